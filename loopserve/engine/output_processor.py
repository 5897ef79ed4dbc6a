"""Front-end side of the engine: detokenizes, applies stop strings, assembles RequestOutputs.

A request with n samples becomes n engine requests "<id>-<i>"; this module folds them back together.
It runs wherever the user-facing code runs: in-process for the offline LLM, in the API process for
the server, so the engine core only ever sees token ids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from loopserve.engine.core import EngineOutput
from loopserve.engine.detokenizer import IncrementalDetokenizer
from loopserve.outputs import CompletionOutput, RequestOutput
from loopserve.sampling_params import Logprob, SampleLogprobs, SamplingParams


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


@dataclass
class SampleDelta:
    """What one sample gained in one step (the streaming unit)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class StreamUpdate:
    output: RequestOutput             # the request's cumulative state after this step
    deltas: list[SampleDelta] = field(default_factory=list)


@dataclass
class _Sample:
    request: _Tracked
    output: CompletionOutput
    detok: IncrementalDetokenizer


@dataclass
class _Tracked:
    result: RequestOutput
    open_samples: int
    engine_ids: list[str]


@dataclass
class ProcessedStep:
    updates: list[StreamUpdate]
    stopped: list[tuple[str, str]]  # (engine request id, stop string): finish these in the engine


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._samples: dict[str, _Sample] = {}
        self._requests: dict[str, _Tracked] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams) -> list[str]:
        """Track a request; returns the engine request ids of its samples."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        result = RequestOutput(request_id, prompt, list(prompt_token_ids), [])
        ids = [child_id(request_id, i) if params.n > 1 else request_id for i in range(params.n)]
        tracked = _Tracked(result, params.n, ids)
        self._requests[request_id] = tracked
        for i, rid in enumerate(ids):
            out = CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
            result.outputs.append(out)
            detok = IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids),
                                           skip_special_tokens=params.skip_special_tokens, stop=params.stop)
            self._samples[rid] = _Sample(tracked, out, detok)
        return ids

    def engine_ids(self, request_id: str) -> list[str]:
        tracked = self._requests.get(request_id)
        return list(tracked.engine_ids) if tracked else []

    def discard(self, request_id: str) -> list[str]:
        """Stop tracking a request; returns the engine ids that were still open (to abort)."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return []
        open_ids = [rid for rid in tracked.engine_ids if rid in self._samples]
        for rid in open_ids:
            del self._samples[rid]
        return open_ids

    @property
    def num_open_requests(self) -> int:
        return len(self._requests)

    def process(self, engine_outputs: list[EngineOutput]) -> ProcessedStep:
        step = ProcessedStep([], [])
        touched: dict[str, StreamUpdate] = {}
        for eo in engine_outputs:
            sample = self._samples.get(eo.request_id)
            if sample is None:
                continue  # aborted by the front end while the engine was stepping
            out, tracked = sample.output, sample.request
            result = tracked.result
            result.num_cached_tokens = max(result.num_cached_tokens, eo.num_cached_tokens)
            text, eo = self._detokenize(sample, eo)
            out.token_ids.extend(eo.new_token_ids)
            new_logprobs = self._add_logprobs(out, eo) if eo.new_logprobs is not None else None
            finish, stop_reason = eo.finish_reason, eo.stop_reason
            if sample.detok.stop_reason is not None:
                if finish is None:
                    step.stopped.append((eo.request_id, sample.detok.stop_reason))
                finish, stop_reason = "stop", sample.detok.stop_reason
            if finish is not None:
                text += sample.detok.flush()
                out.finish_reason, out.stop_reason = finish, stop_reason
                del self._samples[eo.request_id]
                tracked.open_samples -= 1
                if tracked.open_samples == 0:
                    result.finished = True
                    del self._requests[result.request_id]
            out.text += text
            update = touched.setdefault(result.request_id, StreamUpdate(result))
            update.deltas.append(SampleDelta(out.index, text, list(eo.new_token_ids), new_logprobs,
                                             out.finish_reason, out.stop_reason))
        step.updates = list(touched.values())
        return step

    @staticmethod
    def _detokenize(sample: _Sample, eo: EngineOutput) -> tuple[str, EngineOutput]:
        """Text delta of the step's tokens. Several tokens at once (speculative decoding) with stop
        strings go in one by one, and the tokens after the one that completes a stop string are
        dropped, so the output is what one-token steps would have produced."""
        ids = eo.new_token_ids
        if len(ids) == 1 or not sample.detok.has_stop_strings:
            return sample.detok.append(ids), eo
        text = ""
        for n, tok in enumerate(ids, start=1):
            text += sample.detok.append([tok])
            if sample.detok.stop_reason is not None:
                if n < len(ids):
                    eo = dataclasses.replace(eo, new_token_ids=ids[:n], new_logprobs=(
                        eo.new_logprobs[:n] if eo.new_logprobs is not None else None))
                break
        return text, eo

    def _add_logprobs(self, out: CompletionOutput, eo: EngineOutput) -> SampleLogprobs:
        added: SampleLogprobs = []
        for tok in eo.new_logprobs:
            entry: dict[int, Logprob] = {}
            for rank, (tid, lp) in enumerate(tok.top_logprobs or [], start=1):
                entry[tid] = Logprob(lp, rank, self.tokenizer.decode([tid]))
            entry[tok.token_id] = Logprob(tok.logprob, tok.rank, self.tokenizer.decode([tok.token_id]))
            out.logprobs.append(entry)
            out.cumulative_logprob += tok.logprob
            added.append(entry)
        return added

"""Front-end side of the engine: detokenizes, applies stop strings, assembles RequestOutputs.

A request with n samples becomes n engine requests "<id>-<i>"; this module folds them back together.
"""
from __future__ import annotations

from dataclasses import dataclass

from loopserve.engine.core import EngineOutput
from loopserve.engine.detokenizer import IncrementalDetokenizer
from loopserve.outputs import CompletionOutput, RequestOutput
from loopserve.sampling_params import Logprob, SamplingParams


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


@dataclass
class _Sample:
    parent: "_Tracked"
    output: CompletionOutput
    detok: IncrementalDetokenizer
    params: SamplingParams


@dataclass
class _Tracked:
    result: RequestOutput
    open_samples: int


@dataclass
class ProcessedStep:
    updated: list[tuple[RequestOutput, list[tuple[int, str]]]]  # request output + (sample index, text delta)
    stopped: list[tuple[str, str]]  # (engine request id, stop string) to finish in the engine


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._samples: dict[str, _Sample] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams) -> list[str]:
        """Track a request; returns the engine request ids of its samples."""
        result = RequestOutput(request_id, prompt, list(prompt_token_ids), [])
        tracked = _Tracked(result, params.n)
        ids = []
        for i in range(params.n):
            out = CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
            result.outputs.append(out)
            detok = IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids),
                                           skip_special_tokens=params.skip_special_tokens, stop=params.stop)
            rid = child_id(request_id, i) if params.n > 1 else request_id
            self._samples[rid] = _Sample(tracked, out, detok, params)
            ids.append(rid)
        return ids

    def discard(self, engine_request_ids: list[str]) -> None:
        for rid in engine_request_ids:
            self._samples.pop(rid, None)

    def process(self, engine_outputs: list[EngineOutput]) -> ProcessedStep:
        step = ProcessedStep([], [])
        touched: dict[int, tuple[RequestOutput, list[tuple[int, str]]]] = {}
        for eo in engine_outputs:
            sample = self._samples.get(eo.request_id)
            if sample is None:
                continue
            out, result = sample.output, sample.parent.result
            result.num_cached_tokens = max(result.num_cached_tokens, eo.num_cached_tokens)
            out.token_ids.extend(eo.new_token_ids)
            if eo.new_logprobs is not None:
                self._add_logprobs(out, eo)
            delta = sample.detok.append(eo.new_token_ids)
            finish, stop_reason = eo.finish_reason, eo.stop_reason
            if sample.detok.stop_reason is not None and finish is None:
                finish, stop_reason = "stop", sample.detok.stop_reason
                step.stopped.append((eo.request_id, stop_reason))
            elif sample.detok.stop_reason is not None:
                finish, stop_reason = "stop", sample.detok.stop_reason
            if finish is not None:
                delta += sample.detok.flush()
                out.finish_reason, out.stop_reason = finish, stop_reason
                self._samples.pop(eo.request_id)
                sample.parent.open_samples -= 1
                result.finished = sample.parent.open_samples == 0
            out.text += delta
            entry = touched.setdefault(id(result), (result, []))
            entry[1].append((out.index, delta))
        step.updated = list(touched.values())
        return step

    def _add_logprobs(self, out: CompletionOutput, eo: EngineOutput) -> None:
        for tok in eo.new_logprobs:
            entry: dict[int, Logprob] = {}
            for rank, (tid, lp) in enumerate(tok.top_logprobs or [], start=1):
                entry[tid] = Logprob(lp, rank, self.tokenizer.decode([tid]))
            entry[tok.token_id] = Logprob(tok.logprob, tok.rank, self.tokenizer.decode([tok.token_id]))
            out.logprobs.append(entry)
            out.cumulative_logprob += tok.logprob

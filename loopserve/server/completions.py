"""POST /v1/completions: raw prompts (strings or token ids, one or many), with echo and legacy logprobs."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loopserve.outputs import RequestOutput
from loopserve.sampling_params import SampleLogprobs, SamplingParams
from loopserve.server.errors import bad_request, from_value_error
from loopserve.server.protocol import (
    MAX_PROMPTS_PER_REQUEST,
    CompletionRequest,
    new_id,
    now,
    safe_logprob,
    top_entries,
    usage,
)
from loopserve.server.serving import (
    FINGERPRINT,
    SSE_DONE,
    ChunkFormat,
    EventStreamResponse,
    Prompt,
    ServerState,
    final_outputs,
    generation_error,
    sse_error,
    stream_outputs,
    until_disconnect,
)
from loopserve.server.sessions import SessionRef

router = APIRouter()


class LogprobsBuilder:
    """Legacy completions logprobs: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""

    def __init__(self, k: int, offset: int = 0) -> None:
        self.k = k
        self.offset = offset

    def prompt(self, tokenizer, token_ids: list[int]) -> dict:
        """Echoed prompt tokens: text and offsets, no logprobs (null)."""
        out = self._empty()
        for tid in token_ids:
            self._add(out, tokenizer.decode([tid]), None, None)
        return out

    def sample(self, token_ids: list[int], entries: SampleLogprobs, into: dict | None = None) -> dict:
        out = into if into is not None else self._empty()
        for tid, entry in zip(token_ids, entries):
            chosen = entry.get(tid)
            token = (chosen.decoded_token or "") if chosen else ""
            top = {(lp.decoded_token or ""): safe_logprob(lp.logprob) for _, lp in top_entries(entry, self.k)}
            if chosen is not None and self.k > 0:
                top.setdefault(token, safe_logprob(chosen.logprob))
            self._add(out, token, safe_logprob(chosen.logprob) if chosen else None, top if self.k > 0 else None)
        return out

    @staticmethod
    def _empty() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add(self, out: dict, token: str, logprob: float | None, top: dict | None) -> None:
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(token)


def parse_prompts(state: ServerState, body: CompletionRequest) -> list[Prompt]:
    p = body.prompt
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise bad_request("prompt must not be empty", param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if len(items) > MAX_PROMPTS_PER_REQUEST:
        raise bad_request(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(items)}", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt must not be empty", param="prompt")
            prompts.append(Prompt(item, state.encode(item, add_special_tokens=True, param="prompt")))
        else:
            state.check_token_ids(item, "prompt")
            prompts.append(Prompt(None, list(item)))
    return prompts


def _prompt_text(state: ServerState, p: Prompt) -> str:
    return p.text if p.text is not None else state.tokenizer.decode(p.token_ids)


def completion_response(state: ServerState, request_id: str, created: int, prompts: list[Prompt],
                        results: list[RequestOutput], body: CompletionRequest, k: int | None, n: int) -> dict:
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for i, (p, result) in enumerate(zip(prompts, results)):
        prompt_tokens += len(p.token_ids)
        cached += result.num_cached_tokens
        echo_text = _prompt_text(state, p) if body.echo else ""
        for out in result.outputs:
            completion_tokens += len(out.token_ids)
            logprobs = None
            if k is not None:
                builder = LogprobsBuilder(k)
                logprobs = builder.prompt(state.tokenizer, p.token_ids) if body.echo else None
                logprobs = builder.sample(out.token_ids, out.logprobs or [], logprobs)
            choices.append({"index": i * n + out.index, "text": echo_text + out.text, "logprobs": logprobs,
                            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
    return {"id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
            "system_fingerprint": FINGERPRINT, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached)}


async def completion_events(state: ServerState, body: CompletionRequest, prompts: list[Prompt],
                            params: SamplingParams, request_id: str, created: int, k: int | None,
                            session: SessionRef | None = None) -> AsyncIterator[bytes]:
    chunks = ChunkFormat(request_id, "text_completion", created, state.model_name, body.include_usage())
    n = params.n

    builders: dict[int, LogprobsBuilder] = {}
    results: dict[int, RequestOutput] = {}
    async with aclosing(stream_outputs(state.client, prompts, params, request_id, body.cache_salt,
                                       session)) as updates:
        if body.echo:
            for i, p in enumerate(prompts):
                text = _prompt_text(state, p)
                for j in range(n):
                    logprobs = None
                    if k is not None:
                        builders[i * n + j] = LogprobsBuilder(k)
                        logprobs = builders[i * n + j].prompt(state.tokenizer, p.token_ids)
                    yield chunks.choices([{"index": i * n + j, "text": text, "logprobs": logprobs,
                                           "finish_reason": None}])
        try:
            async for i, update in updates:
                results[i] = update.output
                for d in update.deltas:
                    if not (d.text or d.finish_reason or d.logprobs):
                        continue
                    index = i * n + d.index
                    logprobs = None
                    if k is not None:
                        logprobs = builders.setdefault(index, LogprobsBuilder(k)).sample(d.token_ids, d.logprobs or [])
                    choice = {"index": index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason}
                    if d.finish_reason is not None:
                        choice["stop_reason"] = d.stop_reason
                    yield chunks.choices([choice])
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield sse_error(e)
            yield SSE_DONE
            return
    if chunks.include_usage:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(o.token_ids) for r in results.values() for o in r.outputs)
        cached = sum(r.num_cached_tokens for r in results.values())
        yield chunks.usage(prompt_tokens, completion_tokens, cached)
    yield SSE_DONE


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.loopserve
    state.check_engine()
    state.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    k = body.logprobs
    try:
        params = body.sampling_params(body.max_tokens, k)
    except ValueError as e:
        raise from_value_error(e) from None
    prompts = parse_prompts(state, body)
    for p in prompts:
        fitted = state.fit_max_tokens(len(p.token_ids), body.max_tokens, "prompt")
        p.params = params if fitted == params.max_tokens else replace(params, max_tokens=fitted)
    request_id = new_id("cmpl")
    created = now()
    session = state.session(request, body)
    if body.stream:
        return EventStreamResponse(completion_events(state, body, prompts, params, request_id, created, k, session))

    async def work():
        try:
            results = await final_outputs(state.client, prompts, params, request_id, body.cache_salt, session)
        except Exception as e:  # noqa: BLE001
            return generation_error(e).response()
        return JSONResponse(completion_response(state, request_id, created, prompts, results, body, k, params.n))

    return await until_disconnect(request, work())

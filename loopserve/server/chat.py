"""POST /v1/chat/completions: the chat template is applied, then the engine generates the reply."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loopserve.outputs import CompletionOutput, RequestOutput
from loopserve.sampling_params import SampleLogprobs
from loopserve.server.errors import bad_request, from_value_error
from loopserve.server.protocol import (
    ChatCompletionRequest,
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
from loopserve.server.tooling import ChoiceStream, ToolPlan, final_message, plan_tools

router = APIRouter()


def _token_logprob(token: str, logprob: float | None) -> dict:
    return {"token": token, "logprob": safe_logprob(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: SampleLogprobs | None, k: int) -> dict | None:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    if entries is None:
        return None
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid)
        item = _token_logprob((chosen.decoded_token or "") if chosen else "", chosen.logprob if chosen else None)
        item["top_logprobs"] = [_token_logprob(lp.decoded_token or "", lp.logprob) for _, lp in top_entries(entry, k)]
        content.append(item)
    return {"content": content}


def _choice(out: CompletionOutput, k: int | None, plan: ToolPlan, reasoning_parser: str | None) -> dict:
    message, finish_reason = final_message(out.text, out.finish_reason, plan, reasoning_parser)
    return {"index": out.index, "message": message,
            "logprobs": chat_logprobs(out.token_ids, out.logprobs, k or 0) if k is not None else None,
            "finish_reason": finish_reason, "stop_reason": out.stop_reason}


def chat_response(request_id: str, model: str, created: int, result: RequestOutput, k: int | None,
                  plan: ToolPlan, reasoning_parser: str | None) -> dict:
    completion = sum(len(o.token_ids) for o in result.outputs)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [_choice(o, k, plan, reasoning_parser) for o in result.outputs],
            "usage": usage(len(result.prompt_token_ids), completion, result.num_cached_tokens)}


async def chat_events(state: ServerState, body: ChatCompletionRequest, prompt: Prompt, params, request_id: str,
                      created: int, k: int | None, plan: ToolPlan, session: SessionRef | None) -> AsyncIterator[bytes]:
    chunks = ChunkFormat(request_id, "chat.completion.chunk", created, state.model_name, body.include_usage())
    result: RequestOutput | None = None
    streams = [ChoiceStream(plan, state.config.reasoning_parser) for _ in range(params.n)]
    async with aclosing(stream_outputs(state.client, [prompt], params, request_id, body.cache_salt, session)) as updates:
        for i in range(params.n):
            yield chunks.choices([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        try:
            async for _, update in updates:
                result = update.output
                for d in update.deltas:
                    if not (d.text or d.finish_reason or d.logprobs):
                        continue
                    delta = streams[d.index].feed(d.text) if d.text else {}
                    finish_reason = d.finish_reason
                    if finish_reason is not None:
                        tail, finish_reason = streams[d.index].finish(finish_reason)
                        for key, value in tail.items():
                            delta[key] = delta.get(key, type(value)()) + value
                    if not (delta or finish_reason or d.logprobs):
                        continue  # text held back by a parser (a tag still being decided)
                    choice = {"index": d.index, "delta": delta,
                              "logprobs": chat_logprobs(d.token_ids, d.logprobs, k or 0) if k is not None else None,
                              "finish_reason": finish_reason}
                    if finish_reason is not None:
                        choice["stop_reason"] = d.stop_reason
                    yield chunks.choices([choice])
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield sse_error(e)
            yield SSE_DONE
            return
    if session is not None and result is not None:
        state.sessions.finish(session.id, prompt.token_ids, result.outputs[0].token_ids)
    if chunks.include_usage and result is not None:
        completion = sum(len(o.token_ids) for o in result.outputs)
        yield chunks.usage(len(result.prompt_token_ids), completion, result.num_cached_tokens)
    yield SSE_DONE


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.loopserve
    state.check_engine()
    state.check_model(body.model)
    requested = body.requested_max_tokens()
    try:
        k = body.num_logprobs()
        params = body.sampling_params(requested, k)
    except ValueError as e:
        raise from_value_error(e, "top_logprobs") from None
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, state.tool_parser_name)
    if plan.structured is not None:
        if params.structured_outputs is not None:
            raise bad_request(f"{body.structured_params()[1]} cannot be combined with tool_choice "
                              f"{body.tool_choice!r}: the tool call already decides the output",
                              param="tool_choice")
        params.structured_outputs = plan.structured
    text, ids = state.render_chat(body.messages, body.add_generation_prompt is not False,
                                  body.chat_template_kwargs, plan)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params.max_tokens = state.fit_max_tokens(len(ids), requested, "messages", max_param)
    prompt = Prompt(text, ids)
    session = state.session(request, body)
    if session is not None:
        state.sessions.check(session.id, ids, state.tokenizer.decode)
    request_id = new_id("chatcmpl")
    created = now()
    if body.stream:
        return EventStreamResponse(chat_events(state, body, prompt, params, request_id, created, k, plan, session))

    async def work():
        try:
            [result] = await final_outputs(state.client, [prompt], params, request_id, body.cache_salt, session)
        except Exception as e:  # noqa: BLE001
            return generation_error(e).response()
        if session is not None:
            state.sessions.finish(session.id, ids, result.outputs[0].token_ids)
        return JSONResponse(chat_response(request_id, state.model_name, created, result, k, plan,
                                          state.config.reasoning_parser))

    return await until_disconnect(request, work())

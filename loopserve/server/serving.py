"""What the endpoints share: the server state, prompt checks, generation fan-out, SSE and disconnects."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from loopserve.config import ServerConfig
from loopserve.engine.client import AsyncEngineClient, EngineDeadError
from loopserve.engine.output_processor import StreamUpdate
from loopserve.model.prompt_encoder import PromptEncoder
from loopserve.outputs import RequestOutput
from loopserve.sampling_params import SamplingParams
from loopserve.server.errors import APIError, bad_request, error_body
from loopserve.server.protocol import ChatMessage, usage
from loopserve.server.sessions import SessionRef, SessionTracker, session_ref
from loopserve.server.tooling import ToolPlan, render_conversation
from loopserve.tools import detect_parser, get_parser, template_renders_tools

log = logging.getLogger("loopserve.server")

# chat_template_kwargs may not override what the server itself passes to apply_chat_template.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "add_generation_prompt", "chat_template", "tools",
                             "documents", "return_dict", "return_tensors", "return_assistant_tokens_mask",
                             "padding", "truncation", "max_length", "continue_final_message", "tokenizer_kwargs"}


@dataclass
class ServerState:
    client: AsyncEngineClient
    config: ServerConfig
    model_name: str
    metrics: Any = None
    draining: bool = False
    admitted: int = 0  # requests inside a generation endpoint right now (admission control)
    sessions: SessionTracker = field(default_factory=SessionTracker)
    _max_token_chars: int | None = None
    _prompt_encoder: PromptEncoder | None = None
    _tokenizer_fits_vocab: bool | None = None

    def session(self, request, body) -> SessionRef | None:
        """The request's agent session and retention hint (400 when the hint is bad)."""
        from loopserve.server.errors import bad_request
        try:
            return session_ref(request.headers, body.user, body.session_retention, self.config.session_retention_s)
        except ValueError as e:
            raise bad_request(str(e), param="session_retention") from None

    # ---- engine facts ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    def warm_up(self) -> None:
        """What the first prompt would otherwise pay for: the segment encoder's probe, the longest
        token's length (a walk over the vocabulary), the template's tools check."""
        if self.tokenizer is None:
            return
        _ = self.prompt_encoder
        self._chars_bound()
        self.tokenizer_fits_vocab()
        template_renders_tools(self.chat_template)

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """Prompt text to ids, reusing earlier prompts' segments (built at start-up, or on first use)."""
        if self._prompt_encoder is None or self._prompt_encoder.tokenizer is not self.tokenizer:
            self._prompt_encoder = PromptEncoder(self.tokenizer, self.config.prompt_segment_cache_tokens)
        return self._prompt_encoder

    @property
    def vocab_size(self) -> int:
        return self.client.ready.model_config.vocab_size

    @property
    def admission_limit(self) -> int:
        return self.client.config.scheduler.max_num_seqs + self.config.max_waiting_requests

    def check_engine(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if not self.client.healthy:
            raise APIError(503, f"the engine is not running: {self.client.dead or 'process exited'}",
                           code="engine_unavailable")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    # ---- prompts -----------------------------------------------------------------------------
    def _chars_bound(self) -> int:
        """An upper bound on the characters one token can cover (to refuse huge texts before tokenizing)."""
        if self._max_token_chars is None:
            try:
                longest = max((len(t) for t in self.tokenizer.get_vocab()), default=16)
            except Exception:  # noqa: BLE001
                longest = 64
            self._max_token_chars = max(16, 4 * longest)
        return self._max_token_chars

    def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        limit = self.max_model_len * self._chars_bound()
        if len(text) > limit:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"request has at least {len(text) // self._chars_bound()} input tokens "
                              f"({len(text)} characters). Please reduce the length of the input.",
                              param=param, code="context_length_exceeded")
        try:
            encoder = self.prompt_encoder
            reused, encoded = encoder.stats.reused_tokens, encoder.stats.encoded_tokens
            ids = encoder.encode(text, add_special_tokens)
            if self.metrics is not None:
                self.metrics.prompt_text_tokens.labels(source="segment_cache").inc(encoder.stats.reused_tokens - reused)
                self.metrics.prompt_text_tokens.labels(source="tokenizer").inc(encoder.stats.encoded_tokens - encoded)
        except BaseException as e:  # noqa: BLE001 - what the text makes the tokenizer raise, its Rust panics too
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise bad_request(f"cannot tokenize the {param}: {e}", param=param) from None
        if not self.tokenizer_fits_vocab():
            self.check_token_ids(ids, param)
        return ids

    def tokenizer_fits_vocab(self) -> bool:
        """Whether every id the tokenizer can produce (added tokens too) is inside the model's vocabulary,
        so its output needs no check (known once, at start-up). Every prompt handed to the engine is
        then checked here, and the engine is told so (stream_outputs)."""
        if self._tokenizer_fits_vocab is None:
            try:
                top = max(self.tokenizer.get_vocab().values(), default=-1)
            except Exception:  # noqa: BLE001 - a tokenizer that cannot list its vocabulary: check every prompt
                top = None
            self._tokenizer_fits_vocab = top is not None and top < self.vocab_size
        return self._tokenizer_fits_vocab

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def tool_parser_name(self) -> str:
        return self.config.tool_call_parser or detect_parser(self.chat_template)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None, plan: ToolPlan | None = None) -> tuple[str, list[int]]:
        if not messages:
            raise bad_request("messages must be a non-empty list", param="messages")
        if not self.chat_template:
            raise bad_request("this model has no chat template; use /v1/completions", param="messages")
        conversation, tools = render_conversation(messages, plan or ToolPlan("none"),
                                                  get_parser(self.tool_parser_name),
                                                  template_renders_tools(self.chat_template))
        kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        if tools:
            kwargs["tools"] = tools
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # noqa: BLE001 - template errors (role order, missing fields) are the input's
            raise bad_request(f"cannot apply the chat template to these messages: {e}", param="messages") from None
        if not isinstance(text, str):
            raise bad_request("the chat template did not produce text", param="messages")
        # The template writes any BOS it wants; the tokenizer must not add another.
        return text, self.encode(text, add_special_tokens=False, param="messages")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    def fit_max_tokens(self, num_prompt_tokens: int, requested: int | None, param: str,
                       max_tokens_param: str = "max_tokens") -> int | None:
        """Check the prompt against the context window; returns the max_tokens to use.

        Like vLLM: a prompt that fills the window, or prompt + max_tokens beyond it, is a 400 whose
        message names both the lengths and the window. No max_tokens: up to the end of the window.
        """
        limit = self.max_model_len
        if num_prompt_tokens == 0:
            raise bad_request("the prompt is empty", param=param)
        if num_prompt_tokens >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your request has "
                              f"{num_prompt_tokens} input tokens (at least one token must be left for the output). "
                              "Please reduce the length of the input.", param=param, code="context_length_exceeded")
        if requested is None:
            return limit - num_prompt_tokens
        if isinstance(requested, int) and requested >= 1 and num_prompt_tokens + requested > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the input, {requested} "
                              f"for the completion). Please reduce the length of the input or the completion.",
                              param=max_tokens_param, code="context_length_exceeded")
        return requested


# ---- generation ------------------------------------------------------------------------------

@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams | None = None  # this prompt's own params (its max_tokens); else the request's


async def stream_outputs(client: AsyncEngineClient, prompts: list[Prompt], params: SamplingParams,
                         request_id: str, cache_salt: str | None = None, session: SessionRef | None = None
                         ) -> AsyncIterator[tuple[int, StreamUpdate]]:
    """(prompt index, update) for every engine step of every prompt, until all are finished. Every
    prompt's ids are in the vocabulary: a tokenizer's that fits it, or checked (ServerState.encode,
    check_token_ids), so the engine does not walk them again.

    Closing this iterator (or cancelling its consumer) closes every engine stream, which aborts
    the unfinished requests in the engine and frees their KV blocks.
    """
    sess = {"session_id": session.id, "retention_s": session.retention_s} if session is not None else {}
    if len(prompts) == 1:
        p = prompts[0]
        async with aclosing(client.generate(p.token_ids, p.params or params, request_id=request_id, prompt=p.text,
                                            cache_salt=cache_salt, ids_checked=True, **sess)) as gen:
            async for update in gen:
                yield 0, update
        return

    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, p: Prompt) -> None:
        try:
            async with aclosing(client.generate(p.token_ids, p.params or params, request_id=f"{request_id}-{i}",
                                                prompt=p.text, cache_salt=cache_salt, ids_checked=True,
                                                **sess)) as gen:
                async for update in gen:
                    queue.put_nowait((i, update))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(client: AsyncEngineClient, prompts: list[Prompt], params: SamplingParams, request_id: str,
                        cache_salt: str | None = None, session: SessionRef | None = None) -> list[RequestOutput]:
    """Each prompt's final output, in prompt order (a response that does not stream)."""
    results: dict[int, RequestOutput] = {}
    async with aclosing(stream_outputs(client, prompts, params, request_id, cache_salt, session)) as updates:
        async for i, update in updates:
            results[i] = update.output
    return [results[i] for i in range(len(prompts))]


def generation_error(e: Exception) -> APIError:
    """Map what the engine client raises while generating to an API error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running: {e}", code="engine_unavailable")
    if isinstance(e, ValueError):  # the engine refused the request (RequestFailed)
        return bad_request(str(e))
    log.exception("unexpected error while generating", exc_info=e)
    return APIError(500, f"internal error: {e.__class__.__name__}")


# ---- SSE and disconnects -----------------------------------------------------------------------

FINGERPRINT = "loopserve"


@dataclass(frozen=True)
class ChunkFormat:
    """The chunks of one streamed response, each naming it (id, object, created, model)."""
    request_id: str
    obj: str
    created: int
    model: str
    include_usage: bool  # stream_options.include_usage: every chunk has a usage field, the last one's set

    def _head(self, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": self.obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT, "choices": choices}

    def choices(self, choices: list[dict]) -> bytes:
        body = self._head(choices)
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        """The final include_usage chunk: no choices, just usage."""
        return sse({**self._head([]), "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})


def sse(obj: Any) -> bytes:
    """One server-sent event. Text that is not valid Unicode (lone surrogates) goes out escaped."""
    try:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode("utf-8")
    except UnicodeEncodeError:
        return f"data: {json.dumps(obj, ensure_ascii=True, separators=(',', ':'))}\n\n".encode("ascii")


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(e: Exception) -> bytes:
    err = generation_error(e)
    return sse(error_body(err.message, err.type, err.param, err.code))


class EventStreamResponse(StreamingResponse):
    """An SSE response that notices the client leaving and then closes its body at once.

    Starlette cancels the streaming task through an anyio cancel scope, whose cancellation repeats at
    every await: the cleanup of an aborted generation (an await that tells the engine) could be cut
    short. Here the stream runs in a plain asyncio task, cancelled once, and the body iterator is
    always closed, so the engine request is aborted and its KV blocks freed.
    """

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        listen = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, listen):
                if not task.done():
                    task.cancel()
            results = await asyncio.gather(stream, listen, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        err = results[0]
        if isinstance(err, Exception) and not isinstance(err, OSError):
            log.error("streaming response failed", exc_info=err)


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler's work, cancelling it (and so aborting its engine requests) if the
    client disconnects first. The request body must already have been read."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return task.result()


"""Request bodies of the OpenAI-compatible API (pydantic, strict types) and small response helpers.

Types are strict: ``"temperature": "0.5"`` or ``"n": 1.5`` is a 400, not silently coerced. Value
ranges are checked by SamplingParams (its ValueErrors name the field). Unknown fields are ignored.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loopserve.sampling_params import Logprob, SamplingParams
from loopserve.structured import StructuredOutputsParams

# Seeds go to torch.Generator.manual_seed (64-bit); sample i of n uses seed + i.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1 - 128
MAX_PROMPTS_PER_REQUEST = 256
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template(self, index: int = 0) -> dict[str, Any]:
        """The message as the chat template sees it: content flattened to one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    from loopserve.server.errors import bad_request
                    raise bad_request(f"content part type {part.type!r} is not supported (only 'text' parts)",
                                      param=f"messages[{index}].content[{i}].type")
                texts.append(part.text)
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": self.role, "content": content if content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                msg[key] = value
        return msg


class _SamplingRequest(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""
    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    # Agent sessions (loopserve extension): seconds to keep this turn's KV pinned after it finishes, for
    # the session named by the X-Session-Id header or `user`. Also accepted as the X-Session-Retention header.
    session_retention: float | None = None
    # Constrained decoding: OpenAI's response_format, and vLLM's extensions (structured_outputs and
    # the older guided_* fields), so clients written for either carry over.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def structured_params(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The output constraint the request asks for, and the field it came from (for errors).
        Raises ValueError (message starts with the field) when it is malformed or more than one is given."""
        asked: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                asked.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise ValueError("response_format must have json_schema: {name, schema, strict} with schema "
                                     "an object")
                # A missing schema means any JSON object (OpenAI requires one; be lenient like vLLM).
                asked.append(("response_format", {"json": spec.get("schema") or {"type": "object"}}))
            elif kind != "text":
                raise ValueError(f"response_format must have type 'text', 'json_object' or 'json_schema', "
                                 f"got {kind!r}")
        if self.structured_outputs is not None:
            fields = {k: v for k, v in self.structured_outputs.items() if v is not None and v is not False}
            asked.append(("structured_outputs", fields))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                asked.append((name, {key: value}))
        if not asked:
            return None, None
        if len(asked) > 1:
            raise ValueError(f"{asked[0][0]} must be the only output constraint, but "
                             f"{', '.join(a for a, _ in asked[1:])} was given too")
        field, kwargs = asked[0]
        try:
            params = StructuredOutputsParams(**kwargs)
            params.validate()
        except TypeError as e:
            raise ValueError(f"{field} has an unknown key: {e}") from None
        except ValueError as e:
            raise ValueError(f"{field} is invalid: {e}") from None
        return params, field

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Build (and so validate) the SamplingParams; raises ValueError naming the field."""
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")

        def pick(value, default):
            return default if value is None else value

        return SamplingParams(
            n=pick(self.n, 1), temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, -1), min_p=pick(self.min_p, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            presence_penalty=pick(self.presence_penalty, 0.0), frequency_penalty=pick(self.frequency_penalty, 0.0),
            seed=self.seed, max_tokens=max_tokens, min_tokens=pick(self.min_tokens, 0), stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=bool(self.ignore_eos), logprobs=logprobs,
            skip_special_tokens=pick(self.skip_special_tokens, True),
            structured_outputs=self.structured_params()[0])


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.logprobs:
            return self.top_logprobs or 0
        if self.top_logprobs:
            raise ValueError("top_logprobs must be used with logprobs: true, got "
                             f"top_logprobs={self.top_logprobs} without it")
        return None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest, ChatMessage,
                  ContentPart, StreamOptions)


def known_fields() -> set[str]:
    names: set[str] = set()
    for m in REQUEST_MODELS:
        names.update(m.model_fields)
    return names


# ---- response helpers ----------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def safe_logprob(x: float | None) -> float | None:
    if x is None or math.isnan(x):
        return None
    return max(x, LOGPROB_FLOOR)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def top_entries(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The top-k alternatives of one position, best first (the sampled token is in it only if in the top k)."""
    if k <= 0:
        return []
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
    return ranked[:k]

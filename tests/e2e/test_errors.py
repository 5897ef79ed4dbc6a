"""Bad inputs get OpenAI-style 4xx errors (never a 500 or a hang), and the server stays healthy."""
from __future__ import annotations

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def post(server, path, body=None, *, content=None, headers=None, timeout=30):
    h = dict(server.headers) if headers is None else headers
    if content is not None:
        h.setdefault("Content-Type", "application/json")
        return httpx.post(server.base_url + path, content=content, headers=h, timeout=timeout)
    return httpx.post(server.base_url + path, json=body, headers=h, timeout=timeout)


def assert_error(r: httpx.Response, status: int, param: str | None = "ANY") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "ANY":
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("content", [b"{", b"{'a': 1}", b"not json", b"", b"[1, 2]", b"null", b"\xff\xfe"])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/tokenize", "/detokenize"])
def test_malformed_body(server, path, content):
    assert_error(post(server, path, content=content), 400)


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    (CHAT, {"messages": MSG, "stream": "yes"}, "stream"),
    (CHAT, {"messages": MSG, "n": "2"}, "n"),
    (CHAT, {"messages": MSG, "stop": 5}, "stop"),
    (CHAT, {"messages": MSG, "logprobs": 3}, "logprobs"),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    (CHAT, {}, "messages"),
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "seed": "1"}, "seed"),
    (COMPLETIONS, {"prompt": "x", "echo": "no"}, "echo"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens[0]"),
])
def test_wrong_types(server, path, body, param):
    assert_error(post(server, path, body), 400, param)


@pytest.mark.parametrize("extra,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"top_k": -7}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": 2 ** 70}, "seed"),
    ({"logprobs": True, "top_logprobs": 50}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_out_of_range_chat(server, extra, param):
    assert_error(post(server, CHAT, {"messages": MSG, **extra}), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_out_of_range_completions(server, body, param):
    assert_error(post(server, COMPLETIONS, body), 400, param)


def test_nan_and_infinity_rejected(server):
    for value in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"prompt": "x", "temperature": ' + value + b"}"
        assert_error(post(server, COMPLETIONS, content=body), 400, "temperature")


def test_empty_messages_and_unsupported_parts(server):
    assert_error(post(server, CHAT, {"messages": []}), 400, "messages")
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_error(post(server, CHAT, body), 400, "messages[0].content[0].type")
    parts = [{"type": "text", "text": "The quick"}, {"type": "text", "text": "brown fox"}]
    r = post(server, CHAT, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_prompt_over_the_context_window(server):
    window = 1024
    ids = [5] * 1500
    err = assert_error(post(server, COMPLETIONS, {"prompt": ids}), 400, "prompt")
    assert "1500" in err["message"] and str(window) in err["message"]
    assert err["code"] == "context_length_exceeded"
    # prompt + max_tokens beyond the window
    err = assert_error(post(server, COMPLETIONS, {"prompt": [5] * 1000, "max_tokens": 100}), 400, "max_tokens")
    assert "1000" in err["message"] and str(window) in err["message"]
    # the same via chat, with text
    err = assert_error(post(server, CHAT, {"messages": [{"role": "user", "content": "fox " * 2000}]}), 400)
    assert str(window) in err["message"]
    # a huge text is refused before tokenizing it
    err = assert_error(post(server, COMPLETIONS, {"prompt": "a" * 2_000_000}), 400, "prompt")
    assert str(window) in err["message"]


def test_unknown_model_is_404(server):
    err = assert_error(post(server, CHAT, {"model": "gpt-4", "messages": MSG}), 404, "model")
    assert "gpt-4" in err["message"]
    assert_error(post(server, COMPLETIONS, {"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(httpx.get(server.base_url + "/v1/models/nope", headers=server.headers), 404)
    # omitting the model is fine
    assert post(server, COMPLETIONS, {"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"},
                                     {"Authorization": "Basic test-key"}])
@pytest.mark.parametrize("method,path", [("POST", CHAT), ("POST", COMPLETIONS), ("GET", "/v1/models"),
                                         ("POST", "/tokenize"), ("POST", "/detokenize")])
def test_auth(server, headers, method, path):
    r = httpx.request(method, server.base_url + path, headers=headers, json={"messages": MSG, "prompt": "x"})
    err = assert_error(r, 401)
    assert err["code"] == "invalid_api_key"


def test_open_endpoints_need_no_key(server):
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(server.base_url + path).status_code == 200


def test_unknown_route_is_404_openai_style(server):
    err = assert_error(httpx.get(server.base_url + "/v1/nothing", headers=server.headers), 404)
    assert "/v1/nothing" in err["message"]
    assert_error(httpx.get(server.base_url + "/nothing"), 404)
    assert_error(httpx.get(server.base_url + CHAT, headers=server.headers), 405)


def test_still_healthy_after_bad_inputs(server):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    r = server.openai().chat.completions.create(model=server.model, messages=MSG, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    m = server.metrics()
    assert m["loopserve:num_requests_running"] == 0


def test_invalid_unicode_never_breaks_a_response(server):
    # JSON escapes can smuggle lone surrogates into strings: no 500 anywhere
    body = b'{"model": "\\ud800", "prompt": "x"}'
    err = assert_error(post(server, COMPLETIONS, content=body), 404, "model")
    assert "\ud800" in err["message"]
    assert_error(post(server, COMPLETIONS, content=b'{"prompt": "a\\ud800b"}'), 400, "prompt")
    assert_error(post(server, CHAT, content=b'{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400)
    r = post(server, COMPLETIONS, content=b'{"prompt": "x", "max_tokens": 2, "stop": ["\\ud800"], "stream": true}')
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_body_is_json_whatever_the_content_type(server):
    # `curl -d '{...}'` sends application/x-www-form-urlencoded
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):
        r = post(server, COMPLETIONS, content=b'{"prompt": "hi", "max_tokens": 1}',
                 headers={**server.headers, "Content-Type": ctype})
        assert r.status_code == 200, r.text

"""Admission control (429) and the SIGTERM drain, on a server of their own (one running request max)."""
from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from .conftest import start_server


@pytest.fixture(scope="module")
def limited(tiny_llama, tmp_path_factory):
    srv = start_server(str(tiny_llama), tmp_path_factory.mktemp("limited") / "server.log",
                       "--max-num-seqs", "1", "--max-waiting-requests", "0", "--drain-timeout", "60")
    yield srv
    srv.process.kill()  # the drain test normally stopped it already


def _long_stream(client: httpx.Client, srv, max_tokens: int):
    return client.stream("POST", srv.base_url + "/v1/completions", headers=srv.headers,
                         json={"model": srv.model, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True,
                               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})


def test_admission_full_gives_429(limited):
    body = {"model": limited.model, "prompt": "x", "max_tokens": 2}
    with httpx.Client(timeout=60) as c:
        with _long_stream(c, limited, 900) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            busy = httpx.post(limited.base_url + "/v1/completions", json=body, headers=limited.headers, timeout=30)
            assert busy.status_code == 429, busy.text
            assert int(busy.headers["Retry-After"]) >= 1
            err = busy.json()["error"]
            assert err["code"] == "rate_limit_exceeded" and err["message"]
            busy = httpx.post(limited.base_url + "/v1/chat/completions", headers=limited.headers, timeout=30,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert busy.status_code == 429
            # non-generation endpoints are not subject to admission
            assert httpx.get(limited.base_url + "/health").status_code == 200
    # the slot frees once the stream is gone
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(limited.base_url + "/v1/completions", json=body, headers=limited.headers, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_sigterm_drains_in_flight_stream_then_exits_0(limited):
    n_tokens = 120
    texts, usage, finish, done = [], None, None, False
    with httpx.Client(timeout=60) as c:
        with _long_stream(c, limited, n_tokens) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[5:])
                if chunk["choices"]:
                    texts.append(chunk["choices"][0]["text"])
                    finish = chunk["choices"][0]["finish_reason"] or finish
                else:
                    usage = chunk["usage"]
                if len(texts) == 2:
                    limited.process.proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    # new work is refused while draining: connection refused, or 503 on a live connection
                    try:
                        h = httpx.get(limited.base_url + "/health", timeout=5)
                        assert h.status_code == 503
                    except httpx.TransportError:
                        pass
    assert done and finish == "length", (done, finish, len(texts), limited.process.log()[-3000:])
    assert usage is not None and usage["completion_tokens"] == n_tokens
    assert limited.process.terminate(timeout=60) == 0, limited.process.log()[-4000:]

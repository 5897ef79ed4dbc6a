"""A server with overlap scheduling on (the CUDA default, forced here on CPU): the engine process
loop keeps one step in flight, and the API sees the same outputs as the synchronous server."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from .conftest import start_server
from tests.e2e.server_proc import pool_whole

from .test_openai_api import _wait_idle


@pytest.fixture(scope="module")
def overlapped(tiny_llama, tmp_path_factory):
    srv = start_server(str(tiny_llama), tmp_path_factory.mktemp("overlap") / "server.log", "--overlap-scheduling")
    yield srv
    code = srv.process.terminate()
    assert code == 0, f"server exited with {code}:\n{srv.process.log()[-4000:]}"


def _completions(srv, prompts: list[str], **kw) -> list[tuple]:
    async def one(client, prompt):
        r = await client.completions.create(model=srv.model, prompt=prompt, **kw)
        return [(c.text, c.finish_reason) for c in r.choices]

    async def main():
        client = srv.async_openai()
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()

    return asyncio.run(main())


def test_concurrent_outputs_equal_the_synchronous_server(server, overlapped):
    prompts = [f"request {i}: " + "word " * (i % 7) for i in range(12)]
    for kw in (dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True}),
               dict(max_tokens=10, temperature=0.8, seed=7, n=2, extra_body={"ignore_eos": True}),
               dict(max_tokens=16, temperature=0, stop=["e"])):
        assert _completions(overlapped, prompts, **kw) == _completions(server, prompts, **kw)


def _streamed_text(client: httpx.Client, srv, body: dict) -> tuple[str, str | None]:
    text, finish = "", None
    with client.stream("POST", srv.base_url + "/v1/completions", headers=srv.headers, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                choice = json.loads(line[5:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return text, finish


def test_streams_and_disconnects_leave_nothing_behind(server, overlapped):
    body = {"model": overlapped.model, "prompt": "hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as c:
        assert _streamed_text(c, overlapped, body) == _streamed_text(c, server, body)
        with c.stream("POST", overlapped.base_url + "/v1/completions", headers=overlapped.headers,
                      json={**body, "max_tokens": 900}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 6:
                    break  # disconnect while its steps are in flight
    m = _wait_idle(overlapped, timeout=10)
    assert m["loopserve:num_requests_running"] == 0 and pool_whole(m)
    assert "overlap scheduling on" in overlapped.process.log()
    assert "overlap scheduling off" in server.process.log()

"""End-to-end fixtures: real `loopserve serve` subprocesses on free ports.

`server` (session): the tiny random Llama from tests/conftest.py, with an API key. Other modules
start their own servers with `ServerProcess` (e.g. small admission limits, SIGTERM tests).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
TINY_NAME = "tiny"
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `loopserve serve` subprocess; logs go to a file that is printed if startup fails."""

    def __init__(self, model: str, log_path: Path, *extra: str, api_key: str | None = API_KEY,
                 served_model_name: str | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        args = [sys.executable, "-m", "loopserve.cli", "serve", "--model", model, "--port", str(self.port),
                "--kv-cache-bytes", "64M", "--no-access-log", *extra]
        if api_key:
            args += ["--api-key", api_key]
        if served_model_name:
            args += ["--served-model-name", served_model_name]
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LOOPSERVE_API_KEY", None)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (kills it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Server:
    base_url: str
    api_key: str | None
    model: str
    process: ServerProcess

    @property
    def headers(self) -> dict[str, str]:
        return self.process.headers

    def openai(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def async_openai(self, **kw):
        import openai
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  **kw)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.base_url + "/metrics", timeout=10).text)


_METRIC_LINE = re.compile(r"^(loopserve:[A-Za-z_:]+(?:\{[^}]*\})?) ([-+0-9.eEinfINFaN]+)$", re.M)


def parse_metrics(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in _METRIC_LINE.findall(text)}


def start_server(model: str, log_path: Path, *extra: str, served_model_name: str | None = TINY_NAME,
                 api_key: str | None = API_KEY) -> Server:
    proc = ServerProcess(model, log_path, *extra, api_key=api_key, served_model_name=served_model_name)
    try:
        proc.wait_ready()
    except BaseException:
        proc.kill()
        raise
    return Server(proc.base_url, api_key, served_model_name or model, proc)


@pytest.fixture(scope="session")
def server(tiny_llama, tmp_path_factory):
    srv = start_server(str(tiny_llama), tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    code = srv.process.terminate()
    assert code == 0, f"server exited with {code}:\n{srv.process.log()[-4000:]}"

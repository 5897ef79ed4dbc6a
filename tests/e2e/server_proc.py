"""Start a real `loopserve serve` subprocess for end-to-end tests, and read its /metrics.

Used by the browser playground test and the schema fuzz test; both need a live server on a real port.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=kw.pop("timeout", 30), **kw)

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {metric name (labels dropped): value summed over label sets}."""
        r = httpx.get(self.base_url + "/metrics", headers=self.headers, timeout=10)
        r.raise_for_status()
        return parse_metrics(r.text)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the server's own process group (it started in a new session)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        # The engine runs in a child process: make sure nothing from this group outlives the test.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


_METRIC_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> [(name, labels, value)]."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """{metric name: value summed over its label sets}."""
    out: dict[str, float] = {}
    for name, _, value in metric_samples(text):
        out[name] = out.get(name, 0.0) + value
    return out


def _name_matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith(":" + suffix) or name.endswith("_" + suffix)


def metric(metrics: dict[str, float], suffix: str) -> float | None:
    """The value of the metric whose name ends with `suffix` (e.g. 'num_requests_running'), or None."""
    hits = [v for k, v in metrics.items() if _name_matches(k, suffix)]
    return hits[0] if len(hits) == 1 else None if not hits else _ambiguous(suffix, metrics)


def _ambiguous(suffix: str, metrics: dict[str, float]):
    raise AssertionError(f"several metrics end with {suffix!r}: {[k for k in metrics if k.endswith(suffix)]}")


def start_server(model_dir: Path, log_dir: Path, *, max_model_len: int = 512, api_key: str | None = None,
                 device: str = "cpu", extra_args: list[str] | None = None,
                 startup_timeout: float = 240.0) -> ServerProc:
    """`loopserve serve` on a free port (CPU by default: a tiny model, and steady timings for the tests)."""
    port = free_port()
    cmd = [sys.executable, "-m", "loopserve.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
           "--kv-cache-bytes", "64M", "--device", device]
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += extra_args or []
    log_path = log_dir / f"server-{port}.log"
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("LOOPSERVE_API_KEY", None)  # the key, if any, is the one passed here
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)
    server = ServerProc(proc, f"http://127.0.0.1:{port}", log_path, api_key,
                        {"Authorization": f"Bearer {api_key}"} if api_key else {})
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy:\n"
                               f"$ {' '.join(cmd)}\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not healthy after {startup_timeout:.0f}s:\n$ {' '.join(cmd)}\n"
                               f"{server.log_tail()}")
        time.sleep(0.5)


def pool_whole(m: dict[str, float]) -> bool:
    """Every KV block is free or pinned by a retained agent session (nothing held by a request)."""
    free, total = metric(m, "kv_cache_free_blocks"), metric(m, "kv_cache_total_blocks")
    pinned = metric(m, "session_pinned_blocks") or 0
    return free is not None and total is not None and total > 0 and free + pinned == total


def wait_idle(server: ServerProc, timeout: float = 15.0, need_blocks: bool = False) -> dict[str, float]:
    """Poll /metrics until no request runs or waits (and, with need_blocks, every KV block is free).

    Returns the last metrics; raises AssertionError with them if the server never went idle.
    """
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while True:
        last = server.metrics()
        running = metric(last, "num_requests_running")
        waiting = metric(last, "num_requests_waiting")
        ok = running == 0 and (waiting in (None, 0))
        if need_blocks:
            ok = ok and pool_whole(last)
        if ok:
            return last
        if time.monotonic() > deadline:
            shown = {k: v for k, v in last.items() if "request" in k or "kv_cache" in k or "block" in k}
            raise AssertionError(f"server not idle after {timeout:.0f}s: {shown}")
        time.sleep(0.25)

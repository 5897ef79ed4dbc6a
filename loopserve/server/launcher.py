"""Run the server: engine client + app + uvicorn, with a graceful SIGTERM drain that exits 0.

On SIGTERM/SIGINT uvicorn stops listening and waits (at most drain_timeout_s) for in-flight
requests; meanwhile anything new on an open connection gets 503 and /health reports draining.
Then the lifespan shuts the engine down and run_server returns 0.
"""
from __future__ import annotations

import logging
import sys

import uvicorn

from loopserve.config import EngineConfig, ServerConfig
from loopserve.engine.client import AsyncEngineClient
from loopserve.server.app import build_app
from loopserve.server.metrics import ServerMetrics
from loopserve.server.serving import ServerState

log = logging.getLogger("loopserve.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.loopserve_state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("signal %d: draining (in-flight requests get up to %.0fs), then shutting down", sig,
                     self.loopserve_state.config.drain_timeout_s)
        self.loopserve_state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises the captured signal once it has shut down (so the process dies of it);
        # a drained, orderly shutdown should exit 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    def _log_started_message(self, listeners) -> None:
        super()._log_started_message(listeners)
        host = self.config.host or "0.0.0.0"
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        port = self.config.port or listeners[0].getsockname()[1]
        url = f"http://{shown}:{port}/"
        print(f"loopserve: serving `{self.loopserve_state.model_name}`; web playground at {url} "
              f"(OpenAI API at {url}v1)", flush=True)


def run_server(engine_config: EngineConfig, server_config: ServerConfig, *, log_level: str = "info",
               access_log: bool = True) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful shutdown (exits 3 if startup fails)."""
    level = getattr(logging, log_level.upper(), logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    metrics = ServerMetrics()
    client = AsyncEngineClient(engine_config, observer=metrics)
    app = build_app(client, server_config, server_config.served_model_name or engine_config.model, metrics,
                    freeze_heap=True)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level=log_level,
                            access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=max(0.0, float(server_config.drain_timeout_s)))
    server = _Server(config, app.state.loopserve)
    server.run()
    return 0

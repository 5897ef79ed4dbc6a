"""The FastAPI app: lifespan (engine start/stop), auth/admission/drain gate, and the small endpoints.

    app = build_app(client, server_config, served_model_name)

The app owns the client's lifecycle: its lifespan starts the engine (if not started yet) and shuts
it down. Chat and completions live in chat.py / completions.py.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import signal
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from loopserve.config import ServerConfig
from loopserve.engine.client import AsyncEngineClient
from loopserve.engine.process import freeze_startup_heap
from loopserve.server import chat, completions
from loopserve.server.errors import APIError, bad_request, install_error_handlers
from loopserve.server.metrics import CONTENT_TYPE, ServerMetrics
from loopserve.server.protocol import DetokenizeRequest, TokenizeRequest, known_fields, now
from loopserve.server.sessions import SessionTracker
from loopserve.server.serving import ServerState

log = logging.getLogger("loopserve.server")

STATIC_DIR = Path(__file__).parent / "static"
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
RETRY_AFTER_S = 1
WATCHDOG_PERIOD_S = 0.5

FALLBACK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loopserve</title></head>
<body><h1>loopserve</h1><p>Serving <code>{model}</code>. OpenAI-compatible API under <code>/v1</code>:
<code>POST /v1/chat/completions</code>, <code>POST /v1/completions</code>, <code>GET /v1/models</code>.
Also <code>/health</code>, <code>/metrics</code>, <code>/tokenize</code>, <code>/detokenize</code>.</p></body></html>"""


def _json_error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Response:
    return APIError(status, message, code=code, headers=headers).response()


class GateMiddleware:
    """Pure ASGI (streams pass straight through): draining 503, bearer auth 401, admission 429."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope.get("path", "")
        if state.draining and path != "/metrics":
            if path == "/health":
                return await JSONResponse({"status": "draining"}, status_code=503)(scope, receive, send)
            return await _json_error(503, "the server is shutting down", "server_shutting_down")(scope, receive, send)
        key = state.config.api_key
        if key and path.startswith(PROTECTED_PREFIXES) and not _authorized(scope, key):
            resp = _json_error(401, "invalid or missing API key (send it as 'Authorization: Bearer <key>')",
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        if scope.get("method") == "POST" and path.startswith(PROTECTED_PREFIXES):
            scope = _as_json(scope)
        if path in GENERATION_PATHS and scope.get("method") == "POST":
            limit = state.admission_limit
            if max(state.admitted, state.client.num_inflight) >= limit:
                resp = _json_error(429, f"the server is at capacity ({limit} requests running or waiting); "
                                   "retry later", "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_S)})
                return await resp(scope, receive, send)
            state.admitted += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                state.admitted -= 1
        return await self.app(scope, receive, send)


def _as_json(scope: Scope) -> Scope:
    """API bodies are JSON whatever the Content-Type says (`curl -d` sends form-urlencoded)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


def _authorized(scope: Scope, key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


async def _start_engine(client: AsyncEngineClient) -> None:
    """Start the engine process with SIGINT ignored in it, so Ctrl-C reaches only this process,
    which then drains and shuts the engine down in order. (Ignored signals survive the spawn.)"""
    if client.ready is not None:
        return
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        task = asyncio.ensure_future(client.start())
        await asyncio.sleep(0)  # start() spawns the process before its first await
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    await task


async def _watchdog(state: ServerState) -> None:
    """Fail in-flight requests at once if the engine process dies without a word (killed, OOM)."""
    client = state.client
    while True:
        await asyncio.sleep(WATCHDOG_PERIOD_S)
        proc = getattr(client, "_proc", None)
        if client.dead is None and proc is not None and not proc.is_alive():
            die = getattr(client, "_die", None)
            if die is not None:
                die(f"the engine process exited unexpectedly (code {proc.exitcode})")


def build_app(client: AsyncEngineClient, server_config: ServerConfig | None = None,
              served_model_name: str | None = None, metrics: ServerMetrics | None = None,
              freeze_heap: bool = False) -> FastAPI:
    """The OpenAI-compatible app around `client` (started in the lifespan if it is not yet).
    freeze_heap: once started, keep the process's startup heap out of the garbage collector's full
    collections (engine/process.py freeze_startup_heap) until shutdown: for a process that is the
    server (run_server), not for one that embeds the app among other work (the tests)."""
    server_config = server_config or ServerConfig()
    if metrics is None:
        metrics = ServerMetrics()
    if client.observer is None:
        client.observer = metrics
    name = served_model_name or server_config.served_model_name or client.config.model
    state = ServerState(client, server_config, name, metrics, sessions=SessionTracker(metrics.session_drift.inc))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _start_engine(client)
        watchdog = None
        try:
            state.warm_up()
            metrics.set_pool(client.ready.num_blocks)
            if client.stats is not None:
                metrics.on_stats(client.stats)
            watchdog = asyncio.create_task(_watchdog(state))
            log.info("serving %s (max_model_len %d)", name, client.max_model_len)
            if freeze_heap:
                freeze_startup_heap()
            yield
        finally:
            if freeze_heap:
                gc.unfreeze()
            state.draining = True
            if watchdog is not None:
                watchdog.cancel()
            await client.shutdown()

    app = FastAPI(title="loopserve", description="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.loopserve = state
    install_error_handlers(app, known_fields())
    app.add_middleware(GateMiddleware, state=state)
    app.include_router(chat.router)
    app.include_router(completions.router)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.client.healthy:
            return JSONResponse({"status": "unhealthy", "reason": state.client.dead or "engine process exited"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version():
        from loopserve.cli import _version
        return {"version": _version()}

    def model_card() -> dict:
        ready = state.client.ready
        return {"id": state.model_name, "object": "model", "created": now(), "owned_by": "loopserve",
                "root": ready.model_path if ready else None, "parent": None,
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        state.check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt (a string) or messages (a chat)", param="prompt")
        if body.messages is not None:
            # Exactly what /v1/chat/completions feeds the engine (the template writes the specials).
            _, ids = state.render_chat(body.messages, body.add_generation_prompt is not False)
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = state.encode(body.prompt, add, "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        state.check_token_ids(body.tokens, "tokens")
        try:
            text = state.tokenizer.decode(body.tokens)
        except Exception as e:  # noqa: BLE001
            raise bad_request(f"cannot decode these tokens: {e}", param="tokens") from None
        return {"prompt": text}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = STATIC_DIR / "index.html"
        try:
            return HTMLResponse(page.read_text(encoding="utf-8"))
        except OSError:
            import html
            return HTMLResponse(FALLBACK_PAGE.format(model=html.escape(state.model_name)))


__all__ = ["build_app", "GateMiddleware"]

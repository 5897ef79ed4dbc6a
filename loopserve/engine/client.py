"""AsyncEngineClient: the API process's handle on the engine process.

It owns tokenization-side state (tokenizer, detokenizers, stop strings) and one asyncio queue per
request; a background task receives engine steps and routes them. Requests are aborted in the
engine when their consumer goes away (client disconnect), so blocks are freed at once.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import zmq
import zmq.asyncio

from loopserve.config import EngineConfig
from loopserve.engine.core import EngineRequest, EngineStats
from loopserve.engine.messages import (
    AbortRequests,
    AddRequests,
    EngineDead,
    EngineReady,
    EngineStep,
    RequestFailed,
    Shutdown,
    StopRequests,
)
from loopserve.engine.output_processor import OutputProcessor, StreamUpdate
from loopserve.engine.process import run_engine
from loopserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600.0


class EngineDeadError(RuntimeError):
    pass


class RequestObserver(Protocol):
    """Per-request timing hooks (the server's Prometheus metrics implement them)."""

    def on_first_token(self, ttft: float, queue_time: float | None) -> None: ...
    def on_token_gap(self, seconds: float) -> None: ...
    def on_finish(self, e2e: float, prompt_tokens: int, generation_tokens: int, finish_reason: str) -> None: ...
    def on_stats(self, stats: EngineStats) -> None: ...


@dataclass
class _Inflight:
    queue: asyncio.Queue
    arrival: float
    last_token: float | None = None
    num_prompt_tokens: int = 0


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, observer: RequestObserver | None = None) -> None:
        self.config = config
        self.observer = observer
        self.ready: EngineReady | None = None
        self.tokenizer = None
        self.stats: EngineStats | None = None
        self.dead: str | None = None
        self._inflight: dict[str, _Inflight] = {}
        self._ids = itertools.count()
        self._proc: multiprocessing.Process | None = None
        self._task: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        from loopserve.fetch import resolve_model
        from loopserve.model import load_tokenizer

        model_path = resolve_model(self.config.model)  # fetch here once, not in the engine process
        from dataclasses import replace
        self.config = replace(self.config, model=model_path)
        self._dir = tempfile.mkdtemp(prefix="loopserve-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.asyncio.Context()
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._to_engine.bind(in_addr)
        self._from_engine = self._ctx.socket(zmq.PULL)
        self._from_engine.bind(out_addr)
        spawn = multiprocessing.get_context("spawn")
        self._proc = spawn.Process(target=run_engine, name="loopserve-engine", daemon=True,
                                   args=(self.config, in_addr, out_addr, logging.getLogger().level or logging.INFO))
        self._proc.start()
        self.tokenizer = load_tokenizer(self.config.tokenizer or model_path)
        self.processor = OutputProcessor(self.tokenizer)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while self.ready is None:
            if not self._proc.is_alive():
                raise EngineDeadError(f"the engine process exited during startup (code {self._proc.exitcode})")
            if time.monotonic() > deadline:
                raise EngineDeadError("the engine did not start in time")
            if await self._from_engine.poll(500):
                msg = pickle.loads(await self._from_engine.recv())
                if isinstance(msg, EngineDead):
                    raise EngineDeadError(msg.message)
                if isinstance(msg, EngineReady):
                    self.ready = msg
        self._task = asyncio.create_task(self._receive_loop())

    async def shutdown(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                await self._send(Shutdown())
            except Exception:  # noqa: BLE001
                pass
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 10)
            if self._proc.is_alive():
                self._proc.kill()
        if self._task is not None:
            self._task.cancel()
        self._to_engine.close(0)
        self._from_engine.close(0)
        self._ctx.term()
        for name in ("in", "out"):
            try:
                os.unlink(os.path.join(self._dir, name))
            except OSError:
                pass

    @property
    def max_model_len(self) -> int:
        return self.ready.max_model_len

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    @property
    def healthy(self) -> bool:
        return self.dead is None and self._proc is not None and self._proc.is_alive()

    async def _send(self, msg) -> None:
        await self._to_engine.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    # ---- requests ------------------------------------------------------------------------------

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                       prompt: str | None = None, cache_salt: str | None = None, session_id: str | None = None,
                       retention_s: float = 0.0, ids_checked: bool = False) -> AsyncIterator[StreamUpdate]:
        """Yield one StreamUpdate per engine step that produced tokens, until every sample finished.

        Closing the iterator early (client disconnect) aborts the request in the engine. ids_checked:
        every prompt id is known to be in the vocabulary (EngineRequest.ids_checked).
        """
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        request_id = request_id or self.new_request_id()
        engine_ids = self.processor.add(request_id, prompt, prompt_token_ids, params)
        now = time.monotonic()
        state = _Inflight(asyncio.Queue(), now, num_prompt_tokens=len(prompt_token_ids))
        self._inflight[request_id] = state
        requests = [EngineRequest(rid, list(prompt_token_ids), params.for_sample(i) if params.n > 1 else params,
                                  cache_salt=cache_salt, wait_for=engine_ids[0] if i else None, arrival_time=now,
                                  session_id=session_id, retention_s=retention_s, ids_checked=ids_checked)
                    for i, rid in enumerate(engine_ids)]
        finished = False
        try:
            await self._send(AddRequests(requests))
            while True:
                item = await state.queue.get()
                if isinstance(item, Exception):
                    raise item
                update, finished = item
                yield update
                if finished:
                    return
        finally:
            self._inflight.pop(request_id, None)
            if not finished and self.observer is not None:
                self.observer.on_finish(time.monotonic() - state.arrival, state.num_prompt_tokens, 0, "abort")
            if not finished:
                open_ids = self.processor.discard(request_id)
                if open_ids and self.dead is None:
                    await self._send(AbortRequests(open_ids))

    async def _receive_loop(self) -> None:
        try:
            while True:
                msg = pickle.loads(await self._from_engine.recv())
                if isinstance(msg, EngineStep):
                    await self._on_step(msg)
                elif isinstance(msg, RequestFailed):
                    self._fail(msg.request_id, ValueError(msg.message))
                elif isinstance(msg, EngineDead):
                    self._die(msg.message)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.exception("engine output loop failed")
            self._die(f"engine output loop failed: {e}")

    def _fail(self, engine_request_id: str, error: Exception) -> None:
        # The first sample's id is the request id for n == 1 and "<id>-0" otherwise.
        for rid in (engine_request_id, engine_request_id.rsplit("-", 1)[0]):
            state = self._inflight.get(rid)
            if state is not None:
                self.processor.discard(rid)
                state.queue.put_nowait(error)
                return

    def _die(self, message: str) -> None:
        log.error("%s", message)
        self.dead = message
        for state in self._inflight.values():
            state.queue.put_nowait(EngineDeadError(message))

    async def _on_step(self, msg: EngineStep) -> None:
        self.stats = msg.stats
        obs = self.observer
        if obs is not None:
            obs.on_stats(msg.stats)
        queue_times = {o.request_id: o.queue_time for o in msg.outputs if o.queue_time is not None}
        processed = self.processor.process(msg.outputs)
        if processed.stopped:
            await self._send(StopRequests([r for r, _ in processed.stopped], [s for _, s in processed.stopped]))
        now = time.monotonic()
        for update in processed.updates:
            state = self._inflight.get(update.output.request_id)
            if state is None:
                continue
            if obs is not None:
                if state.last_token is None:
                    qt = next((queue_times[k] for k in queue_times
                               if k == update.output.request_id or k.startswith(update.output.request_id + "-")),
                              None)
                    obs.on_first_token(now - state.arrival, qt)
                else:
                    obs.on_token_gap(now - state.last_token)
                if update.output.finished:
                    gen = sum(len(o.token_ids) for o in update.output.outputs)
                    reason = update.output.outputs[0].finish_reason or "stop"
                    obs.on_finish(now - state.arrival, state.num_prompt_tokens, gen, reason)
            state.last_token = now
            # With the flag as of this step: update.output is shared and later steps mutate it, so a
            # consumer that lags behind would otherwise stop early and drop the final deltas.
            state.queue.put_nowait((update, update.output.finished))

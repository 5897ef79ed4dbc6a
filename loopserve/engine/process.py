"""The engine core's own process: receive requests, step while there is work, send outputs.

It never waits on HTTP: inputs are drained without blocking whenever requests are running, and
outputs are pushed (not requested). When idle it blocks on its input socket.
"""
from __future__ import annotations

import gc
import logging
import os
import pickle
import traceback

import zmq

from loopserve.config import EngineConfig
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
from loopserve.engine.request import RequestStatus

IDLE_POLL_MS = 200

log = logging.getLogger(__name__)


def run_engine(config: EngineConfig, input_addr: str, output_addr: str, log_level: int = logging.INFO) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s engine %(levelname)s %(message)s")
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)

    def send(msg) -> None:
        outbox.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        from loopserve.engine.core import EngineCore
        core = EngineCore(config)
    except Exception as e:  # noqa: BLE001 - reported to the API process, which exits with it
        send(EngineDead(f"engine failed to start: {e}"))
        return
    send(EngineReady(str(core.model_path), core.model_config, core.max_model_len, core.kv.num_blocks,
                     core.kv.block_size, str(core.dtype).removeprefix("torch."), str(core.device)))
    core.structured  # start loading the grammar backend now, so the first constrained request finds it ready
    freeze_startup_heap()
    try:
        _loop(core, inbox, send)
    except Exception:  # noqa: BLE001
        send(EngineDead("engine crashed:\n" + traceback.format_exc()))
    finally:
        gc.unfreeze()  # frozen objects outlive the interpreter's last collection: extensions report them as leaks
        inbox.close(0)
        outbox.close(0)
        ctx.term()


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, the model, the block pool: ~330k on the dev VM with the
    135M model) out of the collector's reach. They live as long as the engine, yet a full collection,
    which the step loop's allocations trigger every so often, walked them all: ~160 ms on the dev VM
    (bench/host_overhead.py --gc), a stall in the middle of a step. Only objects made later are
    collected, as before."""
    gc.collect()
    gc.freeze()


def _loop(core, inbox, send) -> None:
    stats_dirty = True
    parent = os.getppid()
    while True:
        if not core.has_unfinished() and os.getppid() != parent:
            log.error("the API process is gone; engine exiting")
            return
        timeout = 0 if core.has_unfinished() else IDLE_POLL_MS
        while inbox.poll(timeout):
            timeout = 0
            msg = pickle.loads(inbox.recv())
            stats_dirty = True
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, AddRequests):
                added = []
                try:
                    for er in msg.requests:
                        core.add_request(er)
                        added.append(er.request_id)
                except Exception as e:  # noqa: BLE001 - a bad request must not take the engine down
                    core.abort(added)
                    if not isinstance(e, ValueError):
                        log.exception("add_request failed")
                    send(RequestFailed(msg.requests[0].request_id, str(e)))
            elif isinstance(msg, AbortRequests):
                core.abort(msg.request_ids)
            elif isinstance(msg, StopRequests):
                for rid, reason in zip(msg.request_ids, msg.stop_reasons):
                    core.finish([rid], RequestStatus.FINISHED_STOPPED, reason)
        if core.has_unfinished():
            send(EngineStep(core.step(), core.stats()))
            stats_dirty = True
            continue
        if core.expire_sessions():
            stats_dirty = True  # pins ended while idle: the gauges should show it
        if stats_dirty:
            # Idle: one last snapshot so gauges (running, KV usage) settle at their idle values.
            send(EngineStep([], core.stats()))
            stats_dirty = False

"""Session KV retention: keep an agent's cache warm while its tool runs.

When a turn of a session (a request carrying a session id and a retention hint) finishes, the blocks
of its prompt + output that are in the prefix-cache index stay referenced by the session: they
cannot be evicted, so the next turn finds them even while other sessions fill the cache during the
pause. The policy, in order:

1. A session holds at most one pin: a new finished turn replaces the previous pin (the blocks they
   share stay referenced throughout).
2. A pin ends when its hint expires (`expired`); its blocks become ordinary cached blocks, evicted
   least recently used first like any other.
3. Memory pressure: when a running request needs blocks, or the request at the head of the queue
   cannot be admitted, pins are released before anyone is preempted or kept waiting, the one closest
   to expiry first, never the requesting session's own (`pressure`). Released blocks go to the back
   of the eviction queue, so older unpinned cache goes first.
4. With a host-memory tier (on by default on GPU), the blocks of a pin released under pressure are
   copied to host memory when the allocator actually reuses them, and the session's next turn
   restores them from there instead of recomputing them.
5. An aborted turn leaves the session's previous pin as it was.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from loopserve.engine.kv_cache import KVBlock, KVCacheManager, PartialBlock
from loopserve.engine.request import Request


@dataclass
class RetentionStats:
    sessions: int = 0            # sessions holding a pin now
    pinned_blocks: int = 0       # distinct blocks referenced by pins now
    pinned_total: int = 0        # turns pinned since start
    expired_total: int = 0       # pins ended by their hint
    pressure_total: int = 0      # pins released early for memory pressure


@dataclass
class _Pin:
    blocks: list[KVBlock]            # the turn's hashed blocks, then its partial last block if any
    expires_at: float
    tail: PartialBlock | None = None  # that partial block: the next turn copies it (copy-on-write)


class SessionRetention:
    def __init__(self, kv: KVCacheManager, clock: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.clock = clock
        self._pins: dict[str, _Pin] = {}
        self._pin_refs: dict[int, int] = {}  # block id -> pins holding it (sessions share the system prompt)
        self.pinned_total = 0
        self.expired_total = 0
        self.pressure_total = 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._pins

    def pin(self, request: Request) -> None:
        """Pin the cached blocks of a finished turn of request.session_id for request.retention_s seconds.

        Call before the request's own blocks are freed, after its last blocks were indexed."""
        sid, seconds = request.session_id, request.retention_s
        if sid is None or seconds <= 0 or not self.kv.enable_prefix_caching:
            return
        blocks = list(self.kv.hashed_blocks(request))
        tail = self.kv.partial_block(request)
        if tail is not None:
            blocks.append(tail.block)
        self.kv.pool.touch(blocks)
        for b in blocks:
            self.kv.pool.offload_on_evict.discard(b.block_hash)
            self._pin_refs[b.block_id] = self._pin_refs.get(b.block_id, 0) + 1
        old = self._pins.pop(sid, None)
        if old is not None:
            self._unref(old)
            self.kv.pool.release(old.blocks[::-1])
        self._pins[sid] = _Pin(blocks, self.clock() + seconds, tail)
        self.pinned_total += 1

    def tail(self, session_id: str | None) -> PartialBlock | None:
        pin = self._pins.get(session_id) if session_id is not None else None
        return pin.tail if pin is not None else None

    def expire(self) -> int:
        """End the pins whose hint has passed; returns how many."""
        if not self._pins:
            return 0
        now = self.clock()
        gone = [sid for sid, p in self._pins.items() if p.expires_at <= now]
        for sid in gone:
            self._release(sid, offload=False)
        self.expired_total += len(gone)
        return len(gone)

    def release_for_pressure(self, requesting_session: str | None) -> bool:
        """Release the pin closest to expiry (not the requester's own); False when there is none."""
        candidates = [(p.expires_at, sid) for sid, p in self._pins.items() if sid != requesting_session]
        if not candidates:
            return False
        _, sid = min(candidates)
        self._release(sid, offload=True)
        self.pressure_total += 1
        return True

    def release_all(self) -> None:
        for sid in list(self._pins):
            self._release(sid, offload=False)

    def _release(self, sid: str, offload: bool) -> None:
        pin = self._pins.pop(sid)
        pool = self.kv.pool
        if offload and pool.host is not None:
            # Copied out only if the allocator really reuses them (see BlockPool._evict).
            pool.offload_on_evict.update(b.block_hash for b in pin.blocks if b.block_hash is not None)
        self._unref(pin)
        pool.release(pin.blocks[::-1])

    def _unref(self, pin: _Pin) -> None:
        for b in pin.blocks:
            n = self._pin_refs[b.block_id] - 1
            if n:
                self._pin_refs[b.block_id] = n
            else:
                del self._pin_refs[b.block_id]

    def stats(self) -> RetentionStats:
        return RetentionStats(len(self._pins), len(self._pin_refs), self.pinned_total, self.expired_total,
                              self.pressure_total)

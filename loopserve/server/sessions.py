"""Agent sessions seen by the API: which session a request belongs to, its KV retention hint, and
template-drift detection.

A session is named by the `X-Session-Id` header or, failing that, the request's `user` field. Each
turn of an agent loop should resend the previous turn's prompt plus its output and then append: that
is what lets the prefix cache serve it. When a new prompt is not such an extension (a chat template
that renders the history differently from how the model produced it, a client that edits earlier
messages), the cache misses from the first differing token on. Every such turn is counted
(`loopserve:session_template_drift` in /metrics) and, once per session, logged with the first
differing position and a few tokens of context on both sides, so the user can see why.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from loopserve.config import MAX_SESSION_RETENTION_S

log = logging.getLogger("loopserve.server")

SESSION_HEADER = "x-session-id"
RETENTION_HEADER = "x-session-retention"
# Sessions remembered at once (least recently used forgotten first) and context tokens in a log line.
MAX_SESSIONS = 4096
CONTEXT_TOKENS = 6


@dataclass
class _Session:
    expected: list[int]        # the last turn's prompt + output: the next prompt should start with it
    logged: bool = False


@dataclass
class Drift:
    position: int              # first token where the new prompt leaves the expected prefix
    expected: list[int]        # a few tokens from there on, as the session would continue
    got: list[int]             # and as the new prompt has them


def session_id(header: str | None, user: str | None) -> str | None:
    return header or user or None


@dataclass(frozen=True)
class SessionRef:
    """The session a request belongs to and how long its finished turn stays pinned in the KV cache."""
    id: str
    retention_s: float


def session_ref(headers, user: str | None, body_retention: float | None, default_retention: float) -> SessionRef | None:
    """Resolve the session from X-Session-Id / `user` and the retention hint from the body field
    `session_retention`, the X-Session-Retention header, or the server's default; ValueError when bad."""
    sid = session_id(headers.get(SESSION_HEADER), user)
    raw = body_retention if body_retention is not None else headers.get(RETENTION_HEADER)
    if raw is None:
        seconds = default_retention
    else:
        try:
            seconds = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"session_retention must be a number of seconds, got {raw!r}") from None
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SESSION_RETENTION_S):
            raise ValueError(f"session_retention must be in [0, {MAX_SESSION_RETENTION_S:g}] seconds, got {raw!r}")
        if sid is None:
            raise ValueError("session_retention needs a session: set the X-Session-Id header or `user`")
    return SessionRef(sid, seconds) if sid is not None else None


class SessionTracker:
    def __init__(self, on_drift: Callable[[], None] | None = None, max_sessions: int = MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._on_drift = on_drift
        self._max = max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def check(self, sid: str, prompt: list[int], decode: Callable[[list[int]], str] | None = None) -> Drift | None:
        """Compare a new prompt of session sid with what its last turn left; report a drift once per session."""
        s = self._sessions.get(sid)
        if s is None:
            return None
        self._sessions.move_to_end(sid)
        n = min(len(s.expected), len(prompt))
        # Whole-list comparison runs in C; the token-by-token search only where they differ (a drift).
        same = prompt[:n] == s.expected[:n]
        pos = None if same else next(i for i in range(n) if s.expected[i] != prompt[i])
        if pos is None:
            if len(prompt) >= len(s.expected):
                return None
            pos = len(prompt)  # the new prompt is shorter than the last turn: history was dropped
        drift = Drift(pos, s.expected[pos:pos + CONTEXT_TOKENS], prompt[pos:pos + CONTEXT_TOKENS])
        if self._on_drift is not None:
            self._on_drift()
        if not s.logged:
            s.logged = True
            show = decode or (lambda ids: repr(ids))
            before = prompt[max(0, pos - CONTEXT_TOKENS):pos]
            log.warning("session %s: the prompt is not an extension of the previous turn (prompt + output): "
                        "first difference at token %d of %d; the prefix cache misses from there. "
                        "Context: %r | expected %r, got %r", sid, pos, len(s.expected), show(before),
                        show(drift.expected), show(drift.got))
        return drift

    def finish(self, sid: str, prompt: list[int], output: list[int]) -> None:
        """Remember a finished turn: the next prompt of sid should start with prompt + output."""
        s = self._sessions.get(sid)
        expected = list(prompt) + list(output)
        if s is None:
            self._sessions[sid] = _Session(expected)
            while len(self._sessions) > self._max:
                self._sessions.popitem(last=False)
        else:
            s.expected = expected
            self._sessions.move_to_end(sid)

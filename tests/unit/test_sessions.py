"""Template-drift detection: a session's new prompt must extend its last prompt + output."""
from __future__ import annotations

import logging

from loopserve.server.sessions import SessionTracker, session_id


def test_extensions_pass_and_drifts_are_counted_and_logged_once(caplog):
    drifts = []
    t = SessionTracker(on_drift=lambda: drifts.append(1))
    assert t.check("s", [1, 2, 3]) is None  # unknown session: nothing to compare with
    t.finish("s", [1, 2, 3], [4, 5])
    assert t.check("s", [1, 2, 3, 4, 5, 6, 7]) is None  # a proper extension
    t.finish("s", [1, 2, 3, 4, 5, 6, 7], [8])
    with caplog.at_level(logging.WARNING, logger="loopserve.server"):
        d = t.check("s", [1, 2, 3, 4, 9, 9, 7, 8, 10], decode=lambda ids: " ".join(map(str, ids)))
        assert (d.position, d.expected[:2], d.got[:2]) == (4, [5, 6], [9, 9])
        t.finish("s", [1, 2, 3, 4, 9, 9, 7, 8, 10], [11])
        d2 = t.check("s", [1, 2, 0])  # drifts again: counted, not logged again
        assert d2.position == 2
    assert len(drifts) == 2
    lines = [r.getMessage() for r in caplog.records if "not an extension" in r.getMessage()]
    assert len(lines) == 1 and "token 4 of 8" in lines[0] and "'5 6 7 8'" in lines[0]


def test_a_shorter_prompt_is_a_drift_and_old_sessions_are_forgotten():
    t = SessionTracker(max_sessions=2)
    t.finish("a", [1, 2, 3], [4])
    assert t.check("a", [1, 2]).position == 2
    t.finish("b", [1], [2])
    t.finish("c", [1], [2])  # "a" is the least recently used: forgotten
    assert len(t) == 2 and t.check("a", [9]) is None
    assert session_id("h", "u") == "h" and session_id(None, "u") == "u" and session_id(None, None) is None

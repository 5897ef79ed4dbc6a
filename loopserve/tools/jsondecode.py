"""Reads calls out of a complete JSON call body with the standard library, keeping each arguments
value's raw text (the model's own spacing and escapes) rather than a re-serialisation."""
from __future__ import annotations

import json
import re
from typing import Any

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
ARGUMENT_KEYS = ("arguments", "parameters")


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _members(text: str, pos: int) -> tuple[list[tuple[str, Any, int, int]], int]:
    """(key, value, value start, value end) of the object at text[pos], and the position after it.
    The text must already be known to be valid JSON."""
    members = []
    pos = _skip_ws(text, pos + 1)
    if text[pos] == "}":
        return members, pos + 1
    while True:
        key, pos = _DECODER.raw_decode(text, pos)
        start = _skip_ws(text, _skip_ws(text, pos) + 1)
        value, end = _DECODER.raw_decode(text, start)
        members.append((key, value, start, end))
        pos = _skip_ws(text, end)
        if text[pos] == "}":
            return members, pos + 1
        pos = _skip_ws(text, pos + 1)


def _call(text: str, pos: int) -> tuple[tuple[str, str] | None, int]:
    members, end = _members(text, pos)
    names = [value for key, value, _, _ in members if key == "name"]
    args = [(value, start, stop) for key, value, start, stop in members if key in ARGUMENT_KEYS]
    # Two names or two argument values would make the call ambiguous, whatever json.loads keeps.
    if len(names) != 1 or not isinstance(names[0], str) or not names[0] or len(args) > 1:
        return None, end
    if not args:
        return (names[0], "{}"), end
    value, start, stop = args[0]
    return ((names[0], text[start:stop]) if isinstance(value, dict) else None), end


def decode_calls(body: str) -> list[tuple[str, str]] | None:
    """(name, arguments text) of each call in `body`: one call object, or a non-empty list of them.
    None when the body is not valid JSON or not shaped like calls."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    pos = _skip_ws(body, 0)
    if isinstance(value, dict):
        call, _ = _call(body, pos)
        return None if call is None else [call]
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        return None
    calls = []
    pos += 1  # past "["
    for _ in value:
        call, pos = _call(body, _skip_ws(body, pos))
        if call is None:
            return None
        calls.append(call)
        pos = _skip_ws(body, pos) + 1  # past "," or "]"
    return calls

"""Where a JSON value ends, found one character at a time without parsing it.

Only strings, escapes and bracket depth are tracked: enough to know that a `}` or a closing tag
inside a string does not end anything. Whether the text is valid JSON is json.loads's call, made
once the end is known."""
from __future__ import annotations


class ValueScanner:
    """Fed a JSON object, array or string from its first character; feed() is True on the
    character that ends it."""

    __slots__ = ("_escaped", "depth", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self._escaped = False

    def feed(self, ch: str) -> bool:
        if self.in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self.in_string = False
                return self.depth == 0
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False

"""Streams the calls of a JSON call body as it arrives: a call's id and name as soon as its name
string is complete, then the raw characters of its arguments value.

The reader checks the call structure strictly enough to stop at the first character that cannot
belong to a call, so a broken body usually fails before anything is sent. It is not the judge of
validity: JsonBody compares what was streamed with the standard library's reading of the finished
body and reports calls only when the two agree."""
from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum

from loopserve.tools.base import ToolCall, ToolCallDelta
from loopserve.tools.jsondecode import ARGUMENT_KEYS, decode_calls
from loopserve.tools.jsonscan import ValueScanner
from loopserve.tools.streaming import WHITESPACE

StartCall = Callable[[], tuple[int, str]]  # -> (index, id) of a new call
Emit = Callable[[ToolCallDelta], None]

# Characters that may appear outside strings in JSON (literals true/false/null, numbers, and the
# NaN/Infinity that json.loads also accepts). Anything else, e.g. the "<" of a closing tag, ends the
# arguments value as an error before it is sent.
_JSON_BARE = set(WHITESPACE + '{}[],:"-+.0123456789eEtrufalsnNIiy')
_SCALAR = set("-+.0123456789eEtrufalsnNIiy")


class Status(Enum):
    MORE = 0
    DONE = 1
    ERROR = 2


class ObjectReader:
    """One call object, fed from the character after its "{"."""

    def __init__(self, start_call: StartCall, emit: Emit) -> None:
        self._start_call, self._emit = start_call, emit
        self._state = self._key_or_end
        self._token: list[str] = []  # raw characters of the key or name string being read
        self._escaped = False
        self._on_string: Callable[[str], Status] = self._after_key
        self._key = ""
        self._scanner = ValueScanner()
        self.name: str | None = None
        self._args: list[str] | None = None  # raw characters of the arguments value, once it starts
        self.index: int | None = None  # set when the call is started (its first delta sent)
        self.id = ""

    @property
    def arguments(self) -> str:
        return "".join(self._args) if self._args is not None else "{}"

    def feed(self, ch: str) -> Status:
        return self._state(ch)

    def _begin_string(self, then: Callable[[str], Status]) -> Status:
        self._token, self._escaped, self._on_string = [], False, then
        self._state = self._string
        return Status.MORE

    def _string(self, ch: str) -> Status:
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            try:
                value = json.loads('"' + "".join(self._token) + '"')
            except ValueError:
                return Status.ERROR
            return self._on_string(value)
        self._token.append(ch)
        return Status.MORE

    def _key_or_end(self, ch: str) -> Status:
        if ch == "}":
            return self._close()
        return self._key_start(ch)

    def _key_start(self, ch: str) -> Status:
        if ch in WHITESPACE:
            return Status.MORE
        return self._begin_string(self._after_key) if ch == '"' else Status.ERROR

    def _after_key(self, key: str) -> Status:
        self._key, self._state = key, self._colon
        return Status.MORE

    def _colon(self, ch: str) -> Status:
        if ch in WHITESPACE:
            return Status.MORE
        if ch != ":":
            return Status.ERROR
        self._state = self._value_start
        return Status.MORE

    def _value_start(self, ch: str) -> Status:
        if ch in WHITESPACE:
            return Status.MORE
        if self._key == "name":
            if ch != '"' or self.name is not None:
                return Status.ERROR
            return self._begin_string(self._after_name)
        if self._key in ARGUMENT_KEYS:
            if ch != "{" or self._args is not None:
                return Status.ERROR
            self._args, self._state = [], self._arguments
        elif ch in '{["':
            self._state = self._skip
        elif ch in _SCALAR:
            self._state = self._scalar
            return Status.MORE
        else:
            return Status.ERROR
        self._scanner = ValueScanner()
        return self._state(ch)

    def _after_name(self, name: str) -> Status:
        if not name:
            return Status.ERROR
        self.name = name
        self.index, self.id = self._start_call()
        # Arguments written before the name were held until now.
        self._emit(ToolCallDelta(self.index, self.id, name, "".join(self._args or ())))
        self._state = self._comma_or_end
        return Status.MORE

    def _arguments(self, ch: str) -> Status:
        if not self._scanner.in_string and ch not in _JSON_BARE:
            return Status.ERROR
        self._args.append(ch)
        if self.index is not None:
            self._emit(ToolCallDelta(self.index, arguments=ch))
        if self._scanner.feed(ch):
            self._state = self._comma_or_end
        return Status.MORE

    def _skip(self, ch: str) -> Status:
        if self._scanner.feed(ch):
            self._state = self._comma_or_end
        return Status.MORE

    def _scalar(self, ch: str) -> Status:
        if ch in _SCALAR:
            return Status.MORE
        return self._comma_or_end(ch)

    def _comma_or_end(self, ch: str) -> Status:
        if ch in WHITESPACE:
            return Status.MORE
        if ch == "}":
            return self._close()
        if ch != ",":
            return Status.ERROR
        self._state = self._key_start
        return Status.MORE

    def _close(self) -> Status:
        if self.name is None:
            return Status.ERROR
        if self._args is None:
            # A call is never streamed with empty arguments.
            self._emit(ToolCallDelta(self.index, arguments="{}"))
        return Status.DONE


class BodyReader:
    """A call body: one call object or a JSON list of them, fed from its first character."""

    def __init__(self, start_call: StartCall, emit: Emit) -> None:
        self._start_call, self._emit = start_call, emit
        self.objects: list[ObjectReader] = []
        self._list = False
        self._state = self._start
        self.status = Status.MORE

    def feed(self, ch: str) -> Status:
        if self.status is Status.MORE:
            self.status = self._state(ch)
        return self.status

    def _new_object(self) -> Status:
        self.objects.append(ObjectReader(self._start_call, self._emit))
        self._state = self._in_object
        return Status.MORE

    def _start(self, ch: str) -> Status:
        if ch == "{":
            return self._new_object()
        if ch != "[":
            return Status.ERROR
        self._list, self._state = True, self._item
        return Status.MORE

    def _item(self, ch: str) -> Status:
        if ch in WHITESPACE:
            return Status.MORE
        return self._new_object() if ch == "{" else Status.ERROR

    def _in_object(self, ch: str) -> Status:
        status = self.objects[-1].feed(ch)
        if status is Status.DONE and self._list:
            self._state = self._after_item
            return Status.MORE
        return status

    def _after_item(self, ch: str) -> Status:
        if ch in WHITESPACE:
            return Status.MORE
        if ch == "]":
            return Status.DONE
        if ch != ",":
            return Status.ERROR
        self._state = self._item
        return Status.MORE


class JsonBody:
    """One JSON call body in the output: leading whitespace, then an object or list. Knows where
    it ends (ValueScanner) and streams its calls (BodyReader) while it arrives."""

    def __init__(self, start_call: StartCall, emit: Emit) -> None:
        self._chars: list[str] = []
        self._scanner: ValueScanner | None = None
        self._reader = BodyReader(start_call, emit)
        self.done = False

    @property
    def in_string(self) -> bool:
        return self._scanner is not None and self._scanner.in_string

    def feed(self, ch: str) -> bool:
        """Consume ch; False when ch does not belong to the body because no JSON container starts
        there (the body is then done and empty)."""
        if self._scanner is None:
            if ch in WHITESPACE:
                return True
            if ch not in "{[":
                self.done = True
                return False
            self._scanner = ValueScanner()
        self._chars.append(ch)
        self._reader.feed(ch)
        self.done = self._scanner.feed(ch)
        return True

    def calls(self) -> list[ToolCall] | None:
        """The body's calls once it is done, or None when it is not a valid call body, including
        when the stream sent something other than what the body decodes to."""
        if self._reader.status is not Status.DONE:
            return None
        streamed = [(o.name, o.arguments) for o in self._reader.objects]
        if decode_calls("".join(self._chars)) != streamed:
            return None
        return [ToolCall(o.id, o.name, o.arguments) for o in self._reader.objects]

"""Llama 3.1 JSON format: the output, optionally opened by `<|python_tag|>`, is one or more
`{"name": ..., "parameters": {...}}` objects separated by `;`.

Only output that starts (after whitespace) with `{` or the tag holds calls; any other output is
content. The calls end at the first text that is not another object; that text and the rest is
content. An object that is not a valid call ends the calls too and becomes content, the tag and
leading whitespace with it when it is the first one."""
from __future__ import annotations

from loopserve.tools.base import ToolCallStreamer, ToolParser
from loopserve.tools.callreader import JsonBody
from loopserve.tools.prompting import json_call, tools_json_lines
from loopserve.tools.streaming import WHITESPACE, StreamerBase

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonStreamer(StreamerBase):
    def __init__(self) -> None:
        super().__init__()
        self._state = self._lead
        self._held = ""  # text not sent yet, content if the object being read turns out not to be a call
        self._body: JsonBody | None = None

    def _consume(self, text: str) -> None:
        i = 0
        while i < len(text):
            i = self._state(text, i)

    def _lead(self, text: str, i: int) -> int:
        """Before the first object: decide between calls and plain content."""
        self._held += text[i:]
        start = self._held.lstrip(WHITESPACE)
        if start.startswith((PYTHON_TAG, "{")):
            # Calls: the whitespace and tag stay held (content if the first object is no call);
            # the rest, in _held too, is re-read from this piece, starting at the first object.
            rest = start.removeprefix(PYTHON_TAG)
            self._held = self._held[:len(self._held) - len(rest)]
            self._state = self._before_object
            return len(text) - len(rest)
        if not start or PYTHON_TAG.startswith(start):
            return len(text)  # could still become the tag
        self._to_content()
        return len(text)

    def _before_object(self, text: str, i: int) -> int:
        ch = text[i]
        if ch in WHITESPACE:
            self._held += ch
            return i + 1
        if ch != "{":
            self._held += text[i:]
            self._to_content()
            return len(text)
        self._body = JsonBody(self._start_call, self._emit_call)
        self._state = self._object
        return i

    def _object(self, text: str, i: int) -> int:
        body = self._body
        start = i
        while i < len(text) and not body.done:
            body.feed(text[i])
            i += 1
        self._held += text[start:i]
        if body.done:
            calls = body.calls()
            if calls is None:
                self._to_content()
            else:
                self._calls += calls
                self._held, self._body = "", None
                self._state = self._separator
        return i

    def _separator(self, text: str, i: int) -> int:
        """Between objects: whitespace and `;` belong to no one; another object or content follows."""
        ch = text[i]
        if ch in WHITESPACE or ch == ";":
            return i + 1
        if ch == "{":
            self._state = self._before_object
            return i
        self._state = self._pass_through
        return i

    def _to_content(self) -> None:
        self._emit_content(self._held)
        self._held, self._body = "", None
        self._state = self._pass_through

    def _pass_through(self, text: str, i: int) -> int:
        self._emit_content(text[i:])
        return len(text)

    def _flush(self) -> None:
        if self._state == self._lead:
            self._to_content()
        elif self._state in (self._before_object, self._object):
            self._incomplete = True


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def streamer(self) -> ToolCallStreamer:
        return Llama3JsonStreamer()

    def system_prompt(self, tools: list[dict]) -> str:
        return ("You have access to the following functions, each described by a JSON signature:\n"
                f"{tools_json_lines(tools)}\n\n"
                "To call a function, respond with only a JSON object of the form "
                '{"name": function name, "parameters": dictionary of argument name and its value}. '
                "To call several functions, separate the objects with ';'. "
                "Do not use variables. When no function helps, answer in plain text.")

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        return "; ".join(json_call(c, "parameters") for c in tool_calls)

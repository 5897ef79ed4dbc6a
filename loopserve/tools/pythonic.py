"""Pythonic format (Llama 3.2 / 4): the whole output is a Python list of calls with keyword
arguments, `[get_weather(city="Paris", days=3), other()]`; arguments are Python literals.

Output that is not such a list, all of it, is content; so nothing is sent as content until the
output stops looking like a call list. Each call is sent whole once its closing parenthesis
arrives; calls are reported once the list has closed with nothing but whitespace after it."""
from __future__ import annotations

import ast
import json

from loopserve.tools.base import ToolCall, ToolCallDelta, ToolCallStreamer, ToolParser
from loopserve.tools.prompting import call_parts, function_specs
from loopserve.tools.streaming import WHITESPACE, StreamerBase

_NAME_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME = _NAME_START | set("0123456789.")
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _JsonNames(ast.NodeTransformer):
    """Models trained on JSON write true/false/null; read them as the literals they mean."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(_JSON_NAMES[node.id]) if node.id in _JSON_NAMES else node


def _callee(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _callee(node.value)
        return owner and f"{owner}.{node.attr}"
    return None


def decode_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call `name(key=literal, ...)`, or None if it is not one."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    name = _callee(node.func) if isinstance(node, ast.Call) else None
    if name is None or node.args or any(kw.arg is None for kw in node.keywords):
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(_JsonNames().visit(kw.value)) for kw in node.keywords}
        return name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None


class PythonicStreamer(StreamerBase):
    def __init__(self) -> None:
        super().__init__()
        self._state = self._lead
        self._held: list[str] = []  # the whole output while it may be a call list
        self._call: list[str] = []  # the call being read, from its name
        self._depth = 0  # brackets open inside the call's parentheses
        self._quote = ""  # the quote of the string being read, "" outside strings
        self._escaped = False
        self._pending: list[ToolCall] = []  # calls sent, reported once the list is known good
        self._opened = False  # a "(" was seen: output cut from here on is an unfinished call

    def _consume(self, text: str) -> None:
        for i, ch in enumerate(text):
            if self._state is None:
                self._emit_content(text[i:])
                return
            self._held.append(ch)
            if not self._state(ch):
                self._to_content()

    def _to_content(self) -> None:
        self._emit_content("".join(self._held))
        self._held, self._pending, self._state = [], [], None

    def _lead(self, ch: str) -> bool:
        if ch == "[":
            self._state = self._item
        return ch == "[" or ch in WHITESPACE

    def _item(self, ch: str) -> bool:
        if ch in WHITESPACE:
            return True
        if ch == "]":  # only after a trailing comma; an empty list is not a call list
            self._state = self._tail
            return bool(self._pending)
        if ch not in _NAME_START:
            return False
        self._call, self._state = [ch], self._name
        return True

    def _name(self, ch: str) -> bool:
        self._call.append(ch)
        if ch == "(":
            self._opened, self._depth, self._state = True, 0, self._arguments
            return True
        return ch in _NAME or ch in WHITESPACE

    def _arguments(self, ch: str) -> bool:
        self._call.append(ch)
        if self._quote:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == self._quote:
                self._quote = ""
        elif ch in "'\"":
            self._quote = ch
        elif ch in "([{":
            self._depth += 1
        elif ch in ")]}":
            if self._depth == 0:
                return self._end_call()
            self._depth -= 1
        return True

    def _end_call(self) -> bool:
        decoded = decode_call("".join(self._call))
        if decoded is None:
            return False
        index, call_id = self._start_call()
        self._emit_call(ToolCallDelta(index, call_id, decoded[0], decoded[1]))
        self._pending.append(ToolCall(call_id, *decoded))
        self._state = self._after_call
        return True

    def _after_call(self, ch: str) -> bool:
        if ch == ",":
            self._state = self._item
        elif ch == "]":
            self._state = self._tail
        return ch in ",]" or ch in WHITESPACE

    def _tail(self, ch: str) -> bool:
        return ch in WHITESPACE

    def _flush(self) -> None:
        if self._state == self._tail:
            self._calls += self._pending
        elif self._state is not None and self._opened:
            self._incomplete = True
        elif self._state is not None:
            self._to_content()


class PythonicParser(ToolParser):
    name = "pythonic"

    def streamer(self) -> ToolCallStreamer:
        return PythonicStreamer()

    def system_prompt(self, tools: list[dict]) -> str:
        specs = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in function_specs(tools))
        return ("You can call the following functions, each described by a JSON signature:\n"
                f"{specs}\n\n"
                "To call functions, reply with only a Python list of calls with keyword arguments and "
                "literal values, in this form:\n"
                "[func_name1(param_name1=value1, param_name2=value2), func_name2(param=value)]\n"
                "When no function helps, answer in plain text.")

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        calls = []
        for call in tool_calls:
            name, arguments = call_parts(call)
            params = ", ".join(f"{key}={_python_literal(value)}" for key, value in json.loads(arguments).items())
            calls.append(f"{name}({params})")
        return f"[{', '.join(calls)}]"


def _python_literal(value: object) -> str:
    if isinstance(value, str):
        # A JSON string with its non-ASCII kept is also a valid Python string literal.
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, list):
        return f"[{', '.join(_python_literal(v) for v in value)}]"
    return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"

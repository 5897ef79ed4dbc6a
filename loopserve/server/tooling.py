"""Tool calling for /v1/chat/completions: check tools, tool_choice and tool messages, render them for the
chat template, and turn the model's output into OpenAI tool_calls, whole or streamed.

tool_choice decides who shapes the output:
* auto     the model writes calls in its own format (a ToolParser, chosen from the chat template or by
           --tool-call-parser) and the parser finds them; text outside calls is content.
* required a grammar forces a JSON array of {"name", "arguments"} objects, one per call, each valid
           against its function's parameters (one item unless parallel_tool_calls).
* named    a grammar forces the function's arguments object itself.
* none     tools stay in the prompt (when the template renders them) and nothing is parsed.
Forced calls always parse and validate; one cut short by max_tokens ends as `length` with the partial
text as content, never as a broken call.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from loopserve.server.errors import bad_request
from loopserve.server.protocol import ChatMessage
from loopserve.structured import StructuredOutputsParams
from loopserve.tools import ToolCall, ToolCallDelta, ToolParser, get_parser
from loopserve.tools.reasoning import REASONING_PARSERS

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")
# The parser that reads the `required` grammar's output: a JSON list of {"name", "arguments"}.
_REQUIRED_FORMAT = "mistral"
_REQUIRED_PREFIX = "[TOOL_CALLS]"


@dataclass
class ToolPlan:
    mode: str                                   # none | auto | required | named
    tools: list[dict] = field(default_factory=list)
    parser: ToolParser | None = None            # auto: the model's format
    function: str | None = None                 # named: the function forced
    structured: StructuredOutputsParams | None = None  # required / named: the grammar that forces the call


def _check_schema(schema: Any, param: str) -> None:
    try:
        StructuredOutputsParams(json=schema).validate()
    except ValueError as e:
        raise bad_request(f"{param} is not a usable JSON schema: {e}", param=param) from None


def plan_tools(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               parser_name: str) -> ToolPlan:
    """Validate tools / tool_choice (400 naming the field) and decide how the output is shaped."""
    tools = tools or []
    names: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                              param=f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise bad_request("a function name must be 1-64 letters, digits, '_', '-' or '.', got "
                              f"{name!r}", param=f"tools[{i}].function.name")
        if name in names:
            raise bad_request(f"function {name!r} is defined twice", param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, f"tools[{i}].function.parameters")
        names[name] = fn

    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request('tool_choice must be "none", "auto", "required" or '
                              '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the tools "
                              f"({', '.join(names) or 'none given'})", param="tool_choice")
        schema = names[name].get("parameters") or {"type": "object"}
        return ToolPlan("named", tools, function=name, structured=StructuredOutputsParams(json=schema))
    if tool_choice not in ("none", "auto", "required"):
        raise bad_request(f'tool_choice must be "none", "auto", "required" or a function, got {tool_choice!r}',
                          param="tool_choice")
    if tool_choice != "none" and not tools:
        raise bad_request(f'tool_choice "{tool_choice}" needs tools', param="tool_choice")
    if tool_choice == "none":
        return ToolPlan("none", tools)
    if tool_choice == "auto":
        return ToolPlan("auto", tools, parser=get_parser(parser_name))
    calls = [{"type": "object",
              "properties": {"name": {"const": n}, "arguments": fn.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for n, fn in names.items()]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return ToolPlan("required", tools, structured=StructuredOutputsParams(json=schema))


def _arguments_object(text: Any, param: str) -> dict:
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise bad_request(f"tool call arguments must be a JSON object: {e}", param=param) from None
    if not isinstance(value, dict):
        raise bad_request("tool call arguments must be a JSON object", param=param)
    return value


def render_conversation(messages: list[ChatMessage], plan: ToolPlan, parser: ToolParser,
                        template_renders_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """The messages as the chat template gets them, and the tools= argument for it (None: not passed).

    A template that renders tools itself gets them (and tool calls with dict arguments, as HF
    templates expect). Otherwise the parser's format is written into the text: the tools as a system
    prompt, earlier calls as the assistant's text in the model's own format."""
    conversation: list[dict] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        msg = m.to_template(i)
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                where = f"messages[{i}].tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request("a tool call must be {\"id\", \"type\": \"function\", \"function\": "
                                      "{\"name\", \"arguments\"}}", param=where)
                args = _arguments_object(fn.get("arguments", "{}"), f"{where}.function.arguments")
                call_id = call.get("id") or f"call_{i}_{j}"
                call_ids.add(call_id)
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            if template_renders_tools:
                msg["tool_calls"] = calls
            else:
                del msg["tool_calls"]
                text = parser.render_tool_calls(
                    [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                     for c in calls])
                msg["content"] = f"{msg['content']}\n{text}" if msg["content"] else text
        elif m.role == "tool":
            if not m.tool_call_id:
                raise bad_request("a tool message needs the tool_call_id it answers", param=f"messages[{i}]")
            if m.tool_call_id not in call_ids:
                raise bad_request(f"tool_call_id {m.tool_call_id!r} does not answer any earlier assistant tool "
                                  "call", param=f"messages[{i}].tool_call_id")
        conversation.append(msg)

    if not plan.tools or template_renders_tools:
        return conversation, (plan.tools or None) if template_renders_tools else None
    if plan.mode == "none":
        return conversation, None
    prompt = parser.system_prompt(plan.tools)
    if conversation and conversation[0]["role"] in ("system", "developer"):
        first = conversation[0]
        conversation[0] = {**first, "content": f"{first['content']}\n\n{prompt}" if first["content"] else prompt}
    else:
        conversation.insert(0, {"role": "system", "content": prompt})
    return conversation, None


# ---- output -------------------------------------------------------------------------------------

def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _delta_json(d: ToolCallDelta) -> dict:
    out: dict[str, Any] = {"index": d.index}
    if d.id is not None:
        out["id"] = d.id
        out["type"] = "function"
    fn: dict[str, Any] = {"arguments": d.arguments}
    if d.name is not None:
        fn["name"] = d.name
    out["function"] = fn
    return out


def reasoning_parser_for(name: str | None):
    return REASONING_PARSERS[name]() if name else None


def final_message(text: str, finish_reason: str | None, plan: ToolPlan,
                  reasoning_parser: str | None) -> tuple[dict, str | None]:
    """The assistant message of a finished choice, and its finish_reason."""
    message: dict[str, Any] = {"role": "assistant"}
    if reasoning_parser:
        reasoning, text = reasoning_parser_for(reasoning_parser).split(text)
        message["reasoning_content"] = reasoning
    calls: list[ToolCall] = []
    content: str | None = text
    if plan.mode == "auto" and finish_reason != "abort":
        parsed = plan.parser.parse(text)
        content, calls = parsed.content, parsed.tool_calls
        if parsed.incomplete and finish_reason == "length":
            content = text  # the call was cut short: the partial text, not a broken call
    elif plan.mode == "named" and finish_reason == "stop":
        calls = [ToolCall(_call_id(), plan.function, text.strip())]
        content = None
    elif plan.mode == "required" and finish_reason == "stop":
        parsed = get_parser(_REQUIRED_FORMAT).parse(_REQUIRED_PREFIX + text)
        if parsed.tool_calls and not parsed.incomplete:
            calls, content = parsed.tool_calls, None
    message["content"] = content
    if calls:
        message["tool_calls"] = [_call_json(c) for c in calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return message, finish_reason


class ChoiceStream:
    """One choice's streamed deltas: reasoning split first, then tool calls found in the content."""

    def __init__(self, plan: ToolPlan, reasoning_parser: str | None) -> None:
        self.plan = plan
        parser = reasoning_parser_for(reasoning_parser)
        self.reasoning = parser.streamer() if parser is not None else None
        self.tools = None
        if plan.mode == "auto":
            self.tools = plan.parser.streamer()
        elif plan.mode == "required":
            self.tools = get_parser(_REQUIRED_FORMAT).streamer()
            self.tools.feed(_REQUIRED_PREFIX)
        self.named_id: str | None = None

    def _content_delta(self, content: str) -> dict:
        delta: dict[str, Any] = {}
        if self.plan.mode == "named":
            if content:
                calls = []
                if self.named_id is None:
                    self.named_id = _call_id()
                    calls.append({"index": 0, "id": self.named_id, "type": "function",
                                  "function": {"name": self.plan.function, "arguments": ""}})
                calls.append({"index": 0, "function": {"arguments": content}})
                delta["tool_calls"] = calls
            return delta
        if self.tools is None:
            if content:
                delta["content"] = content
            return delta
        return self._merge(self.tools.feed(content) if content else None)

    def _merge(self, out) -> dict:
        delta: dict[str, Any] = {}
        if out is None:
            return delta
        if out.content:
            delta["content"] = out.content
        if out.tool_calls:
            delta["tool_calls"] = [_delta_json(d) for d in out.tool_calls]
        return delta

    def feed(self, text: str) -> dict:
        """The delta (content / reasoning_content / tool_calls) for this piece of output text."""
        delta: dict[str, Any] = {}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if reasoning:
                delta["reasoning_content"] = reasoning
        delta.update(self._content_delta(text))
        return delta

    def finish(self, finish_reason: str | None) -> tuple[dict, str | None]:
        """Flush held-back text at the end; returns the last delta and the finish_reason to report."""
        delta: dict[str, Any] = {}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.finish()
            if reasoning:
                delta["reasoning_content"] = reasoning
            delta.update(self._content_delta(text))
        if self.tools is not None:
            tail = self._merge(self.tools.finish())
            if "content" in tail:
                delta["content"] = delta.get("content", "") + tail["content"]
            if "tool_calls" in tail:
                delta.setdefault("tool_calls", []).extend(tail["tool_calls"])
        # Only complete calls count: a call whose JSON broke after its name went out is not one.
        called = self.named_id is not None if self.plan.mode == "named" else bool(self.tools and self.tools.calls)
        if called and finish_reason == "stop":
            finish_reason = "tool_calls"
        return delta, finish_reason

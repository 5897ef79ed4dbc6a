"""SmolLM2's function-calling format: all calls as one JSON list in a single
`<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`."""
from __future__ import annotations

from loopserve.tools.base import ToolCallStreamer, ToolParser
from loopserve.tools.prompting import json_call, tools_json_lines
from loopserve.tools.tagged import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TaggedJsonStreamer


class SmolLM2Parser(ToolParser):
    name = "smollm2"

    def streamer(self) -> ToolCallStreamer:
        return TaggedJsonStreamer(TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

    def system_prompt(self, tools: list[dict]) -> str:
        return ("You are an assistant that can call functions. These are the functions available, "
                f"one JSON description per line:\n<tools>\n{tools_json_lines(tools)}\n</tools>\n\n"
                "When a function call would help, answer with the call and nothing else, written exactly "
                "like this, with one list item per call:\n"
                f'{TOOL_CALL_OPEN}[{{"name": "function_name", "arguments": {{"arg_1": "value_1"}}}}]'
                f"{TOOL_CALL_CLOSE}\n"
                "Use only the functions listed above, with the arguments their descriptions ask for. "
                "When no function helps, answer in plain text.")

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        return f"{TOOL_CALL_OPEN}[{', '.join(json_call(c) for c in tool_calls)}]{TOOL_CALL_CLOSE}"

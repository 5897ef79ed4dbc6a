"""Mistral format: `[TOOL_CALLS]` followed by a JSON list of {"name", "arguments"} objects."""
from __future__ import annotations

from loopserve.tools.base import ToolCallStreamer, ToolParser
from loopserve.tools.prompting import json_call, tools_json_lines
from loopserve.tools.tagged import TaggedJsonStreamer

TOOL_CALLS = "[TOOL_CALLS]"


class MistralParser(ToolParser):
    name = "mistral"

    def streamer(self) -> ToolCallStreamer:
        return TaggedJsonStreamer(TOOL_CALLS, None)

    def system_prompt(self, tools: list[dict]) -> str:
        # Plain text only: Mistral's [AVAILABLE_TOOLS] markers are control tokens, not prompt text.
        return ("You can call these functions, each described by a JSON signature:\n"
                f"{tools_json_lines(tools)}\n\n"
                f"To call functions, answer with {TOOL_CALLS} followed by a JSON list with one object "
                "per call:\n"
                f'{TOOL_CALLS}[{{"name": "function_name", "arguments": {{"arg_1": "value_1"}}}}]')

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        return f"{TOOL_CALLS}[{', '.join(json_call(c) for c in tool_calls)}]"

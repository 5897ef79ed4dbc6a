"""Hermes / Qwen2.5 format: one `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call."""
from __future__ import annotations

from loopserve.tools.base import ToolCallStreamer, ToolParser
from loopserve.tools.prompting import json_call, tools_json_lines
from loopserve.tools.tagged import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TaggedJsonStreamer


class HermesParser(ToolParser):
    name = "hermes"

    def streamer(self) -> ToolCallStreamer:
        return TaggedJsonStreamer(TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

    def system_prompt(self, tools: list[dict]) -> str:
        return ("# Tools\n\nYou may call one or more functions to help with the user's request. "
                "The functions you can call are described by these JSON signatures:\n"
                f"<tools>\n{tools_json_lines(tools)}\n</tools>\n\n"
                "To call a function, write a JSON object with its name and arguments between "
                f"{TOOL_CALL_OPEN} and {TOOL_CALL_CLOSE} tags, one pair of tags per call:\n"
                f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n'
                f"{TOOL_CALL_CLOSE}")

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        return "\n".join(f"{TOOL_CALL_OPEN}\n{json_call(c)}\n{TOOL_CALL_CLOSE}" for c in tool_calls)

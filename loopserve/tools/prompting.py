"""Pieces shared by the formats' system prompts and tool-call rendering."""
from __future__ import annotations

import json


def function_specs(tools: list[dict]) -> list[dict]:
    """The function objects ({name, description, parameters}) of OpenAI-format tools."""
    return [tool.get("function", tool) for tool in tools]


def tools_json_lines(tools: list[dict]) -> str:
    return "\n".join(json.dumps(spec, ensure_ascii=False) for spec in function_specs(tools))


def call_parts(tool_call: dict) -> tuple[str, str]:
    """(name, arguments JSON text) of one OpenAI tool_calls entry."""
    function = tool_call["function"]
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments or {}, ensure_ascii=False)
    return function["name"], arguments.strip() or "{}"


def json_call(tool_call: dict, arguments_key: str = "arguments") -> str:
    """{"name": ..., "arguments": ...} with the arguments text kept as given."""
    name, arguments = call_parts(tool_call)
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{arguments_key}": {arguments}}}'

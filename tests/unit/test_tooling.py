"""Server-side tool plumbing (loopserve/server/tooling.py) without a model: planning tool_choice into
grammars, rendering tool history for templates without tool support, and assembling the final message
or the streamed deltas (with reasoning split off first)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from loopserve.server.errors import APIError
from loopserve.server.protocol import ChatMessage
from loopserve.server.tooling import ChoiceStream, final_message, plan_tools, render_conversation
from loopserve.tools import get_parser

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def feed_all(stream: ChoiceStream, pieces: list[str], finish: str) -> tuple[dict, str]:
    content, reasoning, calls = "", "", {}
    deltas = [stream.feed(p) for p in pieces]
    tail, reason = stream.finish(finish)
    for d in deltas + [tail]:
        content += d.get("content", "")
        reasoning += d.get("reasoning_content", "")
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in c:
                assert entry["id"] is None
                entry["id"] = c["id"]
            entry["name"] = c["function"].get("name", entry["name"])
            entry["arguments"] += c["function"]["arguments"]
    return {"content": content, "reasoning": reasoning, "calls": calls}, reason


def test_required_plan_schema_accepts_calls_and_rejects_others():
    plan = plan_tools([WEATHER, CLOCK], "required", False, "hermes")
    schema = json.loads(plan.structured.key.text)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}], schema)
    jsonschema.validate([{"name": "get_time", "arguments": {}}], schema)
    for bad in ([], [{"name": "nope", "arguments": {}}], [{"name": "get_weather", "arguments": {}}],
                [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert plan_tools([WEATHER], "auto", None, "hermes").parser.name == "hermes"
    assert plan_tools(None, None, None, "hermes").mode == "none"
    named = plan_tools([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}}, None, "hermes")
    assert named.mode == "named" and json.loads(named.structured.key.text) == {"type": "object"}


def test_required_and_named_outputs_become_calls_whole_and_streamed():
    plan = plan_tools([WEATHER, CLOCK], "required", True, "smollm2")
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    message, reason = final_message(text, "stop", plan, None)
    assert reason == "tool_calls" and message["content"] is None
    whole = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert whole == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    got, reason = feed_all(ChoiceStream(plan, None), [text[i:i + 3] for i in range(0, len(text), 3)], "stop")
    assert reason == "tool_calls" and [(c["name"], c["arguments"]) for c in got["calls"].values()] == whole

    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, "smollm2")
    message, reason = final_message('{"city": "Rome"}', "stop", named, None)
    assert reason == "tool_calls" and message["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
    got, reason = feed_all(ChoiceStream(named, None), ['{"ci', 'ty": "Ro', 'me"}'], "stop")
    assert got["calls"][0]["name"] == "get_weather" and got["calls"][0]["arguments"] == '{"city": "Rome"}'


def test_forced_call_cut_short_is_length_with_the_text_as_content():
    plan = plan_tools([WEATHER], "required", None, "smollm2")
    message, reason = final_message('[{"name": "get_wea', "length", plan, None)
    assert reason == "length" and "tool_calls" not in message and message["content"] == '[{"name": "get_wea'
    auto = plan_tools([WEATHER], "auto", None, "hermes")
    message, reason = final_message('<tool_call>\n{"name": "get_weather", "argu', "length", auto, None)
    assert reason == "length" and "tool_calls" not in message


def test_reasoning_is_split_off_before_the_tool_parser_sees_the_text():
    plan = plan_tools([WEATHER], "auto", None, "hermes")
    text = ('<think>Maybe <tool_call> is needed: the user asks for Oslo.</think>Checking.'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    message, reason = final_message(text, "stop", plan, "qwen3")
    assert message["reasoning_content"] == "Maybe <tool_call> is needed: the user asks for Oslo."
    assert message["content"] == "Checking." and reason == "tool_calls"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    for step in (1, 2, 5, 11):
        got, reason = feed_all(ChoiceStream(plan, "qwen3"), [text[i:i + step] for i in range(0, len(text), step)],
                               "stop")
        assert got["reasoning"] == message["reasoning_content"] and got["content"] == "Checking."
        assert got["calls"][0]["arguments"] == '{"city": "Oslo"}' and reason == "tool_calls"


def test_history_is_rendered_in_the_models_format_when_the_template_has_no_tools():
    parser = get_parser("smollm2")
    plan = plan_tools([WEATHER], "auto", None, "smollm2")
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Oslo?"),
            ChatMessage(role="assistant", content=None, tool_calls=[{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]),
            ChatMessage(role="tool", content="3 degrees", tool_call_id="c1")]
    conv, tools = render_conversation(msgs, plan, parser, template_renders_tools=False)
    assert tools is None
    assert conv[0]["content"].startswith("Be brief.") and "get_weather" in conv[0]["content"]
    assert parser.parse(conv[2]["content"]).tool_calls[0].arguments == '{"city": "Oslo"}'
    conv, tools = render_conversation(msgs, plan, parser, template_renders_tools=True)
    assert tools == [WEATHER] and conv[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    with pytest.raises(APIError) as e:
        render_conversation(msgs[:2] + [ChatMessage(role="tool", content="x", tool_call_id="zz")], plan, parser,
                            False)
    assert e.value.param == "messages[2].tool_call_id"

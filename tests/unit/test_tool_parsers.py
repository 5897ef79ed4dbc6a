"""Tool-call parsers: whole-output parsing, streaming under every split, prompts, rendering round
trips, template detection and the reasoning splitter."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import pytest

from loopserve.tools import (
    PARSERS,
    ToolParser,
    detect_parser,
    get_parser,
    template_renders_tools,
)
from loopserve.tools.reasoning import REASONING_PARSERS, Qwen3ReasoningParser

CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")

# Arguments as a model writes them (raw JSON text; the parser must keep it byte for byte).
A_SIMPLE = '{"city": "Paris", "days": 3}'
A_NESTED = ('{"query": {"filters": [{"field": "price", "op": "<=", "value": [1, 2.5, null]}], '
            '"exact": true}, "limit": 10}')
A_UNICODE = '{"text": "Zürich, 東京 😀 naïve", "note": "a } and a ] and a { inside"}'
A_ESCAPES = r'{"quote": "she said \"hi\"", "path": "C:\\temp\\", "accent": "caf\u00e9", "nl": "one\ntwo"}'
A_TAGS = ('{"html": "</tool_call> <tool_call> [TOOL_CALLS] <|python_tag|> </think>", "sep": "a; b", '
          '"code": "f(x=1)]"}')
ARGS = {"simple": A_SIMPLE, "nested": A_NESTED, "unicode": A_UNICODE, "escapes": A_ESCAPES, "tags": A_TAGS}
PARALLEL = [("get_weather", A_SIMPLE), ("search", A_ESCAPES), ("render", A_TAGS)]
PLAIN = "The capital of France is Paris. Use <b>bold</b>, [brackets]; {braces} and (parens) freely."


@dataclass
class Case:
    id: str
    text: str
    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)
    incomplete: bool = False
    # Valid output: the streamed deltas must equal the calls exactly. Otherwise (cut short or
    # malformed) only content, calls and `incomplete` must match: a call whose first delta went out
    # before its JSON broke cannot be taken back.
    valid: bool = True
    sends_nothing: bool = False  # broken before any call delta may go out


def _obj(name: str, args: str, key: str = "arguments") -> str:
    return f'{{"name": "{name}", "{key}": {args}}}'


def _hermes(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tool_call>\n{_obj(n, a)}\n</tool_call>" for n, a in calls)


def _smollm2(calls: list[tuple[str, str]]) -> str:
    return f"<tool_call>[{', '.join(_obj(n, a) for n, a in calls)}]</tool_call>"


def _mistral(calls: list[tuple[str, str]]) -> str:
    return f"[TOOL_CALLS][{', '.join(_obj(n, a) for n, a in calls)}]"


def _llama3(calls: list[tuple[str, str]]) -> str:
    return "; ".join(_obj(n, a, "parameters") for n, a in calls)


def _each_args(fmt) -> list[Case]:
    return [Case(f"args_{k}", fmt([("get_weather", a)]), None, [("get_weather", a)]) for k, a in ARGS.items()]


CASES: dict[str, list[Case]] = {
    "hermes": [
        *_each_args(_hermes),
        Case("parallel", _hermes(PARALLEL), None, PARALLEL),
        Case("content_before", "I'll look that up for you.\n\n" + _hermes(PARALLEL[:1]),
             "I'll look that up for you.\n\n", PARALLEL[:1]),
        Case("content_around", "Checking.\n" + _hermes(PARALLEL[:2]) + "\nDone <now>.",
             "Checking.\n\n\nDone <now>.", PARALLEL[:2]),
        Case("no_arguments", '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
        Case("empty_arguments", _hermes([("get_time", "{}")]), None, [("get_time", "{}")]),
        Case("arguments_first_pretty",
             '<tool_call>\n{\n  "arguments": {\n    "city": "Paris"\n  },\n  "name": "get_weather"\n}\n</tool_call>',
             None, [("get_weather", '{\n    "city": "Paris"\n  }')]),
        Case("list_in_tag", _smollm2(PARALLEL[:2]), None, PARALLEL[:2]),
        Case("plain", PLAIN, PLAIN),
        Case("cut_in_arguments", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
             "Sure.\n", incomplete=True, valid=False),
        Case("cut_in_second", _hermes(PARALLEL[:1]) + '\n<tool_call>\n{"name": "sea',
             None, PARALLEL[:1], incomplete=True, valid=False),
        Case("cut_before_close", _hermes(PARALLEL[:1])[:-4], None, incomplete=True, valid=False),
        Case("missing_brace", 'A\n<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>\nB',
             'A\n<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>\nB', valid=False),
        Case("not_json", "<tool_call>\nI cannot call that.\n</tool_call>",
             "<tool_call>\nI cannot call that.\n</tool_call>", valid=False, sends_nothing=True),
        Case("string_arguments", '<tool_call>{"arguments": "x", "name": "f"}</tool_call>',
             '<tool_call>{"arguments": "x", "name": "f"}</tool_call>', valid=False, sends_nothing=True),
        Case("no_name", '<tool_call>{"arguments": {"a": 1}}</tool_call>',
             '<tool_call>{"arguments": {"a": 1}}</tool_call>', valid=False, sends_nothing=True),
        Case("bad_literal", '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>',
             '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', valid=False),
        Case("junk_after_json", '<tool_call>{"name": "f"} oops</tool_call>' + _hermes(PARALLEL[:1]),
             '<tool_call>{"name": "f"} oops</tool_call>', PARALLEL[:1], valid=False),
    ],
    "smollm2": [
        *_each_args(_smollm2),
        Case("parallel", _smollm2(PARALLEL), None, PARALLEL),
        Case("content_before", "Let me check both.\n" + _smollm2(PARALLEL[:2]), "Let me check both.\n", PARALLEL[:2]),
        Case("two_tags", _smollm2(PARALLEL[:1]) + "\n" + _smollm2(PARALLEL[1:]), None, PARALLEL),
        Case("object_in_tag", f"<tool_call>{_obj('get_weather', A_NESTED)}</tool_call>", None,
             [("get_weather", A_NESTED)]),
        Case("spaced_list", '<tool_call>\n[\n  {"name": "get_time"},\n  {"name": "get_weather", "arguments": '
             f'{A_SIMPLE}}}\n]\n</tool_call>', None, [("get_time", "{}"), ("get_weather", A_SIMPLE)]),
        Case("plain", PLAIN, PLAIN),
        Case("cut_in_list", '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "argu',
             None, incomplete=True, valid=False),
        Case("empty_list", "<tool_call>[]</tool_call>", "<tool_call>[]</tool_call>", valid=False,
             sends_nothing=True),
        Case("bad_second_item", '<tool_call>[{"name": "a"}, {"nom": "b"}]</tool_call>',
             '<tool_call>[{"name": "a"}, {"nom": "b"}]</tool_call>', valid=False),
    ],
    "mistral": [
        *_each_args(_mistral),
        Case("parallel", _mistral(PARALLEL), None, PARALLEL),
        Case("content_before", "I will call two tools.\n\n" + _mistral(PARALLEL[:2]), "I will call two tools.\n\n",
             PARALLEL[:2]),
        Case("with_ids", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1B2c3D4e"}]',
             None, [("get_weather", '{"city": "Paris"}')]),
        Case("parameters_key", '[TOOL_CALLS] [{"name": "get_time", "parameters": {"tz": "UTC"}}]', None,
             [("get_time", '{"tz": "UTC"}')]),
        Case("single_object", f"[TOOL_CALLS]{_obj('get_weather', A_UNICODE)}", None, [("get_weather", A_UNICODE)]),
        Case("plain", PLAIN, PLAIN),
        Case("cut_in_string", '[TOOL_CALLS][{"name": "f", "arguments": {"x": "abc', None, incomplete=True, valid=False),
        Case("marker_only", "[TOOL_CALLS]", None, incomplete=True, valid=False),
        Case("no_list", "[TOOL_CALLS] sorry, nothing to call", "[TOOL_CALLS] sorry, nothing to call", valid=False,
             sends_nothing=True),
    ],
    "llama3_json": [
        *_each_args(_llama3),
        Case("parallel", _llama3(PARALLEL), None, PARALLEL),
        Case("python_tag", "<|python_tag|>" + _llama3(PARALLEL[:2]), None, PARALLEL[:2]),
        Case("leading_whitespace_arguments_key", "\n\n " + _obj("get_weather", A_NESTED), None,
             [("get_weather", A_NESTED)]),
        Case("type_key", '{"type": "function", "name": "get_time", "parameters": {}}', None, [("get_time", "{}")]),
        Case("text_after", _llama3(PARALLEL[:1]) + "\nThat is the call.", "That is the call.", PARALLEL[:1]),
        Case("plain", PLAIN, PLAIN),
        Case("plain_angle", "<b>Paris</b> is the capital.", "<b>Paris</b> is the capital."),
        Case("cut_in_object", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa',
             None, incomplete=True, valid=False),
        Case("tag_only", "<|python_tag|>", None, incomplete=True, valid=False),
        Case("not_a_call", '{"a": 1} is a JSON object.', '{"a": 1} is a JSON object.', valid=False,
             sends_nothing=True),
        Case("bad_second", _llama3(PARALLEL[:1]) + '; {"nom": 1} and more', '{"nom": 1} and more', PARALLEL[:1],
             valid=False),
    ],
    "pythonic": [
        Case("single", '[get_weather(city="Paris", days=3)]', None, [("get_weather", A_SIMPLE)]),
        Case("parallel", "[get_weather(city='Paris'), get_time()]", None,
             [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
        Case("nested", '[search(query={"filters": [{"field": "price", "value": [1, 2.5, None]}], "exact": True}, '
             'limit=10)]', None,
             [("search", ('{"query": {"filters": [{"field": "price", "value": [1, 2.5, null]}], "exact": true}, '
                          '"limit": 10}'))]),
        Case("strings", r"""[note(text="Zürich 😀 (a) ] }", quote='she said "hi"', path="C:\\temp\\", """
             r"""accent="caf\u00e9", esc="it\'s \"x\"")]""", None,
             [("note", json.dumps({"text": "Zürich 😀 (a) ] }", "quote": 'she said "hi"', "path": "C:\\temp\\",
                                   "accent": "café", "esc": "it's \"x\""}, ensure_ascii=False))]),
        Case("json_literals", "[set_flags(on=true, off=false, unset=null)]", None,
             [("set_flags", '{"on": true, "off": false, "unset": null}')]),
        Case("whitespace", "\n [ get_time( ) ,\n  get_weather(city='Oslo'), ]\n", None,
             [("get_time", "{}"), ("get_weather", '{"city": "Oslo"}')]),
        Case("dotted_name", '[weather.get(city="Oslo")]', None, [("weather.get", '{"city": "Oslo"}')]),
        Case("plain", PLAIN, PLAIN),
        Case("plain_brackets", "[1, 2, 3] are numbers.", "[1, 2, 3] are numbers."),
        Case("cut_in_call", '[get_weather(city="Paris"), get_time(tz="Eu', None, incomplete=True, valid=False),
        Case("variable_argument", "[get_weather(city=Paris)]", "[get_weather(city=Paris)]", valid=False,
             sends_nothing=True),
        Case("positional_argument", '[get_weather("Paris")]', '[get_weather("Paris")]', valid=False,
             sends_nothing=True),
        Case("text_after", "[get_time()] is what I would call.", "[get_time()] is what I would call.", valid=False),
    ],
}

ALL_CASES = [pytest.param(name, case, id=f"{name}-{case.id}") for name, cases in CASES.items() for case in cases]


def _stream(parser: ToolParser, pieces: list[str]):
    """Feed the pieces; check the delta protocol; return (content, {index: [id, name, arguments]}, streamer)."""
    streamer = parser.streamer()
    deltas = [streamer.feed(p) for p in pieces] + [streamer.finish()]
    streamed: dict[int, list] = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in streamed:
                assert tc.id is not None and CALL_ID.match(tc.id) and tc.name, "id and name open an index"
                streamed[tc.index] = [tc.id, tc.name, tc.arguments]
            else:
                assert tc.id is None and tc.name is None, "id and name only in the first delta of an index"
                streamed[tc.index][2] += tc.arguments
    assert list(streamed) == list(range(len(streamed)))
    return "".join(d.content for d in deltas), streamed, streamer


def _check_stream(parser: ToolParser, case: Case, expected, pieces: list[str]) -> None:
    assert "".join(pieces) == case.text
    content, streamed, streamer = _stream(parser, pieces)
    assert content == (expected.content or "")
    assert streamer.incomplete == expected.incomplete
    calls = streamer.calls
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected.tool_calls]
    by_id = {entry[0]: entry for entry in streamed.values()}
    for c in calls:
        assert by_id[c.id] == [c.id, c.name, c.arguments]
    if case.valid:
        assert [(n, a) for _, n, a in streamed.values()] == case.calls
        assert all(a for _, _, a in streamed.values())
    if case.sends_nothing:
        assert streamed == {}


def _random_pieces(text: str, seed: int) -> list[str]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        pieces.append(text[i:i + n])
        i += n
    return pieces


@pytest.mark.parametrize("name, case", ALL_CASES)
def test_parse(name, case):
    out = get_parser(name).parse(case.text)
    assert out.content == case.content
    assert [(c.name, c.arguments) for c in out.tool_calls] == case.calls
    assert out.incomplete == case.incomplete
    for c in out.tool_calls:
        assert CALL_ID.match(c.id)
        assert isinstance(json.loads(c.arguments), dict)
    assert len({c.id for c in out.tool_calls}) == len(out.tool_calls)


@pytest.mark.parametrize("name, case", ALL_CASES)
def test_stream_every_two_piece_split(name, case):
    parser = get_parser(name)
    expected = parser.parse(case.text)
    for cut in range(len(case.text) + 1):
        _check_stream(parser, case, expected, [case.text[:cut], case.text[cut:]])


@pytest.mark.parametrize("name, case", ALL_CASES)
def test_stream_one_character_pieces(name, case):
    parser = get_parser(name)
    _check_stream(parser, case, parser.parse(case.text), list(case.text))


@pytest.mark.parametrize("name, case", ALL_CASES)
def test_stream_random_pieces(name, case):
    parser = get_parser(name)
    expected = parser.parse(case.text)
    for seed in range(6):
        _check_stream(parser, case, expected, _random_pieces(case.text, seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_text_is_sent_as_it_arrives(name):
    streamer = get_parser(name).streamer()
    # Parsers that need the whole output's first character to decide send it once that is seen.
    sent = "".join(streamer.feed(ch).content for ch in PLAIN)
    assert sent == PLAIN
    assert streamer.finish().content == ""
    assert streamer.calls == [] and not streamer.incomplete


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("text", [" \n\t ", "\u00a0"])
def test_whitespace_only_output(name, text):
    parser = get_parser(name)
    expected = parser.parse(text)
    assert expected.tool_calls == [] and not expected.incomplete
    assert expected.content == (text if text.strip(" \n\t") else None)
    for pieces in ([text], list(text)):
        content, streamed, _ = _stream(parser, pieces)
        assert content == (expected.content or "") and streamed == {}


@pytest.mark.parametrize("name, tail", [("hermes", "<tool_c"), ("smollm2", "<"), ("mistral", "[TOOL_")])
def test_possible_tag_is_held_until_finish(name, tail):
    streamer = get_parser(name).streamer()
    assert streamer.feed("Hello " + tail).content == "Hello "
    assert streamer.finish().content == tail
    assert not streamer.incomplete


def test_arguments_stream_as_they_arrive():
    streamer = get_parser("hermes").streamer()
    first = streamer.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    [delta] = first.tool_calls
    assert (delta.index, delta.name, delta.arguments) == (0, "get_weather", '{"city": "Pa')
    assert CALL_ID.match(delta.id)
    more = streamer.feed('ris"}}\n</tool')
    assert [(d.index, d.id, d.arguments) for d in more.tool_calls] == [(0, None, 'ris"}')]
    assert streamer.calls == []  # reported once the tag closes
    assert streamer.feed("_call>").tool_calls == []
    assert [c.id for c in streamer.calls] == [delta.id]


def test_name_goes_out_before_the_arguments():
    streamer = get_parser("mistral").streamer()
    streamer.feed("[TOOL_CALLS]")  # how the server's `required` mode primes it
    [delta] = streamer.feed('[{"name": "search"').tool_calls
    assert (delta.name, delta.arguments) == ("search", "")


def test_unknown_parser():
    with pytest.raises(ValueError, match=r"hermes.*llama3_json.*mistral.*pythonic.*smollm2"):
        get_parser("nope")
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic", "smollm2"}


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_web", "description": "Search the web for a query.",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_system_prompt_lists_every_tool(name):
    prompt = get_parser(name).system_prompt(TOOLS)
    for tool in TOOLS:
        assert tool["function"]["name"] in prompt
    assert "Search the web for a query." in prompt


def test_smollm2_prompt_shows_the_format():
    prompt = get_parser("smollm2").system_prompt(TOOLS)
    assert "<tools>" in prompt and "</tools>" in prompt
    assert '<tool_call>[{"name": ' in prompt and '"arguments": {' in prompt


ROUND_TRIP = [
    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": A_ESCAPES}},
    {"id": "call_b", "type": "function", "function": {"name": "search_web", "arguments": A_NESTED}},
    {"id": "call_c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    {"id": "call_d", "type": "function", "function": {"name": "render", "arguments": A_TAGS}},
]


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("count", [1, 4])
def test_render_round_trip(name, count):
    parser = get_parser(name)
    calls = ROUND_TRIP[:count]
    out = parser.parse(parser.render_tool_calls(calls))
    assert out.content is None and not out.incomplete
    assert [c.name for c in out.tool_calls] == [c["function"]["name"] for c in calls]
    assert [json.loads(c.arguments) for c in out.tool_calls] == [json.loads(c["function"]["arguments"])
                                                                   for c in calls]
    if name != "pythonic":  # JSON formats keep the arguments text as given
        assert [c.arguments for c in out.tool_calls] == [c["function"]["arguments"] for c in calls]


HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- tool | tojson }}"
    "{%- endfor %}{{- '</tools>\\nFor each function call, return a json object within <tool_call></tool_call> "
    "XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>"
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>\\n' }}{%- endfor %}")
SMOLLM3_TEMPLATE = HERMES_TEMPLATE.replace("# Tools", "You are SmolLM3. # Tools")
MISTRAL_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- if tools and loop.last %}"
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}[INST]{{ message.content }}[/INST]"
    "{%- elif message.tool_calls %}[TOOL_CALLS]{{ message.tool_calls | tojson }}</s>{%- endif %}{%- endfor %}")
LLAMA31_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n{%- endif %}"
    "{%- for message in messages %}{%- if message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>"
    "\\n\\n<|python_tag|>{{ message.tool_calls[0].function | tojson }}<|eom_id|>{%- elif message.role == 'tool' %}"
    "<|start_header_id|>ipython<|end_header_id|>\\n\\n{{ message.content }}<|eot_id|>{%- endif %}{%- endfor %}")
LLAMA32_PYTHONIC_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\\n\\nIf you decide to invoke any of the function(s),"
    " you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), "
    "func_name2(params)]\\n{{ tools | tojson }}<|eot_id|>{%- endif %}{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>{%- endif %}{%- endfor %}")
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template, parser, renders", [
    (HERMES_TEMPLATE, "hermes", True),
    (SMOLLM3_TEMPLATE, "smollm2", True),
    (MISTRAL_TEMPLATE, "mistral", True),
    (LLAMA31_TEMPLATE, "llama3_json", True),
    (LLAMA32_PYTHONIC_TEMPLATE, "pythonic", True),
    (SMOLLM2_TEMPLATE, "smollm2", False),
    (None, "smollm2", False),
    ("", "smollm2", False),
], ids=["hermes", "smollm3", "mistral", "llama31", "llama32_pythonic", "smollm2", "none", "empty"])
def test_detect_parser(template, parser, renders):
    assert detect_parser(template) == parser
    assert template_renders_tools(template) is renders


def test_template_renders_tools_reads_variables_not_words():
    assert not template_renders_tools("{{ 'You can use tools.' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_renders_tools("{% set t = tools or [] %}{{ t | length }}")
    # A tag jinja2 does not know (HF's {% generation %}) still leaves the variable visible.
    assert template_renders_tools("{% generation %}{% if tools %}x{% endif %}{% endgeneration %}")


REASONING_CASES = [
    ("qwen3", None, "<think>\nThe user wants 2+2.\n</think>\n\nThe answer is 4.", "The user wants 2+2.\n",
     "The answer is 4."),
    ("qwen3", None, "The answer is 4.", None, "The answer is 4."),
    ("qwen3", None, "<think>\n\n</think>\n\nHi <there>.", None, "Hi <there>."),
    ("qwen3", None, "<think>\nStill going when cut <", "Still going when cut <", ""),
    ("qwen3", None, "<thinking> is a tag I like.", None, "<thinking> is a tag I like."),
    ("qwen3", None, "  <thi", None, "  <thi"),
    ("qwen3", True, "Opened by the template.</think>Answer", "Opened by the template.", "Answer"),
    ("deepseek_r1", None, "Okay, so 2+2 is 4.\n</think>\n\n**4**", "Okay, so 2+2 is 4.\n", "**4**"),
    ("deepseek_r1", None, "<think>\nHmm </thin> not yet</think>Done", "Hmm </thin> not yet", "Done"),
    ("deepseek_r1", None, "No end tag, all reasoning", "No end tag, all reasoning", ""),
    ("deepseek_r1", False, "Plain answer.", None, "Plain answer."),
]


@pytest.mark.parametrize("name, starts, text, reasoning, content", REASONING_CASES)
def test_reasoning_split_and_stream(name, starts, text, reasoning, content):
    parser = REASONING_PARSERS[name](starts)
    assert parser.split(text) == (reasoning, content)
    splits = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    splits += [_random_pieces(text, seed) for seed in range(4)]
    for pieces in splits:
        streamer = parser.streamer()
        outs = [streamer.feed(p) for p in pieces] + [streamer.finish()]
        assert "".join(r for r, _ in outs) == (reasoning or "")
        assert "".join(c for _, c in outs) == content


def test_reasoning_defaults():
    assert REASONING_PARSERS["deepseek_r1"]().starts_in_reasoning
    assert not REASONING_PARSERS["qwen3"]().starts_in_reasoning
    assert Qwen3ReasoningParser(starts_in_reasoning=True).starts_in_reasoning


def test_reasoning_streams_before_the_end_tag():
    streamer = REASONING_PARSERS["qwen3"]().streamer()
    assert streamer.feed("<think>Let me see</th") == ("Let me see", "")
    assert streamer.feed("ink>\nIt is 4") == ("", "It is 4")
    assert streamer.finish() == ("", "")


def test_broken_call_sends_no_closing_tag_as_arguments():
    # The arguments object never closes; "</tool_call>" cannot be JSON outside a string, so it is
    # not sent as arguments, and the whole tag falls back to content.
    text = 'A\n<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>'
    content, streamed, streamer = _stream(get_parser("hermes"), list(text))
    assert [(n, a) for _, n, a in streamed.values()] == [("f", '{"a": 1\n')]
    assert content == text and streamer.calls == [] and not streamer.incomplete

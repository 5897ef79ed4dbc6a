"""Constrained decoding in the engine, on the tiny random model: outputs obey the grammar, the request
waits for its grammar without holding up others, unconstrained neighbours are untouched, failures
free everything."""
from __future__ import annotations

import re
import threading
import time

import pytest

from loopserve import SamplingParams
from loopserve.structured import StructuredOutputsParams
from loopserve.structured.backend import XGrammarBackend

GREEDY = dict(temperature=0.0, max_tokens=24)


def constrained(**kw) -> SamplingParams:
    return SamplingParams(**GREEDY, structured_outputs=StructuredOutputsParams(**kw))


def test_choice_and_regex_outputs_match(make_llm):
    llm = make_llm()
    choices = ["alpha", "beta gamma", "delta.epsilon"]
    outs = llm.generate(["pick one:", "another prompt", "x y z"], constrained(choice=choices))
    for o in outs:
        assert o.outputs[0].text in choices
        assert o.outputs[0].finish_reason == "stop"
    rx = r"[a-d]{2,4}-[0-9]{1,3}"
    outs = llm.generate(["id:", "code here"], SamplingParams(temperature=0.8, seed=3, max_tokens=24,
                                                             structured_outputs={"regex": rx}))
    for o in outs:
        assert re.fullmatch(rx, o.outputs[0].text), o.outputs[0].text


def test_json_schema_output_validates(make_llm):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {
        "level": {"enum": ["low", "mid", "high"]}, "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}},
        "required": ["level", "ok", "tags"], "additionalProperties": False}
    llm = make_llm()
    outs = llm.generate(["json please", "more json", "{"], SamplingParams(
        temperature=1.0, seed=7, max_tokens=64, n=2, structured_outputs={"json": schema}))
    import json
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


def test_unconstrained_neighbours_are_unchanged(make_llm):
    llm = make_llm()
    plain = SamplingParams(**GREEDY)
    alone = [o.outputs[0].token_ids for o in llm.generate(["hello there", "general kenobi"], plain)]
    mixed = llm.generate(["hello there", "pick", "general kenobi"],
                         [plain, constrained(choice=["yes", "no"]), plain])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert mixed[1].outputs[0].text in ("yes", "no")


def test_a_compiling_grammar_does_not_hold_up_other_requests(make_llm, monkeypatch):
    llm = make_llm()
    release = threading.Event()
    real_compile = XGrammarBackend.compile

    def slow_compile(self, key):
        release.wait(10)
        return real_compile(self, key)

    monkeypatch.setattr(XGrammarBackend, "compile", slow_compile)
    engine = llm.engine
    from loopserve.engine.core import EngineRequest
    engine.add_request(EngineRequest("slow", [5, 6, 7], constrained(choice=["yes", "no"])))
    engine.add_request(EngineRequest("fast", [8, 9, 10], SamplingParams(**GREEDY)))
    finished: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while engine.has_unfinished() and time.monotonic() < deadline:
        for out in engine.step():
            if out.finish_reason:
                finished[out.request_id] = time.monotonic()
                if out.request_id == "fast":
                    release.set()  # the grammar finishes compiling only after the other request is done
    assert list(finished) == ["fast", "slow"]


def test_a_grammar_that_fails_to_compile_aborts_only_its_request(make_llm, monkeypatch):
    llm = make_llm()

    def broken(self, key):
        raise RuntimeError("boom")

    monkeypatch.setattr(XGrammarBackend, "compile", broken)
    from loopserve.engine.core import EngineRequest
    engine = llm.engine
    engine.add_request(EngineRequest("bad", [5, 6, 7], constrained(regex="[ab]+")))
    engine.add_request(EngineRequest("good", [8, 9], SamplingParams(**GREEDY)))
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason:
                results[out.request_id] = (out.finish_reason, out.stop_reason)
    assert results["bad"][0] == "abort" and "boom" in results["bad"][1]
    assert results["good"][0] == "length"


def test_cached_grammar_gets_its_matcher_without_the_compile_thread(make_llm):
    llm = make_llm()
    params = constrained(choice=["one", "two"])
    llm.generate(["warm"], params)  # compiles and caches
    grammar = llm.engine.structured.grammar_for("probe", params.structured_outputs)
    assert grammar.ready and grammar.matcher is not None and "probe" not in llm.engine.structured._pending


def test_constrained_requests_do_not_speculate(make_llm):
    llm = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "adaptive": False,
                                        "disable_by_batch_size": 1000})
    outs = llm.generate(["a b a b a b a b", "c d c d c d"],
                        [SamplingParams(**GREEDY), constrained(regex="(ab){1,5}")])
    assert re.fullmatch("(ab){1,5}", outs[1].outputs[0].text)


@pytest.mark.parametrize("bad, reason", [
    ({"json": {"type": "objec"}}, "invalid JSON schema"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "a(b"}, "invalid regex"),
    ({"grammar": "root ::= undefined_rule"}, "invalid EBNF grammar"),
    ({"lark": "start: ("}, "invalid Lark grammar"),
    ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ({}, "exactly one of"),
    ({"choice": []}, "non-empty list"),
])
def test_invalid_constraints_are_rejected_with_the_reason(bad, reason):
    with pytest.raises(ValueError, match=reason):
        SamplingParams(structured_outputs=bad)

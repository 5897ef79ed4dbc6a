"""Structured outputs on CPU with SmolLM2's tokenizer: xgrammar against llguidance, and the engine's overhead.

Library part (same tokenizer, same schemas, same token sequences):
  - tokenizer preparation (once per server start);
  - grammar compile time, cold and cached (xgrammar: compile; cached: our cache lookup + a matcher.
    llguidance compiles lazily: constructing a matcher is its compile, plus the first mask);
  - per-token mask time (fill the next-token bitmask, then accept the token), mean / p50 / p99.
Engine part (loopserve's LLM, real SmolLM2, greedy, methods taking turns, best of --repeats):
  - decode tok/s with and without a JSON schema at batch 1 and 8;
  - TTFT (max_tokens=1, prompt already in the prefix cache) with a cached grammar against none.

  python -m bench.structured_bench --model smollm2 --out bench/results/structured-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loopserve import LLM, SamplingParams
from loopserve.fetch import resolve_model
from loopserve.model.loader import load_model_config
from loopserve.model.tokenizer import load_tokenizer

# (schema, a valid instance): the instance's tokens drive the per-token mask timing.
CASES = {
    "ticket": ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "severity": {"type": "integer", "minimum": 1, "maximum": 5},
        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["title", "severity", "labels"], "additionalProperties": False},
        {"title": "Login page crashes on submit", "severity": 4, "labels": ["bug", "auth"]}),
    "tool_call": ({"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
        "name": {"enum": ["read_file", "write_file", "run_tests", "search"]},
        "arguments": {"type": "object", "properties": {"path": {"type": "string"},
                                                       "query": {"type": "string"}},
                      "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False}},
        [{"name": "read_file", "arguments": {"path": "src/loopserve/engine/core.py"}},
         {"name": "search", "arguments": {"query": "def step("}}]),
    "nested": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.com$"},
            "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "email", "address"], "additionalProperties": False},
        "active": {"type": "boolean"}, "score": {"type": "number", "minimum": 0, "maximum": 100}},
        "required": ["user", "active", "score"], "additionalProperties": False},
        {"user": {"name": "Ada Lovelace", "email": "ada.lovelace@example.com",
                  "address": {"city": "London", "zip": "12345"}}, "active": True, "score": 97.5}),
}
PROMPTS = [
    "Return the bug ticket for: the login page crashes on submit.",
    "Which files should I read to understand the engine step? Answer with tool calls.",
    "Give the user record of Ada Lovelace from London.",
    "Summarise the last test run as a ticket.",
    "Plan the next two tool calls to fix the failing test.",
    "Describe a typical user of our service.",
    "File a ticket about slow page loads.",
    "Which tool calls find where the scheduler preempts requests?",
]


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean_us": round(1e6 * statistics.fmean(xs), 1), "p50_us": round(1e6 * xs[len(xs) // 2], 1),
            "p99_us": round(1e6 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1)}


def bench_xgrammar(tok, vocab: int, eos: list[int]) -> dict:
    import xgrammar as xgr

    from loopserve.structured.backend import XGrammarBackend
    from loopserve.structured.params import StructuredOutputsParams

    t0 = time.perf_counter()
    backend = XGrammarBackend(tok, vocab, eos)
    out = {"tokenizer_prep_s": round(time.perf_counter() - t0, 3), "schemas": {}}
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for name, (schema, instance) in CASES.items():
        key = StructuredOutputsParams(json=schema).key
        t0 = time.perf_counter()
        compiled = backend.compile(key)
        cold = time.perf_counter() - t0
        cached = []
        for _ in range(20):
            t0 = time.perf_counter()
            matcher = backend.matcher(backend.cached(key))
            cached.append(time.perf_counter() - t0)
        ids = tok.encode(json.dumps(instance), add_special_tokens=False) + [eos[0]]
        fills, accepted = [], 0
        for t in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            ok = matcher.accept_token(t)
            fills.append(time.perf_counter() - t0)
            if not ok:
                break
            accepted += 1
        out["schemas"][name] = {"compile_cold_ms": round(1e3 * cold, 2),
                                "compile_cached_ms": round(1e3 * statistics.median(cached), 4),
                                "tokens": len(ids), "accepted": accepted, "mask_per_token": _stats(fills),
                                "compiled_bytes": compiled.memory_size_bytes}
    logits = torch.randn(8, vocab)
    full = xgr.allocate_token_bitmask(8, vocab)
    applies = []
    for _ in range(50):
        t0 = time.perf_counter()
        backend.apply(logits, full, list(range(8)))
        applies.append(time.perf_counter() - t0)
    out["apply_batch8"] = _stats(applies)
    return out


def bench_llguidance(tok, vocab: int, eos: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, vocab, eos_token=eos[0])
    out = {"tokenizer_prep_s": round(time.perf_counter() - t0, 3), "schemas": {}}
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    for name, (schema, instance) in CASES.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        creates, firsts = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            matcher = llguidance.LLMatcher(lltok, grammar)
            t1 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            creates.append(t1 - t0)
            firsts.append(time.perf_counter() - t1)
        assert not matcher.is_error(), matcher.get_error()
        matcher = llguidance.LLMatcher(lltok, grammar)
        ids = tok.encode(json.dumps(instance), add_special_tokens=False) + [eos[0]]
        fills, accepted = [], 0
        for t in ids:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            ok = matcher.consume_token(t)
            fills.append(time.perf_counter() - t0)
            if not ok:
                break
            accepted += 1
        out["schemas"][name] = {"compile_cold_ms": round(1e3 * (creates[0] + firsts[0]), 2),
                                "compile_cached_ms": round(1e3 * statistics.median(creates[1:]), 4),
                                "first_mask_ms": round(1e3 * statistics.median(firsts), 3),
                                "tokens": len(ids), "accepted": accepted, "mask_per_token": _stats(fills)}
    return out


def _run(llm: LLM, prompts: list[str], params: list[SamplingParams], batch: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    lens = []
    for i in range(0, len(prompts), batch):
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts[i:i + batch]], params[i:i + batch])
        lens += [len(o.outputs[0].token_ids) for o in outs]
    return time.perf_counter() - t0, lens


def bench_engine(model_path: str, repeats: int, max_tokens: int) -> dict:
    """Constrained against free decoding over the same number of tokens per request: the free run of
    prompt i is forced (ignore_eos) to exactly the length the constrained run of prompt i produced, so
    both keep the same batch occupancy and only the per-token cost differs."""
    llm = LLM(model_path)
    schema = CASES["ticket"][0]
    constrained = SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs={"json": schema})
    out: dict = {}
    for batch, prompts in ((1, PROMPTS[:2]), (8, PROMPTS)):
        _, lens = _run(llm, prompts, [constrained] * len(prompts), batch)  # warm-up: grammar cached, prompts too
        plain = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
        _run(llm, prompts, plain, batch)
        runs = {"none": [], "json_schema": []}
        for _ in range(repeats):
            for name, params in (("none", plain), ("json_schema", [constrained] * len(prompts))):
                secs, got = _run(llm, prompts, params, batch)
                runs[name].append(sum(got) / secs)
        best = {k: max(v) for k, v in runs.items()}
        out[f"batch{batch}"] = {
            "none_tok_s": round(best["none"], 2), "json_schema_tok_s": round(best["json_schema"], 2),
            "ratio": round(best["json_schema"] / best["none"], 3), "tokens_per_run": sum(lens),
            "all_tok_s": {k: [round(r, 2) for r in v] for k, v in runs.items()}}
    one = [SamplingParams(temperature=0, max_tokens=1)]
    one_c = [SamplingParams(temperature=0, max_tokens=1, structured_outputs={"json": schema})]
    ttft = {"none": [], "json_schema": []}
    for _ in range(3 * repeats):
        for name, params in (("none", one), ("json_schema", one_c)):
            secs, _ = _run(llm, PROMPTS[:1], params, 1)
            ttft[name].append(secs)
    med = {k: statistics.median(v) for k, v in ttft.items()}
    out["ttft_cached_grammar"] = {"none_s": round(med["none"], 4), "json_schema_s": round(med["json_schema"], 4),
                                  "added_ms": round(1e3 * (med["json_schema"] - med["none"]), 2)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--skip-engine", action="store_true", help="only the library comparison")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model_path = str(resolve_model(args.model))
    tok = load_tokenizer(model_path)
    cfg = load_model_config(model_path)
    vocab, eos = cfg.vocab_size, list(cfg.eos_token_ids)
    report = {"model": model_path, "device": "cpu", "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "xgrammar": bench_xgrammar(tok, vocab, eos), "llguidance": bench_llguidance(tok, vocab, eos)}
    print(json.dumps({k: report[k] for k in ("xgrammar", "llguidance")}, indent=1), flush=True)
    if not args.skip_engine:
        report["engine"] = bench_engine(model_path, args.repeats, args.max_tokens)
        print(json.dumps(report["engine"], indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

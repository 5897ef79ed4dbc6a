"""`loopserve bench spec`: pick a draft model before deploying it.

For each candidate draft the target generates the prompts with that draft at a fixed k (adaptive length
off, so acceptance is measured cleanly) and, once, without speculation. Reported per draft:

  acceptance_rate       accepted / proposed tokens
  tokens_per_forward    tokens gained per target verify pass (mean accepted length, 1.0 = no gain)
  t_decode, t_verify,   measured seconds of a plain one-token target decode step, of a verify step
  t_draft               (k + 1 tokens), and of one draft forward step, from the runs themselves
  expected_speedup      tokens_per_forward * t_decode / (t_verify + k * t_draft)
  measured_speedup      wall-clock of the plain run / wall-clock of the speculative run
  suggested costs       draft_token_cost = t_draft / t_decode and verify_token_cost =
                        (t_verify / t_decode - 1) / k, for the adaptive controller's config

Prompts file: JSONL (each line a string, {"prompt": ...} or {"messages": [...]}) or plain text, one
prompt per line.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from loopserve.sampling_params import SamplingParams

# A draft run speculates at every step with a fixed k, whatever the acceptance or batch.
_FIXED = {"adaptive": False, "disable_by_batch_size": 1 << 20}


def load_prompts(path: str | Path) -> list:
    """Strings (raw prompts) or lists of chat messages."""
    text = Path(path).read_text()
    out: list = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if str(path).endswith((".jsonl", ".json")):
            item = json.loads(line)
            if isinstance(item, dict):
                item = item.get("messages") or item.get("prompt")
            if not isinstance(item, (str, list)):
                raise ValueError(f"{path}: each line must be a string, {{'prompt': ...}} or {{'messages': [...]}}")
            out.append(item)
        else:
            out.append(line)
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


class StepTimer:
    """Wraps a ModelRunner's forward_logits and sorts its wall times by kind of step."""

    def __init__(self, runner) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self._orig = runner.forward_logits
        runner.forward_logits = self._timed

    def _timed(self, out):
        t0 = time.perf_counter()
        result = self._orig(out)
        dt = time.perf_counter() - t0
        seqs = out.seqs
        if seqs and all(s.num_spec_tokens for s in seqs):
            self.times["verify"].append(dt)
        elif seqs and all(s.num_new_tokens == 1 for s in seqs):
            self.times["decode"].append(dt)
        else:
            self.times["other"].append(dt)
        return result

    def median(self, kind: str) -> float | None:
        t = self.times.get(kind)
        return statistics.median(t) if t else None


def run_workload(llm, prompts: list, params: SamplingParams | list[SamplingParams], batch: int) -> dict:
    """Generate every prompt, `batch` at a time (params: one for all, or one per prompt); wall time,
    tokens and target forwards per sequence."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    engine = llm.engine
    counts = {"seq_forwards": 0, "tokens": 0}
    orig_step = engine.step

    def counted_step():
        outs = orig_step()
        counts["seq_forwards"] += len(outs)
        counts["tokens"] += sum(len(o.new_token_ids) for o in outs)
        return outs

    engine.step = counted_step
    try:
        _reset_caches(llm)
        before = engine.stats().spec_decode
        t0 = time.perf_counter()
        outputs = []
        for i in range(0, len(prompts), batch):
            chunk, chunk_params = prompts[i:i + batch], params[i:i + batch]
            if all(isinstance(p, list) for p in chunk):
                outputs += llm.chat(chunk, chunk_params)
            else:
                outputs += llm.generate(chunk, chunk_params)
        seconds = time.perf_counter() - t0
    finally:
        engine.step = orig_step
    after = engine.stats().spec_decode
    result = {"seconds": seconds, "output_tokens": counts["tokens"],
              "tok_s": counts["tokens"] / seconds if seconds > 0 else 0.0,
              # The first token of each request comes from its prefill: count decode-side tokens only.
              "tokens_per_forward": _ratio(counts["tokens"] - len(prompts), counts["seq_forwards"] - len(prompts)),
              "token_ids": [o.outputs[0].token_ids for o in outputs]}
    if after is not None:
        drafted = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        drafts = after.num_drafts - before.num_drafts
        result["spec"] = {"num_drafts": drafts, "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
                          "acceptance_rate": _ratio(accepted, drafted),
                          "mean_accepted_length": _ratio(accepted + drafts, drafts)}
    return result


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _reset_caches(llm) -> None:
    """Fresh prefix caches so every run pays the same prefills."""
    llm.engine.kv.reset_prefix_cache()
    spec = llm.engine.spec
    kv = getattr(spec.proposer, "kv", None) if spec is not None else None
    if kv is not None:
        kv.reset_prefix_cache()


def select_draft(target: str, drafts: list[str], prompts: list, k: int = 4, max_tokens: int = 128,
                 temperature: float = 0.0, include: tuple[str, ...] = (), llm_kwargs: dict | None = None,
                 log=print) -> dict:
    """Measure every candidate (drafts, plus 'ngram' / 'lookahead' when in `include`) on the prompts."""
    from loopserve import LLM

    kw = dict(llm_kwargs or {})
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=False)
    log(f"baseline: {target} without speculation")
    base_llm = LLM(target, **kw)
    base_timer = StepTimer(base_llm.engine.runner)
    run_workload(base_llm, prompts[:1], SamplingParams(max_tokens=4), 1)  # warm-up
    base = run_workload(base_llm, prompts, params, 1)
    t_decode = base_timer.median("decode")
    del base_llm

    candidates = [("draft_model", d) for d in drafts] + [(m, None) for m in include]
    rows = []
    for method, draft in candidates:
        cfg = {"method": method, "num_speculative_tokens": k, **_FIXED}
        if draft is not None:
            cfg["model"] = draft
        log(f"candidate: {method}" + (f" {draft}" if draft else ""))
        llm = LLM(target, speculative_config=cfg, **kw)
        target_timer = StepTimer(llm.engine.runner)
        draft_runner = getattr(llm.engine.spec.proposer, "runner", None)
        draft_timer = StepTimer(draft_runner) if draft_runner is not None else None
        run_workload(llm, prompts[:1], SamplingParams(max_tokens=4), 1)
        got = run_workload(llm, prompts, params, 1)
        spec = got["spec"]
        t_verify = target_timer.median("verify")
        t_draft = (draft_timer.median("decode") or 0.0) if draft_timer is not None else 0.0
        row = {"method": method, "draft": draft, "k": k, **spec, "seconds": got["seconds"],
               "t_decode": t_decode, "t_verify": t_verify, "t_draft": t_draft,
               "measured_speedup": _ratio(base["seconds"], got["seconds"]),
               "identical_to_target": got["token_ids"] == base["token_ids"] if temperature == 0 else None}
        if t_decode and t_verify:
            row["expected_speedup"] = spec["mean_accepted_length"] * t_decode / (t_verify + k * t_draft)
            row["suggested_config"] = {"draft_token_cost": round(t_draft / t_decode, 3),
                                       "verify_token_cost": round(max(0.0, (t_verify / t_decode - 1) / k), 3)}
        rows.append(row)
        del llm
    best = max(rows, key=lambda r: r.get("expected_speedup", 0.0), default=None)
    return {"target": target, "k": k, "max_tokens": max_tokens, "temperature": temperature,
            "num_prompts": len(prompts), "baseline_seconds": base["seconds"], "t_decode": t_decode,
            "candidates": rows, "best": (best["draft"] or best["method"]) if best else None}


def format_table(report: dict) -> str:
    head = f"{'candidate':40s} {'accept':>7s} {'tok/fwd':>8s} {'t_draft':>8s} {'t_verify':>8s} {'exp.x':>6s} {'meas.x':>6s}"
    lines = [head, "-" * len(head)]
    for r in report["candidates"]:
        name = r["draft"] or r["method"]
        lines.append(f"{name[-40:]:40s} {r['acceptance_rate']:7.2f} {r['mean_accepted_length']:8.2f} "
                     f"{(r['t_draft'] or 0) * 1e3:7.1f}m {(r['t_verify'] or 0) * 1e3:7.1f}m "
                     f"{r.get('expected_speedup', 0.0):6.2f} {r['measured_speedup']:6.2f}")
    lines.append(f"target decode step: {(report['t_decode'] or 0) * 1e3:.1f} ms; best: {report['best']}")
    return "\n".join(lines)


def main(args) -> int:
    """Entry point of `loopserve bench spec` (args from the CLI parser)."""
    prompts = load_prompts(args.prompts)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    kw = {"dtype": args.dtype}
    if args.kv_cache_bytes:
        kw["kv_cache_bytes"] = args.kv_cache_bytes
    report = select_draft(args.target, args.draft or [], prompts, k=args.num_speculative_tokens,
                          max_tokens=args.max_tokens, temperature=args.temperature,
                          include=tuple(args.include or ()), llm_kwargs=kw,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0

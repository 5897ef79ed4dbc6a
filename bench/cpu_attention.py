"""CPU decode attention of the torch backend, SmolLM2's shape: B sessions whose contexts start with one
shared prompt, with and without cascade decode (the shared blocks read once for the batch).

  python -m bench.cpu_attention --out bench/results/cpu-attention.json

Two measurements, both variants in turns (--repeats times each), medians:
  - attention alone: one layer's decode attention over a synthetic pool where each session's own blocks
    are scattered, as they are after a while of serving (run --layers times a step);
  - engine (--engine-sessions, 0 skips it): whole decode steps of the real model, the sessions' prompts
    (the shared prompt plus --own-tokens of their own) prefix-cached first, so each variant re-adds them
    and times its decode steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import loopserve.attention.torch_ref as ref
from loopserve.attention.metadata import AttentionMetadata, KVCache, kv_cache_shape


def make_batch(sessions: int, shared_tokens: int, own_tokens: list[int], block_size: int, hq: int, hkv: int,
               head_dim: int, seed: int = 0):
    """A heads-outer cache and one decode step's inputs (the new token is the last of each context)."""
    gen = torch.Generator().manual_seed(seed)
    shared_blocks = shared_tokens // block_size
    lens = [shared_blocks * block_size + own for own in own_tokens]
    own_blocks = [-(-n // block_size) - shared_blocks for n in lens]
    num_blocks = 1 + shared_blocks + sum(own_blocks)
    order = (torch.randperm(num_blocks - 1 - shared_blocks, generator=gen) + 1 + shared_blocks).tolist()
    width = max(shared_blocks + n for n in own_blocks)
    tables, slots = [], []
    for n, total in zip(own_blocks, lens):
        ids = list(range(1, 1 + shared_blocks)) + [order.pop() for _ in range(n)]
        tables.append(ids + [0] * (width - len(ids)))
        slots.append(ids[(total - 1) // block_size] * block_size + (total - 1) % block_size)
    shape = kv_cache_shape(num_blocks, block_size, hkv, head_dim, heads_outer=True)
    cache = KVCache(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), heads_outer=True)
    q = torch.randn(sessions, hq, head_dim, generator=gen)
    k, v = (torch.randn(sessions, hkv, head_dim, generator=gen) for _ in range(2))

    def meta() -> AttentionMetadata:
        return AttentionMetadata(list(range(sessions + 1)), lens, torch.tensor(slots), torch.tensor(tables),
                                 decode_indices=list(range(sessions)), prefill_indices=[])
    return cache, q, k, v, meta, lens


def time_step(cache, q, k, v, meta, layers: int, cascade: bool, min_shared: int) -> tuple[float, torch.Tensor]:
    """One step's decode attention over `layers` layers (one cache reused: the bytes read are the same),
    per layer; what the backend derives from the metadata once a step is amortised as in the engine."""
    ref.CASCADE_MIN_SHARED_TOKENS = min_shared if cascade else 1 << 62
    backend = ref.TorchPagedAttention()
    step = meta()
    t0 = time.perf_counter()
    for _ in range(layers):
        out = backend.forward(q, k, v, cache, step, q.shape[-1] ** -0.5)
    return (time.perf_counter() - t0) / layers, out


def engine_steps(sessions: int, shared_tokens: int, own: list[int], steps: int, repeats: int) -> dict:
    """Median decode-step time of the real model over `sessions` cached prompts, cascade on and off."""
    from loopserve import LLM, SamplingParams
    from loopserve.fetch import resolve_model

    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(100, 40000, (shared_tokens,), generator=gen).tolist()
    prompts = [{"prompt_token_ids": shared + torch.randint(100, 40000, (n,), generator=gen).tolist()} for n in own]
    llm = LLM(str(resolve_model("smollm2")), kv_cache_bytes=sessions * (shared_tokens + max(own) + 4 * steps) * 46080)
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))  # computes and caches every prompt
    min_shared = ref.CASCADE_MIN_SHARED_TOKENS
    times: dict[str, list[float]] = {"plain": [], "cascade": []}
    for _ in range(repeats):
        for name, runs in times.items():
            ref.CASCADE_MIN_SHARED_TOKENS = min_shared if name == "cascade" else 1 << 62
            for p in prompts:
                llm._add(p, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
            llm._step()  # the prompts' last tokens (everything else is a cache hit)
            while llm.engine.has_unfinished():
                t0 = time.perf_counter()
                llm._step()
                runs.append(time.perf_counter() - t0)
    ref.CASCADE_MIN_SHARED_TOKENS = min_shared
    plain, cascade = (statistics.median(times[n]) for n in ("plain", "cascade"))
    return {"sessions": sessions, "shared_tokens": shared_tokens, "own_tokens": own, "decode_steps": len(times["plain"]),
            "plain_step_s": round(plain, 4), "cascade_step_s": round(cascade, 4), "speedup": round(plain / cascade, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--shared-tokens", type=int, default=2048)
    ap.add_argument("--own-tokens", nargs="+", type=int, default=[500, 2000],
                    help="each session's own context after the shared prompt, spread evenly over this range")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30, help="layers a step (SmolLM2-135M: 30)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--engine-sessions", type=int, default=16)
    ap.add_argument("--engine-steps", type=int, default=8, help="decode steps per variant and repeat")
    ap.add_argument("--engine-repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    min_shared = ref.CASCADE_MIN_SHARED_TOKENS
    lo, hi = args.own_tokens[0], args.own_tokens[-1]
    results = []
    for b in args.sessions:
        own = [lo + (hi - lo) * i // max(1, b - 1) for i in range(b)]
        cache, q, k, v, meta, lens = make_batch(b, args.shared_tokens, own, args.block_size, args.heads,
                                                args.kv_heads, args.head_dim)
        times = {"plain": [], "cascade": []}
        outs = {}
        for _ in range(args.repeats):
            for name, runs in times.items():
                dt, outs[name] = time_step(cache, q, k, v, meta, args.layers, name == "cascade", min_shared)
                runs.append(dt)
        ref.CASCADE_MIN_SHARED_TOKENS = min_shared
        plain, cascade = (statistics.median(times[n]) * 1e3 for n in ("plain", "cascade"))
        row = {"sessions": b, "context_tokens_mean": sum(lens) / b, "shared_tokens": args.shared_tokens,
               "plain_ms_per_layer": round(plain, 3), "cascade_ms_per_layer": round(cascade, 3),
               "speedup": round(plain / cascade, 3), "max_abs_diff": float((outs["plain"] - outs["cascade"]).abs().max())}
        results.append(row)
        print(json.dumps(row))
    engine = None
    if args.engine_sessions:
        n = args.engine_sessions
        engine = engine_steps(n, args.shared_tokens, [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)],
                              args.engine_steps, args.engine_repeats)
        print(json.dumps(engine))
    report = {"bench": "cpu_attention", "platform": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "layers": args.layers, "block_size": args.block_size, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "results": results, "engine": engine}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

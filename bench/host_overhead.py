"""Host work per engine step, with the model's forward replaced by nothing.

Overlap scheduling hides the host's share of a step (scheduling, building the step's inputs, sampling
bookkeeping, reading tokens back into requests, building outputs) behind the device's forward, but
only while that share is shorter than the forward. This runs the real EngineCore with a dummy
model whose forward is skipped (the step's inputs are still built, and a [B, 8] zero logits tensor
is sampled greedily), B decoding requests at a time, and reports the host time per step by batch
size, synchronous and overlapped, so it can be set against the device step times in docs/PERF.md.

  python -m bench.host_overhead --batch 1 16 64 256 --out bench/results/host-overhead.json

--cold-prompt N instead times the host's work before a cold N-token prompt's first forward is launched
(admission, prefix lookup, scheduling, the step's inputs): the device idles through it.

--gc instead times a full garbage collection in a process holding a built engine (B = the first --batch
sequences' worth of KV blocks), before and after engine/process.py freezes the startup heap, as the
engine's own process does: the pause a full collection puts into a step.

--prefix-turn N instead times an agent turn's host work: a request whose first N tokens are cached plus
256 new ones, from add_request until its first token (admission, prefix lookup, scheduling, the step's
inputs, sampling), median of --rounds each of three ways, alternating: as served (the previous turn's
digests taken at once, engine/kv_cache.py HashedRun), with only the block-digest memo (a dict hit a
block), and with neither (every block hashed again).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.gpu_decode import dummy_model_dir
from loopserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loopserve.engine.core import EngineCore, EngineRequest
from loopserve.sampling_params import SamplingParams


def make_core(config: Path, batch: int, overlap: bool, max_model_len: int) -> EngineCore:
    folder = dummy_model_dir(config)
    blocks_per_request = -(-max_model_len // CacheConfig.block_size)
    core = EngineCore(EngineConfig(model=str(folder), load_format="dummy", dtype="fp32", device="cpu",
                                   max_model_len=max_model_len,
                                   cache=CacheConfig(num_blocks=batch * blocks_per_request + 8),
                                   scheduler=SchedulerConfig(max_num_seqs=max(batch, 1),
                                                             max_num_batched_tokens=max(2048, batch)),
                                   overlap_scheduling=overlap))
    runner = core.runner

    def forward_logits(out, prev=None):  # the inputs are built; the forward itself is skipped
        if out.empty:
            return None, []
        runner._prepare(out, prev)
        sampling = [s for s in out.seqs if s.samples]
        return torch.zeros(len(sampling), 8), sampling

    runner.forward_logits = forward_logits
    return core


def measure(core: EngineCore, batch: int, prompt_len: int, steps: int, rounds: int) -> list[float]:
    """Median host seconds per pure-decode step, one value per round."""
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    per_round = []
    for r in range(rounds):
        for i in range(batch):
            core.add_request(EngineRequest(f"r{r}-{i}", [100 + (i + j) % 900 for j in range(prompt_len)], params,
                                           ids_checked=True))  # as the server sends them (server/serving.py)
        while not all(req.num_output_tokens for req in core.requests.values()):
            core.step()  # prefills
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - t0)
        per_round.append(statistics.median(times))
        core.abort(list(core.requests))
        while core.has_unfinished():
            core.step()
    return per_round


def prefix_turn(config: Path, prefix_len: int, rounds: int) -> dict:
    """Host ms from add_request to the first token of prefix_len cached + 256 new tokens."""
    core = make_core(config, 1, False, prefix_len + 512)
    vocab = core.model_config.vocab_size
    prefix = [1 + (j * 7) % (vocab - 2) for j in range(prefix_len)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def turn(rid: str, new: list[int]) -> float:
        t0 = time.perf_counter()
        core.add_request(EngineRequest(rid, prefix + new, params, ids_checked=True))
        while core.has_unfinished():
            core.step()
        return time.perf_counter() - t0

    turn("cache-the-prefix", [5] * 256)
    times: dict[str, list[float]] = {"served": [], "memo": [], "cleared": []}
    for r in range(rounds):
        for mode in times:
            if mode != "served":
                core.kv._runs.clear()
                core.kv._run_tokens = 0
            if mode == "cleared":
                core.kv._digests.clear()
            times[mode].append(turn(f"{mode}{r}", [1 + (r * 31 + j * 3) % (vocab - 2) for j in range(256)]))
    assert core.kv.stats.hit_tokens >= prefix_len  # the turns did hit the cached prefix
    return {"prefix_len": prefix_len, "new_tokens": 256,
            "turn_ms_served": statistics.median(times["served"]) * 1e3,
            "turn_ms_memo_only": statistics.median(times["memo"]) * 1e3,
            "turn_ms_nothing_reused": statistics.median(times["cleared"]) * 1e3}


def cold_prompt(config: Path, prompt_len: int, rounds: int) -> dict:
    """Median host ms from add_request to the launch of a fresh prompt_len-token prompt's first forward."""
    core = make_core(config, 1, False, prompt_len + 1)
    vocab = core.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    launched: list[float | None] = []
    forward_logits = core.runner.forward_logits

    def first_forward(out, prev=None):
        if launched[-1] is None:
            launched[-1] = time.perf_counter()
        return forward_logits(out, prev)

    core.runner.forward_logits = first_forward
    times = []
    for r in range(rounds):
        ids = [1 + (r * 131 + j * 7919) % (vocab - 2) for j in range(prompt_len)]
        launched.append(None)
        t0 = time.perf_counter()
        core.add_request(EngineRequest(f"cold{r}", ids, params, ids_checked=True))
        while core.has_unfinished():
            core.step()
        times.append(launched[-1] - t0)
    assert core.kv.stats.hit_tokens == 0  # every prompt was cold
    return {"prompt_len": prompt_len, "ms_to_first_forward": statistics.median(times) * 1e3}


def full_collection_ms(config: Path, batch: int, rounds: int) -> dict:
    """Milliseconds of gc.collect() (best of rounds) with an engine built, then after freezing its heap."""
    import gc

    from loopserve.engine.process import freeze_startup_heap

    core = make_core(config, batch, True, min(8192, json.loads(config.read_text())["max_position_embeddings"]))
    tracked = len(gc.get_objects())

    def best() -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            gc.collect()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    before = best()
    freeze_startup_heap()
    after = best()
    gc.unfreeze()
    return {"tracked_objects": tracked, "kv_blocks": core.kv.num_blocks, "full_collection_ms": before,
            "full_collection_ms_frozen": after}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "smollm2-135m.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix-turn", type=int, metavar="N", help="time a turn over N cached tokens instead")
    ap.add_argument("--cold-prompt", type=int, metavar="N", help="time the host's work before a cold prompt's "
                    "first forward instead")
    ap.add_argument("--gc", action="store_true", help="time a full garbage collection instead")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.gc:
        single = "host_overhead_gc", lambda: full_collection_ms(args.config, args.batch[0], args.rounds)
    elif args.cold_prompt:
        single = "host_overhead_cold_prompt", lambda: cold_prompt(args.config, args.cold_prompt, args.rounds)
    elif args.prefix_turn:
        single = "host_overhead_prefix_turn", lambda: prefix_turn(args.config, args.prefix_turn, args.rounds)
    else:
        single = None
    if single is not None:
        name, run_single = single
        result = {"bench": name, "config": args.config.name, "rounds": args.rounds,
                  "python": platform.python_version(), "machine": platform.machine(), **run_single()}
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    rows = []
    for batch in args.batch:
        row = {"batch": batch}
        for mode, overlap in (("sync", False), ("overlap", True)):
            core = make_core(args.config, batch, overlap, args.prompt_len + args.steps + 8)
            per_round = measure(core, batch, args.prompt_len, args.steps, args.rounds)
            row[f"{mode}_ms_per_step"] = statistics.median(per_round) * 1e3
            row[f"{mode}_us_per_request"] = statistics.median(per_round) * 1e6 / batch
            row[f"{mode}_rounds_ms"] = [t * 1e3 for t in per_round]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"bench": "host_overhead", "config": args.config.name, "prompt_len": args.prompt_len,
              "steps": args.steps, "rounds": args.rounds, "python": platform.python_version(),
              "torch": torch.__version__, "machine": platform.machine(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where a step's time goes, for the issue-5 cells still short of target (dummy weights, torch.profiler).

Four phases, each profiled on its own after a warm-up, each one JSON line:
  decode_b1         batch-1 decode steps (graph replays): device busy time against wall time shows the
                    host gap overlap scheduling is meant to close;
  cold_long         a cold `--long-len`-token prompt to its first token (the cold TTFT cell);
  cached_plus_new   256 new tokens over that prompt as a cached prefix (the cached TTFT cell);
  mixed             `--batch` requests decoding while a `--prefill-len` prompt arrives every step (the
                    eager mixed steps that bound saturation throughput).
Per phase: wall ms per step and in all, device-busy ms per step and in all (sum of kernel time), the
top kernels and the top host-side ops by self time. The first three also run inside
`bench.gpu_decode engine --profile-top N`, on the engine its timed rows warmed (`profile_turns`).

  python -m bench.gpu_profile --config bench/configs/llama-3.1-8b.json --out gpu.jsonl
"""
from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.gpu_decode import dummy_model_dir, emit
from loopserve.config import FUSED_DECODE_GEMV_MODES, CacheConfig, EngineConfig, SchedulerConfig
from loopserve.engine.core import EngineCore, EngineRequest
from loopserve.sampling_params import SamplingParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _summary(prof, phase: str, wall_s: float, steps: int, top: int) -> dict:
    events = prof.key_averages()
    rows = []
    for e in events:
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        rows.append((e.key[:90], e.count, dev_us / 1e3, e.self_cpu_time_total / 1e3))
    # Device busy time is the kernels' own rows: a CPU op's row (aten::mm) repeats its kernels' time.
    busy_ms = sum(r[2] for r, e in zip(rows, events) if e.device_type != DeviceType.CPU)
    by_dev = sorted((r for r, e in zip(rows, events) if r[2] > 0 and e.device_type != DeviceType.CPU),
                    key=lambda r: -r[2])[:top]
    by_cpu = sorted(rows, key=lambda r: -r[3])[:top]
    on_device = busy_ms > 0  # no kernels recorded: a CPU run, nothing to say about device idle time
    return {"mode": f"profile_{phase}", "steps": steps, "wall_ms_per_step": wall_s * 1e3 / steps,
            "device_busy_ms_per_step": busy_ms / steps if on_device else None,
            "wall_ms": wall_s * 1e3, "device_busy_ms": busy_ms if on_device else None,
            "device_idle_share": max(0.0, 1 - busy_ms / (wall_s * 1e3)) if on_device else None,
            "top_kernels": [{"name": n, "calls": c, "ms": round(d, 3)} for n, c, d, _ in by_dev],
            "top_host_ops": [{"name": n, "calls": c, "self_cpu_ms": round(h, 3)} for n, c, _, h in by_cpu]}


def profiled(core: EngineCore, device: str, phase: str, steps: int, top: int, before_step=None) -> dict:
    """Up to `steps` engine steps (fewer if the engine runs out of work) under torch.profiler, summed
    up as the `profile_<phase>` row; `before_step(i)`, if given, runs before step i (inside the profile)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _sync(device)
    done = 0
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        while done < steps and core.has_unfinished():
            if before_step is not None:
                before_step(done)
            core.step()
            done += 1
        _sync(device)
        wall = time.perf_counter() - t0
    return _summary(prof, phase, wall, max(done, 1), top)


def add_request(core: EngineCore, rid: str, ids: list[int], max_tokens: int) -> None:
    """A greedy request of `ids`, sent as the server sends them (bench/gpu_decode.py: ids_checked)."""
    core.add_request(EngineRequest(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                   ids_checked=True))


def drain(core: EngineCore) -> None:
    while core.has_unfinished():
        core.step()


def profile_turns(core: EngineCore, device: str, prompt: Callable[[int], list[int]], long_len: int,
                  top: int) -> Iterator[dict]:
    """The decode_b1, cold_long and cached_plus_new phases, on an engine that has already run their shapes
    (a batch-1 decode of a 128-token prompt, a cold `long_len` prompt, 256 new tokens over a cached one),
    so each costs its own seconds and no first-time compile. `prompt(n)`: n fresh token ids. long_len 0:
    the decode phase alone."""
    add_request(core, "profile_b1", prompt(128), 64)
    for _ in range(4):
        core.step()
    yield profiled(core, device, "decode_b1", 32, top)
    drain(core)
    if long_len <= 0:
        return
    long_prompt = prompt(long_len)
    add_request(core, "profile_cold", long_prompt, 1)
    yield profiled(core, device, "cold_long", 8, top)
    drain(core)
    add_request(core, "profile_cached", long_prompt + prompt(256), 1)
    yield profiled(core, device, "cached_plus_new", 8, top)
    drain(core)


def run(config: Path, device: str, long_len: int, prefill_len: int, batch: int, top: int,
        decode_only: bool = False, fused_gemv: str = "auto") -> list[dict]:
    folder = dummy_model_dir(config)
    dtype = "bf16" if device.startswith("cuda") else "fp32"
    kv_bytes = 8 << 30 if device.startswith("cuda") else 1 << 30
    sched = SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=max(batch + 8, 16),
                            long_prefill_token_threshold=8192)
    core = EngineCore(EngineConfig(model=str(folder), load_format="dummy", dtype=dtype, device=device,
                                   max_model_len=long_len + 512, cache=CacheConfig(kv_cache_bytes=kv_bytes),
                                   scheduler=sched, fused_decode_gemv=fused_gemv))
    vocab = core.model_config.vocab_size
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 1) for _ in range(n)]

    add_request(core, "warm", prompt(128), 16)
    drain(core)
    if decode_only:
        return list(profile_turns(core, device, prompt, 0, top))
    warm_prompt = prompt(long_len)
    add_request(core, "long_warm", warm_prompt, 1)
    drain(core)
    add_request(core, "long_cached_warm", warm_prompt + prompt(256), 1)  # the cached + 256 shape itself, warmed
    drain(core)
    results = list(profile_turns(core, device, prompt, long_len, top))
    # decodes mixed with a new prompt every step
    for i in range(batch):
        add_request(core, f"d{i}", prompt(512), 256)
    while not all(r.num_output_tokens for r in core.requests.values()):
        core.step()

    def arrival(i: int) -> None:
        add_request(core, f"p{i}", prompt(prefill_len), 1)

    for i in range(3):  # warm the mixed shapes
        arrival(1000 + i)
        core.step()
    results.append(profiled(core, device, "mixed", 10, top, before_step=arrival))
    core.abort(list(core.requests))
    drain(core)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="an HF config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--long-len", type=int, default=8192)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--decode-only", action="store_true", help="only the batch-1 decode phase")
    ap.add_argument("--fused-decode-gemv", choices=FUSED_DECODE_GEMV_MODES, default="auto",
                    help="EngineConfig.fused_decode_gemv")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    for res in run(args.config, args.device, args.long_len, args.prefill_len, args.batch, args.top,
                   args.decode_only, args.fused_decode_gemv):
        res["fused_decode_gemv"] = args.fused_decode_gemv
        emit(res, args.config, args.device, args.out)


if __name__ == "__main__":
    main()

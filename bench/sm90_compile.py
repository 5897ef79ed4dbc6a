"""Triton kernels compiled for Hopper (sm_90) on a machine without a GPU, and how fast a pool of threads
compiles the startup tuners' candidates.

Triton builds PTX and runs its bundled ptxas without a device, so a kernel variant can be compiled
here as the JIT on an H100 would: integers and pointers divisible by 16 (except the kernel's
do_not_specialize ones), unit strides as the constant 1. tests/attention/test_compile_hopper.py
builds every variant the GPU path launches this way.

The startup tuners (runner/tuning.py) run their candidates' first calls, nearly all compile time, on a
thread pool. This times the 8B shape's GEMV and decode-attention tuning candidates compiled on 1 and
on N threads, each round in a fresh process with an empty Triton cache, the counts alternating:

  python -m bench.sm90_compile --threads 1 2 --rounds 3 --out bench/results/sm90-compile-threads.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict, floats=(), ones=(), **options):
    """`kernel` (a @triton.jit function) compiled for sm_90 as the JIT specialises it: `pointers` maps
    pointer parameters to their types, `floats` are fp32 scalars, `ones` unit strides, every other
    parameter an i32 divisible by 16 unless the kernel does not specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {**constexprs, **dict.fromkeys(ones, 1)}
    params = list(inspect.signature(kernel.fn).parameters)
    nospec = {params[d] if isinstance(d, int) else d for d in getattr(kernel, "do_not_specialize", ()) or ()}
    signature, attrs = {}, {}
    for i, p in enumerate(params):
        if p in constexprs:
            signature[p] = "constexpr"
            continue
        signature[p] = pointers.get(p) or ("fp32" if p in floats else "i32")
        if signature[p] != "fp32" and p not in nospec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def programs_an_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many programs of a compiled kernel an sm_90 SM holds at once: 64K registers, allocated to
    each warp in 256s; 228 KB of shared memory, 1 KB of it reserved for each program; 64 warps."""
    warp_registers = -(-registers * 32 // 256) * 256
    return min(65536 // max(1, warp_registers * num_warps), 228 * 1024 // (shared_bytes + 1024), 64 // num_warps)


DECODE_POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "bt_ptr": "*i64", "lens_ptr": "*i32",
                   "acc_ptr": "*fp32", "stat_ptr": "*fp32", "ticket_ptr": "*i32", "out_ptr": "*bf16",
                   "q_rows_ptr": "*i64", "out_rows_ptr": "*i64", "kn_ptr": "*bf16", "vn_ptr": "*bf16",
                   "pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64"}
DECODE_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_btn", "stride_ad", "stride_sk", "stride_od")


def decode_constexprs(block_n: int, prefetch: bool, pipeline: bool = False, rows: bool = False,
                      rotary: bool = False) -> dict:
    """The decode kernel's compile-time arguments on the 8B shape (GQA group 4, head_dim 128)."""
    from loopserve.attention import triton_decode as td

    return dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=block_n, DOT_PRECISION="tf32",
                SPLIT_PAD=td.MAX_SPLITS, HAS_ROWS=rows, ROTARY=rotary, GDC=True, PREFETCH=prefetch,
                PIPELINE=pipeline)


def gemv_launch(tile, prologue: str, rows: int, k: int = 4096) -> tuple[dict, dict, int]:
    """(pointer types, compile-time arguments, warps) of the fused GEMV as fused_gemv launches `tile`
    at `rows` rows of K = k with a prologue ("none", "norm" or "silu"; a residual add unless "norm"),
    or as the logits GEMV ("logits": the norm, fp32 output, no residual)."""
    import triton

    from loopserve.model import gemv

    block_n, block_k, warps = gemv.launch_shape(tile, rows, k)
    split = tile.split_k > 1
    norm = prologue in ("norm", "logits")
    pointers = {**dict.fromkeys(["X", "W", "BIAS", "RES", "NW"], "*bf16"),
                "Y": "*fp32" if prologue == "logits" else "*bf16",
                "PART": "*fp32" if split else "*bf16", "TICKET": "*i32" if split else "*bf16"}
    constexprs = dict(NORM=norm, SILU=prologue == "silu", HAS_BIAS=False, HAS_RES=not norm,
                      BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
                      NORM_BLOCK=gemv.norm_block(rows, k, warps), GDC=True, SPLIT_K=tile.split_k)
    return pointers, constexprs, warps


def tuning_variants() -> list:
    """Zero-argument compiles of what the 8B shape's startup tuners first run: every GEMV tile with
    each prologue at one row (K = 4,096), and every decode tile of each regime."""
    from loopserve.attention import triton_decode as td
    from loopserve.model import gemv

    jobs = []
    for tile in gemv.GPU_CANDIDATE_TILES:
        for prologue in ("none", "norm", "silu"):
            pointers, constexprs, warps = gemv_launch(tile, prologue, 1)
            jobs.append(lambda pointers=pointers, constexprs=constexprs, warps=warps: compile_for_hopper(
                gemv._gemv_kernel, pointers, constexprs, floats=("eps",), num_warps=warps, num_stages=1))
    for regime, tiles in td._GPU_DECODE_CANDIDATES.items():
        for tile in tiles:
            jobs.append(lambda tile=tile, regime=regime: compile_for_hopper(
                td._decode_kernel, DECODE_POINTERS, decode_constexprs(tile.block_n, regime == td.FEW, tile.pipeline),
                floats=("qk_scale",), ones=DECODE_UNIT_STRIDES, num_warps=tile.num_warps,
                num_stages=tile.num_stages))
    return jobs


def compile_all(threads: int) -> tuple[int, float]:
    """(variants, wall seconds) to compile tuning_variants() on `threads` threads (1: in turn)."""
    jobs = tuning_variants()
    start = time.perf_counter()
    if threads == 1:
        for job in jobs:
            job()
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda job: job(), jobs))
    return len(jobs), time.perf_counter() - start


def _timed_child(threads: int) -> tuple[int, float]:
    """compile_all in a fresh process with an empty Triton cache (nothing compiled before counts)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_INTERPRET": "0",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run([sys.executable, "-m", "bench.sm90_compile", "--child", str(threads)], env=env,
                              cwd=ROOT, capture_output=True, text=True, check=True)
    variants, seconds = json.loads(proc.stdout.splitlines()[-1])
    return variants, seconds


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(compile_all(args.child)))
        return None
    seconds: dict[int, list[float]] = {n: [] for n in args.threads}
    variants = 0
    for _ in range(args.rounds):
        for n in args.threads:
            variants, s = _timed_child(n)
            seconds[n].append(round(s, 3))
    medians = {n: statistics.median(ts) for n, ts in seconds.items()}
    first = args.threads[0]
    res = {"bench": "sm90_compile", "variants": variants, "cores": len(os.sched_getaffinity(0)),
           "seconds": {str(n): ts for n, ts in seconds.items()},
           "median_s": {str(n): m for n, m in medians.items()},
           "speedup_over_first": {str(n): round(medians[first] / m, 3) for n, m in medians.items()}}
    print(json.dumps(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()

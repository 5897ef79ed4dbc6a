"""Every Triton kernel variant the GPU path launches, compiled for Hopper (sm_90) on this machine.

The interpreter checks what the kernels compute but not that they compile: a construct the
interpreter accepts can still fail in Triton's compiler, and a GPU session would spend its minutes
finding out. Triton compiles to PTX and runs its bundled ptxas without a GPU, so each variant is built
here for the H100/H200 target, at the real model shapes (Llama-3.1-8B heads, bf16). The installed
Triton may be newer than the GPU machine's; a pass here is necessary, not sufficient.

The tests run Triton in its interpreter (tests/conftest.py), whose kernels cannot be compiled, so the
compiles run in one child process without it; each test reads its variants' results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
import torch  # noqa: E402

if torch.cuda.is_available():
    # There the GPU tests compile and run every variant for real, within the GPU script's time budget.
    pytest.skip("a CUDA device compiles and runs these kernels in the GPU tests", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import json, re, subprocess, sys, tempfile
    from bench.sm90_compile import (DECODE_POINTERS, DECODE_UNIT_STRIDES, compile_for_hopper, decode_constexprs,
                                    gemv_launch)
    from loopserve.attention import triton_decode as td, triton_extend as te
    from loopserve.model import fused_ops as fo, gated_mlp, gemv
    from loopserve.runner import argmax, step_inputs

    results = {}

    def ptxas_usage(ptx):
        """(registers, spill-store bytes) a thread, from ptxas -v; (None, None) if it cannot tell."""
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            err = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=120).stderr
            regs, spills = re.search(r"Used (\\d+) registers", err), re.search(r"(\\d+) bytes spill stores", err)
            return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)
        except Exception:
            return None, None

    def build(name, kernel, pointers, constexprs, floats=(), ones=(), **options):
        """As the JIT specialises (bench/sm90_compile.py); records what it compiled to."""
        try:
            k = compile_for_hopper(kernel, pointers, constexprs, floats, ones, **options)
            ptx = k.asm["ptx"]
            regs, spills = ptxas_usage(ptx)
            results[name] = {"ok": True, "shared": k.metadata.shared, "registers": regs, "spill_bytes": spills,
                             "warps": options.get("num_warps", 4), "wgmma": "wgmma.mma_async" in ptx,
                             "tma": "cp.async.bulk.tensor" in ptx,
                             "gdc": [op for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents")
                                     if op in ptx]}
        except Exception as e:
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}

    for split in (False, True):
        for pack in (False, True):
            for block_n in (64, 128):
                build(f"extend-split{int(split)}-pack{int(pack)}-n{block_n}", te._extend_kernel,
                      {**dict.fromkeys("QKVO", "*bf16"), "BT": "*i64", "QSL": "*i32", "SL": "*i32",
                       "SEQ_IDS": "*i32", "WS": "*fp32", "ML": "*fp32"},
                      dict(GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=block_n, DOT_PREC="tf32",
                           SKIP_SINGLE=True, SPLIT=split, PACK_GQA=pack, TOKENS=16 if pack else 64,
                           HAS_SEQ_IDS=split),
                      floats=("qk_scale",), num_warps=4, num_stages=2)
    # Every tile the startup tuner may pick (runner/extend_tuning.py), unsplit, as an 8B model launches it;
    # the few-programs ones also split (those that aim at several programs an SM), and packed by GQA
    # group and split, as short launches take them.
    for regime, tiles in te._GPU_EXTEND_CANDIDATES.items():
        for tile in tiles:
            variants = [(False, False)]
            if regime == te.FEW:
                variants += [(True, False)] * (tile.per_sm > 1) + [(True, True)]
            for split, packed in variants:
                build(f"extend-tuned-{regime}-{tile}" + ("-packed" if packed else "") + ("-split" if split else ""),
                      te._extend_kernel,
                      {**dict.fromkeys("QKVO", "*bf16"), "BT": "*i64", "QSL": "*i32", "SL": "*i32",
                       "SEQ_IDS": "*i32", "WS": "*fp32", "ML": "*fp32"},
                      dict(GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                           DOT_PREC="tf32", SKIP_SINGLE=False, SPLIT=split, PACK_GQA=packed,
                           TOKENS=tile.block_m // 4 if packed else tile.block_m, HAS_SEQ_IDS=False),
                      floats=("qk_scale",), num_warps=tile.num_warps, num_stages=tile.num_stages,
                      **({"maxnreg": tile.max_registers} if tile.max_registers else {}))
    for rows, rotary, prefetch in ((False, False, True), (True, False, False), (False, True, True),
                                   (False, True, False)):
        build(f"decode-rows{int(rows)}-rotary{int(rotary)}-prefetch{int(prefetch)}", td._decode_kernel,
              DECODE_POINTERS, decode_constexprs(td.BLOCK_N, prefetch, rows=rows, rotary=rotary),
              floats=("qk_scale",), num_warps=4,
              ones=DECODE_UNIT_STRIDES)
    # Every tile the startup tuner may pick for the decode kernel (runner/decode_tuning.py), in the
    # variants each regime launches: few programs read their first tile early (and rotate, at batch 1).
    for regime, tiles in td._GPU_DECODE_CANDIDATES.items():
        for tile in tiles:
            for rotary in ((False, True) if regime == td.FEW else (False,)):
                build(f"decode-tuned-{regime}-{tile}-rotary{int(rotary)}", td._decode_kernel,
                      DECODE_POINTERS,
                      decode_constexprs(tile.block_n, regime == td.FEW, tile.pipeline, rotary=rotary),
                      floats=("qk_scale",), num_warps=tile.num_warps, num_stages=tile.num_stages,
                      ones=DECODE_UNIT_STRIDES)
    build("extend-merge", te._merge_splits_kernel, {"acc_ptr": "*fp32", "stat_ptr": "*fp32", "out_ptr": "*bf16"},
          dict(HEAD_DIM=128, SPLIT_PAD=8), num_warps=4, ones=("stride_ad", "stride_sk", "stride_od"))
    # Every tile the startup tuner may pick, as launched at 1 and 4 rows (8B shapes: K = 4,096), the
    # logits GEMV (fp32 output) included.
    for tile in gemv.GPU_CANDIDATE_TILES:
        for prologue in ("none", "norm", "silu", "logits"):
            for rows in (1, 4):
                pointers, constexprs, warps = gemv_launch(tile, prologue, rows)
                build(f"gemv-{tile}-{prologue}-m{rows}", gemv._gemv_kernel, pointers, constexprs,
                      floats=("eps",), num_warps=warps, num_stages=1)
    # Every tile the gate_up + SiLU-mul tuner may pick (runner/gated_mlp_tuning.py), K a multiple of the
    # tile's (the 8B shape) or not.
    # TMA tiles also as plain loads: their fallback where rows are not 16-byte aligned.
    for tile in gated_mlp.GPU_CANDIDATE_TILES:
        bm, bn, bk = tile.block_m, tile.block_n, tile.block_k
        for even_k in (True, False):
            build(f"gated-{tile}-evenk{int(even_k)}", gated_mlp._gate_up_silu_kernel, dict.fromkeys("XWY", "*bf16"),
                  dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=even_k),
                  num_warps=tile.num_warps, num_stages=tile.num_stages)
        if tile.tma:
            build(f"gated-{tile}-descriptors", gated_mlp._gate_up_silu_tma_kernel,
                  {"x_desc": f"tensordesc<bf16[{bm},{bk}]>", "w_desc": f"tensordesc<bf16[{bn},{bk}]>",
                   "y_desc": f"tensordesc<bf16[{bm},{bn}]>"},
                  dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PROGRAMS=132 * tile.persistent_per_sm),
                  num_warps=tile.num_warps, num_stages=tile.num_stages)
    # Step-to-step arguments the JIT must not specialise (only visible outside the interpreter).
    results["unspecialised-gated"] = {name: list(k.do_not_specialize) for name, k in (
        ("plain", gated_mlp._gate_up_silu_kernel), ("tma", gated_mlp._gate_up_silu_tma_kernel))}
    build("rms-norm", fo._rms_norm_kernel,
          dict.fromkeys(["x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr"], "*bf16"),
          dict(HAS_RESIDUAL=True, BLOCK=4096), floats=("eps",), num_warps=16)
    build("rotary-store", fo._rotary_qk_kernel,
          {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr"], "*bf16"), "pos_ptr": "*i64",
           "cache_ptr": "*fp32", "slot_ptr": "*i64"},
          dict(BLOCK_H=16, BLOCK_D=64, STORE_KV=True), num_warps=4)
    build("silu-mul", fo._silu_and_mul_kernel, {"gu_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK=1024),
          num_warps=4)
    build("argmax-chunk", argmax._chunk_argmax_kernel, {"x_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i64"},
          dict(CHUNK=argmax.CHUNK), num_warps=4)
    build("argmax-merge", argmax._merge_argmax_kernel, {"val_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*i64"},
          dict(BLOCK=32), num_warps=1)
    build("unpack-decode-inputs", step_inputs._unpack_decode_kernel,
          {"packed_ptr": "*i64", "prev_ptr": "*i64", "ids_ptr": "*i64", "pos_ptr": "*i64", "slot_ptr": "*i64",
           "lens_ptr": "*i32", "tables_ptr": "*i64"}, dict(BLOCK_W=256), num_warps=1)
    json.dump(results, sys.stdout)
''')


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"the compile child failed:\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout)
    if any("ptxas" in r.get("error", "").lower() and "not found" in r.get("error", "").lower()
           for r in results.values()):
        pytest.skip("this Triton build cannot assemble for sm_90 (no ptxas)")
    return results


def _assert_built(compiled: dict, prefix: str) -> None:
    names = [n for n in compiled if n.startswith(prefix)]
    assert names, f"no variant named {prefix}*"
    for n in names:
        assert compiled[n]["ok"], f"{n}: {compiled[n]['error']}"
        assert compiled[n]["shared"] <= 228 * 1024, f"{n} needs {compiled[n]['shared']} bytes of shared memory"


@pytest.mark.parametrize("kernel", ["extend-", "decode-", "gemv-", "gated-", "rms-norm", "rotary-store", "silu-mul",
                                    "argmax-", "unpack-decode-inputs"])
def test_compiles_for_sm90(compiled, kernel):
    _assert_built(compiled, kernel)


@pytest.mark.parametrize("kernel", ["decode-", "gemv-"])
def test_decode_step_kernels_do_not_spill(compiled, kernel):
    """The kernels of a batch-1 decode step are latency-bound: spilled registers put local-memory
    round trips into every program (ptxas -v, with the JIT's specialisations). The extend kernel's
    64 x 128 4-warp tiles do spill (~20-76 bytes), yet measured fastest at 8k cached + 256 on an H200;
    bench/gpu_diag.py sweeps 8-warp ones, which do not."""
    names = [n for n in compiled if n.startswith(kernel)]
    usage = {n: (compiled[n]["registers"], compiled[n]["spill_bytes"]) for n in names}
    if all(spills is None for _, spills in usage.values()):
        pytest.skip("ptxas -v gave no register report here")
    assert all(spills == 0 for _, spills in usage.values()), usage


def test_gated_gemm_tiles_run_on_hopper_tensor_cores_without_spills(compiled):
    """The fused gate_up + SiLU-mul competes with cuBLAS only on wgmma (mma.sync is Ampere's, about half
    an H100's rate), with its loads pipelined and its two accumulators in registers."""
    names = [n for n in compiled if n.startswith("gated-")]
    assert names and all(compiled[n]["wgmma"] for n in names), {n: compiled[n]["wgmma"] for n in names}
    descriptors = [n for n in names if n.endswith("-descriptors")]
    assert descriptors and all(compiled[n]["tma"] for n in descriptors)
    if any(compiled[n]["spill_bytes"] is None for n in names):
        pytest.skip("ptxas -v gave no register report here")
    assert all(compiled[n]["spill_bytes"] == 0 for n in names), {n: compiled[n]["spill_bytes"] for n in names}


def test_gated_gemm_compiles_nothing_for_a_new_row_count(compiled):
    """A step's rows vary; Triton would otherwise compile a variant for rows that are, or are not, a
    multiple of 16 (or 1), in the middle of serving."""
    assert all("M" in names for names in compiled["unspecialised-gated"].values()), compiled["unspecialised-gated"]


def test_extend_tiles_hold_the_programs_an_sm_they_split_for(compiled):
    """A tile's per_sm is how many programs an SM it holds, and splits a launch of few programs for
    (triton_extend.choose_extend_splits); a tile whose split variant fit fewer would make a second,
    mostly idle wave. A register cap must hold, without spills where the long prompts launch it."""
    from bench.sm90_compile import programs_an_sm
    from loopserve.attention import triton_extend as te

    checked = 0
    for regime, tiles in te._GPU_EXTEND_CANDIDATES.items():
        for tile in tiles:
            name = f"extend-tuned-{regime}-{tile}"
            if compiled[name]["registers"] is None:
                pytest.skip("ptxas -v gave no register report here")
            if tile.per_sm > 1:  # as launched: few programs split their keys, many do not
                launched = compiled[f"{name}-split" if regime == te.FEW else name]
                assert programs_an_sm(launched["registers"], launched["shared"], launched["warps"]) >= tile.per_sm, \
                    (name, launched)
                checked += 1
            if tile.max_registers:
                assert compiled[name]["registers"] <= tile.max_registers, (name, compiled[name])
                if regime == te.MANY:
                    assert compiled[name]["spill_bytes"] == 0, (name, compiled[name])
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize("kernel", ["decode-", "gemv-"])
def test_decode_step_kernels_wait_for_their_predecessor(compiled, kernel):
    """Launched with programmatic dependent launch on Hopper, these kernels must wait for the kernel
    before them (griddepcontrol.wait) before reading its output, and let the next one launch."""
    for name in (n for n in compiled if n.startswith(kernel)):
        assert compiled[name]["gdc"] == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"], name

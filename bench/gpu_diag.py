"""Where an eager (prefill / extend / mixed) step's host time goes, and how the extend kernel's tile
configuration performs at the issue's two long shapes. One JSON line per finding.

  host_ttft       cProfile of the steps until a 128-token prompt's first token (steady shapes), and of a
                  prompt of a length never seen before: the top functions by own time.
  launch_cost     host microseconds per call of each kernel wrapper on tiny inputs (queued, not waited
                  for): what one eager layer pays before any device work.
  extend_configs  _extend_kernel (BLOCK_M, BLOCK_N, warps, stages[, GQA-packed]) timed at 8k cached +
                  256 new and at an 8k cold prompt, Llama-3.1-8B attention shape.
  gemv_chain      (--gemv) a batch-1 step's linear layers in one CUDA graph: fused GEMVs with and
                  without programmatic dependent launch, and cuBLAS with the separate small kernels.
  gemv_configs    (--gemv) the fused GEMV's tiles (BLOCK_N x BLOCK_K / warps: the startup tuner's
                  candidates and a few more) against cuBLAS at the 8B decode shapes, batch 1, in GB/s
                  of weights read.

    python -m bench.gpu_diag --config bench/configs/llama-3.1-8b.json --out gpu.jsonl
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from pathlib import Path

import torch

from bench.gpu_decode import dummy_model_dir, emit
from loopserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loopserve.engine.core import EngineCore, EngineRequest
from loopserve.model import load_model_config
from loopserve.sampling_params import SamplingParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _top(prof: cProfile.Profile, n: int) -> list[dict]:
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"fn": f"{Path(file).name}:{line}:{name}", "calls": ncalls,
                     "own_ms": round(tottime * 1e3, 3), "cum_ms": round(cumtime * 1e3, 3)})
    return sorted(rows, key=lambda r: -r["own_ms"])[:n]


def host_ttft(config: Path, device: str, top: int) -> list[dict]:
    folder = dummy_model_dir(config)
    dtype = "bf16" if device.startswith("cuda") else "fp32"
    kv_bytes = 8 << 30 if device.startswith("cuda") else 1 << 30
    core = EngineCore(EngineConfig(model=str(folder), load_format="dummy", dtype=dtype, device=device,
                                   max_model_len=min(4096, load_model_config(folder).max_position_embeddings),
                                   cache=CacheConfig(kv_cache_bytes=kv_bytes),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=16)))
    vocab = core.model_config.vocab_size
    rng = random.Random(0)

    def ttft(rid: str, n: int, prof: cProfile.Profile | None = None) -> float:
        ids = [rng.randrange(100, vocab - 1) for _ in range(n)]
        _sync(device)
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        core.add_request(EngineRequest(rid, ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)))
        while core.has_unfinished():
            if any(o.new_token_ids for o in core.step()):
                break
        if prof is not None:
            prof.disable()
        t = time.perf_counter() - t0
        while core.has_unfinished():
            core.step()
        return t

    for i in range(3):
        ttft(f"w{i}", 128)
    plain = sorted(ttft(f"t{i}", 128) for i in range(5))[2]
    prof = cProfile.Profile()
    profiled = ttft("p", 128, prof)
    out = [{"mode": "diag_host_ttft", "prompt": 128, "ttft_ms": plain * 1e3, "profiled_ttft_ms": profiled * 1e3,
            "top": _top(prof, top)}]
    prof = cProfile.Profile()
    first = ttft("new", 203, prof)
    again = ttft("new2", 203)
    out.append({"mode": "diag_host_ttft_new_shape", "prompt": 203, "first_ttft_ms": first * 1e3,
                "second_ttft_ms": again * 1e3, "top": _top(prof, top)})
    return out


def _host_us(fn, iters: int, device: str) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = time.perf_counter() - t0
    _sync(device)
    return t / iters * 1e6


def launch_cost(device: str, iters: int) -> dict:
    from loopserve.attention.triton_decode import paged_decode_attention
    from loopserve.attention.triton_extend import paged_extend_attention
    from loopserve.model import fused_ops

    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    h, hq, hkv, d, bs = 4096, 32, 8, 128, 16
    x = torch.randn(4, h, device=dev, dtype=dt)
    w = torch.ones(h, device=dev, dtype=dt)
    lin = torch.randn(64, h, device=dev, dtype=dt)
    q = torch.randn(4, hq, d, device=dev, dtype=dt)
    k = torch.randn(4, hkv, d, device=dev, dtype=dt)
    v = torch.randn(4, hkv, d, device=dev, dtype=dt)
    cache_k = torch.zeros(8, bs, hkv, d, device=dev, dtype=dt)
    cache_v = torch.zeros_like(cache_k)
    pos = torch.arange(4, device=dev)
    slots = torch.arange(4, device=dev)
    cos_sin = torch.randn(64, d, device=dev, dtype=torch.float32)
    bt = torch.arange(8, device=dev, dtype=torch.int32).view(1, 8)
    qsl = torch.tensor([0, 4], device=dev, dtype=torch.int32)
    sl = torch.tensor([4], device=dev, dtype=torch.int32)
    gu = torch.randn(4, 2 * 1024, device=dev, dtype=dt)
    cases = {
        "torch_add": lambda: x + x,
        "F.linear_4x4096x64": lambda: torch.nn.functional.linear(x, lin),
        "rms_norm": lambda: fused_ops.rms_norm(x, w, 1e-5),
        "fused_add_rms_norm": lambda: fused_ops.fused_add_rms_norm(x, x, w, 1e-5),
        "silu_and_mul": lambda: fused_ops.silu_and_mul(gu),
        "rotary_qk_store_kv_": lambda: fused_ops.rotary_qk_store_kv_(q, k, v, pos, cos_sin, cache_k, cache_v, slots),
        "paged_extend_attention": lambda: paged_extend_attention(q, cache_k, cache_v, bt, qsl, sl, 4, 0.1),
        "paged_decode_attention": lambda: paged_decode_attention(q[:1], cache_k, cache_v, bt, sl, 0.1),
    }
    res = {}
    for name, fn in cases.items():
        try:
            res[name] = round(_host_us(fn, iters, device), 2)
        except Exception as e:  # a signature drift must not cost the other measurements
            res[name] = f"error: {type(e).__name__}: {e}"[:200]
    return {"mode": "diag_launch_cost_us", **res}


def extend_configs(device: str) -> list[dict]:
    import triton.testing

    from loopserve.attention import triton_extend as te

    dev = torch.device(device)
    hq, hkv, d, bs = 32, 8, 128, 16
    out = []
    for name, prefix, new in (("cached8k_plus256", 8192, 256), ("cold8k", 0, 8192)):
        seq = prefix + new
        nblk = triton.cdiv(seq, bs)
        kc = torch.randn(nblk, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(new, hq, d, device=dev, dtype=torch.bfloat16)
        bt = torch.randperm(nblk, device=dev).to(torch.int32).view(1, nblk)
        qsl = torch.tensor([0, new], device=dev, dtype=torch.int32)
        sl = torch.tensor([seq], device=dev, dtype=torch.int32)
        o = torch.empty_like(q)
        flops = 4 * hq * d * sum(prefix + i + 1 for i in range(new))
        for cfg in ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                    (128, 32, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2),
                    (64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 3),
                    # GQA-packed: one program per KV head, its 4 query heads' rows in one tile
                    (64, 64, 4, 2, True), (64, 128, 4, 2, True), (128, 64, 8, 2, True), (128, 128, 8, 2, True)):
            try:
                ms = triton.testing.do_bench(
                    lambda: te._launch(q, kc, vc, bt, qsl, sl, new, 0.08, o, *cfg[:4], pack_gqa=cfg[4:] == (True,)),
                    warmup=5, rep=40)
                out.append({"shape": name, "config": list(cfg), "ms": round(ms, 4),
                            "tflop_s": round(flops / ms / 1e9, 1)})
            except Exception as e:  # out of shared memory, say
                out.append({"shape": name, "config": list(cfg), "error": f"{type(e).__name__}"[:80]})
    return [{"mode": "diag_extend_configs", "results": out}]


def gemv_configs(device: str, rows: int) -> list[dict]:
    """The fused GEMV's tiles (the startup tuner's candidates and a few more) against cuBLAS (F.linear)
    at the 8B decode shapes, one kernel at a time: GB/s of weights."""
    import triton.testing

    from loopserve.model.gemv import GemvTile, candidate_tiles, fused_gemv, gemv_workspace

    dev = torch.device(device)
    out = []
    for name, n, k in (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        gb = n * k * 2 / 1e9
        ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), warmup=5, rep=40)
        row = {"shape": name, "cublas_gb_s": round(gb / ms * 1e3, 1), "triton": []}
        extra = [GemvTile(*t) for t in ((16, 256, 4), (32, 128, 4), (8, 1024, 8), (16, 128, 4))]
        for tile in candidate_tiles(n, dev) + extra:
            try:
                ws = gemv_workspace([(tile, n)], rows, dev)  # made once, as a forward makes it
                ms = triton.testing.do_bench(lambda: fused_gemv(x, w, tile=tile, workspace=ws), warmup=5, rep=40)
                row["triton"].append({"tile": str(tile), "gb_s": round(gb / ms * 1e3, 1)})
            except Exception as e:  # out of registers or shared memory, say
                row["triton"].append({"tile": str(tile), "error": type(e).__name__})
        out.append(row)
    return [{"mode": "diag_gemv_configs", "rows": rows, "results": out}]


def chain_steps(device: torch.device, dtype: torch.dtype, layers: int, hidden: int, qkv_n: int, inter: int):
    """(fused(pdl) -> h, cublas() -> h): a batch-1 step's linear layers over `layers` layers of random
    weights, as the fused path runs them (the q part of qkv stands in for the attention output) and as
    cuBLAS with the separate RMSNorm / SiLU-mul / add kernels; and the weights' bytes."""
    import torch.nn.functional as F

    from loopserve.model import fused_ops
    from loopserve.model.gemv import fused_gemv

    def weight(n, k):
        return torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5

    ws = [(weight(qkv_n, hidden), weight(hidden, hidden), weight(2 * inter, hidden), weight(hidden, inter))
          for _ in range(layers)]
    norm = torch.ones(hidden, device=device, dtype=dtype)
    h0 = torch.randn(1, hidden, device=device, dtype=dtype)

    def fused(pdl: bool) -> torch.Tensor:
        h = h0
        for wqkv, wo, wgu, wd in ws:
            qkv = fused_gemv(h, wqkv, norm_weight=norm, eps=1e-5, pdl=pdl)
            h = fused_gemv(qkv[:, :hidden], wo, residual=h, pdl=pdl)
            gu = fused_gemv(h, wgu, norm_weight=norm, eps=1e-5, pdl=pdl)
            h = fused_gemv(gu, wd, silu_mul=True, residual=h, pdl=pdl)
        return h

    def cublas() -> torch.Tensor:
        h, res = h0, None
        for wqkv, wo, wgu, wd in ws:
            if res is None:
                x, res = fused_ops.rms_norm(h, norm, 1e-5), h
            else:
                x, res = fused_ops.fused_add_rms_norm(h, res, norm, 1e-5)
            o = F.linear(F.linear(x, wqkv)[:, :hidden], wo)
            x, res = fused_ops.fused_add_rms_norm(o, res, norm, 1e-5)
            h = F.linear(fused_ops.silu_and_mul(F.linear(x, wgu)), wd)
        return h

    return fused, cublas, sum(w.numel() * w.element_size() for layer in ws for w in layer)


def gemv_chain(device: str) -> list[dict]:
    """A batch-1 decode step's linear layers without attention, in one CUDA graph each way: the four
    fused GEMVs of a layer (model/llama.py forward_fused) launched with programmatic dependent launch,
    the same plainly, and cuBLAS with the separate small kernels. ms a layer, from alternating replays
    (each layer has its own weights, so nothing stays in L2)."""
    from loopserve.device_caps import pdl_supported
    from loopserve.runner.cuda_graphs import capture_graph, replay_ms

    dev = torch.device(device)
    out = []
    # (name, layers, hidden, qkv width, intermediate): SmolLM2-135M and Llama-3.1-8B
    for name, layers, hidden, qkv_n, inter in (("135m", 30, 576, 960, 1536), ("8b", 8, 4096, 6144, 14336)):
        fused, cublas, weight_bytes = chain_steps(dev, torch.bfloat16, layers, hidden, qkv_n, inter)
        kinds = ("pdl", "plain", "cublas")
        try:
            graphs = [capture_graph(lambda f=fused: f(True)), capture_graph(lambda f=fused: f(False)),
                      capture_graph(cublas)]
            ms = replay_ms(*graphs, rounds=5, reps=20)
            out.append({"shape": name, "layers": layers, "pdl_supported": pdl_supported(dev),
                        **{f"{k}_ms_per_layer": round(t / layers, 4) for k, t in zip(kinds, ms)},
                        **{f"{k}_gb_s": round(weight_bytes / 1e9 / t * 1e3, 1) for k, t in zip(kinds, ms)}})
        except Exception as e:  # a capture the driver refuses, say: the other shape still runs
            out.append({"shape": name, "error": f"{type(e).__name__}: {e}"[:300]})
        del fused, cublas
    return [{"mode": "diag_gemv_chain", "results": out}]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="an HF config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--skip-extend", action="store_true", help="no extend-kernel sweep (CPU smoke runs)")
    ap.add_argument("--gemv", action="store_true", help="also sweep the fused GEMV's tiles against cuBLAS")
    ap.add_argument("--gemv-chain", action="store_true",
                    help="only the GEMV chain's replay times, with and without programmatic dependent launch")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.gemv_chain:
        for res in gemv_chain(args.device):
            emit(res, args.config, args.device, args.out)
        return
    results = [launch_cost(args.device, args.iters)]
    results += host_ttft(args.config, args.device, args.top)
    if not args.skip_extend:
        results += extend_configs(args.device)
    if args.gemv:
        results += gemv_chain(args.device) + gemv_configs(args.device, rows=1)
    for res in results:
        emit(res, args.config, args.device, args.out)


if __name__ == "__main__":
    main()

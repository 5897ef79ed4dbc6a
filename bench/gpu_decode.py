"""GPU decode benchmark on dummy weights: the weight-streaming floor, loopserve's engine, transformers.

  python -m bench.gpu_decode floor --config bench/configs/llama-3.1-8b.json
  python -m bench.gpu_decode engine --config bench/configs/llama-3.1-8b.json
  python -m bench.gpu_decode hf --config bench/configs/llama-3.1-8b.json
  python -m bench.gpu_decode throughput --config bench/configs/llama-3.1-8b.json --workload sharegpt

Each mode prints one JSON line (and appends it to --out when given), so bench/gpu_check.sh can run
them as separate processes that do not share GPU memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from loopserve.config import FUSED_DECODE_GEMV_MODES, CacheConfig, EngineConfig, SchedulerConfig
from loopserve.model import load_model_config


def dummy_model_dir(config: Path) -> Path:
    """A fresh folder holding only `config` as config.json: a model the engine loads with dummy weights."""
    folder = Path(tempfile.mkdtemp())
    shutil.copy(config, folder / "config.json")
    return folder


def emit(res: dict, config: Path, device: str, out: Path | None) -> None:
    """Print one result as a JSON line (naming the config and device) and append it to `out`."""
    res.update(config=config.name, device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")
    line = json.dumps(res)
    print(line, flush=True)
    if out:
        with out.open("a") as f:
            f.write(line + "\n")


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every matmul weight a decode step reads, lm_head included."""
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = [(q + 2 * kv, cfg.hidden_size), (cfg.hidden_size, q),
                 (2 * cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)]
    return per_layer * cfg.num_layers + [(cfg.vocab_size, cfg.hidden_size)]


def time_graph(fn, iters: int = 50) -> float:
    """Median ms of one replay of fn captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# Tokens a step for the model's own GEMM rate: about a saturation step's, and a long prefill's.
GEMM_RATE_TOKENS = (1024, 4096)


def floor(cfg, batch: int) -> dict:
    """Every matmul weight read once through cuBLAS in one CUDA graph at `batch` rows (the decode
    floor), and the same matmuls at GEMM_RATE_TOKENS rows: the compute rate the saturation ceilings
    use (bench/gpu_summary.py)."""
    dtype = torch.bfloat16
    weights = [torch.randn(o, i, device="cuda", dtype=dtype) * 0.02 for o, i in linear_shapes(cfg)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    def matmuls(rows: int):
        x_in = {i: torch.randn(rows, i, device="cuda", dtype=dtype) for _, i in linear_shapes(cfg)}

        def step():
            for w in weights:
                torch.matmul(x_in[w.shape[1]], w.t())
        return step

    ms = time_graph(matmuls(batch))
    flops = 2 * sum(o * i for o, i in linear_shapes(cfg))  # a token's
    gemm_tflops = {str(m): flops * m / (time_graph(matmuls(m), iters=10) / 1e3) / 1e12 for m in GEMM_RATE_TOKENS}
    return {"mode": "floor", "batch": batch, "ms_per_step": ms, "weight_gb": nbytes / 1e9,
            "achieved_gb_s": nbytes / 1e9 / (ms / 1e3), "tok_s": batch * 1e3 / ms, "gemm_tflops": gemm_tflops}


# Every engine row's scheduler: one step may prefill a whole 8k prompt (the cold TTFT row).
BENCH_SCHEDULER = dict(max_num_batched_tokens=8192, long_prefill_token_threshold=8192)
SATURATION_SEQS = 256
LONG_PROMPT_REPEATS = 3  # fresh long prompts timed cold, each then timed again with 256 new tokens over it
SATURATION_PROFILE_STEPS = 12  # saturation steps profiled after the window (--profile-top)


# workload -> ((least, most) prompt tokens, (least, most) output tokens), each uniform (issue 5):
# ShareGPT-like synthetic lengths, and random 1000-in / 1000-out.
WORKLOADS = {"sharegpt": ((64, 1024), (64, 512)), "random1000": ((1000, 1000), (1000, 1000))}


def workload_lengths(workload: str, rng) -> tuple[int, int]:
    """(prompt, output) tokens of one request of `workload` (WORKLOADS)."""
    (p_lo, p_hi), (o_lo, o_hi) = WORKLOADS[workload]
    return rng.randint(p_lo, p_hi), rng.randint(o_lo, o_hi)


def record_steps(core) -> list[tuple[int, int, int]]:
    """A list the engine's scheduler fills with each step it makes: (sequences, tokens, prompts, i.e.
    sequences with more than one new token). Recorded around the scheduler; the engine is untouched."""
    steps: list[tuple[int, int, int]] = []
    schedule = core.scheduler.schedule

    def recorded_schedule():
        out = schedule()
        if out.seqs:
            steps.append((len(out.seqs), out.num_batched_tokens, sum(q.num_new_tokens > 1 for q in out.seqs)))
        return out

    core.scheduler.schedule = recorded_schedule
    return steps


def _core(config_dir: Path, cfg, device: str, backend: str, eager: bool, max_num_seqs: int,
          kv_cache_bytes: int | None, overlap: bool | None = None, fused_gemv: str = "auto", pdl: bool = True,
          mixed_graphs: bool = True):
    """The engine in this process, its startup heap frozen as the server's engine process freezes it
    (no full garbage collection walks the model and the block pool in the middle of a timed step);
    main unfreezes it when the mode is done."""
    from loopserve.engine.core import EngineCore
    from loopserve.engine.process import freeze_startup_heap

    core = EngineCore(EngineConfig(model=str(config_dir), load_format="dummy", dtype="bf16", device=device,
                                   max_model_len=min(cfg.max_position_embeddings, 16384),
                                   cache=CacheConfig(kv_cache_bytes=kv_cache_bytes),
                                   scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, **BENCH_SCHEDULER),
                                   attention_backend=backend, enforce_eager=eager, overlap_scheduling=overlap,
                                   fused_decode_gemv=fused_gemv, programmatic_dependent_launch=pdl,
                                   mixed_step_graphs=mixed_graphs))
    freeze_startup_heap()
    return core


def _tuned(timings: dict) -> dict | None:
    return {name: {"chosen": str(t.chosen), "ms": t.ms} for name, t in timings.items()} or None


def engine(config_dir: Path, cfg, prompt_len: int, out_len: int, long_len: int, device: str, backend: str,
           eager: bool, overlap: bool | None = None, fused_gemv: str = "auto", pdl: bool = True,
           profile_top: int = 0) -> Iterator[dict]:
    """The engine row; then, with profile_top, bench.gpu_profile's decode and long-prompt phases on the
    same warm engine (their top profile_top kernels), each its own row. The engine row comes first, so
    a profile that fails or runs past the step's time costs only itself."""
    from loopserve.engine.core import EngineRequest
    from loopserve.sampling_params import SamplingParams

    t_start = time.perf_counter()
    kv_bytes = 8 << 30 if device.startswith("cuda") else 256 << 20  # CPU: smoke runs only
    core = _core(config_dir, cfg, device, backend, eager, 16, kv_bytes, overlap, fused_gemv, pdl)
    startup = time.perf_counter() - t_start
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(100, vocab - 1, (n,), generator=gen).tolist()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(rid, ids, max_tokens):
        sync()
        t0 = time.perf_counter()
        # ids_checked: the bench's ids are in the vocabulary, and the server sends the engine its prompts
        # checked (server/serving.py), so the engine does not walk them again.
        core.add_request(EngineRequest(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                ignore_eos=True), ids_checked=True))
        first, n = None, 0
        while core.has_unfinished():
            n += sum(len(o.new_token_ids) for o in core.step())
            if first is None and n:
                first = time.perf_counter()
        sync()
        end = time.perf_counter()
        return first - t0, (n - 1) / (end - first) if n > 1 else None

    run("warm", prompt(64), 8)
    first_ttft, _ = run("first", prompt(prompt_len), 2)  # a new prompt length: any per-shape setup shows here
    ttft, tok_s = run("b1", prompt(prompt_len), out_len)
    # The same decode with every step read back before the next is scheduled (no overlap), in turns.
    overlap, sync_tok_s, overlap_tok_s = core.overlap, [], [tok_s]
    for i in range(3 if overlap else 0):
        core.overlap = False  # safe to switch between requests: nothing is in flight
        sync_tok_s.append(run(f"b1_sync{i}", prompt(prompt_len), out_len)[1])
        core.overlap = True
        overlap_tok_s.append(run(f"b1_overlap{i}", prompt(prompt_len), out_len)[1])
    # The batch-1 decode graph replayed alone, back to back, at the last decode step's inputs (its static
    # buffers still hold them: the context of the run above): the device's share of ms_per_step, so
    # what lies between the two is the step's work outside the graph and any gaps between steps. The
    # replays rewrite that step's K/V slot, in a block its finished request gave back unfilled.
    from loopserve.runner.cuda_graphs import replay_ms

    captured = core.runner.graphs.graphs.get(1) if core.runner.graphs is not None else None
    decode_graph_ms = replay_ms(captured[0])[0] if captured is not None else None
    cold_ttfts, cached_ttfts = [], []
    if long_len > 0:  # 0: batch-1 decode only
        long_len = min(long_len, core.max_model_len - 257)
        # The long shapes once, so the timed runs are steady-state: a cold prompt, then 256 new tokens over
        # that prompt as a cached prefix (a fresh random prompt would be one more cold prefill).
        warm_prompt = prompt(long_len)
        run("warm_long", warm_prompt, 1)
        run("warm_long_cached", warm_prompt + prompt(256), 1)
        for i in range(LONG_PROMPT_REPEATS):  # each a fresh prompt: cold, then its cached turn
            long_prompt = prompt(long_len)
            cold_ttfts.append(run(f"cold8k{i}", long_prompt, 1)[0])
            cached_ttfts.append(run(f"cached8k{i}", long_prompt + prompt(256), 1)[0])
    weight_bytes = sum(p.numel() * p.element_size() for p in core.model.parameters())
    tok_s = statistics.median(overlap_tok_s)
    yield {"mode": "engine", "backend": core.runner.backend.name, "cuda_graphs": core.runner.graphs is not None,
            "overlap": overlap, "fused_decode_gemv": fused_gemv, "pdl": core.runner.pdl,
            # "auto": each small decode graph's startup timing, {batch: [ms cuBLAS, ms fused]}, and the winners
            "fused_gemv_timings": getattr(core.runner.graphs, "fused_timings", None) or None,
            "fused_gemv_sizes": getattr(core.runner.graphs, "fused_sizes", None),
            # the startup tuning: each choice and the ms of every candidate
            "gemv_choices": _tuned(core.runner.gemv_timings), "extend_tiles": _tuned(core.runner.extend_timings),
            "decode_tiles": _tuned(core.runner.decode_timings), "gated_mlp": _tuned(core.runner.gated_timings),
            "decode_tok_s_no_overlap": statistics.median(sync_tok_s) if sync_tok_s else None,
            "startup_s": startup, "decode_tok_s": tok_s, "ms_per_step": 1e3 / tok_s, "ttft_s": ttft,
            "decode_graph_ms_b1": decode_graph_ms,
            "ttft_first_shape_s": first_ttft,
            "achieved_gb_s": weight_bytes / 1e9 * tok_s, "long_prompt_len": long_len,
            # medians of LONG_PROMPT_REPEATS fresh prompts (a 1 % margin to the target must not be one sample's)
            "ttft_long_cold_s": statistics.median(cold_ttfts) if cold_ttfts else None,
            "ttft_long_cached_plus_256_s": statistics.median(cached_ttfts) if cached_ttfts else None,
            "ttft_long_cold_samples_s": cold_ttfts or None, "ttft_long_cached_plus_256_samples_s": cached_ttfts or None,
            "prefix_hit_tokens": core.kv.stats.hit_tokens}
    if profile_top:
        from bench.gpu_profile import profile_turns

        for row in profile_turns(core, device, prompt, long_len, profile_top):
            yield row | {"fused_decode_gemv": fused_gemv, "profiled_in": "engine"}


def throughput(config_dir: Path, cfg, workload: str, seconds: float, device: str, backend: str,
               eager: bool, overlap: bool | None = None, warmup_s: float = 5.0, mixed_graphs: bool = True,
               max_num_seqs: int = SATURATION_SEQS, profile_top: int = 0) -> Iterator[dict]:
    """Saturation: more requests than fit are queued at once, and each one that finishes is replaced;
    output tokens per second over `seconds` of stepping after a warm-up (`output_tok_s`), and over
    the warm-up and that together (`output_tok_s_from_start`), as many requests as the time allows.
    With profile_top, then a profile of SATURATION_PROFILE_STEPS more steps of the same run (its top
    profile_top kernels), its own row after this one."""
    import random

    from loopserve.engine.core import EngineRequest
    from loopserve.sampling_params import SamplingParams

    core = _core(config_dir, cfg, device, backend, eager, max_num_seqs, None, overlap, mixed_graphs=mixed_graphs)
    rng = random.Random(0)
    vocab = cfg.vocab_size

    def lengths() -> tuple[int, int]:
        return workload_lengths(workload, rng)

    def add(i: int) -> None:
        p, o = lengths()
        ids = [rng.randrange(100, vocab - 1) for _ in range(p)]
        core.add_request(EngineRequest(f"r{i}", ids, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True),
                                       ids_checked=True))  # as the server sends them (see engine's run)

    # A shake-down first: eager prompt steps of these lengths compile whatever the engine's startup
    # did not, outside the timing.
    for i in range(8):
        p, _ = lengths()
        core.add_request(EngineRequest(f"warm{i}", [rng.randrange(100, vocab - 1) for _ in range(p)],
                                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    while core.has_unfinished():
        core.step()
    n = 0
    for _ in range(2 * max_num_seqs):
        add(n)
        n += 1
    # What the measured steps were: pure decode (a decode graph), steps with prompt tokens that fit a
    # prefill graph, and the rest (eager).
    steps = record_steps(core)
    # Which graph set ran each step with prompt tokens (None: eager), around the runner's choice.
    graph_sets: list[int | None] = []
    choose = core.runner.step_graphs_for

    def recorded_choice(num_tokens, host, num_logits):
        graphs = choose(num_tokens, host, num_logits)
        graph_sets.append(None if graphs is None else core.runner.step_graphs.index(graphs))
        return graphs

    core.runner.step_graphs_for = recorded_choice
    # How long the host waits for the device: a step's samples are read back (SampledBatch.tokens)
    # after the next step is launched, so a host that never waits is the bottleneck and the device
    # idles; one that waits most of the time keeps the device busy. Measured without a profiler, which
    # inflates host costs.
    from loopserve.runner.sampler import SampledBatch

    waited = [0.0]
    read_back = SampledBatch.tokens

    def timed_tokens(batch):
        t = time.perf_counter()
        try:
            return read_back(batch)
        finally:
            waited[0] += time.perf_counter() - t

    SampledBatch.tokens = timed_tokens
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> tuple[int, int]:
        """One engine step: (output tokens, finished requests); a finished request is replaced."""
        nonlocal n
        tokens = done = 0
        for o in core.step():
            tokens += len(o.new_token_ids)
            if o.finish_reason:
                done += 1
                add(n)  # keep the queue full
                n += 1
        return tokens, done

    t_start = time.perf_counter()
    warm_tokens = 0
    while time.perf_counter() < t_start + warmup_s:
        warm_tokens += step()[0]
    sync()
    steps.clear()
    graph_sets.clear()
    waited[0] = 0.0
    t0 = time.perf_counter()
    out_tokens = finished = 0
    while time.perf_counter() - t0 < seconds:
        tokens, done = step()
        out_tokens += tokens
        finished += done
    sync()
    t_end = time.perf_counter()
    dt = t_end - t0
    SampledBatch.tokens = read_back
    mixed = [t for _, t, prompt in steps if prompt]
    eager = [t for t, graph_set in zip(mixed, graph_sets) if graph_set is None]
    yield {"mode": f"throughput_{workload}", "backend": core.runner.backend.name, "max_num_seqs": max_num_seqs,
            "cuda_graphs": core.runner.graphs is not None, "overlap": core.overlap,
            "mixed_step_graphs": len(core.runner.step_graphs) > 1, "output_tok_s": out_tokens / dt,
            # From the first step, the initial prefill included: where no request finishes within the
            # window (random 1000/1000), the window alone is decode and leaves out a request's prefill.
            "output_tok_s_from_start": (warm_tokens + out_tokens) / (t_end - t_start),
            "seconds": dt, "finished_requests": finished, "kv_blocks": core.kv.num_blocks,
            "decode_tiles": _tuned(core.runner.decode_timings), "gated_mlp": _tuned(core.runner.gated_timings),
            "host_wait_share": waited[0] / dt,
            "host_ms_per_step": 1e3 * (dt - waited[0]) / len(steps) if steps else None,
            "steps_per_s": len(steps) / dt, "mean_seqs_per_step": statistics.fmean(b for b, _, _ in steps) if steps else 0,
            "mean_tokens_per_step": statistics.fmean(t for _, t, _ in steps) if steps else 0,
            "decode_steps": len(steps) - len(mixed),
            # prompt steps by the graph set that ran them: 0 prefill graphs (a few sequences), 1 mixed-step
            "prompt_steps_graphed": {k: graph_sets.count(k) for k in sorted({g for g in graph_sets if g is not None})},
            "prompt_steps_eager": len(eager),
            "mean_tokens_eager_prompt_step": statistics.fmean(eager) if eager else 0}
    if profile_top:
        from bench.gpu_profile import profiled

        yield profiled(core, device, f"saturation_{workload}", SATURATION_PROFILE_STEPS, profile_top) | {
            "max_num_seqs": max_num_seqs, "profiled_in": "throughput"}


def hf(config_dir: Path, prompt_len: int, out_len: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(100, config.vocab_size - 1, (1, prompt_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    return {"mode": "hf", "decode_tok_s": (out_len - 1) / ((t2 - t1) - (t1 - t0)), "ttft_s": t1 - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["floor", "engine", "hf", "throughput"])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="sharegpt")
    ap.add_argument("--seconds", type=float, default=30.0, help="throughput: measured stepping time")
    ap.add_argument("--warmup", type=float, default=5.0, help="throughput: stepping time before the measurement")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--overlap-scheduling", default=None, action=argparse.BooleanOptionalAction,
                    help="default: the engine's (on for CUDA); engine mode also times batch-1 decode without it")
    ap.add_argument("--fused-decode-gemv", choices=FUSED_DECODE_GEMV_MODES, default="auto",
                    help="engine mode: EngineConfig.fused_decode_gemv")
    ap.add_argument("--pdl", default=True, action=argparse.BooleanOptionalAction,
                    help="engine mode: EngineConfig.programmatic_dependent_launch (default: on)")
    ap.add_argument("--mixed-step-graphs", default=True, action=argparse.BooleanOptionalAction,
                    help="throughput mode: EngineConfig.mixed_step_graphs (default: on)")
    ap.add_argument("--max-num-seqs", type=int, default=SATURATION_SEQS,
                    help=f"throughput mode: running sequences, with twice as many queued (default: {SATURATION_SEQS})")
    ap.add_argument("--config", type=Path, required=True, help="an HF config.json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--long-prompt-len", type=int, default=8192, help="engine mode: 0 skips the long-prompt TTFTs")
    ap.add_argument("--profile-top", type=int, default=0,
                    help="engine mode: then profile batch-1 decode and both long-prompt turns on the warm engine; "
                         "throughput mode: then profile a few more steps of the run; naming this many top kernels "
                         "(bench.gpu_profile; 0: no profiles)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    folder = dummy_model_dir(args.config)
    cfg = load_model_config(folder, "dummy")
    try:
        if args.mode == "floor":
            rows = [floor(cfg, args.batch)]
        elif args.mode == "engine":
            rows = engine(folder, cfg, args.prompt_len, args.output_len, args.long_prompt_len, args.device,
                          args.attention_backend, args.enforce_eager, args.overlap_scheduling, args.fused_decode_gemv,
                          args.pdl, args.profile_top)
        elif args.mode == "throughput":
            rows = throughput(folder, cfg, args.workload, args.seconds, args.device, args.attention_backend,
                              args.enforce_eager, args.overlap_scheduling, args.warmup, args.mixed_step_graphs,
                              args.max_num_seqs, args.profile_top)
        else:
            rows = [hf(folder, args.prompt_len, args.output_len)]
        for res in rows:  # each as soon as it is measured
            emit(res, args.config, args.device, args.out)
    finally:
        # _core froze the engine's heap. Frozen objects are never collected (a caller's process keeps
        # running: the tests), and outlive the interpreter's last collection, which extensions report
        # as leaks.
        gc.unfreeze()


if __name__ == "__main__":
    main()

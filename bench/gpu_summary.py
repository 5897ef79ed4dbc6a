"""The summary of a bench/gpu_check.sh run: one line per result, then issue 5's targets, each met or not.

The targets are set for an H100. On another card the saturation targets scale by the measured
bandwidth ratio: the H100's 8B floor (5.62 ms a step, every weight read once) over this run's floor.
Every ratio comes from the same run.

Each saturation workload also gets its bf16 ceiling at this run's own rates (`ceilings`): the floor's
bandwidth for the KV reads, the floor row's best GEMM rate for the matmuls. It says what share of the
achievable a result is, and whether a target lies past it.

  python -m bench.gpu_summary gpu.jsonl
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.gpu_decode import WORKLOADS, linear_shapes
from loopserve.model.hf_config import model_config_from_hf

B8, B135 = "llama-3.1-8b.json", "smollm2-135m.json"
CONFIGS = Path(__file__).parent / "configs"
H100_FLOOR_8B_MS = 5.62

ROW_KEYS = ("backend", "cuda_graphs", "overlap", "fused_decode_gemv", "pdl", "batch", "max_num_seqs", "ms_per_step",
            "decode_tok_s", "decode_tok_s_no_overlap", "decode_graph_ms_b1", "output_tok_s", "output_tok_s_from_start",
            "achieved_gb_s", "ttft_s", "ttft_first_shape_s", "ttft_long_cold_s", "ttft_long_cached_plus_256_s",
            "startup_s", "fused_gemv_timings", "fused_gemv_sizes", "gemv_choices", "extend_tiles", "decode_tiles",
            "gated_mlp", "mixed_step_graphs", "host_wait_share", "host_ms_per_step", "steps_per_s", "mean_seqs_per_step",
            "mean_tokens_per_step", "decode_steps", "prompt_steps_graphed", "prompt_steps_eager", "gemm_tflops",
            "mean_tokens_eager_prompt_step")


@dataclass
class Target:
    name: str
    value: float | None  # None: the run has no such result
    target: float
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


def row_line(r: dict) -> str:
    if r["mode"].startswith("profile_"):
        top = ", ".join(f'{k["name"][:40]} {k["ms"] / r["steps"]:.3f}' for k in r["top_kernels"][:5])
        in_all = f'({r["wall_ms"]:.2f} / {r.get("device_busy_ms") or 0:.2f} ms in all)' if "wall_ms" in r else ""
        return " ".join([r["config"], r["mode"], f'fused_gemv={r.get("fused_decode_gemv")}',
                         f'steps={r["steps"]}', f'wall={r["wall_ms_per_step"]:.3f} ms/step',
                         f'busy={r["device_busy_ms_per_step"] or 0:.3f} ms/step', in_all, "|", top])
    if r["mode"].startswith("lanes"):  # bench/gpu_lanes.py
        head = ([f'decode_seqs={r["decode_seqs"]}', f'chunk={r["chunk"]}',
                 f'prefill alone {r["prefill_tok_s_alone"]:.0f} tok/s']
                if r["mode"] == "lanes" else [f'prefill on {r["prefill_sms"]} of {r["sm_count"]} SMs'])
        phases = [f'| {p}: decode {r[f"decode_tok_s_{p}"]:.0f} (alone {r[f"decode_tok_s_alone_{p}"]:.0f}) '
                  f'prefill {r[f"prefill_tok_s_{p}"]:.0f} sum of fractions {r[f"sum_of_fractions_{p}"]:.2f}'
                  for p in ("both", "both_decode_first") if r.get(f"sum_of_fractions_{p}") is not None]
        head.append(f'preemptions={r.get("preemptions")}')
        errors = [f'errors={r["errors"]}'] if r.get("errors") else []
        return " ".join([r["config"], r["mode"], *head, *phases, *errors])
    fields = " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                      for k in ROW_KEYS if r.get(k) is not None)
    return f'{r["config"]} {r["mode"]} {fields}'


def _first(rows: list[dict], config: str, mode: str, **match) -> dict | None:
    return next((r for r in rows if r.get("config") == config and r["mode"] == mode
                 and all(r.get(k) == v for k, v in match.items())), None)


def targets(rows: list[dict]) -> list[Target]:
    """Issue 5's targets from a run's rows: the default engine rows (Triton, CUDA graphs, fused GEMV
    auto), the floors and the saturation rows."""
    engine8 = _first(rows, B8, "engine", backend="triton", fused_decode_gemv="auto")
    engine135 = _first(rows, B135, "engine", backend="triton", fused_decode_gemv="auto")
    floor8 = _first(rows, B8, "floor")
    scale = H100_FLOOR_8B_MS / floor8["ms_per_step"] if floor8 else None

    def get(row: dict | None, key: str) -> float | None:
        return None if row is None else row.get(key)

    pct = (100 * floor8["ms_per_step"] / engine8["ms_per_step"]) if floor8 and engine8 else None
    def saturation(workload: str) -> dict | None:
        """The default engine's row at 256 sequences (rows without max_num_seqs predate the A/B rows at 32)."""
        return next((r for r in rows if r.get("config") == B8 and r["mode"] == f"throughput_{workload}"
                     and r.get("max_num_seqs", 256) == 256), None)

    # ShareGPT-like requests finish and are replaced within the window: it is the steady state. Random
    # 1000/1000 ones do not (~23 s of decode each), so the window alone would be decode without any
    # prefill; from the first step, the 256 requests' prefill is in, about one prompt token for each
    # output token, as in the steady state.
    sharegpt = get(saturation("sharegpt"), "output_tok_s")
    row1000 = saturation("random1000")
    random1000 = get(row1000, "output_tok_s_from_start") or get(row1000, "output_tok_s")
    return [
        Target("8B batch-1 decode, % of the floor", pct, 95.0, True),
        Target("8B saturation ShareGPT-like, output tok/s", sharegpt, 16000 * (scale or 1), True),
        Target("8B saturation random 1000/1000, output tok/s (prefill included)", random1000, 9000 * (scale or 1),
               True),
        Target("135M batch-1 decode, tok/s", get(engine135, "decode_tok_s"), 1500.0, True),
        Target("8B TTFT, 256 new after 8k cached, s", get(engine8, "ttft_long_cached_plus_256_s"), 0.015, False),
        Target("8B TTFT, 8k cold, s", get(engine8, "ttft_long_cold_s"), 0.230, False),
    ]


@dataclass
class Ceiling:
    """Output tok/s a saturation workload cannot pass in bf16 at the run's own rates, every GEMM at the
    best measured rate and every KV read at the floor's bandwidth: with the two one after the other, as
    a step's kernels run, and with them fully overlapped (what no kernel schedule here attempts)."""
    workload: str
    sequential: float
    overlapped: float
    tflops: float
    tb_s: float


def _uniform_moments(lo: int, hi: int) -> tuple[float, float]:
    """E[x] and E[x^2] of an integer uniform on lo..hi."""
    mean = (lo + hi) / 2
    return mean, mean * mean + ((hi - lo + 1) ** 2 - 1) / 12


def ceiling(workload: str, cfg, tflops: float, gb_s: float) -> Ceiling:
    """The ceilings of `workload` (bench.gpu_decode.WORKLOADS) for model `cfg`, in the steady state, per
    output token: its decode token's GEMMs (lm_head included) and KV reads over its context, and its
    share of prompt tokens (prompt / output tokens), each with its GEMMs (no lm_head: only a prompt's
    last row is sampled) and causal attention over the prompt so far. Decode attention's FLOPs ride
    on its reads."""
    (p_lo, p_hi), (o_lo, o_hi) = WORKLOADS[workload]
    p1, p2 = _uniform_moments(p_lo, p_hi)
    o1, o2 = _uniform_moments(o_lo, o_hi)
    prompt_per_output = p1 / o1
    decode_context = p1 + o2 / (2 * o1)  # keys an output token reads, over all of them
    prompt_context = p2 / (2 * p1)       # keys a prompt token attends, over all of them
    linear = sum(o * i for o, i in linear_shapes(cfg))
    lm_head = cfg.vocab_size * cfg.hidden_size
    attention_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * prompt_context
    flops = 2 * linear + prompt_per_output * (2 * (linear - lm_head) + attention_flops)
    kv_bytes = decode_context * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    compute_s, memory_s = flops / (tflops * 1e12), kv_bytes / (gb_s * 1e9)
    return Ceiling(workload, 1 / (compute_s + memory_s), 1 / max(compute_s, memory_s), tflops, gb_s / 1e3)


def ceilings(rows: list[dict]) -> list[Ceiling]:
    """Both saturation workloads' ceilings on the 8B shape, from the run's 8B floor row (none without
    its GEMM rates)."""
    floor8 = _first(rows, B8, "floor")
    if not floor8 or not floor8.get("gemm_tflops"):
        return []
    cfg = model_config_from_hf(json.loads((CONFIGS / B8).read_text()))
    return [ceiling(w, cfg, max(floor8["gemm_tflops"].values()), floor8["achieved_gb_s"]) for w in WORKLOADS]


def ceiling_lines(found_ceilings: list[Ceiling], found: list[Target]) -> list[str]:
    """Each saturation ceiling beside its target and result, as shares of each."""
    by_workload = {"sharegpt": found[1], "random1000": found[2]}
    lines = []
    for c in found_ceilings:
        t = by_workload[c.workload]
        shares = [f"target {t.target:.4g} is {100 * t.target / c.sequential:.0f} % / "
                  f"{100 * t.target / c.overlapped:.0f} % of them"]
        if t.value is not None:
            shares.append(f"result {t.value:.4g} is {100 * t.value / c.sequential:.0f} % / "
                          f"{100 * t.value / c.overlapped:.0f} %")
        lines.append(f"ceiling  8B {c.workload}, bf16 at {c.tflops:.0f} TFLOP/s and {c.tb_s:.2f} TB/s: "
                     f"{c.sequential:.4g} output tok/s with GEMMs and KV reads in turn, {c.overlapped:.4g} "
                     f"overlapped; " + "; ".join(shares))
    return lines


def comparisons(rows: list[dict]) -> list[str]:
    """The run's A/B pairs, each as 'what: on X, off Y, on / off R'."""
    pairs = [("8B ShareGPT-like at 32 sequences, mixed-step graphs, output tok/s", "output_tok_s",
              _first(rows, B8, "throughput_sharegpt", max_num_seqs=32, mixed_step_graphs=True),
              _first(rows, B8, "throughput_sharegpt", max_num_seqs=32, mixed_step_graphs=False)),
             ("135M fused-GEMV decode, programmatic dependent launch, tok/s", "decode_tok_s",
              _first(rows, B135, "engine", fused_decode_gemv="on", pdl=True),
              _first(rows, B135, "engine", fused_decode_gemv="on", pdl=False))]
    return [f"A/B  {what}: on {on[key]:.4g}, off {off[key]:.4g}, on / off {on[key] / off[key]:.3f}"
            for what, key, on, off in pairs if on and off and on.get(key) and off.get(key)]


def main(argv: list[str] | None = None) -> None:
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("mode") != "targets"]
    for r in rows:
        print(row_line(r))
    floor8 = _first(rows, B8, "floor")
    if floor8:
        print(f"saturation targets scaled by {H100_FLOOR_8B_MS / floor8['ms_per_step']:.3f} "
              f"(H100 floor {H100_FLOOR_8B_MS} ms / this run's {floor8['ms_per_step']:.3f} ms)")
    for line in comparisons(rows):
        print(line)
    found = targets(rows)
    for t in found:
        verdict = {True: "MET", False: "missed", None: "no result"}[t.met]
        value = "-" if t.value is None else f"{t.value:.4g}"
        print(f"target  {t.name}: {value} against {'>=' if t.higher_is_better else '<='} {t.target:.4g}: {verdict}")
    found_ceilings = ceilings(rows)
    for line in ceiling_lines(found_ceilings, found):
        print(line)
    device = next((r.get("device") for r in rows if r.get("device")), None)
    with path.open("a") as f:
        f.write(json.dumps({"mode": "targets", "device": device,
                            "targets": [{**asdict(t), "met": t.met} for t in found],
                            "ceilings": [asdict(c) for c in found_ceilings]}) + "\n")


if __name__ == "__main__":
    main()

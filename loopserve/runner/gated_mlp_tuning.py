"""Startup tuning of the MLP's gate_up + SiLU-mul (runner/tuning.py, model/gated_mlp.py).

At each of a few row counts, up to the step's token budget, the fused GEMM's tiles are timed against
cuBLAS's GEMM followed by the SiLU-mul kernel, on the first layer's weights (larger than L2 on any
model where it matters, so one layer stands for all). Each MLP then runs, for a step of T rows, the
choice timed at the largest tuned row count at or below T; fewer rows than the smallest (decode
batches, short extends) keep cuBLAS and the kernel.
"""
from __future__ import annotations

import logging

import torch

from loopserve.model.gated_mlp import UNFUSED, GatedChoices, candidate_tiles, gate_up_silu, gate_up_silu_unfused
from loopserve.runner.tuning import TimeFn, Tuned, described, fastest, time_in_graphs

log = logging.getLogger(__name__)

# Rows timed: a mixed step of a few hundred decodes and a prompt chunk, the default token budget's
# share of a long prompt, and a long prompt's chunk at the benches' 8k budget.
TUNING_ROWS = (256, 1024, 4096)


def tuning_rows(max_rows: int) -> list[int]:
    """The TUNING_ROWS a step of at most max_rows rows can reach."""
    return [rows for rows in TUNING_ROWS if rows <= max_rows]


@torch.inference_mode()
def tune_gated_mlp(model: torch.nn.Module, max_rows: int, time_fn: TimeFn = time_in_graphs) -> dict[str, Tuned]:
    """Time the fused gate_up + SiLU-mul's tiles against UNFUSED at each of tuning_rows(max_rows) and
    set every MLP's choices (CausalLM.set_gated_choices); "<rows> rows" -> Tuned."""
    weight = model.model.layers[0].mlp.gate_up_proj.weight
    tiles = candidate_tiles(weight.device, weight.dtype)
    timings: dict[str, Tuned] = {}
    choices: list[tuple[int, object]] = []
    if not tiles:
        model.set_gated_choices(())
        return timings
    gen = torch.Generator(device=weight.device).manual_seed(0)
    for rows in tuning_rows(max_rows):
        x = torch.randn(rows, weight.shape[1], generator=gen, device=weight.device, dtype=weight.dtype)
        # The tiles share one output buffer: each timing graph would otherwise hold its own.
        out = torch.empty(rows, weight.shape[0] // 2, device=weight.device, dtype=weight.dtype)

        def run(choice, x=x, out=out) -> torch.Tensor:
            return gate_up_silu_unfused(x, weight) if choice == UNFUSED else gate_up_silu(x, weight, choice, out)

        tuned = fastest([UNFUSED, *tiles], run, time_fn, f"gate_up + SiLU-mul ({rows} rows)", weight.device)
        if tuned is not None:
            timings[f"{rows} rows"] = tuned
            choices.append((rows, tuned.chosen))
    model.set_gated_choices(_compact(choices))
    log.info("gate_up + SiLU-mul choices (ms a layer): %s", described(timings))
    return timings


def _compact(choices: list[tuple[int, object]]) -> GatedChoices:
    """The choices by least rows, each kept only where it differs from the one before (UNFUSED first)."""
    kept: list[tuple[int, object]] = []
    for rows, choice in choices:
        if choice != (kept[-1][1] if kept else UNFUSED):
            kept.append((rows, choice))
    return tuple(kept)

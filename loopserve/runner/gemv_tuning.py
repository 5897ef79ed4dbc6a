"""Startup tuning of the fused layers' GEMVs, on the GPU that serves.

Which share of a GEMV a program should take (model/gemv.py: GemvTile), and whether a role is better
left to cuBLAS, depends on the weights' shape, the number of SMs, HBM's latency and what
programmatic dependent launch overlaps. Nothing about that can be settled away from the device, so
before the decode graphs are captured the runner times each candidate per role of the layer (qkv, o,
gate_up, down) the way a batch-1 decode step runs it: that role's GEMV over every layer's own
weights, one after the other in a CUDA graph, so no layer's weights are still in L2 and each kernel
follows another of its kind. The candidates are the fused kernel's tiles and cuBLAS with the
prologue and the residual add as kernels of their own (gemv.CUBLAS). The fastest choice of each role
is kept in `model.gemv_choices`; batches of 2-4 rows use the same choices, K tiles scaled down.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loopserve.model.gemv import CUBLAS, GemvChoice, candidate_tiles, gemv_by

log = logging.getLogger(__name__)

# Times a list of zero-argument callables, each run at least once already: milliseconds apiece.
TimeFn = Callable[[Sequence[Callable[[], object]]], list[float]]


@dataclass
class RoleTiming:
    """One role's candidates and their ms per chain (a GEMV per layer), and the choice kept."""
    chosen: GemvChoice
    ms: dict[str, float]


def time_in_graphs(fns: Sequence[Callable[[], object]]) -> list[float]:
    """Each callable captured in a CUDA graph; ms a replay, from alternating rounds."""
    from loopserve.runner.cuda_graphs import capture_graph, replay_ms

    return replay_ms(*(capture_graph(fn) for fn in fns), rounds=3, reps=5)


@torch.inference_mode()
def tune_gemv_choices(model: torch.nn.Module, time_fn: TimeFn = time_in_graphs) -> dict[str, RoleTiming]:
    """Time every candidate of each role of `model`'s fused layers (batch 1) and set
    `model.gemv_choices` to the fastest. A tile the compiler rejects (out of registers or shared
    memory, say) is left out."""
    layers = list(model.model.layers)
    timings: dict[str, RoleTiming] = {}
    choices: dict[str, GemvChoice] = {}
    for role, (linear, prologue, with_residual) in layers[0].gemv_roles().items():
        weight = linear.weight
        n, k = weight.shape
        gen = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(1, 2 * k if prologue.get("silu_mul") else k, generator=gen, device=weight.device,
                        dtype=weight.dtype)
        residual = torch.randn(1, n, generator=gen, device=weight.device, dtype=weight.dtype) if with_residual else None
        calls = [layer.gemv_roles()[role] for layer in layers]

        def chain(choice: GemvChoice) -> torch.Tensor:
            y = None
            for lin, pro, _ in calls:
                y = gemv_by(choice, x, lin.weight, lin.bias, residual=residual, pdl=model.use_pdl, **pro)
            return y

        runnable: list[GemvChoice] = []
        for choice in [*candidate_tiles(n, weight.device), CUBLAS]:
            try:
                chain(choice)  # compiles it
            except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the tile is out
                log.info("GEMV choice %s for %s (%d x %d) left out: %s", choice, role, n, k, e)
                continue
            runnable.append(choice)
        ms = time_fn([functools.partial(chain, choice) for choice in runnable])
        best = runnable[min(range(len(runnable)), key=ms.__getitem__)]
        choices[role] = best
        timings[role] = RoleTiming(best, {str(c): round(v, 4) for c, v in zip(runnable, ms)})
    model.gemv_choices = choices
    log.info("fused-layer GEMV choices (ms over %d layers): %s", len(layers),
             {role: (str(t.chosen), t.ms) for role, t in timings.items()})
    return timings

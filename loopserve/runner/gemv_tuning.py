"""Startup tuning of the fused GEMV's tiles, on the GPU that serves.

Which share of a GEMV a program should take (model/gemv.py: GemvTile) depends on the weights' shape,
the number of SMs, HBM's latency and what programmatic dependent launch overlaps. Nothing about that
can be settled away from the device, so before the decode graphs are captured the runner times each
candidate tile per role of the layer (qkv, o, gate_up, down) the way a batch-1 decode step runs it:
that role's GEMV over every layer's own weights, one after the other in a CUDA graph, so no layer's
weights are still in L2 and each kernel follows another of its kind. The fastest tile of each role is
kept in `model.gemv_tiles`. Batches of 2-4 rows use the same tiles with K tiles scaled down.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loopserve.model.gemv import GemvTile, candidate_tiles, fused_gemv

log = logging.getLogger(__name__)

# Times a list of zero-argument callables, each run at least once already: milliseconds apiece.
TimeFn = Callable[[Sequence[Callable[[], object]]], list[float]]


@dataclass
class RoleTiming:
    """One role's candidates and their ms per chain (a GEMV per layer), and the tile kept."""
    chosen: GemvTile
    ms: dict[str, float]


def time_in_graphs(fns: Sequence[Callable[[], object]]) -> list[float]:
    """Each callable captured in a CUDA graph; ms a replay, from alternating rounds."""
    from loopserve.runner.cuda_graphs import capture_graph, replay_ms

    return replay_ms(*(capture_graph(fn) for fn in fns), rounds=3, reps=5)


@torch.inference_mode()
def tune_gemv_tiles(model: torch.nn.Module, time_fn: TimeFn = time_in_graphs) -> dict[str, RoleTiming]:
    """Time every candidate tile of each role of `model`'s fused layers (batch 1) and set
    `model.gemv_tiles` to the fastest. A candidate the compiler rejects (out of registers or shared
    memory, say) is left out; the default tile is always a candidate."""
    layers = list(model.model.layers)
    first = layers[0].gemv_roles()
    timings: dict[str, RoleTiming] = {}
    tiles: dict[str, GemvTile] = {}
    for role, (linear, prologue, with_residual) in first.items():
        weight = linear.weight
        n, k = weight.shape
        gen = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(1, 2 * k if prologue.get("silu_mul") else k, generator=gen, device=weight.device,
                        dtype=weight.dtype)
        residual = torch.randn(1, n, generator=gen, device=weight.device, dtype=weight.dtype) if with_residual else None
        calls = [layer.gemv_roles()[role] for layer in layers]

        def chain(tile: GemvTile) -> torch.Tensor:
            y = None
            for lin, pro, _ in calls:
                y = fused_gemv(x, lin.weight, lin.bias, residual=residual, tile=tile, pdl=model.use_pdl, **pro)
            return y

        runnable = []
        for tile in candidate_tiles(n, weight.device):
            try:
                chain(tile)  # compiles it
            except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the tile is out
                log.info("GEMV tile %s for %s (%d x %d) left out: %s", tile, role, n, k, e)
                continue
            runnable.append(tile)
        if not runnable:  # the fused decode graphs then fail to capture, and cuBLAS is kept
            continue
        ms = time_fn([functools.partial(chain, tile) for tile in runnable])
        best = min(range(len(runnable)), key=ms.__getitem__)
        tiles[role] = runnable[best]
        timings[role] = RoleTiming(runnable[best], {str(t): round(v, 4) for t, v in zip(runnable, ms)})
    model.gemv_tiles = tiles
    log.info("fused GEMV tiles (ms over %d layers): %s", len(layers),
             {role: (str(t.chosen), t.ms) for role, t in timings.items()})
    return timings

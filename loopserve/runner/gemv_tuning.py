"""Startup tuning of the fused layers' GEMVs (runner/tuning.py).

Each role of the layer (qkv, o, gate_up, down) is timed the way a batch-1 decode step runs it: that
role's GEMV over every layer's own weights, one after the other in a CUDA graph, so no layer's
weights are still in L2 and each kernel follows another of its kind. The candidates are the fused
kernel's tiles (model/gemv.py) and cuBLAS with the prologue and the residual add as kernels of their
own (gemv.CUBLAS). The fastest choice of each role is kept in `model.gemv_choices`; batches of 2-4
rows use the same choices, K tiles scaled down.
"""
from __future__ import annotations

import logging

import torch

from loopserve.model.gemv import CUBLAS, GemvChoice, candidate_tiles, gemv_by, gemv_workspace
from loopserve.runner.tuning import TimeFn, Tuned, chosen, described, fastest, time_in_graphs

log = logging.getLogger(__name__)


@torch.inference_mode()
def tune_gemv_choices(model: torch.nn.Module, time_fn: TimeFn = time_in_graphs) -> dict[str, Tuned]:
    """Time every candidate of each role of `model`'s fused layers (batch 1) and set
    `model.gemv_choices` to the fastest; role -> Tuned."""
    layers = list(model.model.layers)
    timings: dict[str, Tuned] = {}
    for role, (linear, prologue, with_residual) in layers[0].gemv_roles.items():
        weight = linear.weight
        n, k = weight.shape
        gen = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(1, 2 * k if prologue.get("silu_mul") else k, generator=gen, device=weight.device,
                        dtype=weight.dtype)
        residual = torch.randn(1, n, generator=gen, device=weight.device, dtype=weight.dtype) if with_residual else None
        calls = [layer.gemv_roles[role] for layer in layers]

        def chain(choice: GemvChoice) -> torch.Tensor:
            y = None
            workspace = gemv_workspace([(choice, n)], 1, weight.device)  # one a chain, as one a forward
            for lin, pro, _ in calls:
                y = gemv_by(choice, x, lin.weight, lin.bias, residual=residual, pdl=model.use_pdl,
                            workspace=workspace, **pro)
            return y

        tuned = fastest([*candidate_tiles(n, weight.device), CUBLAS], chain, time_fn, f"GEMV {role} ({n} x {k})",
                        weight.device)
        if tuned is not None:  # else the fused decode graphs fail to capture, and cuBLAS is kept
            timings[role] = tuned
    model.gemv_choices = chosen(timings)
    log.info("fused-layer GEMV choices (ms over %d layers): %s", len(layers), described(timings))
    return timings

"""Startup tuning of the fused layers' GEMVs (runner/tuning.py).

Each role of the layer (qkv, o, gate_up, down) is timed the way a batch-1 decode step runs it: that
role's GEMV over every layer's own weights, one after the other in a CUDA graph, so no layer's
weights are still in L2 and each kernel follows another of its kind. The step's last GEMV (the
model's LOGITS_ROLE: final RMSNorm, lm_head, fp32 logits) is one call of a weight larger than L2. The
candidates are the fused kernel's tiles (model/gemv.py) and cuBLAS with the prologue, the residual add
and the cast as kernels of their own (gemv.CUBLAS). The fastest choice of each role is kept in
`model.gemv_choices`; batches of 2-4 rows use the same choices, K tiles scaled down.
"""
from __future__ import annotations

import logging

import torch

from loopserve.model.gemv import CUBLAS, GemvChoice, candidate_tiles, gemv_by, gemv_workspace
from loopserve.model.llama import LOGITS_ROLE
from loopserve.runner.tuning import TimeFn, Tuned, chosen, described, fastest, time_in_graphs

log = logging.getLogger(__name__)

# A role's calls in a decode step, in order: (weight, bias, gemv_by's prologue / output keywords).
GemvCall = tuple[torch.Tensor, torch.Tensor | None, dict]


def gemv_role_calls(model: torch.nn.Module) -> dict[str, tuple[list[GemvCall], bool]]:
    """Each role -> (its calls in one decode step, whether they add a residual)."""
    layers = list(model.model.layers)
    roles = {role: ([(lin.weight, lin.bias, pro) for lin, pro, _ in (layer.gemv_roles[role] for layer in layers)],
                    with_residual)
             for role, (_, _, with_residual) in layers[0].gemv_roles.items()}
    weight, prologue = model.logits_gemv
    roles[LOGITS_ROLE] = ([(weight, None, prologue)], False)
    return roles


@torch.inference_mode()
def tune_gemv_choices(model: torch.nn.Module, time_fn: TimeFn = time_in_graphs) -> dict[str, Tuned]:
    """Time every candidate of each role of `model`'s fused decode step (batch 1) and set
    `model.gemv_choices` to the fastest; role -> Tuned."""
    timings: dict[str, Tuned] = {}
    for role, (calls, with_residual) in gemv_role_calls(model).items():
        weight, _, prologue = calls[0]
        n, k = weight.shape
        gen = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(1, 2 * k if prologue.get("silu_mul") else k, generator=gen, device=weight.device,
                        dtype=weight.dtype)
        residual = torch.randn(1, n, generator=gen, device=weight.device, dtype=weight.dtype) if with_residual else None

        def chain(choice: GemvChoice, calls=calls, x=x, residual=residual, n=n) -> torch.Tensor:
            y = None
            workspace = gemv_workspace([(choice, n)], 1, x.device)  # one a chain, as one a forward
            for w, b, pro in calls:
                y = gemv_by(choice, x, w, b, residual=residual, pdl=model.use_pdl, workspace=workspace, **pro)
            return y

        tuned = fastest([*candidate_tiles(n, weight.device), CUBLAS], chain, time_fn, f"GEMV {role} ({n} x {k})",
                        weight.device)
        if tuned is not None:  # else the fused decode graphs fail to capture, and cuBLAS is kept
            timings[role] = tuned
    model.gemv_choices = chosen(timings)
    log.info("fused-layer GEMV choices (ms a decode step's calls): %s", described(timings))
    return timings

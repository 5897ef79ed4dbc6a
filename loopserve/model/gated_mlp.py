"""The MLP's gate_up projection with its SiLU-mul in the GEMM's epilogue, for steps of many rows.

Unfused, a prefill step's MLP writes gate_up's [T, 2I] output, reads it back in the SiLU-mul
kernel and writes the [T, I] product for down_proj. On the 8B shape at 8,192 tokens that is 470 MB
written, 470 MB read and 235 MB written a layer: ~0.25 ms a layer at an H100's bandwidth, ~8 ms of
an 8k prompt's TTFT, besides what cuBLAS's epilogue spends storing the wide output. Here each program
computes the gate and the up tile of the same output features side by side (two accumulators over one
load of the activations) and stores only silu(gate) * up.

Numerics: gate and up are rounded to the activation dtype before the SiLU-mul, as the separate ops
round the GEMM's output, and the SiLU-mul is fused_ops' formula; so the fused result is the unfused
one's up to the GEMM's summation order.

Whether it beats cuBLAS plus the SiLU-mul kernel depends on how close a Triton GEMM comes to cuBLAS
on the card, and on the rows: runner/gated_mlp_tuning.py times both at startup, at a few row counts,
and each MLP keeps the choice for its step's rows (`MLP.gated_choices`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopserve.device_caps import sm_count
from loopserve.model.fused_ops import HAS_TRITON, silu_and_mul, tl, triton

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the environment
    TensorDescriptor = None

if HAS_TRITON:
    from loopserve.model.fused_ops import silu_times

    @triton.jit
    def _tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Output tile number `tile` as (row tile, feature tile). Tiles go down GROUP_M row tiles before
        the next feature tile, so the weight tiles a group shares are read from L2 while still there."""
        grid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * grid_n
        first_m = (tile // in_group) * GROUP_M
        group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        return first_m + (tile % in_group) % group_rows, (tile % in_group) // group_rows

    @triton.jit
    def _silu_mul(acc_g, acc_u, act: tl.constexpr):
        """fused_ops' SiLU-mul of gate and up, each rounded to the activation dtype first (as the GEMM's
        output is), in the activation dtype."""
        return silu_times(acc_g.to(act).to(tl.float32), acc_u.to(act).to(tl.float32)).to(act)

    # M (the step's rows) is not specialised: a step of a new row count compiles nothing mid-serving.
    @triton.jit(do_not_specialize=["M"])
    def _gate_up_silu_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        """Y[M, N] = silu(X @ Wg^T) * (X @ Wu^T), with W = [Wg; Wu] of [2N, K] (nn.Linear's layout)."""
        pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows and features past the end read row / feature 0 instead (in bounds, never stored), so the
        # loads in the loop need no row mask and pipeline as plain tiles.
        rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        feats = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
        g_ptrs = W + feats[None, :] * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + N.to(tl.int64) * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x = tl.load(x_ptrs)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        y = _silu_mul(acc_g, acc_u, Y.dtype.element_ty)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y, mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _gate_up_silu_tma_kernel(x_desc, w_desc, y_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
        """The same through Hopper's tensor memory accelerator: each tile is one bulk copy, which needs no
        per-thread addresses and pads reads past an edge with zeros (a gate tile past N reads up's first
        rows instead: never stored, as the store stops at the output's edge). PROGRAMS > 0: that many
        persistent programs take the output tiles in turn, their loops flattened into one, so the next
        tile's first loads are in flight during this one's epilogue; 0: a program a tile."""
        if PROGRAMS == 0:
            _tma_tile(x_desc, w_desc, y_desc, tl.program_id(0), M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        else:
            num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
            for tile in tl.range(tl.program_id(0), num_tiles, PROGRAMS, flatten=True):
                _tma_tile(x_desc, w_desc, y_desc, tile, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    @triton.jit
    def _tma_tile(x_desc, w_desc, y_desc, tile, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([m0, k * BLOCK_K])
            acc_g = tl.dot(x, w_desc.load([n0, k * BLOCK_K]).T, acc_g)
            acc_u = tl.dot(x, w_desc.load([N + n0, k * BLOCK_K]).T, acc_u)
        y_desc.store([m0, n0], _silu_mul(acc_g, acc_u, y_desc.dtype))


@dataclass(frozen=True)
class GatedTile:
    """A program's output tile: block_m rows by block_n features (two accumulators of that size: gate and
    up), block_k columns of K an iteration, num_warps warps, num_stages loads in flight."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False  # tiles loaded and stored by TMA bulk copies (_gate_up_silu_tma_kernel)
    # With tma: > 0 launches that many persistent programs an SM, which take the output tiles in turn.
    persistent_per_sm: int = 0

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}/{self.num_warps}w/{self.num_stages}s"
                + ("/tma" if self.tma else "") + (f"/p{self.persistent_per_sm}" if self.persistent_per_sm else ""))


# The other choice: cuBLAS's gate_up GEMM, then fused_ops' SiLU-mul kernel.
UNFUSED = "unfused"
GatedChoice = GatedTile | str

# GEMM tiles for Hopper, bf16/fp16. The two accumulators make each an effective block_m x 2 block_n tile:
# 128 x 128 is cuBLAS's 128 x 256 class. By ptxas for sm_90 (tests/attention/test_compile_hopper.py) every
# one runs on wgmma with no spills, its loads pipelined (cp.async, or TMA bulk copies); 128 x 64 with three
# stages fits two programs an SM (one's epilogue beside the other's main loop), the others one. None is
# measured yet: the startup tuner times them against UNFUSED.
GPU_CANDIDATE_TILES = (GatedTile(128, 128, 64, 8, 3), GatedTile(128, 128, 64, 8, 4), GatedTile(128, 64, 64, 4, 4),
                       GatedTile(128, 64, 64, 4, 3), GatedTile(64, 128, 64, 4, 4), GatedTile(256, 64, 64, 8, 3),
                       GatedTile(128, 128, 64, 8, 3, tma=True), GatedTile(128, 128, 64, 8, 4, tma=True),
                       GatedTile(128, 64, 64, 4, 3, tma=True),
                       GatedTile(128, 128, 64, 8, 3, tma=True, persistent_per_sm=1),
                       GatedTile(128, 64, 64, 4, 3, tma=True, persistent_per_sm=2))
# Small tiles keep the interpreter's numpy emulation fast.
INTERPRETER_CANDIDATE_TILES = (GatedTile(16, 16, 16, 1, 1), GatedTile(32, 16, 32, 2, 1),
                               GatedTile(16, 16, 16, 1, 1, tma=True), GatedTile(16, 16, 16, 1, 1, tma=True,
                                                                                 persistent_per_sm=1))


def candidate_tiles(device: torch.device, dtype: torch.dtype) -> list[GatedTile]:
    """The tiles worth timing on `device` for activations of `dtype`: none for fp32 on a GPU, where
    tl.dot would round to tf32 and cuBLAS does not; TMA ones only where Triton has host descriptors."""
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return []
    tiles = GPU_CANDIDATE_TILES if device.type == "cuda" else INTERPRETER_CANDIDATE_TILES
    return [tile for tile in tiles if TensorDescriptor is not None or not tile.tma]


def gated_problem(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None if it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[1]:
        return f"x [T, K] and weight [2I, K] expected, got {tuple(x.shape)} and {tuple(weight.shape)}"
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtypes {x.dtype} / {weight.dtype}"
    if x.stride(1) != 1 or weight.stride(1) != 1:
        return "x and weight need contiguous rows"
    return None


def _tma_fits(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these 2-D tensors: 16-byte aligned bases and row strides."""
    return TensorDescriptor is not None and all(
        t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, tile: GatedTile, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for weight = [gate; up] ([2I, K]), x [T, K] -> [T, I], in one kernel."""
    problem = gated_problem(x, weight)
    if problem:
        raise ValueError(f"gate_up_silu: {problem}")
    m, k = x.shape
    n = weight.shape[0] // 2
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tiles = triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n)
    if tile.tma and _tma_fits(x, weight, out):
        # A persistent launch's program count is a compile-time constant of the device, not of the step
        # (no new compile for a new row count); with fewer tiles than that, a program a tile.
        programs = sm_count(x.device) * tile.persistent_per_sm
        _gate_up_silu_tma_kernel[(min(tiles, programs) if programs else tiles,)](
            TensorDescriptor.from_tensor(x, [tile.block_m, tile.block_k]),
            TensorDescriptor.from_tensor(weight, [tile.block_n, tile.block_k]),
            TensorDescriptor.from_tensor(out, [tile.block_m, tile.block_n]), m, n, k,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=8, PROGRAMS=programs,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
        return out
    # A TMA tile whose tensors a bulk copy cannot address runs as the same tile through plain loads.
    _gate_up_silu_kernel[(tiles,)](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                               BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=8,
                               EVEN_K=k % tile.block_k == 0, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


def gate_up_silu_unfused(x: torch.Tensor, weight: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """The same as separate ops: the gate_up GEMM (cuBLAS on a GPU), then the SiLU-mul kernel."""
    return silu_and_mul(F.linear(x, weight), use_triton=use_triton)


def gated_by(choice: GatedChoice, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gate_up_silu_unfused(x, weight) if choice == UNFUSED else gate_up_silu(x, weight, choice)


# What a model's MLPs run, by rows: ((least rows, choice), ...) sorted by rows; fewer rows than the
# first entry's, or none at all, run UNFUSED.
GatedChoices = tuple[tuple[int, GatedChoice], ...]


def choice_for_rows(choices: GatedChoices, rows: int) -> GatedChoice:
    chosen = UNFUSED
    for least, choice in choices:
        if rows < least:
            break
        chosen = choice
    return chosen

"""Small-batch GEMV with the decode step's elementwise work fused into it.

At batch 1-4 a decode step is a chain of weight reads (each linear layer a GEMV) with small kernels
in between: RMSNorm before qkv_proj and gate_up_proj, SiLU-mul before down_proj, residual adds after
o_proj and down_proj. In a CUDA graph each of those costs ~2-3 us of launch and ramp, about 0.45 ms
of an 8B step and a third of a 135M step. Here one kernel does

    y = round(round(prologue(x) @ W^T + bias) + residual)

with the prologue RMSNorm (each program recomputes the row's sum of squares: K values from L2) or
SiLU(gate) * up, rounded at the same points as the separate ops (fused_ops), so the fused path gives
the same values as the unfused one up to the GEMV's summation order.

Grid: one program per BLOCK_N output features, every batch row at once, so the weight tile is read
once for the whole batch. Memory-bound by design: BLOCK_M is at most 4 rows. A program's latency is
what a small model's step is made of, so each does few dependent round trips: the RMSNorm pre-pass
reads a row in one load, wide K tiles cover a small model's K in one or two iterations, and each
tile's loads are issued an iteration before it is used. A tile may also divide K among several
programs (split-K: more programs for a GEMV of few output features and a long K, such as down_proj);
the last of an n-tile's programs to finish adds their partial sums in a fixed order. Which tile suits
a shape is for the GPU to say: runner/gemv_tuning.py times the candidates below at startup.

On Hopper the kernels launch with programmatic dependent launch: each program reads its first two
weight tiles, then waits for the previous kernel (which produced x), then lets the next kernel launch.
A chain of GEMVs (and the decode attention, which does the same) so overlaps each kernel's launch and
first weight reads with the one before it, instead of paying both between every two kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopserve.device_caps import pdl_supported, sm_count
from loopserve.model.fused_ops import HAS_TRITON, rms_norm, silu_and_mul, tl, triton

if HAS_TRITON:
    from loopserve.model.fused_ops import silu_times

# Rows (tokens) the fused path takes; larger batches use cuBLAS and the separate kernels.
MAX_GEMV_ROWS = 4


def unfused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0, silu_mul: bool = False,
                 residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 use_triton: bool | None = None) -> torch.Tensor:
    """What the kernel fuses, one op at a time in the model's order and precision: the prologue as its
    own kernel (fused_ops: Triton on a GPU), cuBLAS, the residual add, the cast to out_dtype (if
    given). use_triton=False: the torch reference throughout."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps, use_triton=use_triton)
    if silu_mul:
        x = silu_and_mul(x, use_triton=use_triton)
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = y + residual
    return y if out_dtype is None else y.to(out_dtype)


def gemv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Reference: the separate ops the kernel fuses, in torch."""
    return unfused_gemv(x, weight, bias, use_triton=False, **kw)


if HAS_TRITON:

    @triton.jit
    def _x_tile(x_rows, NW, K, k, x_mask, inv_rms, act: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr):
        """The activations' K tile k, after the prologue, as fp32 values of the activation dtype."""
        if SILU:
            # x holds [gate | up], 2K wide.
            g = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            u = tl.load(x_rows + K + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            return silu_times(g, u).to(act).to(tl.float32)
        xv = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if NORM:
            nw = tl.load(NW + k, mask=k < K, other=0.0).to(tl.float32)
            xv = (xv * inv_rms[:, None]).to(act).to(tl.float32)
            xv = (xv * nw[None, :]).to(act).to(tl.float32)
        return xv

    @triton.jit
    def _store_y(acc, BIAS, RES, Y, offs_m, offs_n, n_ok, mask, stride_rm, stride_ym, act: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
        """The epilogue: bias, rounding to the activation dtype, the residual add, the store (which
        casts to Y's dtype: the logits GEMV writes fp32)."""
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(act)
        if HAS_RES:
            r = tl.load(RES + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=mask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(act)
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y, mask=mask)

    @triton.jit
    def _gemv_kernel(X, W, BIAS, RES, NW, Y, PART, TICKET, M, N, K, eps,
                     stride_xm, stride_wn, stride_rm, stride_ym,
                     NORM: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM_BLOCK: tl.constexpr, GDC: tl.constexpr, SPLIT_K: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        tile_n = tl.program_id(0)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if SPLIT_K > 1:
            # This program's share of K: whole BLOCK_K tiles, as even as they divide (none empty while
            # there are at least SPLIT_K tiles).
            split = tl.program_id(1)
            k_tiles = tl.cdiv(K, BLOCK_K)
            k_lo = (split * k_tiles // SPLIT_K) * BLOCK_K
            k_hi = tl.minimum(((split + 1) * k_tiles // SPLIT_K) * BLOCK_K, K)
        else:
            k_lo = 0
            k_hi = K
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
        act = X.dtype.element_ty
        # Two weight tiles are in flight at a time: a tile's loads are issued an iteration before it is
        # used (Triton does not pipeline loads that feed no dot). Both of the first two come before the
        # wait: no kernel of a step writes weights, so under programmatic dependent launch they stream
        # in while the previous kernel (whose output is x) finishes. At a small model's shapes that is
        # the program's whole share of W.
        k = k_lo + offs_k
        w_cur = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < k_hi)[None, :], other=0.0)
        k_nxt = k + BLOCK_K
        w_nxt = tl.load(w_rows + k_nxt[None, :], mask=n_ok[:, None] & (k_nxt < k_hi)[None, :], other=0.0)
        if GDC:
            tl.extra.cuda.gdc_wait()
            # The next kernel may launch now and fetch its own weights while this one works.
            tl.extra.cuda.gdc_launch_dependents()
        x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
        inv_rms = tl.full([BLOCK_M], 1.0, tl.float32)
        if NORM:
            # The rows' sums of squares, NORM_BLOCK columns at a time (all of K for one row up to 8,192 at
            # 4 warps): one round trip to L2 instead of a loop of dependent small loads. Every split
            # takes the whole row's.
            offs_nb = tl.arange(0, NORM_BLOCK)
            ss = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, NORM_BLOCK):
                kk = k0 + offs_nb
                xv = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xv * xv, 1)
            inv_rms = 1.0 / tl.sqrt(ss / K + eps)
        # Products accumulate per K lane and are reduced once after the loop: reducing across the
        # threads (and warps) that share a row in every iteration would put a barrier between the loads.
        xv = _x_tile(x_rows, NW, K, k, m_ok[:, None] & (k < k_hi)[None, :], inv_rms, act, NORM, SILU)
        acc3 = xv[:, None, :] * w_cur.to(tl.float32)[None, :, :]
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            k = k0 + offs_k
            w_cur = w_nxt
            k_nxt = k + BLOCK_K
            w_nxt = tl.load(w_rows + k_nxt[None, :], mask=n_ok[:, None] & (k_nxt < k_hi)[None, :], other=0.0)
            xv = _x_tile(x_rows, NW, K, k, m_ok[:, None] & (k < k_hi)[None, :], inv_rms, act, NORM, SILU)
            acc3 += xv[:, None, :] * w_cur.to(tl.float32)[None, :, :]
        acc = tl.sum(acc3, axis=2)
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K > 1:
            # Partial sums to the workspace ([SPLIT_K, M, N] fp32), then a ticket from the n-tile's
            # counter. Every thread's stores come before the ticket (the barrier), and the ticket's
            # release publishes them; the program that draws the last ticket (its acquire orders its
            # loads after all of them) adds the partials in split order, so the result does not depend
            # on which split finished last, and resets the counter for the next launch.
            part = PART + offs_m[:, None] * N + offs_n[None, :]
            tl.store(part + split * M * N, acc, mask=mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(TICKET + tile_n, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in tl.static_range(SPLIT_K):
                    acc += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(TICKET + tile_n, 0)
                _store_y(acc, BIAS, RES, Y, offs_m, offs_n, n_ok, mask, stride_rm, stride_ym, act, HAS_BIAS, HAS_RES)
        else:
            _store_y(acc, BIAS, RES, Y, offs_m, offs_n, n_ok, mask, stride_rm, stride_ym, act, HAS_BIAS, HAS_RES)


def gemv_problem(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None if it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if x.dim() != 2 or x.shape[0] > MAX_GEMV_ROWS:
        return f"x must be [<= {MAX_GEMV_ROWS}, K], got {tuple(x.shape)}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return f"dtypes {x.dtype} / {weight.dtype}"
    if weight.dim() != 2 or weight.stride(1) != 1 or x.stride(1) != 1:
        return "weight and x need contiguous rows"
    return None


@dataclass(frozen=True)
class GemvTile:
    """A program's share of the GEMV: block_n output features, block_k columns an iteration at batch 1
    (a batch of m rows takes block_k / m, rounded to powers of two, so the accumulator's registers
    stay the same), num_warps warps; split_k > 1: K divided among that many programs an n-tile, whose
    partial sums the last to finish adds (GemvWorkspace)."""
    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_k}/{self.num_warps}w" + (f"/k{self.split_k}" if self.split_k > 1 else "")


@dataclass(frozen=True)
class GemvWorkspace:
    """Split-K launches' scratch, for any number of them in turn on one stream: fp32 partial sums (each
    launch writes its [split_k, M, N] before reading them; never zeroed) and int32 ticket counters, one
    an n-tile, zero between launches (the program that draws an n-tile's last ticket resets it)."""
    partials: torch.Tensor
    tickets: torch.Tensor

    def holds(self, tile: GemvTile, m: int, n: int) -> bool:
        return (self.partials.numel() >= tile.split_k * m * n
                and self.tickets.numel() >= triton.cdiv(n, tile.block_n))


def gemv_workspace(launches: list[tuple[GemvChoice | None, int]], m: int,
                   device: torch.device) -> GemvWorkspace | None:
    """The workspace for launches of (choice, N) at up to m rows, or None where none splits K. One per
    forward: a graph captures the ticket counters' zeroing once, and every launch leaves them zero."""
    split = [(c, n) for c, n in launches if isinstance(c, GemvTile) and c.split_k > 1]
    if not split:
        return None
    return GemvWorkspace(torch.empty(max(c.split_k * m * n for c, n in split), dtype=torch.float32, device=device),
                         torch.zeros(max(triton.cdiv(n, c.block_n) for c, n in split), dtype=torch.int32,
                                     device=device))


# The interpreter's tile: small, so the numpy emulation stays fast.
_INTERPRETER_TILE = GemvTile(8, 32, 1)


def default_tile(n: int, device: torch.device) -> GemvTile:
    """The tile a GEMV of n output features uses untuned.

    The [16, BLOCK_K] fp32 accumulator plus two weight tiles in flight (see the kernel) take ~100
    registers a thread at 16 x 512 and 8 warps (ptxas, sm_90): two CTAs an SM, 64 KB of weights in
    flight each, about HBM3's bandwidth-delay product. A grid that fits the SMs once over (a small
    model's layers: 36-60 programs at the 135M shapes) does not need two CTAs an SM, so its tile
    doubles and K up to 1,024 takes one iteration."""
    if device.type != "cuda":
        return _INTERPRETER_TILE
    fits_once = triton.cdiv(n, 16) <= sm_count(device)
    return GemvTile(16, 1024 if fits_once else 512, 8)


# Split-K tiles. The fourteenth session's H100 run had gate_up streaming its weights at 3.0 TB/s (7,168
# programs of 4 x 1024), but down (4,096 x 14,336) and qkv at 2.4. By ptxas's registers for sm_90, a
# 4 x 1024 / 4-warp program fits 5 CTAs an SM: down's 1,024 such programs are 1.55 waves of 132 SMs,
# and the tiles that fill their waves hold fewer bytes in flight. Dividing K adds programs without
# shrinking the tile, and shortens down's 14-tile chain of dependent iterations. With the split's
# registers (95-112 at one row; none spills at 1-4 rows, unlike 8 x 512 / 4 warps and 16 x 512 / 8
# warps split) down's programs fill their last wave to 97 % in each (3.9 or 5.8 waves). Not measured
# yet: the GPU picks.
SPLIT_K_CANDIDATE_TILES = (GemvTile(4, 1024, 4, 2), GemvTile(4, 1024, 4, 3), GemvTile(8, 1024, 8, 2),
                           GemvTile(16, 1024, 8, 2))
# The tiles the startup tuner (runner/gemv_tuning.py) times against the default on a GPU: a role's
# GEMV over all its layers in a CUDA graph. By ptxas (sm_90, tests/attention/test_compile_hopper.py)
# most take ~100 registers a thread: two CTAs an SM at 8 warps, four or five at 4. 8 x 128 / 4 warps
# takes ~40 (a dozen CTAs an SM: the finest grid, one wave for any of the 8B shapes) and 16 x 1024 /
# 8 warps ~190 (one CTA an SM, the largest tile). On an H100 (docs/PERF.md, fourteenth session) 4 x 1024
# / 4 warps was fastest for qkv and gate_up, 8 x 512 / 4 for o, and cuBLAS for down.
GPU_CANDIDATE_TILES = (GemvTile(16, 512, 8), GemvTile(8, 512, 4), GemvTile(32, 256, 8), GemvTile(8, 128, 4),
                       GemvTile(4, 1024, 4), GemvTile(16, 1024, 8), *SPLIT_K_CANDIDATE_TILES)
INTERPRETER_CANDIDATE_TILES = (_INTERPRETER_TILE, GemvTile(16, 16, 1), GemvTile(4, 64, 2), GemvTile(8, 16, 1, 3))


def candidate_tiles(n: int, device: torch.device) -> list[GemvTile]:
    """The tiles worth timing for a GEMV of n output features: the default first."""
    tiles = [default_tile(n, device)]
    for tile in GPU_CANDIDATE_TILES if device.type == "cuda" else INTERPRETER_CANDIDATE_TILES:
        if tile not in tiles:
            tiles.append(tile)
    return tiles


# A role's other choice: cuBLAS, with the prologue and the residual add as kernels of their own.
CUBLAS = "cublas"
GemvChoice = GemvTile | str


def gemv_by(choice: GemvChoice | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            pdl: bool = True, workspace: GemvWorkspace | None = None, **kw) -> torch.Tensor:
    """A fused-layer GEMV as the startup tuner chose for its role: fused_gemv with the tile `choice`
    (None: the default one), or unfused_gemv where the choice is CUBLAS."""
    if choice == CUBLAS:
        return unfused_gemv(x, weight, bias, **kw)
    return fused_gemv(x, weight, bias, tile=choice, pdl=pdl, workspace=workspace, **kw)


def launch_shape(tile: GemvTile, m: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for m rows and K columns: K tiles shrink as the rows grow, never
    past K, and warps never outnumber 8 elements a thread."""
    block_k = max(1, min(tile.block_k // triton.next_power_of_2(m), triton.next_power_of_2(k)))
    num_warps = max(1, min(tile.num_warps, tile.block_n * block_k // 256))
    return tile.block_n, block_k, num_warps


# fp32 values a thread holds in one load of the RMSNorm pre-pass. ptxas for sm_90 spilled 8-16 bytes in
# 4-row launches at 4 warps with 128 (Triton 3.6, the GPU machine's) and with 64 (Triton 3.9); at 32
# neither does. A batch-1 row of up to 4,096 (8,192 at 8 warps) still takes one load.
_NORM_VALUES_PER_THREAD = 32


def norm_block(m: int, k: int, num_warps: int) -> int:
    """Columns of the m rows the RMSNorm pre-pass loads at once: all of K where the registers allow
    (one round trip to L2), else as many as keep a load within _NORM_VALUES_PER_THREAD a thread."""
    fits = _NORM_VALUES_PER_THREAD * 32 * num_warps // triton.next_power_of_2(m)
    return max(1, min(triton.next_power_of_2(k), fits))


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               norm_weight: torch.Tensor | None = None, eps: float = 0.0, silu_mul: bool = False,
               residual: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None,
               tile: GemvTile | None = None, pdl: bool = True, workspace: GemvWorkspace | None = None
               ) -> torch.Tensor:
    """x [M <= 4, K] (or [M, 2K] with silu_mul), weight [N, K] (nn.Linear's) -> [M, N] in x's dtype.
    norm_weight: RMSNorm x first (eps); silu_mul: x is [gate | up], use silu(gate) * up; residual
    [M, N]: added to the rounded product. Not both norm and silu. out_dtype: the result, rounded to
    x's dtype as ever, stored as this one (fp32 logits without a cast kernel). tile: the program's
    share instead of default_tile (runner/gemv_tuning.py times candidates at startup). pdl: launch
    with programmatic dependent launch where the device supports it (device_caps.pdl_supported).
    workspace: a split-K tile's scratch (gemv_workspace; one is made for the call where none is given)."""
    assert not (norm_weight is not None and silu_mul), "one prologue at most"
    problem = gemv_problem(x, weight)
    if problem is not None:
        raise ValueError(f"fused_gemv cannot take these inputs: {problem}")
    m = x.shape[0]
    n, k = weight.shape
    assert x.shape[1] == (2 * k if silu_mul else k), f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}"
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1
    tile = tile or default_tile(n, x.device)
    block_n, block_k, num_warps = launch_shape(tile, m, k)
    split_k = tile.split_k
    if split_k > 1:
        if workspace is None:
            workspace = gemv_workspace([(tile, n)], m, x.device)
        assert workspace.holds(tile, m, n), "split-K workspace too small"
        partials, tickets = workspace.partials, workspace.tickets
    else:
        partials, tickets = y, y  # not read
    pdl = pdl and pdl_supported(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x, weight, bias if bias is not None else weight, residual if residual is not None else y,
        norm_weight if norm_weight is not None else weight, y, partials, tickets, m, n, k, float(eps),
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        NORM=norm_weight is not None, SILU=silu_mul, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        NORM_BLOCK=norm_block(m, k, num_warps), GDC=pdl, SPLIT_K=split_k, num_warps=num_warps,
        # The kernel keeps its own two tiles in flight; Triton's pipeliner has no dot to pipeline.
        num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )
    return y

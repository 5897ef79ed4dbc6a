"""Paged prefill/extend attention in Triton: one launch for a whole batch of variable-length chunks.

Layout. The batch's new tokens are packed: sequence b owns query rows query_start_loc[b] ..
query_start_loc[b+1]-1, and its n_new tokens sit at absolute positions seq_lens[b] - n_new ..
seq_lens[b] - 1. Their K/V have already been written into the paged cache
([num_blocks, block_size, Hkv, D]), so every key -- cached prefix and new alike -- is read from the
cache through the block table: position p lives in block block_tables[b, p // block_size] at offset
p % block_size. Pure prefills (n_new == seq_len), extends over a cached prefix and single-token rows
are all the same case to the kernel.

Grid (B, Hq, cdiv(max_query_len, BLOCK_M)). A program takes BLOCK_M query rows of one sequence and
one query head (GQA: kv head = h // (Hq // Hkv)); tiles past its sequence's new tokens exit at once.
It walks key tiles of BLOCK_N positions from 0 up to the causal limit of its last row, gathering each
key's slot from the block table (a tile may span several cache blocks, or sit inside one), and keeps
an online softmax in fp32 (running max m, running sum l, unnormalised accumulator). The key range
splits in two loops:
  * [0, full_end): every key is <= the tile's first row position, so every row sees every key and
    no mask is needed (the bulk of the work for long prefixes);
  * [full_end, last row position]: the diagonal, masked causally by absolute position and by
    seq_len (slots past seq_len in a sequence's last block may hold garbage, even NaN, so they are
    never loaded).
Tiles beyond the last row's position are never visited.

Invariants: key 0 is visible to every row (valid or padding) and is in the first tile visited, so the
running max is finite after the first tile and exp(-inf - -inf) never occurs; padding rows (past
n_new) compute harmless finite values and are not stored. No host synchronisation: all lengths are
read on the device, the only host ints are shapes and max_query_len, so the call can be captured in a
CUDA graph.

One query head per program by default: a prefill/extend of at least BLOCK_M new tokens is
compute-bound once BLOCK_M rows share each K/V tile, and packing heads changes neither the programs'
count nor their reads there, while it wastes rows when the group size does not divide BLOCK_M (e.g.
a group of 3 or 6). With fewer new tokens than BLOCK_M (a short agent turn or a verify pass over a
long context) a program per head would fill only that many of its rows; such launches pack the GQA
group into the rows (PACK_GQA: row r is token r // GROUP of head r % GROUP), which needs up to GROUP
times fewer programs, each reading the context once for the whole group.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loopserve.attention.triton_decode import merge_splits
from loopserve.device_caps import FEW, MANY, launch_regime, sm_count

# A third regime of the extend kernel's own: few-programs launches of fewer new tokens than this (a
# short agent turn or a verify pass over a cached context), which pack the GQA group
# (paged_extend_attention) and so launch up to a group's worth fewer programs than the few-programs
# regime is timed with.
SHORT = "short"
SHORT_MAX_QUERY_LEN = 64

_LOG2E = 1.4426950408889634
# More splits than this add merge traffic and near-empty programs for little extra parallelism.
MAX_EXTEND_SPLITS = 8


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, start, q_pos, seq_len, qk_scale,
                 stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        in_seq = offs_n < seq_len
        # The block table row may be shorter than the tile reaches, so masked columns read nothing.
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    within = (offs_n % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_base + (blk * stride_kb + within * stride_ks)[:, None] + offs_d[None, :]
    v_ptrs = v_base + (blk * stride_vb + within * stride_vs)[:, None] + offs_d[None, :]
    if MASKED:
        # Unwritten slots past seq_len may hold NaN; 0 * NaN in p @ v would poison the row.
        k = tl.load(k_ptrs, mask=in_seq[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)      # [BLOCK_M, BLOCK_N], unscaled
    if MASKED:
        keep = (offs_n[None, :] <= q_pos[:, None]) & in_seq[None, :]
        qk = tl.where(keep, qk * qk_scale, float("-inf"))      # log2 units
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A split of the key range may hold no visible key for some rows yet (m_new = -inf): subtract 0
        # instead, so those rows keep p = 0 and alpha = 0 rather than exp2(-inf - -inf) = NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_sub[:, None])
    else:
        # Every key is visible, so every row's max is finite. Scaling the row max instead of every score
        # (qk_scale > 0 keeps the order) makes the scale and the subtraction one FMA a score: the
        # softmax's ALU work runs in turn with the tensor cores' in this kernel.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


# The block table's row stride is the step's widest table: a fresh value for every new context length,
# and each divisibility class Triton specialises on would compile a new kernel mid-serving (~0.8 s).
# The (max, sum) strides follow the split count likewise. The partials' strides are multiples of
# HEAD_DIM whatever the step, so they keep their divisibility hints (vector stores).
@triton.jit(do_not_specialize=["stride_bt", "stride_mlt", "stride_mlh", "num_splits"])
def _extend_kernel(Q, K, V, O, BT, QSL, SL, SEQ_IDS, WS, ML, qk_scale, num_splits,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                   stride_wss, stride_wst, stride_wsh, stride_mls, stride_mlt, stride_mlh,
                   GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                   SKIP_SINGLE: tl.constexpr, SPLIT: tl.constexpr, PACK_GQA: tl.constexpr,
                   TOKENS: tl.constexpr, HAS_SEQ_IDS: tl.constexpr):
    # SPLIT: num_splits > 1 programs share each tile's keys (a runtime count: one compiled variant).
    # PACK_GQA: a program takes one KV head and BLOCK_M // GROUP tokens of all GROUP query heads that
    # share it (row r: token r // GROUP, head r % GROUP of the group), so each K/V tile it loads
    # serves the whole group instead of one head; otherwise one query head and BLOCK_M tokens. TOKENS:
    # the tokens of a tile (BLOCK_M // GROUP packed, else BLOCK_M). HAS_SEQ_IDS: grid row i takes
    # sequence SEQ_IDS[i] (a mixed step's multi-token sequences), else sequence i.
    b = tl.program_id(0) // num_splits
    if HAS_SEQ_IDS:
        b = tl.load(SEQ_IDS + b)
    split = tl.program_id(0) % num_splits
    # Reverse the tile order: the last tiles of a sequence see the most keys, and starting them first
    # shortens the tail of the launch.
    mt = tl.num_programs(2) - 1 - tl.program_id(2)

    q_start = tl.load(QSL + b)
    n_new = tl.load(QSL + b + 1) - q_start
    if SKIP_SINGLE:
        if n_new == 1:
            return  # the caller attends single-token rows with the decode kernel
    if mt * TOKENS >= n_new:
        return
    seq_len = tl.load(SL + b)
    prefix = seq_len - n_new

    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if PACK_GQA:
        kvh = tl.program_id(1).to(tl.int64)
        offs_m = mt * TOKENS + offs_r // GROUP
        h = kvh * GROUP + offs_r % GROUP                        # per row
        h_col = h[:, None]
        row_ok = (offs_m < n_new) & (offs_r < TOKENS * GROUP)  # a GROUP not dividing BLOCK_M leaves spare rows
    else:
        h = tl.program_id(1)
        h_col = h
        kvh = (h // GROUP).to(tl.int64)
        offs_m = mt * TOKENS + offs_r
        row_ok = offs_m < n_new
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h_col * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = prefix + offs_m

    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    bt_row = BT + b.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first_pos = prefix + mt * TOKENS
    last_pos = prefix + tl.minimum((mt + 1) * TOKENS, n_new) - 1
    # Keys below full_end are visible to every row of the tile (and all < seq_len): no mask.
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    lo = 0
    hi = last_pos + 1
    if SPLIT:
        # This program's share of the key range: whole BLOCK_N tiles, so the mask split stays aligned.
        per_split = tl.cdiv(tl.cdiv(last_pos + 1, BLOCK_N), num_splits) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, last_pos + 1)
    for start in range(lo, tl.minimum(full_end, hi), BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, start, q_pos, seq_len, qk_scale,
                                     stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                                     BLOCK_SIZE, BLOCK_N, False, DOT_PREC)
    for start in range(tl.maximum(full_end, lo), hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, start, q_pos, seq_len, qk_scale,
                                     stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                                     BLOCK_SIZE, BLOCK_N, True, DOT_PREC)

    if SPLIT:
        # Unnormalised partials; _merge_splits_kernel combines the splits of each row.
        tl.store(WS + split * stride_wss + rows[:, None] * stride_wst + h_col * stride_wsh + offs_d[None, :], acc,
                 mask=row_ok[:, None])
        ml = ML + split * stride_mls + rows * stride_mlt + h * stride_mlh
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
    else:
        out = acc / l_i[:, None]
        tl.store(O + rows[:, None] * stride_ot + h_col * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


# Merges the key-range splits of each (row, query head): grid (T, Hq), partials in the layout
# [rows, heads, splits, ...].
@triton.jit(do_not_specialize=["num_splits", "stride_sb", "stride_sh"])
def _merge_splits_kernel(
    acc_ptr, stat_ptr, out_ptr, num_splits,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_sb, stride_sh, stride_ss, stride_sk,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, SPLIT_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    merge_splits(acc_ptr + b * stride_ab + h * stride_ah, stat_ptr + b * stride_sb + h * stride_sh,
                 out_ptr + b * stride_ob + h * stride_oh, num_splits, stride_as, stride_ad, stride_ss, stride_sk,
                 stride_od, HEAD_DIM, SPLIT_PAD, "")


@dataclass(frozen=True)
class ExtendTile:
    """BLOCK_M query rows a program, BLOCK_N keys an iteration, warps, software-pipeline stages; with
    pack_gqa, a program's rows are the tokens of one KV head's whole query-head group (BLOCK_M //
    group tokens), so each K/V tile it loads serves the group, not one head. per_sm: the programs of
    the tile an SM holds at once (checked against sm_90 compiles in tests/attention/test_compile_hopper.py
    and on the GPU), which a launch of few programs aims to fill by splitting key ranges
    (choose_extend_splits): 1 keeps a launch of ~one program an SM unsplit. max_registers: a cap on
    each thread's registers (ptxas .maxnreg), where the compiler would otherwise take enough to keep
    a second program off the SM; None leaves the compiler its choice."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool = False
    per_sm: int = 1
    max_registers: int | None = None

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}/{self.num_warps}w/{self.num_stages}s"
                + ("/gqa" if self.pack_gqa else "") + (f"/x{self.per_sm}" if self.per_sm > 1 else "")
                + (f"/r{self.max_registers}" if self.max_registers else ""))


def default_extend_tile(head_dim: int, dtype: torch.dtype, device: torch.device, regime: str) -> ExtendTile:
    """The tile a launch takes untuned."""
    if device.type != "cuda":
        # Interpreter: small tiles keep the numpy emulation fast; BLOCK_N = 8 sits between the
        # tested cache block sizes (4 and 16), so tiles both span several blocks and sit inside one.
        return ExtendTile(16, 8, 1, 1)
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes; keep K/V stages within shared memory and registers in check.
        return ExtendTile(32, 32, 4, 2)
    if head_dim >= 128:
        # Few programs (a short extend over a long cached prefix: 256 new tokens x 32 heads is 128
        # programs on 132 SMs) each walk the whole context: wider key tiles keep more loads in flight.
        # Measured on an H200 at 8k cached + 256 new: 0.169 ms against 0.206 ms for 64-wide tiles,
        # while at an 8k cold prompt (4,096 programs) 64-wide tiles win, 1.54 ms against 2.26 ms.
        return ExtendTile(64, 128, 4, 2) if regime == FEW else ExtendTile(64, 64, 4, 2)
    return ExtendTile(64, 64, 4, 3)


# The tiles runner/extend_tuning.py times for each regime (bf16 / fp16 on a GPU). The H200 sweep of
# the sixth session (docs/PERF.md) measured some of them at the 8B shapes; the 8-warp 64-row tiles
# (64 x 128 does not spill at 8 warps, unlike at 4) and 128 x 64 at 2 stages were not. With few
# programs (256 new tokens over 8k cached: 128 programs, each walking the whole context) the sweep's
# best tile, 64 x 128 (~148 KB of shared memory: one program an SM), ran at ~210 TFLOP/s, a
# latency-bound walk. 64 x 64 at 4 warps fits two an SM (80 KB, ~200 registers a thread): its per_sm=2
# twin splits such a launch's key ranges two ways, so each SM runs two shorter walks at once.
# Packing the GQA group changes neither the programs' count nor their reads at >= BLOCK_M new tokens,
# and launches with fewer pack anyway: no packed candidates. The fourteenth session's H100 run timed
# the split twin fastest (0.143 ms a layer, against 0.21 unsplit) and the one-CTA-an-SM 8-warp tiles
# slowest: more independent CTAs an SM hide each walk's load latency. 64 x 32 at 4 warps goes one
# further: 150 registers a thread and 48 KB of shared memory split (ptxas, sm_90) fit three an SM,
# so its per_sm=3 splits such a launch three ways (not measured yet).
# A long prompt (MANY) reads each key and value once per BLOCK_M query rows of each head: at 8k, 64-row
# tiles move ~8.6 GB a layer from L2 (~5.8 TB/s at the H100's 1.48 ms a layer), where 128-row tiles
# move half. The 8-warp 128-row tiles (one program an SM by their registers) ran no faster: their
# two warpgroups meet at a barrier every key tile, so softmax and tensor-core work take turns. Two
# candidates keep 128 rows with two programs an SM, whose warpgroups do not wait for each other: 128 x
# 32 at 4 warps (255 registers, 64 KB of shared memory, no spills) and at 8 warps capped to 128
# registers (no spills unsplit). Neither is measured yet; the FEW twin splits two ways. Under the GPU
# machine's Triton 3.6 the 4-warp 128 x 32 spills 44 bytes unsplit (none under 3.9); 128 x 16 at 4 warps
# (249 registers, 48 KB) does not under either, and also fits two an SM.
_GPU_EXTEND_CANDIDATES = {
    FEW: (ExtendTile(64, 128, 4, 2), ExtendTile(64, 128, 8, 2), ExtendTile(64, 64, 4, 2), ExtendTile(64, 64, 8, 2),
          ExtendTile(128, 64, 8, 2), ExtendTile(64, 64, 4, 2, per_sm=2), ExtendTile(64, 64, 4, 3, per_sm=2),
          ExtendTile(64, 32, 4, 2, per_sm=3), ExtendTile(128, 32, 4, 2, per_sm=2)),
    MANY: (ExtendTile(64, 64, 4, 2), ExtendTile(64, 64, 4, 3), ExtendTile(128, 64, 8, 2), ExtendTile(128, 64, 8, 3),
           ExtendTile(128, 128, 8, 2), ExtendTile(64, 128, 8, 2), ExtendTile(128, 32, 4, 2, per_sm=2),
           ExtendTile(128, 32, 8, 2, per_sm=2, max_registers=128), ExtendTile(128, 16, 4, 2, per_sm=2)),
}
_INTERPRETER_EXTEND_CANDIDATES = (ExtendTile(16, 8, 1, 1), ExtendTile(16, 16, 1, 1), ExtendTile(32, 8, 1, 1),
                                  ExtendTile(16, 8, 1, 1, per_sm=2))


def candidate_extend_tiles(regime: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[ExtendTile]:
    """The tiles worth timing for a regime (SHORT: FEW's): the default first (fp32 on a GPU keeps its
    one tile)."""
    regime = FEW if regime == SHORT else regime
    tiles = [default_extend_tile(head_dim, dtype, device, regime)]
    if device.type != "cuda":
        extra = _INTERPRETER_EXTEND_CANDIDATES
    else:
        extra = () if dtype == torch.float32 else _GPU_EXTEND_CANDIDATES[regime]
    return tiles + [t for t in extra if t not in tiles]


def live_programs_of(num_seqs: int, num_q_heads: int, max_query_len: int) -> int:
    """(query tile, head) programs with work, counted in 64-row tiles: what picks the tile shape and
    the splits (the count is a heuristic's input, whatever BLOCK_M the chosen config then has)."""
    return num_seqs * num_q_heads * triton.cdiv(max_query_len, 64)


def launched_programs(live_programs: int, num_q_heads: int, num_kv_heads: int, max_query_len: int,
                      tile: ExtendTile) -> int:
    """The programs with work a launch of `tile` has, from live_programs_of's count (sequences x query
    heads x 64-row tiles): a packed tile has one per KV head and BLOCK_M // group tokens."""
    if not tile.pack_gqa:
        return live_programs
    seqs = max(1, live_programs // live_programs_of(1, num_q_heads, max_query_len))
    return seqs * num_kv_heads * triton.cdiv(max_query_len, tile.block_m // (num_q_heads // num_kv_heads))


def choose_extend_splits(live_programs: int, num_sms: int, per_sm: int = 1) -> int:
    """Splits of each tile's key range: only while most of the launch's slots (per_sm programs an SM,
    the tile's) would idle, then as many as keep it to one wave (live x splits <= slots; at most
    MAX_EXTEND_SPLITS). With the JIT's specialisations a program with 128-wide key tiles needs ~148 KB
    of shared memory, so one runs per SM (tests/attention/test_compile_hopper.py): a second wave
    would run mostly alone. At 256 new tokens over an 8k prefix (128 programs) five splits (640
    programs, five waves) measured 0.24 ms a layer against 0.17 ms unsplit on an H200. A short agent
    turn (64 new tokens x 32 heads, 32 programs) over a long cached prefix splits four ways."""
    slots = num_sms * per_sm
    if 2 * live_programs >= slots:
        return 1
    return max(1, min(MAX_EXTEND_SPLITS, slots // max(1, live_programs)))


def _launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale, out,
            block_m, block_n, num_warps, num_stages, skip_single=False, num_splits=1, pack_gqa=False,
            seq_ids=None, max_registers=None):
    T, Hq, D = q.shape
    B = seq_lens.shape[0] if seq_ids is None else seq_ids.shape[0]
    Hkv = k_cache.shape[2]
    if num_splits > 1:
        ws = torch.empty(T, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(T, Hq, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        ws = ml = out.unsqueeze(2)  # unused (unsplit, the kernel stores to out directly)
    group = Hq // Hkv
    if pack_gqa:
        assert block_m >= group, f"pack_gqa needs BLOCK_M >= the GQA group ({group})"
        tokens = block_m // group
        grid = (B * num_splits, Hkv, triton.cdiv(max_query_len, tokens))
    else:
        tokens = block_m
        grid = (B * num_splits, Hq, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        seq_ids if seq_ids is not None else seq_lens, ws, ml, scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        ws.stride(2), ws.stride(0), ws.stride(1), ml.stride(2), ml.stride(0), ml.stride(1),
        GROUP=group, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=D,
        BLOCK_M=block_m, BLOCK_N=block_n,
        # fp32 inputs would otherwise go through TF32 on the tensor cores (~1e-3 error).
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", SKIP_SINGLE=skip_single,
        SPLIT=num_splits > 1, PACK_GQA=pack_gqa, TOKENS=tokens, HAS_SEQ_IDS=seq_ids is not None,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}),
    )
    if num_splits > 1:
        _merge_splits_kernel[(T, Hq)](
            ws, ml, out, num_splits, *ws.stride(), *ml.stride(), *out.stride(),
            HEAD_DIM=D, SPLIT_PAD=max(2, triton.next_power_of_2(MAX_EXTEND_SPLITS)),  # one compiled variant
            num_warps=4,
        )
    return out


def paged_extend_attention(q: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor,
                           query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor,
                           max_query_len: int,
                           scale: float,
                           out: torch.Tensor | None = None,
                           skip_single: bool = False,
                           live_programs: int | None = None,
                           num_splits: int | None = None,
                           seq_ids: torch.Tensor | None = None,
                           tiles: dict[str, ExtendTile] | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged caches.

    q [T, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] already holding the new tokens'
    K/V; block_tables [B, max_blocks] (int32 or int64); query_start_loc [B+1] int32; seq_lens [B]
    int32 (cached prefix + new); max_query_len: host int >= every sequence's new-token count.
    Returns out [T, Hq, D] in q's dtype (written in place when given). skip_single: rows of sequences
    with exactly one new token get no attention here (the caller attends them with the decode kernel
    and overwrites them); unsplit they are left untouched, split they take the merge's garbage.
    live_programs: how many (query tile, head) programs have work, which picks the tile shape and the
    key-range splits; None counts the whole grid (a captured graph's grid is sized for its largest
    batch, so it says). num_splits: None picks by live_programs (choose_extend_splits); with more than
    one, each tile's keys are shared among that many programs and a second kernel merges them.
    seq_ids: int32 [P], the sequences to attend (their rows only; the others' rows are left alone);
    None attends all. The grid covers these P sequences: in a mixed step of 256 decode rows and one
    prompt, listing the prompt alone launches its tiles rather than 257 sequences' worth of programs
    that exit at once (~131k a layer on the 8B shape at a 1,024-token chunk). tiles: regime (FEW /
    MANY by live_programs; SHORT, where given, for FEW launches of fewer than SHORT_MAX_QUERY_LEN new
    tokens) -> the ExtendTile to launch with (the startup tuner's picks, GQA-packed or not); a launch
    whose regime has none takes default_extend_tile. With fewer new tokens than the tile has rows,
    the launch packs the GQA group whatever the tile says, where that takes fewer programs, each
    reading the context once for its group's heads instead of once per head.
    """
    assert q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "bad shapes"
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    assert k_cache.shape[3] == D, "head_dim of q and cache differ"
    assert D in (16, 32, 64, 128), f"head_dim must be a power of two in 16..128, got {D}"
    assert Hq % Hkv == 0, f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {q.dtype}"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "q and cache dtypes differ"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1, "block_tables must be [B, max_blocks], row-contiguous"
    assert query_start_loc.shape[0] == seq_lens.shape[0] + 1 == block_tables.shape[0] + 1, "batch sizes differ"
    assert query_start_loc.is_contiguous() and seq_lens.is_contiguous()
    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, "bad out"
    if seq_ids is not None:
        assert seq_ids.dim() == 1 and seq_ids.dtype == torch.int32 and seq_ids.is_contiguous(), "bad seq_ids"
    num_listed = seq_lens.shape[0] if seq_ids is None else seq_ids.shape[0]
    if T == 0 or num_listed == 0 or max_query_len <= 0:
        return out
    if live_programs is None:
        live_programs = live_programs_of(num_listed, Hq, max_query_len)
    regime = launch_regime(live_programs, q.device)
    tiles = tiles or {}
    short = regime == FEW and max_query_len < SHORT_MAX_QUERY_LEN
    tile = ((tiles.get(SHORT) if short else None) or tiles.get(regime)
            or default_extend_tile(D, q.dtype, q.device, regime))
    group = Hq // Hkv
    if (not tile.pack_gqa and 1 < group <= tile.block_m and max_query_len < tile.block_m
            and triton.cdiv(max_query_len, tile.block_m // group) < group):
        # Fewer new tokens than a tile has rows (a short agent turn, a verify pass): unpacked, each
        # program fills max_query_len of its rows and reads the whole context for one head; packed,
        # the group's heads fill the rest, so up to `group` times fewer programs read it. (A group
        # that does not divide BLOCK_M leaves spare rows: just under BLOCK_M tokens would then take
        # more packed programs than heads, and stay unpacked.)
        tile = dataclasses.replace(tile, pack_gqa=True)
    if num_splits is None:
        # An occupancy choice for GPUs; in the interpreter extra programs only cost time.
        num_splits = (choose_extend_splits(launched_programs(live_programs, Hq, Hkv, max_query_len, tile),
                                           sm_count(q.device), tile.per_sm) if q.is_cuda else 1)
    assert 1 <= num_splits <= MAX_EXTEND_SPLITS, f"num_splits must be in 1..{MAX_EXTEND_SPLITS}"
    return _launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale, out,
                   tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, skip_single, num_splits, tile.pack_gqa,
                   seq_ids, tile.max_registers)

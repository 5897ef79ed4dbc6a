"""Paged decode attention in Triton: split-K ("flash-decoding"), GQA-aware, CUDA-graph safe.

One new query token per sequence attends to its whole context in the paged KV cache
(``[num_blocks, block_size, Hkv, D]`` pools, block table row per sequence).

Algorithm
---------
One launch, grid ``(B, Hkv, num_splits)``: a program owns one sequence, one KV head and one
contiguous share of that sequence's tokens. It loads every query head of the KV head's GQA
group as one ``[GROUP_PAD, D]`` tile (rows past the group are masked), so each K/V tile read
from the cache serves the whole group through ``tl.dot`` instead of being re-read per query head.
It walks its share ``BLOCK_N`` tokens at a time; a tile may straddle cache blocks, so every token's
physical slot is looked up in the block table. Softmax is online, in fp32 and in base 2 (scores
are pre-multiplied by ``log2(e)``).

The tile (``DecodeTile``: keys an iteration, warps, whether the next tile's loads are issued before
this one's math) is chosen per regime, few programs or many, by a startup timing on the card
(runner/decode_tuning.py); the regime follows the grid, which a captured graph fixes.

When one split holds the whole context, its program normalises and writes the output. Otherwise
each split with keys writes its unnormalised partial ``acc [GROUP, D]`` plus ``(max, sumexp)`` per
head to the workspace and takes a ticket from the (sequence, KV head)'s counter; the program that
draws the last ticket merges the partials with the usual log-sum-exp rescaling, writes the output in
``out``'s dtype and zeroes the counter for the next launch. The merge used to be a second kernel: a
launch of its own per layer, ~3 us at batch 1 inside a CUDA graph, about 2 % of an 8B decode step.
With ``new_tokens`` (a pure decode step) the launch also applies rotary to q and to the new key and
writes the new key and value to the cache (``NewTokens``), which took a third kernel.

Invariants
----------
* Shares are whole ``BLOCK_N`` chunks of the sequence's *actual* length, read on device, so the
  launch grid depends only on shapes and ``num_splits``: the same call can be captured in a CUDA
  graph and replayed with new ``seq_lens`` / ``block_tables`` contents. Nothing here reads a
  tensor value on the host.
* Splits past a sequence's last chunk exit at once: the split count is fixed by shapes (a graph's
  table width), the context is not. The others (``active``, at least one) each write their partial
  and take a ticket; the merge reads those.
* Ticket counters are zero before a launch and after it (the merging program resets its own), so
  one zeroed workspace serves every layer of a forward and every replay of a graph. Partials are
  stored before a CTA barrier and the ticket's acquire-release atomic; the merge reads them through
  L2 (``.cg``), so it sees every split's stores.
* ``seq_lens[b] <= block_tables.shape[1] * block_size`` is the caller's promise (not checked:
  checking would need a host sync). ``seq_lens[b] == 0`` yields zeros instead of NaN, which keeps
  padded batch slots of a captured graph harmless.
* With row maps, sequence b reads query row ``q_rows[b]`` and writes output row ``out_rows[b]``: a
  mixed step's 1-token rows are attended in place, with no gather of queries or scatter of results.
* On Hopper the launch uses programmatic dependent launch (``device_caps.pdl_supported``): a
  program reads its lengths, table row and first K/V tile *before* waiting for the kernel launched
  just before it, so those must not be that kernel's output (the caller's promise; the queries may
  be). The cache's old tokens were written by earlier steps; the new token a ``new_tokens`` launch
  writes itself is read again after the write.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loopserve.device_caps import FEW, MANY, launch_regime, pdl_supported, sm_count

# Tokens per loop iteration of the untuned decode kernel (a DecodeTile's block_n is the unit in which a
# sequence is divided among splits), and the chunk choose_num_splits counts in.
BLOCK_N = 64
# Upper bound of the num_splits heuristic: past this the merge and workspace traffic outweigh
# the extra parallelism.
MAX_SPLITS = 32
_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def merge_splits(acc_ptr, stat_ptr, out_ptr, num_splits, stride_as, stride_ad, stride_ss, stride_sk, stride_od,
                 HEAD_DIM: tl.constexpr, SPLIT_PAD: tl.constexpr, CACHE: tl.constexpr):
    """One (row, head)'s split partials, rescaled by their log-sum-exps, into its output: acc_ptr at
    its [splits, HEAD_DIM] partials, stat_ptr at its (max, sumexp) per split, out_ptr at its output.
    CACHE: the loads' cache modifier (".cg": through L2, for partials other CTAs of this launch wrote)."""
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_s = offs_s < num_splits
    m = tl.load(stat_ptr + offs_s * stride_ss, mask=mask_s, other=float("-inf"), cache_modifier=CACHE)
    l = tl.load(stat_ptr + offs_s * stride_ss + stride_sk, mask=mask_s, other=0.0, cache_modifier=CACHE)
    part = tl.load(acc_ptr + offs_s[:, None] * stride_as + offs_d[None, :] * stride_ad, mask=mask_s[:, None],
                   other=0.0, cache_modifier=CACHE)
    m_max = tl.max(m, 0)
    # A row with no key in any split has every max at -inf: shift by 0 instead so -inf - -inf (NaN)
    # never happens. Empty splits get weight exp2(-inf) = 0 either way.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    num = tl.sum(part * w[:, None], 0)
    den = tl.sum(l * w, 0)
    o = num / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + offs_d * stride_od, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _kv_tile(k_ptr, v_ptr, bt_row, pos, valid, kvh, offs_d, stride_btn, stride_kb, stride_ks, stride_kh, stride_kd,
             stride_vb, stride_vs, stride_vh, stride_vd, BLOCK_SIZE: tl.constexpr):
    """Keys and values [BLOCK_N, D] of one KV head at positions `pos` (masked where not `valid`)."""
    # int64: num_blocks * block stride can pass 2**31 elements on large caches.
    blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btn, mask=valid, other=0).to(tl.int64)
    slot_off = pos % BLOCK_SIZE
    k = tl.load(k_ptr + blk[:, None] * stride_kb + slot_off[:, None] * stride_ks
                + kvh * stride_kh + offs_d[None, :] * stride_kd, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + slot_off[:, None] * stride_vs
                + kvh * stride_vh + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a tile holding at least one valid key: (m, l, acc) updated."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    # The tile holds a valid token, so m_new is finite and exp2(-inf - m_new) = 0 takes care of the
    # first tile and of masked tokens.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Eager mixed steps pass tables whose widths vary step to step: those strides stay unspecialised, so a
# new width never compiles a kernel mid-serving. The partials' strides are multiples of HEAD_DIM
# whatever the split count: they keep their hints.
@triton.jit(do_not_specialize=["stride_btb", "stride_sb", "stride_sh"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, acc_ptr, stat_ptr, ticket_ptr, out_ptr, q_rows_ptr, out_rows_ptr,
    kn_ptr, vn_ptr, pos_ptr, cs_ptr, slot_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_sb, stride_sh, stride_ss, stride_sk,
    stride_ob, stride_oh, stride_od,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cs,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_PAD: tl.constexpr, HAS_ROWS: tl.constexpr, ROTARY: tl.constexpr, GDC: tl.constexpr,
    PREFETCH: tl.constexpr, PIPELINE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    if HAS_ROWS:
        q_row = tl.load(q_rows_ptr + b).to(tl.int64)
        out_row = tl.load(out_rows_ptr + b).to(tl.int64)
    else:
        q_row = b.to(tl.int64)
        out_row = b.to(tl.int64)

    # Divide the sequence in whole BLOCK_N chunks so no split starts mid-tile (one partial tile
    # per sequence instead of one per split). A graph's split count follows its table width, not the
    # context: splits past the last chunk have nothing to do and leave at once, without a partial or
    # a ticket, and the merge reads the `active` ones (at least one, so an empty sequence gets zeros).
    seq_len = tl.load(lens_ptr + b)
    num_chunks = tl.cdiv(seq_len, BLOCK_N)
    chunks_per_split = tl.maximum(tl.cdiv(num_chunks, num_splits), 1)
    active = tl.maximum(tl.cdiv(num_chunks, chunks_per_split), 1)
    if split >= active:
        return
    start = split * chunks_per_split * BLOCK_N
    end = tl.minimum(start + chunks_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    if PREFETCH:
        # The share's first K/V tile is read before the wait for the previous kernel (programmatic
        # dependent launch): the cache holds earlier steps' tokens, which no kernel of this step
        # rewrites, and the lengths and tables are step inputs. The one exception, the new token this
        # launch writes itself (ROTARY), is read again below. At batch 1 a share is often this one tile.
        pos = start + offs_n
        valid = pos < end
        k, v = _kv_tile(k_ptr, v_ptr, bt_row, pos, valid, kvh, offs_d, stride_btn, stride_kb, stride_ks, stride_kh,
                        stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, BLOCK_SIZE)
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    # Padded group rows load as zeros: their scores are finite (0), so they never produce NaN,
    # and their results are simply not stored.
    q_at = q_ptr + q_row * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_at + offs_d[None, :] * stride_qd, mask=mask_g[:, None], other=0.0)

    if ROTARY:
        # Neox rotary at the new token's position, rounded where fused_ops' rotary kernel rounds (cos
        # and sin to the activation dtype, the result to q's): x * cos + partner * (-sin | +sin),
        # the partner being the other half's element.
        half: tl.constexpr = HEAD_DIM // 2
        partner = (offs_d + half) % HEAD_DIM
        cs_row = cs_ptr + tl.load(pos_ptr + q_row).to(tl.int64) * stride_cs
        cos = tl.load(cs_row + offs_d % half).to(q_ptr.dtype.element_ty).to(tl.float32)
        sin = tl.load(cs_row + half + offs_d % half).to(q_ptr.dtype.element_ty).to(tl.float32)
        sin = tl.where(offs_d < half, -sin, sin)
        q_partner = tl.load(q_at + partner[None, :] * stride_qd, mask=mask_g[:, None], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(q_ptr.dtype.element_ty)
        # The program whose share holds the new token (position seq_len - 1) writes its rotated key and
        # its value to the cache before reading them back: the CTA barrier makes the stores visible to
        # the loop's loads. No other program reads that slot.
        if split == active - 1:
            slot = tl.load(slot_ptr + q_row).to(tl.int64)
            dst = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks + kvh * stride_kh
            kn_at = kn_ptr + q_row * stride_knb + kvh * stride_knh
            kn = tl.load(kn_at + offs_d).to(tl.float32) * cos + tl.load(kn_at + partner).to(tl.float32) * sin
            tl.store(k_ptr + dst + offs_d * stride_kd, kn.to(kn_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty))
            dst_v = (slot // BLOCK_SIZE) * stride_vb + (slot % BLOCK_SIZE) * stride_vs + kvh * stride_vh
            vn = tl.load(vn_ptr + q_row * stride_vnb + kvh * stride_vnh + offs_d)
            tl.store(v_ptr + dst_v + offs_d * stride_vd, vn.to(v_ptr.dtype.element_ty))
            if PREFETCH:
                if seq_len - 1 < start + BLOCK_N:  # the new token is in the tile read before its write
                    tl.debug_barrier()
                    k, v = _kv_tile(k_ptr, v_ptr, bt_row, pos, valid, kvh, offs_d, stride_btn, stride_kb,
                                    stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                                    BLOCK_SIZE)
        tl.debug_barrier()
    q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    if PIPELINE:
        # Two tiles in flight: each iteration issues the next tile's loads before this one's math.
        # Triton pipelines little of these loads itself (they go through the block table), so
        # otherwise a program waits out every tile's DRAM latency in turn.
        if not PREFETCH:  # else k, v hold the share's first tile already
            pos = start + offs_n
            valid = pos < end
            k, v = _kv_tile(k_ptr, v_ptr, bt_row, pos, valid, kvh, offs_d, stride_btn, stride_kb, stride_ks,
                            stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, BLOCK_SIZE)
        for start_n in range(start, end, BLOCK_N):
            pos_next = start_n + BLOCK_N + offs_n
            valid_next = pos_next < end  # past the share's end: masked, nothing read
            k_next, v_next = _kv_tile(k_ptr, v_ptr, bt_row, pos_next, valid_next, kvh, offs_d, stride_btn,
                                      stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh,
                                      stride_vd, BLOCK_SIZE)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)
            k, v, valid = k_next, v_next, valid_next
    else:
        loop_from = start
        if PREFETCH:
            if start < end:  # not an empty sequence
                m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)
            loop_from = start + BLOCK_N
        for start_n in range(loop_from, end, BLOCK_N):
            pos = start_n + offs_n
            valid = pos < end
            k, v = _kv_tile(k_ptr, v_ptr, bt_row, pos, valid, kvh, offs_d, stride_btn, stride_kb, stride_ks,
                            stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, BLOCK_SIZE)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out_row_ptr = out_ptr + out_row * stride_ob
    if active == 1:
        # One split holds the whole context (always, unsplit): no partials. An empty sequence has
        # l = 0 and acc = 0: zeros, not NaN.
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_row_ptr + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
    else:
        tl.store(acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as
                 + offs_d[None, :] * stride_ad, acc, mask=mask_g[:, None])
        s_ptrs = stat_ptr + b * stride_sb + heads * stride_sh + split * stride_ss
        tl.store(s_ptrs, m_i, mask=mask_g)
        tl.store(s_ptrs + stride_sk, l_i, mask=mask_g)
        # Every thread's partial stores come before the ticket (the barrier), and the ticket's release
        # publishes them to the GPU; the last ticket's acquire orders the merge's loads after all of them.
        tl.debug_barrier()
        ticket_at = ticket_ptr + b * num_kv_heads + kvh
        ticket = tl.atomic_add(ticket_at, 1, sem="acq_rel")
        if ticket == active - 1:
            for g in tl.static_range(GROUP):
                h = kvh * GROUP + g
                merge_splits(acc_ptr + b * stride_ab + h * stride_ah, stat_ptr + b * stride_sb + h * stride_sh,
                             out_row_ptr + h * stride_oh, active, stride_as, stride_ad, stride_ss, stride_sk,
                             stride_od, HEAD_DIM, SPLIT_PAD, ".cg")
            tl.atomic_xchg(ticket_at, 0)


@dataclass(frozen=True)
class DecodeTile:
    """block_n keys an iteration (and the unit a sequence is divided among splits in), warps, software
    pipeline stages; pipeline: the next K/V tile's loads are issued before this one's math (two tiles
    in registers)."""
    block_n: int
    num_warps: int
    num_stages: int
    pipeline: bool = False

    def __str__(self) -> str:
        return f"{self.block_n}/{self.num_warps}w/{self.num_stages}s" + ("/pipelined" if self.pipeline else "")


# Decode launches of few programs (device_caps.launch_regime: batch 1 to small batches, split; each
# program reads its first tile before waiting for the previous kernel) and of many (large batches: one
# program a (sequence, KV head), bandwidth-bound) each get a tile (runner/decode_tuning.py).
# Triton's default stages on CUDA, as the kernel ran before it was tuned.
DEFAULT_DECODE_TILE = DecodeTile(BLOCK_N, 4, 3)
# Stages barely matter: the K/V loads go through the block table, and Triton pipelines little of them
# (ptxas sm_90 gives 38.9 KB of shared memory at 2 stages, 39.4 KB at 3 or 4); the pipelined tiles
# keep the next tile's loads in flight themselves. A 128-wide tile that reads its first tile early
# spills at 4 warps (Triton 3.6), so few-programs candidates that wide take 8.
_GPU_DECODE_CANDIDATES = {
    FEW: (DecodeTile(32, 4, 2), DecodeTile(64, 8, 2), DecodeTile(128, 8, 2), DecodeTile(16, 4, 2),
          DecodeTile(32, 4, 2, True), DecodeTile(64, 8, 2, True)),
    MANY: (DecodeTile(64, 4, 2), DecodeTile(128, 4, 2), DecodeTile(128, 8, 2), DecodeTile(32, 4, 2),
           DecodeTile(64, 8, 2), DecodeTile(64, 4, 2, True), DecodeTile(32, 4, 2, True), DecodeTile(64, 8, 2, True),
           DecodeTile(128, 8, 2, True)),
}
# The interpreter ignores warps and stages; key tiles narrower than a cache block and spanning several.
_INTERPRETER_DECODE_CANDIDATES = (DecodeTile(16, 1, 1), DecodeTile(32, 1, 1), DecodeTile(16, 1, 1, True),
                                  DecodeTile(64, 1, 1, True))


def candidate_decode_tiles(regime: str, dtype: torch.dtype, device: torch.device) -> list[DecodeTile]:
    """The tiles worth timing for a regime: the default first (fp32 on a GPU keeps it alone)."""
    if device.type != "cuda":
        extra = _INTERPRETER_DECODE_CANDIDATES
    else:
        extra = () if dtype == torch.float32 else _GPU_DECODE_CANDIDATES[regime]
    return [DEFAULT_DECODE_TILE] + [t for t in extra if t != DEFAULT_DECODE_TILE]


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      num_sms: int = 132) -> int:
    """Splits per (sequence, kv head): about two programs per SM, never more splits than
    BLOCK_N chunks in the block table's span (so never more than its blocks), at most MAX_SPLITS.

    Uses host ints only (shapes), so the choice is fixed for a captured graph.
    """
    chunks = max(1, math.ceil(max_blocks * block_size / BLOCK_N))
    want = math.ceil(2 * num_sms / max(1, batch * num_kv_heads))
    return max(1, min(want, chunks, max_blocks, MAX_SPLITS))


@dataclass
class DecodeWorkspace:
    """A split launch's scratch: partials acc [B, Hq, S, D] fp32, (max, sumexp) [B, Hq, S, 2] fp32 and
    ticket counters [B, Hkv] int32, zero between launches. Allocate once per forward (or graph) and
    pass to every layer's call; it may hold more sequences and splits than a call uses."""
    acc: torch.Tensor
    stats: torch.Tensor
    tickets: torch.Tensor

    @property
    def num_splits(self) -> int:
        return self.acc.shape[2]


@dataclass
class NewTokens:
    """A decode step's new tokens before rotary, for a launch that rotates them and writes the cache
    itself (one kernel instead of fused_ops' rotary + KV write and the attention). Row r of each tensor
    is query row r: key/value [rows, Hkv, D] (contiguous last dim), positions and slot_mapping [rows]
    (int32/int64), cos_sin_cache [max_pos, D] fp32 = cat(cos, sin), the Neox rotation over all of D."""
    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def decode_workspace(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, num_splits: int,
                     device) -> DecodeWorkspace:
    acc = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    stats = torch.empty(batch, num_q_heads, num_splits, 2, dtype=torch.float32, device=device)
    return DecodeWorkspace(acc, stats, torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           workspace: DecodeWorkspace | None = None,
                           q_rows: torch.Tensor | None = None,
                           out_rows: torch.Tensor | None = None,
                           new_tokens: NewTokens | None = None, prefetch: bool | None = None,
                           pdl: bool = True, tiles: dict[str, DecodeTile] | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V over each sequence's paged context; q [B, Hq, D] -> out [B, Hq, D].

    block_tables [B, max_blocks] and seq_lens [B] give the B sequences. With row maps (both or
    neither; int32/int64 [B]), sequence b's query is q[q_rows[b]] and its output out[out_rows[b]]:
    q and out may then have any number of rows, and rows not named are left alone (out is required).
    num_splits None: taken from `workspace` when given, else `choose_num_splits`. A workspace may
    have more splits and a larger batch than the call uses. new_tokens: q is not rotated yet, and the
    new tokens' K/V are not in the cache yet; the kernel rotates q, and writes the rotated key and the
    value at each sequence's slot (q itself is left as it was). prefetch: read each program's first
    K/V tile before waiting for the previous kernel (default: when the grid fits the SMs about twice,
    where a launch is latency-bound; the early tile costs registers, ~140-170 a thread against ~100).
    pdl: launch with programmatic dependent launch where the device supports it (see Invariants).
    tiles: regime (FEW / MANY, by the grid's programs) -> the DecodeTile to launch with (the startup
    tuner's picks); a regime without one takes DEFAULT_DECODE_TILE.
    """
    assert q.dim() == 3 and k_cache.dim() == 4, "q [B, Hq, D], caches [num_blocks, block_size, Hkv, D]"
    _, num_q_heads, head_dim = q.shape
    batch = block_tables.shape[0]
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
    assert cache_dim == head_dim, f"q head dim {head_dim} != cache head dim {cache_dim}"
    assert head_dim in (16, 32, 64, 128), f"head_dim must be 16, 32, 64 or 128, got {head_dim}"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads} query heads over {num_kv_heads} kv heads"
    assert q.dtype in _SUPPORTED_DTYPES and k_cache.dtype in _SUPPORTED_DTYPES
    assert block_tables.dim() == 2 and block_tables.dtype in (torch.int32, torch.int64)
    assert seq_lens.shape == (batch,) and seq_lens.dtype in (torch.int32, torch.int64)
    has_rows = q_rows is not None
    assert (out_rows is not None) == has_rows, "q_rows and out_rows go together"
    if has_rows:
        assert out is not None, "row maps write into a given out"
        assert q_rows.shape == (batch,) and out_rows.shape == (batch,), "one row per sequence"
    else:
        assert q.shape[0] == batch, f"q has {q.shape[0]} rows for {batch} sequences"
    group = num_q_heads // num_kv_heads

    if num_splits is None:
        num_splits = (workspace.num_splits if workspace is not None
                      else choose_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size,
                                             sm_count(q.device)))
    assert num_splits >= 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape[1:] == q.shape[1:] and out.dtype == q.dtype
    if batch == 0:
        return out
    if workspace is None:
        workspace = decode_workspace(batch, num_q_heads, num_kv_heads, head_dim, num_splits, q.device)
    assert workspace.acc.dtype == torch.float32 and workspace.stats.dtype == torch.float32
    assert (workspace.acc.shape[0] >= batch and workspace.acc.shape[1] == num_q_heads
            and workspace.num_splits >= num_splits and workspace.acc.shape[3] == head_dim), "workspace too small"
    assert workspace.stats.shape[:3] == workspace.acc.shape[:3] and workspace.stats.shape[3] == 2
    tickets = workspace.tickets
    assert (tickets.dtype == torch.int32 and tickets.shape[0] >= batch and tickets.shape[1] == num_kv_heads
            and tickets.is_contiguous()), "bad ticket counters"

    nt = new_tokens
    if nt is not None:
        assert nt.key.shape[1:] == (num_kv_heads, head_dim) and nt.value.shape == nt.key.shape, "bad new key/value"
        assert nt.key.stride(2) == 1 and nt.value.stride(2) == 1, "new key/value need a contiguous last dim"
        assert nt.key.shape[0] == q.shape[0] and nt.positions.shape == nt.slot_mapping.shape == (q.shape[0],)
        assert nt.cos_sin_cache.shape[1] == head_dim and nt.cos_sin_cache.stride(1) == 1, "bad cos_sin_cache"

    pdl = pdl and pdl_supported(q.device)
    regime = launch_regime(batch * num_kv_heads * num_splits, q.device)
    tile = (tiles or {}).get(regime) or DEFAULT_DECODE_TILE
    if prefetch is None:
        prefetch = regime == FEW
    # fp32 inputs: plain fp32 products (tl.dot would otherwise round them to TF32 on tensor cores).
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    unused = seq_lens  # a placeholder for the pointers a variant does not read
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, workspace.acc, workspace.stats, tickets, out,
        q_rows if has_rows else unused, out_rows if has_rows else unused,
        *((nt.key, nt.value, nt.positions, nt.cos_sin_cache, nt.slot_mapping) if nt is not None else (unused,) * 5),
        scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        *workspace.acc.stride(), *workspace.stats.stride(), *out.stride(),
        *((nt.key.stride(0), nt.key.stride(1), nt.value.stride(0), nt.value.stride(1), nt.cos_sin_cache.stride(0))
          if nt is not None else (0,) * 5),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=tile.block_n, DOT_PRECISION=precision,
        # One compiled variant for every split count the heuristic picks.
        SPLIT_PAD=max(MAX_SPLITS, triton.next_power_of_2(num_splits)), HAS_ROWS=has_rows, ROTARY=nt is not None,
        GDC=pdl, PREFETCH=prefetch, PIPELINE=tile.pipeline, num_warps=tile.num_warps, num_stages=tile.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out

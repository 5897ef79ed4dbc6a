"""Reference paged attention in plain PyTorch: the CPU path and the GPU fallback.

Correct for any mix of decodes, prefill chunks and prefix-cache hits in one batch: each
sequence's keys are gathered from its block table, so cached and freshly written tokens look alike.

Two cache layouts (KVCache.heads_outer). On CPU the pool is heads-outer: decode attention runs one
SDPA per KV head, with that head's query heads as the query rows and its gathered blocks a contiguous
key run, which reads the cache about once (at batch 16 and 3k-token contexts ~2x faster than
gathering [B, L, Hkv, D] and letting SDPA transpose and repeat it for GQA).

Cascade decode (heads-outer layout): decodes whose block tables start with the same blocks (a system
prompt every session shares, the branches of one conversation) attend to that shared run once, with all
their query rows stacked into one call, and to their own remaining blocks separately; the two partial
results merge exactly through their log-sum-exps. A step's KV reads drop from sum(context) to
shared + sum(context - shared), which at 16 agent sessions over a 2k-token shared prompt halves them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopserve.attention.metadata import AttentionMetadata, KVCache
from loopserve.model.fused_ops import rotary_qk_

# Sequences with at most this many new tokens over a cached context (speculative verify passes) are
# batched in one padded SDPA call, like decodes, instead of one call each.
SHORT_QUERY = 16
# Decodes sharing at least this many leading cached tokens attend to them once, together (cascade); a
# shorter shared run saves less than the extra call and merge cost.
CASCADE_MIN_SHARED_TOKENS = 256


def _attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, 1, R, D] over k/v [B, 1, L, D] with an additive float mask [B, 1, 1|R, L];
    returns the output [B, 1, R, D] and each row's log-sum-exp of scores [B, 1, R], which lets partial
    results over disjoint key sets merge exactly. The CPU flash kernel behind F.scaled_dot_product_attention
    computes the log-sum-exp anyway, but only its aten op returns it (torch is pinned on CPU)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                       scale=scale)


def _workspace(meta: AttentionMetadata, pool: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [blocks, bs, D] buffers for one head's gathered keys and values, shared by every layer and head
    of a step (each gather is consumed before the next): a fresh multi-megabyte tensor per gather costs
    page faults that take about as long as the copy itself."""
    key = ("gather_workspace", pool.dtype)
    bufs = meta.derived.get(key)
    if bufs is None or bufs[0].shape[0] < blocks:
        shape = (blocks,) + tuple(pool.shape[2:])
        bufs = meta.derived[key] = tuple(torch.empty(shape, dtype=pool.dtype, device=pool.device) for _ in range(2))
    return bufs[0][:blocks], bufs[1][:blocks]


def _gather_head(pool: torch.Tensor, head: int, flat_tables: torch.Tensor, batch: int, length: int,
                 out: torch.Tensor) -> torch.Tensor:
    """One KV head's blocks for `batch` equally wide flattened block tables, as [batch, 1, length, D]
    (heads-outer pool), copied into `out`. index_select copies whole blocks at memcpy speed; indexing
    with the 2-D table tensor is several times slower on CPU."""
    torch.index_select(pool[head], 0, flat_tables, out=out)
    return out.view(batch, 1, -1, pool.shape[-1])[:, :, :length]


@dataclass
class _DecodeBatch:
    """The decodes of one step as the heads-outer path reads them, built on the first layer."""
    tables: torch.Tensor            # [B, nblk] block tables (cascade: what follows each shared run)
    rows: torch.Tensor              # [B] each decode's query row in the flat batch
    mask: torch.Tensor              # [B, 1, 1, L]: bool keep-mask, or (cascade) additive float mask
    max_len: int                    # L: the longest (remaining) context
    # Cascade groups: (indices into the B decodes, the block ids their tables all start with).
    shared: list[tuple[torch.Tensor, torch.Tensor]]


def _shared_runs(tables: torch.Tensor, lens: list[int], bs: int) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Groups of decodes whose tables start with the same block, with the number of leading blocks all of a
    group's tables have in common (only full blocks before each one's last: every decode keeps a non-empty
    remainder); groups sharing fewer than CASCADE_MIN_SHARED_TOKENS are left out. Also returns each
    decode's shared block count (0 outside groups)."""
    by_first: dict[int, list[int]] = {}
    for b, first in enumerate(tables[:, 0].tolist()):
        by_first.setdefault(first, []).append(b)
    groups, start = [], [0] * len(lens)
    for members in by_first.values():
        if len(members) < 2:
            continue
        cap = min((lens[b] - 1) // bs for b in members)
        t = tables[members, :cap]
        n = int((t == t[0]).all(0).int().cumprod(0).sum()) if cap else 0
        if n * bs < CASCADE_MIN_SHARED_TOKENS:
            continue
        groups.append((members, n))
        for b in members:
            start[b] = n
    return groups, start


class TorchPagedAttention:
    name = "torch"
    needs_device_layout = False

    @staticmethod
    def heads_outer(device: torch.device) -> bool:
        """The cache layout this backend wants on `device` (see the module docstring)."""
        return device.type == "cpu"

    @staticmethod
    def write_kv(cache: KVCache, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if cache.heads_outer:
            h, nb, bs, d = cache.key.shape
            cache.key.view(h, nb * bs, d).index_copy_(1, slot_mapping, key.transpose(0, 1).to(cache.key.dtype))
            cache.value.view(h, nb * bs, d).index_copy_(1, slot_mapping, value.transpose(0, 1).to(cache.value.dtype))
            return
        nb, bs, h, d = cache.key.shape
        cache.key.view(nb * bs, h, d).index_copy_(0, slot_mapping, key.to(cache.key.dtype))
        cache.value.view(nb * bs, h, d).index_copy_(0, slot_mapping, value.to(cache.value.dtype))

    @staticmethod
    def _gather(cache: KVCache, pool: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
        """One sequence's keys or values as [Hkv, length, D]."""
        if cache.heads_outer:
            return pool.index_select(1, block_ids).flatten(1, 2)[:, :length]
        return pool.index_select(0, block_ids).flatten(0, 1)[:length].transpose(0, 1)

    @classmethod
    def _batched(cls, cache: KVCache, q: torch.Tensor, tables: torch.Tensor, max_len: int, mask: torch.Tensor,
                 scale: float, gqa: bool, meta: AttentionMetadata) -> torch.Tensor:
        """Padded attention of B sequences' query rows q [B, Hq, R, D] over their blocks; [B, Hq, R, D]."""
        if cache.heads_outer:
            return cls._per_head(cache, q, tables, max_len, mask, scale, meta)
        k = cache.key[tables].flatten(1, 2)[:, :max_len]                    # [B, L, Hkv, D]
        v = cache.value[tables].flatten(1, 2)[:, :max_len]
        return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              scale=scale, enable_gqa=gqa)

    @staticmethod
    def _per_head(cache: KVCache, q: torch.Tensor, tables: torch.Tensor, max_len: int, mask: torch.Tensor,
                  scale: float, meta: AttentionMetadata) -> torch.Tensor:
        """Heads-outer attention for B sequences: q [B, Hq, R, D] (R query rows each), mask [B, 1, R, L];
        returns [B, Hq, R, D]. Per KV head, its query heads x rows are one SDPA's query rows."""
        b, hq, r, d = q.shape
        hkv = cache.num_kv_heads
        g = hq // hkv
        out = torch.empty_like(q)
        m = mask.repeat(1, 1, g, 1) if g > 1 and r > 1 else mask  # rows are head-major
        flat = tables.flatten()
        kbuf, vbuf = _workspace(meta, cache.key, flat.numel())
        for h in range(hkv):
            k = _gather_head(cache.key, h, flat, b, max_len, kbuf)
            v = _gather_head(cache.value, h, flat, b, max_len, vbuf)
            qh = q[:, h * g:(h + 1) * g].reshape(b, 1, g * r, d)
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=m, scale=scale)
            out[:, h * g:(h + 1) * g] = o.view(b, g, r, d)
        return out

    @staticmethod
    def _cascade(cache: KVCache, q: torch.Tensor, dec: _DecodeBatch, scale: float,
                 meta: AttentionMetadata) -> torch.Tensor:
        """Heads-outer decode attention with shared runs (see the module docstring): q [B, Hq, 1, D]."""
        b, hq, _, d = q.shape
        hkv = cache.num_kv_heads
        g = hq // hkv
        out = torch.empty_like(q)
        mask = dec.mask.to(q.dtype)
        flat = dec.tables.flatten()
        kbuf, vbuf = _workspace(meta, cache.key, max(flat.numel(), max(len(ids) for _, ids in dec.shared)))
        for h in range(hkv):
            qh = q[:, h * g:(h + 1) * g].reshape(b, 1, g, d)
            k = _gather_head(cache.key, h, flat, b, dec.max_len, kbuf[:flat.numel()])
            v = _gather_head(cache.value, h, flat, b, dec.max_len, vbuf[:flat.numel()])
            o, lse = _attend_with_lse(qh, k, v, mask, scale)                 # [B, 1, g, D], [B, 1, g]
            for members, block_ids in dec.shared:
                run = len(block_ids)
                kp = _gather_head(cache.key, h, block_ids, 1, run * cache.block_size, kbuf[:run])
                vp = _gather_head(cache.value, h, block_ids, 1, run * cache.block_size, vbuf[:run])
                op, lp = _attend_with_lse(qh[members].view(1, 1, -1, d), kp, vp, None, scale)
                os_, ls = o[members], lse[members]
                lp = lp.view(ls.shape)
                top = torch.maximum(ls, lp)
                ws, wp = torch.exp(ls - top).unsqueeze(-1), torch.exp(lp - top).unsqueeze(-1)
                o[members] = (os_ * ws + op.view(os_.shape) * wp) / (ws + wp)
            out[:, h * g:(h + 1) * g] = o.view(b, g, 1, d)
        return out

    @staticmethod
    def _decode_inputs(meta: AttentionMetadata, cache: KVCache, device: torch.device) -> _DecodeBatch:
        """Block tables, query rows, padding mask and shared runs of the batch's decodes, built once a step."""
        got = meta.derived.get("decode")
        if got is None:
            got = meta.derived["decode"] = TorchPagedAttention._build_decode_batch(meta, cache, device)
        return got

    @staticmethod
    def _build_decode_batch(meta: AttentionMetadata, cache: KVCache, device: torch.device) -> _DecodeBatch:
        bs = cache.block_size
        idx = meta.decode_indices
        lens = [meta.seq_lens[i] for i in idx]
        tables = meta.block_tables[idx, :(max(lens) + bs - 1) // bs]
        rows = torch.tensor([meta.query_start_loc[i] for i in idx], device=device)
        groups, start = _shared_runs(tables, lens, bs) if cache.heads_outer and len(idx) > 1 else ([], [])
        shared = [(torch.tensor(members, device=device), tables[members[0], :n]) for members, n in groups]
        if shared:
            # Each decode reads only what follows its group's shared run.
            lens = [n - s * bs for n, s in zip(lens, start)]
            width = (max(lens) + bs - 1) // bs
            cols = torch.tensor(start, device=device)[:, None] + torch.arange(width, device=device)[None, :]
            tables = tables.gather(1, cols.clamp_(max=tables.shape[1] - 1))
        max_len = max(lens)
        lens_t = torch.tensor(lens, device=device)
        keep = (torch.arange(max_len, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
        if shared:
            mask = torch.zeros(keep.shape, device=device).masked_fill_(~keep, float("-inf"))
        else:
            mask = keep
        return _DecodeBatch(tables, rows, mask, max_len, shared)

    @staticmethod
    def _short_inputs(meta: AttentionMetadata, bs: int, device: torch.device):
        """Sequences with a few new tokens over a cached context (speculative verify passes), batched
        like decodes: padded query rows, block tables and a causal-with-offset mask, built once per step."""
        got = meta.derived.get("short")
        if got is None:
            qsl, lens = meta.query_start_loc, meta.seq_lens
            idx = [i for i in meta.prefill_indices
                   if 1 < qsl[i + 1] - qsl[i] <= SHORT_QUERY and qsl[i + 1] - qsl[i] < lens[i]]
            if len(idx) < 2:
                got = meta.derived["short"] = ()
                return got
            n_new = [qsl[i + 1] - qsl[i] for i in idx]
            qmax, max_len = max(n_new), max(lens[i] for i in idx)
            tables = meta.block_tables[idx, :(max_len + bs - 1) // bs]
            # Row r of sequence b reads query row qsl + min(r, n - 1): padding repeats the last row.
            rows = [[qsl[i] + min(r, n - 1) for r in range(qmax)] for i, n in zip(idx, n_new)]
            q_pos = [[lens[i] - n + min(r, n - 1) for r in range(qmax)] for i, n in zip(idx, n_new)]
            rows_t = torch.tensor(rows, device=device)
            mask = (torch.arange(max_len, device=device)[None, None, :]
                    <= torch.tensor(q_pos, device=device)[:, :, None])[:, None]      # [B, 1, qmax, L]
            valid = torch.tensor([[r < n for r in range(qmax)] for n in n_new], device=device)
            got = meta.derived["short"] = (set(idx), tables, rows_t, mask, max_len, valid, rows_t[valid])
        return got

    @staticmethod
    def _prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
        """q [Hq, n, D], k/v [Hkv, L, D]; causal when mask is None."""
        group = q.shape[0] // k.shape[0]
        if group > 1 and q.device.type == "cpu":
            # PyTorch's CPU flash kernel has no GQA path (enable_gqa falls back to the ~4x slower
            # math kernel), so repeating K/V heads is cheaper than the fallback.
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=k.shape[0] != q.shape[0])
        return o[0]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] for the new tokens; returns [T, Hq, D]."""
        self.write_kv(cache, key, value, meta.slot_mapping)
        return self.attend(query, key, value, cache, meta, scale)

    def store_rotated(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> None:
        """Rotary on query and key in place, then the new key and value into the cache."""
        rotary_qk_(query, key, positions, cos_sin_cache)
        self.write_kv(cache, key, value, meta.slot_mapping)

    def rotary_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
        """Rotary on the new tokens, their K/V into the cache, their attention; [T, Hq, D]."""
        self.store_rotated(query, key, value, positions, cos_sin_cache, cache, meta)
        return self.attend(query, key, value, cache, meta, scale)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: KVCache,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of the new tokens (already in the cache) over their contexts; [T, Hq, D]."""
        out = torch.empty_like(query)
        bs = cache.block_size
        num_q_heads, num_kv_heads = query.shape[1], cache.num_kv_heads
        gqa = num_q_heads != num_kv_heads
        qsl, lens = meta.query_start_loc, meta.seq_lens

        if meta.decode_indices:
            dec = self._decode_inputs(meta, cache, query.device)
            q = query.index_select(0, dec.rows).unsqueeze(2)                 # [B, Hq, 1, D]
            if dec.shared:
                o = self._cascade(cache, q, dec, scale, meta)
            else:
                o = self._batched(cache, q, dec.tables, dec.max_len, dec.mask, scale, gqa, meta)
            out.index_copy_(0, dec.rows, o.squeeze(2).to(out.dtype))

        short = self._short_inputs(meta, bs, query.device) if meta.prefill_indices else ()
        if short:
            _, tables, rows, mask, max_len, valid, out_rows = short
            q = query[rows].transpose(1, 2)                                  # [B, Hq, qmax, D]
            o = self._batched(cache, q, tables, max_len, mask, scale, gqa, meta)
            out.index_copy_(0, out_rows, o.transpose(1, 2)[valid].to(out.dtype))

        for i in meta.prefill_indices:
            if short and i in short[0]:
                continue
            start, end = qsl[i], qsl[i + 1]
            n_new, total = end - start, lens[i]
            q = query[start:end].transpose(0, 1)                             # [Hq, n, D]
            if n_new == total:
                # Nothing cached before this chunk: the new keys are the whole context, no gather needed.
                k, v = key[start:end].transpose(0, 1), value[start:end].transpose(0, 1)
                o = self._prefill_sdpa(q, k, v, None, scale)
            else:
                nblk = (total + bs - 1) // bs
                block_ids = meta.block_tables[i, :nblk]
                k = self._gather(cache, cache.key, block_ids, total)         # [Hkv, L, D]
                v = self._gather(cache, cache.value, block_ids, total)
                mask = meta.derived.get(("prefill_mask", i))
                if mask is None:
                    # Causal with an offset: new token j sits at position total - n_new + j.
                    q_pos = torch.arange(total - n_new, total, device=query.device)
                    mask = torch.arange(total, device=query.device)[None, :] <= q_pos[:, None]
                    meta.derived[("prefill_mask", i)] = mask
                o = self._prefill_sdpa(q, k, v, mask, scale)
            out[start:end] = o.transpose(0, 1).to(out.dtype)
        return out

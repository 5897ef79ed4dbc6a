"""Reference paged attention in plain PyTorch: the CPU path and the GPU fallback.

Correct for any mix of decodes, prefill chunks and prefix-cache hits in one batch: each
sequence's keys are gathered from its block table, so cached and freshly written tokens look alike.

Two cache layouts (KVCache.heads_outer). On CPU the pool is heads-outer: decode attention runs one
SDPA per KV head, with that head's query heads as the query rows and its gathered blocks a contiguous
key run, which reads the cache about once (at batch 16 and 3k-token contexts ~2x faster than
gathering [B, L, Hkv, D] and letting SDPA transpose and repeat it for GQA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loopserve.attention.metadata import AttentionMetadata, KVCache


# Sequences with at most this many new tokens over a cached context (speculative verify passes) are
# batched in one padded SDPA call, like decodes, instead of one call each.
SHORT_QUERY = 16


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
                 scale: float, gqa: bool) -> torch.Tensor:
        """Padded attention of B sequences' query rows q [B, Hq, R, D] over their blocks; [B, Hq, R, D]."""
        if cache.heads_outer:
            return cls._per_head(cache, q, tables, max_len, mask, scale)
        k = cache.key[tables].flatten(1, 2)[:, :max_len]                    # [B, L, Hkv, D]
        v = cache.value[tables].flatten(1, 2)[:, :max_len]
        return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              scale=scale, enable_gqa=gqa)

    @staticmethod
    def _per_head(cache: KVCache, q: torch.Tensor, tables: torch.Tensor, max_len: int, mask: torch.Tensor,
                  scale: float) -> torch.Tensor:
        """Heads-outer attention for B sequences: q [B, Hq, R, D] (R query rows each), mask [B, 1, R, L];
        returns [B, Hq, R, D]. Per KV head, its query heads x rows are one SDPA's query rows."""
        b, hq, r, d = q.shape
        hkv = cache.num_kv_heads
        g = hq // hkv
        nblk = tables.shape[1]
        out = torch.empty_like(q)
        m = mask.repeat(1, 1, g, 1) if g > 1 and r > 1 else mask  # rows are head-major
        for h in range(hkv):
            k = cache.key[h][tables].view(b, 1, nblk * cache.block_size, d)[:, :, :max_len]
            v = cache.value[h][tables].view(b, 1, nblk * cache.block_size, d)[:, :, :max_len]
            qh = q[:, h * g:(h + 1) * g].reshape(b, 1, g * r, d)
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=m, scale=scale)
            out[:, h * g:(h + 1) * g] = o.view(b, g, r, d)
        return out

    @staticmethod
    def _decode_inputs(meta: AttentionMetadata, bs: int, device: torch.device):
        """Block tables, query rows and padding mask of the batch's decodes, built once per step."""
        got = meta.derived.get("decode")
        if got is None:
            idx = meta.decode_indices
            lens = [meta.seq_lens[i] for i in idx]
            max_len = max(lens)
            tables = meta.block_tables[idx, :(max_len + bs - 1) // bs]
            rows = torch.tensor([meta.query_start_loc[i] for i in idx], device=device)
            lens_t = torch.tensor(lens, device=device)
            mask = (torch.arange(max_len, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
            got = meta.derived["decode"] = (tables, rows, mask, max_len)
        return got

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
        out = torch.empty_like(query)
        bs = cache.block_size
        num_q_heads, num_kv_heads = query.shape[1], cache.num_kv_heads
        gqa = num_q_heads != num_kv_heads
        qsl, lens = meta.query_start_loc, meta.seq_lens

        if meta.decode_indices:
            tables, rows, mask, max_len = self._decode_inputs(meta, bs, query.device)
            q = query.index_select(0, rows).unsqueeze(2)                     # [B, Hq, 1, D]
            o = self._batched(cache, q, tables, max_len, mask, scale, gqa)
            out.index_copy_(0, rows, o.squeeze(2).to(out.dtype))

        short = self._short_inputs(meta, bs, query.device) if meta.prefill_indices else ()
        if short:
            _, tables, rows, mask, max_len, valid, out_rows = short
            q = query[rows].transpose(1, 2)                                  # [B, Hq, qmax, D]
            o = self._batched(cache, q, tables, max_len, mask, scale, gqa)
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

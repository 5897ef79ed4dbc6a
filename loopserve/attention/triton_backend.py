"""Paged attention with Triton kernels: the GPU path (the torch reference stays the CPU path and fallback).

A batch of pure decodes goes to the split-K decode kernel (long contexts use the whole GPU at batch
1), prefill chunks, prefix-cache extends and speculative verify passes to the extend kernel, which
handles variable query lengths over a cached prefix causally; in a mixed step the single-token rows
go to the decode kernel and the rest to the extend kernel (two launches). Both read keys from the
paged pool through the block table, so nothing is gathered, and neither synchronises with the host:
a decode step can be captured in a CUDA graph (runner/cuda_graphs.py).
"""
from __future__ import annotations

import torch

from loopserve.attention.metadata import AttentionMetadata, KVCache
from loopserve.attention.torch_ref import TorchPagedAttention
from loopserve.model.fused_ops import rotary_qk_store_kv_
from loopserve.runner.host_copy import to_device


class TritonPagedAttention:
    name = "triton"
    needs_device_layout = True  # the runner fills AttentionMetadata's *_t fields

    def __init__(self, pdl: bool = True) -> None:
        # Decode launches use programmatic dependent launch where the device has it (triton_decode).
        self.pdl = pdl
        # The extend kernel's tile by regime (triton_extend.FEW / MANY); the runner's startup tuner sets
        # them on a GPU (runner/extend_tuning.py), and a regime without one takes the default.
        self.extend_tiles: dict = {}
        # Likewise the decode kernel's (triton_decode.FEW / MANY; runner/decode_tuning.py).
        self.decode_tiles: dict = {}

    @staticmethod
    def store_rotated(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> None:
        """Rotary on query and key and the cache write of key and value: one kernel on CUDA."""
        rotary_qk_store_kv_(query, key, value, positions, cos_sin_cache, cache.key, cache.value, meta.slot_mapping)

    def rotary_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
        """Rotary on the new tokens, their K/V into the cache, their attention; [T, Hq, D]. A pure decode
        step does all three in the decode kernel's one launch a layer; other steps run the rotary + KV
        write kernel first."""
        from loopserve.attention.triton_decode import NewTokens
        from loopserve.model.fused_ops import rotary_store_problem

        if not meta.static_layout and not meta.prefill_indices and self._derived(
                meta, "triton_fused_decode", lambda: rotary_store_problem(
                    query, key, value, positions, cos_sin_cache, cache.key, cache.value, meta.slot_mapping) is None):
            return self._pure_decode(query, cache, meta, scale,
                                     NewTokens(key, value, positions, cos_sin_cache, meta.slot_mapping))
        self.store_rotated(query, key, value, positions, cos_sin_cache, cache, meta)
        return self.attend(query, key, value, cache, meta, scale)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: KVCache,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of the new tokens (already in the cache) over their contexts; [T, Hq, D]."""
        from loopserve.attention.triton_decode import paged_decode_attention
        from loopserve.attention.triton_extend import live_programs_of, paged_extend_attention

        if not meta.static_layout and not meta.prefill_indices:
            return self._pure_decode(query, cache, meta, scale)
        if meta.static_layout:
            # A captured graph (runner/cuda_graphs.py: PrefillGraphs): its grid covers max_query_len in
            # each of its prompt slots, but the steps it serves mostly have one prompt, whose tiles pick
            # the kernel's tile shape.
            live = live_programs_of(1, query.shape[1], meta.max_query_len)
            seq_ids = meta.derived["triton_prefill_ids"]
        elif meta.decode_indices:
            # Eager mixed step: the extend grid covers the multi-token sequences only, not every row's.
            live = live_programs_of(len(meta.prefill_indices), query.shape[1], meta.max_query_len)
            seq_ids = self._derived(meta, "triton_prefill_ids",
                                    lambda: to_device(meta.prefill_indices, torch.int32, query.device))
        else:
            live = seq_ids = None
        if not meta.decode_indices:  # no 1-token rows (or the graph variant without them): extend alone
            return paged_extend_attention(query, cache.key, cache.value, meta.block_tables, meta.query_start_loc_t,
                                          meta.seq_lens_t, meta.max_query_len, scale, skip_single=meta.static_layout,
                                          live_programs=live, seq_ids=seq_ids, tiles=self.extend_tiles)
        # Mixed step. In the extend kernel a decode row would fill one of BLOCK_M query rows and read its
        # context once per query head; the decode kernel reads it once per KV head for the whole GQA
        # group. So decode rows (and 1-token chunks, the same thing causally) go there, attended in place
        # through row maps. Extend first: split, its merge writes every row, the 1-token ones with garbage.
        t = query.shape[0]
        # A graph's decode launch covers every sequence slot; the slots without a 1-token row write to a
        # spare row past the step's rows (runner/cuda_graphs.py).
        out = query.new_empty((t + 1 if meta.static_layout else t,) + query.shape[1:])
        # Built before the extend launch: the decode kernel reads its tables and lengths before waiting
        # for the kernel launched just before it (programmatic dependent launch), so they must not
        # come from that kernel.
        q_rows, out_rows, tables, lens = self._single_token_rows(meta, query.device)
        paged_extend_attention(query, cache.key, cache.value, meta.block_tables, meta.query_start_loc_t,
                               meta.seq_lens_t, meta.max_query_len, scale, out=out[:t], skip_single=True,
                               live_programs=live, seq_ids=seq_ids, tiles=self.extend_tiles)
        paged_decode_attention(query, cache.key, cache.value, tables, lens, scale, out=out,
                               workspace=self._decode_workspace(meta, query, cache, tables),
                               q_rows=q_rows, out_rows=out_rows, pdl=self.pdl, tiles=self.decode_tiles)
        return out[:t]

    def _pure_decode(self, query: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float,
                     new_tokens=None) -> torch.Tensor:
        """A pure decode step (row i is sequence i's only new token) in the decode kernel's one launch.
        Without new_tokens, the new K/V were stored by the kernel launched just before (store_rotated),
        so no program may read its first K/V tile before waiting for it (programmatic dependent launch):
        the new token's tile would be read stale."""
        from loopserve.attention.triton_decode import paged_decode_attention

        return paged_decode_attention(query, cache.key, cache.value, meta.block_tables, meta.seq_lens_t, scale,
                                      workspace=self._decode_workspace(meta, query, cache, meta.block_tables),
                                      new_tokens=new_tokens, prefetch=None if new_tokens is not None else False,
                                      pdl=self.pdl, tiles=self.decode_tiles)

    @staticmethod
    def _derived(meta: AttentionMetadata, name: str, make):
        """What every layer of a step shares, built on the first layer (or before a graph's capture)."""
        got = meta.derived.get(name)
        if got is None:
            got = meta.derived[name] = make()
        return got

    def _decode_workspace(self, meta: AttentionMetadata, query: torch.Tensor, cache: KVCache,
                          tables: torch.Tensor):
        """One split-decode workspace per forward: its ticket counters are zeroed once (a memset
        inside a captured graph) and every layer's launch leaves them zero for the next."""
        from loopserve.attention.triton_decode import choose_num_splits, decode_workspace
        from loopserve.device_caps import sm_count

        def make():
            batch, num_kv_heads = tables.shape[0], cache.num_kv_heads
            splits = choose_num_splits(batch, num_kv_heads, tables.shape[1], cache.block_size, sm_count(query.device))
            return decode_workspace(batch, query.shape[1], num_kv_heads, query.shape[2], splits, query.device)

        return self._derived(meta, "triton_decode_ws", make)

    @staticmethod
    def _single_token_rows(meta: AttentionMetadata, device: torch.device):
        """Query rows, output rows, block tables and lengths of a mixed step's 1-token sequences (once a
        step). A captured graph puts its static buffers in `meta.derived` before capture."""
        def make():
            idx = to_device(meta.decode_indices, torch.long, device)
            rows = to_device([meta.query_start_loc[i] for i in meta.decode_indices], torch.long, device)
            return rows, rows, meta.block_tables.index_select(0, idx), meta.seq_lens_t.index_select(0, idx)

        return TritonPagedAttention._derived(meta, "triton_single_rows", make)


def make_backend(name: str, device: torch.device):
    """`auto`: Triton on CUDA, the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        return TritonPagedAttention()
    if name == "torch":
        return TorchPagedAttention()
    raise ValueError(f"attention_backend must be auto, torch or triton, got {name!r}")

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

    @staticmethod
    def store_rotated(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> None:
        """Rotary on query and key and the cache write of key and value: one kernel on CUDA."""
        rotary_qk_store_kv_(query, key, value, positions, cos_sin_cache, cache.key, cache.value, meta.slot_mapping)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: KVCache,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of the new tokens (already in the cache) over their contexts; [T, Hq, D]."""
        from loopserve.attention.triton_decode import paged_decode_attention
        from loopserve.attention.triton_extend import live_programs_of, paged_extend_attention

        live = None
        if meta.static_layout:
            # A captured prefill graph: its grid covers max_query_len in every sequence slot, but the steps
            # it serves are mostly one sequence, whose tiles pick the kernel's tile shape.
            live = live_programs_of(1, query.shape[1], meta.max_query_len)
        elif not meta.prefill_indices:
            # Pure decode: row i is sequence i's only new token.
            return paged_decode_attention(query, cache.key, cache.value, meta.block_tables, meta.seq_lens_t, scale)
        if not meta.decode_indices:
            return paged_extend_attention(query, cache.key, cache.value, meta.block_tables, meta.query_start_loc_t,
                                          meta.seq_lens_t, meta.max_query_len, scale, live_programs=live)
        # Mixed step. In the extend kernel a decode row would fill one of BLOCK_M query rows and read its
        # context once per query head; the decode kernel reads it once per KV head for the whole GQA
        # group. So decode rows (and 1-token chunks, the same thing causally) go there.
        t = query.shape[0]
        # A graph's decode launch covers every sequence slot; the slots without a 1-token row write to a
        # spare row past the step's rows (runner/cuda_graphs.py).
        out = query.new_empty((t + 1 if meta.static_layout else t,) + query.shape[1:])
        paged_extend_attention(query, cache.key, cache.value, meta.block_tables, meta.query_start_loc_t,
                               meta.seq_lens_t, meta.max_query_len, scale, out=out[:t], skip_single=True,
                               live_programs=live)
        q_rows, out_rows, tables, lens = self._single_token_rows(meta, query.device)
        out.index_copy_(0, out_rows, paged_decode_attention(query.index_select(0, q_rows), cache.key, cache.value,
                                                            tables, lens, scale))
        return out[:t]

    @staticmethod
    def _single_token_rows(meta: AttentionMetadata, device: torch.device):
        """Query rows, output rows, block tables and lengths of a mixed step's 1-token sequences (once a
        step). A captured graph puts its static buffers in `meta.derived` before capture."""
        got = meta.derived.get("triton_single_rows")
        if got is None:
            idx = to_device(meta.decode_indices, torch.long, device)
            rows = to_device([meta.query_start_loc[i] for i in meta.decode_indices], torch.long, device)
            got = meta.derived["triton_single_rows"] = (rows, rows, meta.block_tables.index_select(0, idx),
                                                        meta.seq_lens_t.index_select(0, idx))
        return got


def make_backend(name: str, device: torch.device):
    """`auto`: Triton on CUDA, the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        return TritonPagedAttention()
    if name == "torch":
        return TorchPagedAttention()
    raise ValueError(f"attention_backend must be auto, torch or triton, got {name!r}")

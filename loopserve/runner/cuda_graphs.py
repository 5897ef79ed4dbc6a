"""CUDA graphs for pure-decode steps: one graph per batch size of a ladder, replayed with padding.

A decode step launches a few hundred small kernels; at batch 1 on a GPU their launch cost, not the
weight reads, would set the step time. Each graph holds the whole forward plus the logits for a
fixed batch size, reading its inputs from static buffers. A step with n sequences copies its inputs
into the buffers of the smallest captured size b >= n and replays; rows n..b-1 are padding that
attends to one token of a scratch KV block (one block past the pool, never handed out), so they
cannot touch real cache entries. Only the attention backend's device-side layout is used inside the
graph (Triton kernels, no host synchronisation); sampling runs after the replay, outside it.
"""
from __future__ import annotations

import torch

from loopserve.attention.metadata import AttentionMetadata, ForwardBatch, KVCache


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], backend, batch_sizes: list[int],
                 max_blocks_per_seq: int, scratch_block: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sizes = sorted(set(batch_sizes))
        self.max_batch = self.sizes[-1]
        block_size = kv_caches[0].block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _batch(self, b: int) -> ForwardBatch:
        meta = AttentionMetadata(query_start_loc=list(range(b + 1)), seq_lens=[1] * b,
                                 slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 decode_indices=list(range(b)), prefill_indices=[],
                                 query_start_loc_t=self.query_start_loc[:b + 1], seq_lens_t=self.seq_lens[:b],
                                 max_query_len=1)
        return ForwardBatch(meta, self.kv_caches, self.backend)

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self._batch(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, all in one memory pool (the largest sets its size)."""
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                for _ in range(2):  # compile / autotune outside the capture
                    self._forward(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks <= self.block_tables.shape[1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Replay for n sequences (device tensors of n rows); returns their fp32 logits [n, vocab]."""
        n = input_ids.shape[0]
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.block_tables[:n, :block_tables.shape[1]].copy_(block_tables)
        self.seq_lens[:n].copy_(seq_lens)
        if b > n:  # padding rows: one token in the scratch block
            self.slot_mapping[n:b].fill_(self.scratch_slot)
            self.block_tables[n:b, 0].fill_(self.scratch_block)
            self.seq_lens[n:b].fill_(1)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]

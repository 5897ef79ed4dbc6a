"""What one forward pass tells every attention layer about the batch and the paged cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """One layer's paged cache: key and value pools shaped [num_blocks, block_size, num_kv_heads, head_dim],
    or with heads_outer [num_kv_heads, num_blocks, block_size, head_dim]: the torch backend's CPU layout,
    where one head's blocks gather into a contiguous [seq, head_dim] run that SDPA reads without a copy."""
    key: torch.Tensor
    value: torch.Tensor
    heads_outer: bool = False

    @property
    def block_dim(self) -> int:
        return 1 if self.heads_outer else 0

    @property
    def block_size(self) -> int:
        return self.key.shape[2] if self.heads_outer else self.key.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[0] if self.heads_outer else self.key.shape[2]


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   heads_outer: bool) -> tuple[int, int, int, int]:
    if heads_outer:
        return (num_kv_heads, num_blocks, block_size, head_dim)
    return (num_blocks, block_size, num_kv_heads, head_dim)


@dataclass
class AttentionMetadata:
    """The batch is flat: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1].

    Its new tokens sit at the end of its context: row j of a sequence with q new tokens and
    seq_lens[i] total tokens has position seq_lens[i] - q + j and attends to positions <= that.
    """
    query_start_loc: list[int]          # len B+1, host ints (loops over sequences stay on the host)
    seq_lens: list[int]                 # len B: context length after this step's tokens are written
    slot_mapping: torch.Tensor          # [T] long: flat cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor          # [B, max_blocks] long, padded with 0
    decode_indices: list[int]           # sequences with exactly one new token (batched together)
    prefill_indices: list[int]          # sequences with several new tokens
    # Device copies of the layout, for kernels that read it on the GPU (Triton backend, CUDA graphs);
    # None for backends that loop on the host.
    query_start_loc_t: torch.Tensor | None = None  # [B+1] int32
    seq_lens_t: torch.Tensor | None = None         # [B] int32
    max_query_len: int = 0
    # A captured prefill graph's layout (runner/cuda_graphs.py): the batch is padded to fixed sizes and
    # the host lists describe the capture, not the replayed step, so the backend may not route on them.
    # Every row goes through the extend kernel, whose grid covers max_query_len (the graph's token count).
    static_layout: bool = False
    # Tensors a backend derives from the fields above on the first layer and reuses on the others.
    derived: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class ForwardBatch:
    """Everything a model's forward needs besides token ids and positions."""
    meta: AttentionMetadata
    kv_caches: list[KVCache]        # one per layer
    # .rotary_attend(q, k, v, positions, cos_sin_cache, cache, meta, scale) -> [T, Hq, D] (rotary, cache
    # write, attention), or its two halves .store_rotated(...) and .attend(q, k, v, cache, meta, scale)
    backend: "object"

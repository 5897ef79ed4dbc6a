"""A step's inputs on the host, and the kernel that lays a decode step's into a CUDA graph's buffers.

The runner flattens the scheduled sequences into `StepInputs` (host lists). An eager or prefill-graph
step packs them into one host-to-device copy and slices it there (ModelRunner._device_inputs). A
decode-graph step instead packs them in the graph's own layout, padded to the graph's batch size, and
one small kernel writes them into the graph's static buffers (`unpack_decode_inputs`), taking pending
tokens (overlap scheduling) from the previous step's sampled tokens on the device. That is one copy
and one kernel a step, where slicing, casting and copying buffer by buffer took ten small device
operations (~2-3 us each, a few percent of a small model's step) and as many host calls.

Layout of the packed decode inputs for a graph of b rows over block tables w wide (int64):
    [b x 4 rows of (token id, position, cache slot, context length)] [b fill sources] [b x w tables]
A fill source is the row of the previous step's tokens that holds the row's pending input token, or -1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loopserve.model.fused_ops import HAS_TRITON, tl, triton


@dataclass
class StepInputs:
    """A step's inputs on the host, flat over its sequences (one token row per new token)."""
    token_ids: list[int]        # PENDING_TOKEN where the previous step's sampled token goes
    positions: list[int]
    slots: list[int]            # flat cache slot of each new token
    tables: list[int]           # num_seqs rows of max_blocks block ids, padded with 0
    max_blocks: int
    query_start_loc: list[int]  # num_seqs + 1
    seq_lens: list[int]         # context length after this step's tokens
    decode_idx: list[int]       # sequences with one new token
    prefill_idx: list[int]      # sequences with several
    logits_rows: list[int]      # token rows whose logits are sampled
    fill_dst: list[int]         # token rows whose input is pending ...
    fill_src: list[int]         # ... and their rows in the previous step's sampled tokens


def pack_decode_inputs(inputs: StepInputs, b: int, scratch_block: int, block_size: int) -> np.ndarray:
    """The decode step's inputs (one token a sequence) in the layout above, padded to b rows: a padding
    row decodes one token of the scratch block, which no sequence owns."""
    n, w = len(inputs.seq_lens), inputs.max_blocks
    packed = np.zeros(5 * b + b * w, np.int64)
    rows = packed[:4 * b].reshape(b, 4)
    rows[:n, 0] = inputs.token_ids
    rows[:n, 1] = inputs.positions
    rows[:n, 2] = inputs.slots
    rows[:n, 3] = inputs.seq_lens
    rows[n:, 2] = scratch_block * block_size
    rows[n:, 3] = 1
    fill = packed[4 * b:5 * b]
    fill.fill(-1)
    fill[inputs.fill_dst] = inputs.fill_src
    tables = packed[5 * b:].reshape(b, w)
    tables[:n] = np.asarray(inputs.tables, np.int64).reshape(n, w)
    tables[n:, 0] = scratch_block
    return packed


if HAS_TRITON:

    @triton.jit(do_not_specialize=["b", "w", "stride_t"])
    def _unpack_decode_kernel(packed_ptr, prev_ptr, ids_ptr, pos_ptr, slot_ptr, lens_ptr, tables_ptr, stride_t,
                              b, w, BLOCK_W: tl.constexpr):
        i = tl.program_id(0)
        row = packed_ptr + i * 4
        src = tl.load(packed_ptr + 4 * b + i)
        # A pending token comes from the previous step's samples (prev_ptr is never read without one).
        prev = tl.load(prev_ptr + tl.maximum(src, 0), mask=src >= 0, other=0)
        tl.store(ids_ptr + i, tl.where(src >= 0, prev, tl.load(row)))
        tl.store(pos_ptr + i, tl.load(row + 1))
        tl.store(slot_ptr + i, tl.load(row + 2))
        tl.store(lens_ptr + i, tl.load(row + 3).to(tl.int32))
        table = packed_ptr + 5 * b + i.to(tl.int64) * w
        for c0 in range(0, w, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            ok = cols < w
            tl.store(tables_ptr + i.to(tl.int64) * stride_t + cols, tl.load(table + cols, mask=ok), mask=ok)


def unpack_decode_inputs(packed: torch.Tensor, prev_tokens: torch.Tensor | None, b: int, w: int,
                         input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                         seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Write packed decode inputs (pack_decode_inputs, on the device) into a graph's first b rows:
    input_ids / positions / slot_mapping (long), seq_lens (int32), block_tables[:, :w] (long)."""
    assert block_tables.stride(1) == 1 and w <= block_tables.shape[1]
    _unpack_decode_kernel[(b,)](packed, prev_tokens if prev_tokens is not None else packed, input_ids, positions,
                                slot_mapping, seq_lens, block_tables, block_tables.stride(0), b, w, BLOCK_W=256,
                                num_warps=1)

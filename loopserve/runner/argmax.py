"""Greedy argmax over a vocabulary, spread over the GPU.

torch.argmax reduces each row in one thread block: on the H200's batch-1 decode profile it took
27 us a step for Llama-3.1-8B's 128k-entry fp32 logits row (bench/results/gpu-h200-prefill-graphs.jsonl),
as long as ten of the layer kernels around it. Here a row is split into CHUNK-wide pieces, one
program each, and a second launch picks the best piece's winner: two short kernels. The decode
graphs capture it after the logits, so a greedy step reads its tokens from the graph.

Ties go to the lowest index (torch's first occurrence); a NaN counts as +inf (torch lets the first
NaN win, so the two differ only for a row holding both NaN and +inf).
"""
from __future__ import annotations

import torch

from loopserve.model.fused_ops import HAS_TRITON, tl, triton

# Entries of a row one program reduces: 16 KB of fp32, 32 a thread at 4 warps.
CHUNK = 4096

if HAS_TRITON:

    @triton.jit
    def _chunk_argmax_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, chunks, CHUNK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        v = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)
        # Padding is -inf and comes last: a row of -inf still picks its first real entry.
        best = tl.argmax(v, 0, tie_break_left=True)
        tl.store(val_ptr + row * chunks + chunk, tl.max(v, 0))
        tl.store(idx_ptr + row * chunks + chunk, (chunk * CHUNK + best).to(tl.int64))

    @triton.jit
    def _merge_argmax_kernel(val_ptr, idx_ptr, out_ptr, chunks, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        v = tl.load(val_ptr + row * chunks + offs, mask=offs < chunks, other=float("-inf"))
        # Pieces are in index order, so the first piece holding the max holds the row's first max.
        best = tl.argmax(v, 0, tie_break_left=True)
        tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + best))


def argmax_rows_triton(logits: torch.Tensor) -> torch.Tensor:
    """[R, V] float -> [R] long: each row's first index of its max (NaN as +inf), in two launches."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "rows must be contiguous"
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.long, device=logits.device)
    _chunk_argmax_kernel[(rows, chunks)](logits, vals, idx, vocab, logits.stride(0), chunks, CHUNK=CHUNK,
                                         num_warps=4)
    _merge_argmax_kernel[(rows,)](vals, idx, out, chunks, BLOCK=max(16, triton.next_power_of_2(chunks)),
                                  num_warps=1)
    return out


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the Triton kernels on a CUDA device, torch.argmax elsewhere."""
    if HAS_TRITON and logits.is_cuda and logits.stride(1) == 1:
        return argmax_rows_triton(logits)
    return logits.argmax(dim=-1)

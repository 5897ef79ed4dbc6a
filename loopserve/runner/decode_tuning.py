"""Startup tuning of the decode attention kernel's tiles (runner/tuning.py).

The decode kernel serves two kinds of launch that want different tiles (attention/triton_decode.py):
few programs (batch 1 to small batches, each context split across the SMs: latency-bound, the
agent's turn) and many (large batches, one program a sequence and KV head: bandwidth-bound, its KV
reads set saturation throughput). Each is timed on one layer of the model's own pool the way the
decode graphs launch it: batch 1, and the largest decode graph's batch (where that many sequences
make a many-programs launch), with the graphs' table width and split count, every sequence on blocks
of its own over TUNING_CONTEXT tokens (fewer where the pool is smaller). The blocks read are filled
with random keys and values first, so the candidates' results can be checked against each other;
nothing reads a block before its sequence has written it, so serving is unaffected. The fastest tile
of each regime goes to the backend's `decode_tiles`.
"""
from __future__ import annotations

import logging

import torch
import triton

from loopserve.attention.metadata import KVCache
from loopserve.attention.triton_decode import (candidate_decode_tiles, choose_num_splits, decode_workspace,
                                               paged_decode_attention)
from loopserve.device_caps import FEW, MANY, launch_regime, sm_count
from loopserve.runner.tuning import TimeFn, Tuned, chosen, described, fastest, fill_random_blocks_, time_in_graphs

log = logging.getLogger(__name__)

# Tokens each tuning sequence attends over: an agent's context is longer, a saturation batch's about this.
TUNING_CONTEXT = 1024


@torch.inference_mode()
def tune_decode_tiles(backend, cache: KVCache, num_q_heads: int, max_batch: int, table_width: int,
                      time_fn: TimeFn = time_in_graphs) -> dict[str, Tuned]:
    """Time each regime's candidate tiles on `cache` (one layer's pool, blocks outermost; its last block
    is not used) for batch 1 and `max_batch` sequences with block tables `table_width` wide, and set
    `backend.decode_tiles` to the fastest; regime -> Tuned."""
    key, value = cache.key, cache.value
    num_blocks, block_size, num_kv_heads, head_dim = key.shape
    device = key.device
    usable = num_blocks - 1
    gen = torch.Generator(device=device).manual_seed(0)
    filled = 0
    timings: dict[str, Tuned] = {}
    for regime, batch in ((FEW, 1), (MANY, max_batch)):
        blocks_each = min(triton.cdiv(TUNING_CONTEXT, block_size), table_width, usable // max(1, batch))
        splits = choose_num_splits(batch, num_kv_heads, table_width, block_size, sm_count(device))
        if blocks_each < 1 or launch_regime(batch * num_kv_heads * splits, device) != regime:
            continue  # this model's decode graphs never launch such a grid (or the pool cannot hold it)
        context = blocks_each * block_size
        if batch * blocks_each > filled:
            fill_random_blocks_((key, value), filled, batch * blocks_each, gen)
            filled = batch * blocks_each
        tables = torch.zeros(batch, table_width, dtype=torch.long, device=device)  # as the runner passes them
        tables[:, :blocks_each] = torch.arange(batch * blocks_each, device=device).view(batch, blocks_each)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, num_q_heads, head_dim, generator=gen, device=device, dtype=key.dtype)
        out = torch.empty_like(q)
        ws = decode_workspace(batch, num_q_heads, num_kv_heads, head_dim, splits, device)

        def attend(tile, q=q, out=out, tables=tables, lens=lens, ws=ws) -> torch.Tensor:
            # Counters a failed candidate may have left set would spoil the next one's merge. Zeroed
            # before each candidate's first (checked) run, not inside the timed graphs: a correct launch
            # leaves them zero, and a memset would weigh on the ~5 us batch-1 timings.
            if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                ws.tickets.zero_()
            # The tile for either regime: the grid's programs pick the regime, as in serving.
            return paged_decode_attention(q, key, value, tables, lens, head_dim ** -0.5, out=out, workspace=ws,
                                          pdl=backend.pdl, tiles={FEW: tile, MANY: tile})

        tuned = fastest(candidate_decode_tiles(regime, key.dtype, device), attend, time_fn,
                        f"decode tile, {regime} programs ({batch} x {context} tokens, {splits} splits)", device)
        if tuned is not None:
            timings[regime] = tuned
    backend.decode_tiles = chosen(timings)
    log.info("decode attention tiles (ms a layer): %s", described(timings))
    return timings

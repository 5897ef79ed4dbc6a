"""Startup tuning of the extend (prefill) attention kernel's tiles (runner/tuning.py).

The extend kernel serves two kinds of launch that want different tiles (attention/triton_extend.py):
few programs, each walking a long context (a short agent turn over a long cached prefix: 256 new
tokens over 8k are 128 programs on the 8B shape), and many (a long prompt: 4,096 programs at 8k). For
each, the candidate tiles are timed on one layer of the model's own KV pool at that shape: 256 new
tokens over a cached prefix, and a cold prompt, each up to 8,192 tokens (what the pool and the
context window allow). The blocks it reads are filled with random keys and values first, so the
candidates' results can be checked against each other (runner/tuning.py); nothing reads a block
before its sequence has written it, so serving is unaffected. The fastest tile of each regime goes
to the backend's `extend_tiles`. A third shape, 32 new tokens over the context, tunes the short
launches (triton_extend.SHORT: a turn of a few dozen tokens, packed by GQA group) among the
few-programs candidates. A candidate's per_sm sets how a launch of few programs splits its
key ranges (triton_extend.choose_extend_splits), so the timing covers that choice too.
"""
from __future__ import annotations

import logging

import torch
import triton

from loopserve.attention.metadata import KVCache
from loopserve.attention.triton_extend import SHORT, candidate_extend_tiles, paged_extend_attention
from loopserve.device_caps import FEW, MANY
from loopserve.runner.tuning import TimeFn, Tuned, chosen, described, fastest, fill_random_blocks_, time_in_graphs

log = logging.getLogger(__name__)

# The longest context a tuning shape takes, and the new tokens of the few-programs and short shapes.
TUNING_CONTEXT = 8192
TUNING_NEW_TOKENS = 256
TUNING_SHORT_TOKENS = 32


@torch.inference_mode()
def tune_extend_tiles(backend, cache: KVCache, num_q_heads: int, max_model_len: int,
                      time_fn: TimeFn = time_in_graphs) -> dict[str, Tuned]:
    """Time each regime's candidate tiles on `cache` (one layer's pool, blocks outermost) and set
    `backend.extend_tiles` to the fastest; regime -> Tuned."""
    key, value = cache.key, cache.value
    num_blocks, block_size, _, head_dim = key.shape
    context = min(TUNING_CONTEXT, max_model_len, num_blocks * block_size)
    device = key.device
    gen = torch.Generator(device=device).manual_seed(0)
    nblk = triton.cdiv(context, block_size)
    fill_random_blocks_((key, value), 0, nblk, gen)
    tables = torch.arange(nblk, dtype=torch.long, device=device).view(1, nblk)  # as the runner passes them
    timings: dict[str, Tuned] = {}
    for regime, new in ((FEW, min(TUNING_NEW_TOKENS, context // 2)), (MANY, context),
                        (SHORT, min(TUNING_SHORT_TOKENS, context // 2))):
        qsl = torch.tensor([0, new], dtype=torch.int32, device=device)
        lens = torch.tensor([context], dtype=torch.int32, device=device)
        q = torch.randn(new, num_q_heads, head_dim, generator=gen, device=device, dtype=key.dtype)
        out = torch.empty_like(q)

        def attend(tile, q=q, out=out, tables=tables, qsl=qsl, lens=lens, new=new) -> torch.Tensor:
            # The tile for any regime: a small model's shapes may not land in the one they stand for.
            return paged_extend_attention(q, key, value, tables, qsl, lens, new, head_dim ** -0.5, out=out,
                                          tiles={FEW: tile, MANY: tile, SHORT: tile})

        tuned = fastest(candidate_extend_tiles(regime, head_dim, key.dtype, device), attend, time_fn,
                        f"extend tile, {regime} programs ({new} new of {context})", device)
        if tuned is not None:
            timings[regime] = tuned
    backend.extend_tiles = chosen(timings)
    log.info("extend attention tiles (ms a layer): %s", described(timings))
    return timings

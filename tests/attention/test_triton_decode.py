"""Triton paged decode attention (split-K, GQA) against a plain torch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors, so shapes stay small.
With CUDA the same tests run on the GPU, plus a larger bf16 shape and a real CUDA-graph replay.
"""
import math
import pytest
import torch

# tests/conftest.py runs Triton in its interpreter on machines without CUDA.
pytest.importorskip("triton", reason="triton is not installed: these kernels cannot run")

from loopserve.attention.triton_decode import (
    BLOCK_N,
    MAX_SPLITS,
    NewTokens,
    candidate_decode_tiles,
    choose_num_splits,
    decode_workspace,
    paged_decode_attention,
)
from loopserve.device_caps import FEW, MANY, sm_count
from loopserve.model.fused_ops import rotary_qk_store_kv_torch_

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_case(lens, hq, hkv, d, block_size, dtype, seed, table_dtype=torch.int64, extra_cols=0,
              device=DEVICE):
    """Random q and paged caches; each sequence's blocks are a random, non-contiguous pick.

    Every cache slot no sequence owns (unassigned blocks, the tail of a last block) holds NaN,
    so a kernel that reads past a sequence's length or outside its blocks fails loudly.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    width = max(math.ceil(n / block_size) for n in lens) + extra_cols
    num_blocks = batch * width + 3
    k = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    v = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(batch, width, dtype=torch.int64)      # padded with 0, like the engine's
    used = 0
    for b, n in enumerate(lens):
        nblk = math.ceil(n / block_size)
        tables[b, :nblk] = perm[used:used + nblk]
        used += nblk
        owned.view(-1, block_size)[tables[b, :nblk]] = (
            torch.arange(nblk * block_size) < n).view(nblk, block_size)
    k[~owned] = float("nan")
    v[~owned] = float("nan")
    q = torch.randn(batch, hq, d, generator=g)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), tables.to(device, table_dtype),
            torch.tensor(lens, dtype=torch.int32, device=device))


def paired_cases(lens_a, lens_b, hq, hkv, d, block_size, dtype, seeds):
    """Two cases whose tensors all have the same shapes, so one can be copied over the other."""
    need = [math.ceil(max(lens) / block_size) for lens in (lens_a, lens_b)]
    width = max(need) + 2
    return [make_case(lens, hq, hkv, d, block_size, dtype, seed, extra_cols=width - n)
            for lens, n, seed in zip((lens_a, lens_b), need, seeds)]


def reference(q, k_cache, v_cache, tables, lens, scale):
    """Gather each sequence's K/V through its block table, repeat KV heads, softmax attention in fp32."""
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    outs = []
    for b, n in enumerate(lens.tolist()):
        ids = tables[b, :math.ceil(n / block_size)].long()
        k = k_cache[ids].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)   # [n, Hq, D]
        v = v_cache[ids].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


def case_lens(batch, block_size, seed):
    """B=3: a 1-token sequence, one exactly a multiple of block_size, a long-ish one (~200), in a
    seeded order. B=1: one long sequence that is also an exact multiple of block_size."""
    g = torch.Generator().manual_seed(seed)
    if batch == 1:
        return [block_size * math.ceil(200 / block_size)]
    lens = [1, block_size * int(torch.randint(2, 7, (1,), generator=g)),
            int(torch.randint(180, 221, (1,), generator=g))]
    return [lens[i] for i in torch.randperm(3, generator=g).tolist()]


HEADS = [(4, 4), (8, 2), (6, 1)]
SPLITS = [None, 1, 3, "many"]


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("block_size", [4, 16], ids=lambda s: f"bs{s}")
@pytest.mark.parametrize("d", [16, 64], ids=lambda s: f"d{s}")
@pytest.mark.parametrize("hq,hkv", HEADS, ids=[f"hq{a}-hkv{b}" for a, b in HEADS])
@pytest.mark.parametrize("batch,dtype", [(3, torch.float32), (1, torch.float16)], ids=["b3-fp32", "b1-fp16"])
def test_matches_reference(batch, dtype, hq, hkv, d, block_size, splits):
    seed = batch * 1000 + hq * 100 + d + block_size * 7 + SPLITS.index(splits)
    lens = case_lens(batch, block_size, seed)
    table_dtype = torch.int64 if dtype == torch.float32 else torch.int32
    q, k, v, tables, lens_t = make_case(lens, hq, hkv, d, block_size, dtype, seed, table_dtype)
    if splits == "many":
        splits = tables.shape[1] + 2            # more splits than the table has blocks
    scale = d ** -0.5
    out = paged_decode_attention(q, k, v, tables, lens_t, scale, num_splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), reference(q, k, v, tables, lens_t, scale), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("splits", [1, 3, "many"], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("hq,hkv", HEADS, ids=[f"hq{a}-hkv{b}" for a, b in HEADS])
def test_fp16_batch3(hq, hkv, splits, prefetch):
    """fp16 over the mixed batch (1 token, a block multiple, ~200) with padded table columns; with
    each program's first tile read early (small grids) and in the loop (large grids)."""
    lens = case_lens(3, 16, 7)
    q, k, v, tables, lens_t = make_case(lens, hq, hkv, 64, 16, torch.float16, 7, torch.int32, extra_cols=2)
    if splits == "many":
        splits = tables.shape[1] + 2
    out = paged_decode_attention(q, k, v, tables, lens_t, 0.125, num_splits=splits, prefetch=prefetch)
    torch.testing.assert_close(out.float(), reference(q, k, v, tables, lens_t, 0.125), atol=2e-3, rtol=0)


def test_replay_with_preallocated_out_and_workspace():
    """Graph-replay style: same out, workspace, seq_lens and block_tables tensors, new contents."""
    hq, hkv, d, bs, splits = 8, 2, 32, 4, 5
    lens_a, lens_b = [70, 1, 33], [9, 130, 64]
    (q, k, v, tables, lens_t), (q2, k2, v2, tables2, lens2) = paired_cases(
        lens_a, lens_b, hq, hkv, d, bs, torch.float32, (1, 2))
    out = torch.empty_like(q)
    ws = decode_workspace(3, hq, hkv, d, splits, DEVICE)
    # num_splits comes from the workspace when not given.
    got = paged_decode_attention(q, k, v, tables, lens_t, 0.2, out=out, workspace=ws)
    assert got is out
    torch.testing.assert_close(out, reference(q, k, v, tables, lens_t, 0.2), atol=1e-4, rtol=0)
    # Refill the very same tensors in place, as a captured graph's static inputs would be.
    q.copy_(q2), k.copy_(k2), v.copy_(v2), tables.copy_(tables2), lens_t.copy_(lens2)
    paged_decode_attention(q, k, v, tables, lens_t, 0.2, out=out, num_splits=splits, workspace=ws)
    torch.testing.assert_close(out, reference(q, k, v, tables, lens_t, 0.2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("splits", [1, 4])
def test_one_workspace_serves_every_layer(splits):
    """A forward's layers share one workspace: every split launch leaves its ticket counters at zero,
    so the next layer's merge runs once per (sequence, KV head), after all its splits."""
    hq, hkv, d, bs = 8, 2, 32, 4
    ws = decode_workspace(3, hq, hkv, d, splits, DEVICE)
    for layer in range(3):
        q, k, v, tables, lens_t = make_case([70, 1, 33], hq, hkv, d, bs, torch.float32, 10 + layer)
        out = paged_decode_attention(q, k, v, tables, lens_t, 0.2, workspace=ws)
        torch.testing.assert_close(out, reference(q, k, v, tables, lens_t, 0.2), atol=1e-4, rtol=0)
        assert not ws.tickets.any()


@pytest.mark.parametrize("splits", [1, 3])
def test_row_maps_attend_in_place(splits):
    """Sequence b reads query row q_rows[b] and writes output row out_rows[b] of wider tensors (a
    mixed step's 1-token rows); every other row is left as it was."""
    hq, hkv, d, bs = 8, 2, 16, 4
    q, k, v, tables, lens_t = make_case([33, 1, 70], hq, hkv, d, bs, torch.float32, 5)
    wide_q = torch.randn(9, hq, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q_rows = torch.tensor([6, 0, 3], device=DEVICE)
    out_rows = torch.tensor([2, 8, 5], device=DEVICE)
    wide_q[q_rows] = q
    out = torch.full((10, hq, d), 7.0, device=DEVICE)
    paged_decode_attention(wide_q, k, v, tables, lens_t, 0.3, out=out, num_splits=splits,
                           q_rows=q_rows, out_rows=out_rows)
    torch.testing.assert_close(out[out_rows], reference(q, k, v, tables, lens_t, 0.3), atol=1e-4, rtol=0)
    untouched = [r for r in range(10) if r not in out_rows.tolist()]
    assert (out[untouched] == 7.0).all()


@pytest.mark.parametrize("splits", [1, 3, "many"], ids=lambda s: f"splits{s}")
# bf16 only on a GPU: Triton's CPU interpreter computes bf16 tl.dot wrongly (the plain kernel too).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda_only)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 1)])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_new_tokens_rotated_and_stored_in_the_launch(hq, hkv, dtype, splits, prefetch):
    """With new_tokens the kernel rotates q, writes the rotated key and the value at each sequence's
    slot and attends over them: the same cache and output as fused_ops' rotary + KV write followed by
    the plain decode call. The new tokens' slots hold stale values before, so a program that read its
    slot before writing it would be caught: with prefetch, the new token sits in a share's early tile
    (lengths 1, 33, 64, and 70 split in two) and in a later one (70 unsplit)."""
    from loopserve.model.llama import RotaryEmbedding

    d, bs = 32, 4
    lens = [70, 1, 33, 64]
    q, k_cache, v_cache, tables, lens_t = make_case(lens, hq, hkv, d, bs, dtype, 3)
    gen = torch.Generator().manual_seed(8)
    k_new = torch.randn(len(lens), hkv, d, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(len(lens), hkv, d, generator=gen).to(DEVICE, dtype)
    positions = lens_t.long() - 1
    slots = torch.stack([tables[b, p // bs] * bs + p % bs for b, p in enumerate(positions.tolist())])
    with torch.device(DEVICE):
        cos_sin = RotaryEmbedding(d, 128, 10000.0, None).cos_sin_cache
    if splits == "many":
        splits = tables.shape[1] + 2

    ref_q, ref_k, ref_kc, ref_vc = q.clone(), k_new.clone(), k_cache.clone(), v_cache.clone()
    rotary_qk_store_kv_torch_(ref_q, ref_k, v_new, positions, cos_sin, ref_kc, ref_vc, slots)
    # The reference reads the tile the cache write just before it stored (pdl=False: no early read).
    want = paged_decode_attention(ref_q, ref_kc, ref_vc, tables, lens_t, d ** -0.5, num_splits=splits, pdl=False)

    q_before = q.clone()
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, d ** -0.5, num_splits=splits,
                                 new_tokens=NewTokens(k_new, v_new, positions, cos_sin, slots), prefetch=prefetch)
    assert torch.equal(q, q_before)  # q itself is not rotated in place
    flat = lambda c: c.flatten(0, 1)  # noqa: E731
    torch.testing.assert_close(flat(k_cache)[slots], flat(ref_kc)[slots], atol=ATOL[dtype], rtol=0)
    assert torch.equal(flat(v_cache)[slots], flat(ref_vc)[slots])
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("regime", [FEW, MANY])
def test_every_candidate_tile_matches(regime, splits):
    """Each tile the startup tuner may pick (runner/decode_tuning.py; on a GPU the GPU's candidates),
    launched as its regime launches (few programs read their first tile early and rotate the new
    token in the launch), with key tiles narrower than a cache block and spanning several: the same
    cache and output as the default tile's plain call."""
    from loopserve.model.llama import RotaryEmbedding

    d, bs, dtype = 64, 16, torch.float16
    lens = [70, 1, 33, 200]
    q, k_cache, v_cache, tables, lens_t = make_case(lens, 8, 2, d, bs, dtype, 11, extra_cols=2)
    gen = torch.Generator().manual_seed(12)
    k_new = torch.randn(len(lens), 2, d, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(len(lens), 2, d, generator=gen).to(DEVICE, dtype)
    positions = lens_t.long() - 1
    slots = torch.stack([tables[b, p // bs] * bs + p % bs for b, p in enumerate(positions.tolist())])
    with torch.device(DEVICE):
        cos_sin = RotaryEmbedding(d, 256, 10000.0, None).cos_sin_cache
    ref_q, ref_k, ref_kc, ref_vc = q.clone(), k_new.clone(), k_cache.clone(), v_cache.clone()
    rotary_qk_store_kv_torch_(ref_q, ref_k, v_new, positions, cos_sin, ref_kc, ref_vc, slots)
    want = reference(ref_q, ref_kc, ref_vc, tables, lens_t, 0.125)
    tiles = candidate_decode_tiles(regime, dtype, DEVICE)
    assert len(tiles) > 1
    for tile in tiles:
        kc, vc = k_cache.clone(), v_cache.clone()
        new = NewTokens(k_new, v_new, positions, cos_sin, slots) if regime == FEW else None
        if new is None:
            kc, vc, qt = ref_kc.clone(), ref_vc.clone(), ref_q
        else:
            qt = q
        got = paged_decode_attention(qt, kc, vc, tables, lens_t, 0.125, num_splits=splits, new_tokens=new,
                                     prefetch=regime == FEW, tiles={FEW: tile, MANY: tile})
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=0, msg=lambda m: f"{tile}: {m}")


def test_the_grid_picks_the_regime_tile(monkeypatch):
    """Few programs take tiles[FEW], many take tiles[MANY]; a regime without a tile takes the default."""
    from loopserve.attention import triton_decode as td

    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append((kw["BLOCK_N"], kw["num_warps"], kw["PREFETCH"]))

    monkeypatch.setattr(td, "_decode_kernel", Recorder())
    q, k, v, tables, lens_t = make_case([5, 3], 4, 2, 16, 4, torch.float32, 3)
    few, many = td.DecodeTile(16, 2, 1), td.DecodeTile(32, 8, 2)
    paged_decode_attention(q, k, v, tables, lens_t, 0.25, num_splits=MAX_SPLITS, tiles={FEW: few, MANY: many})
    big = make_case([2] * (sm_count(DEVICE) + 1), 4, 2, 16, 4, torch.float32, 4)  # 2 heads: > 2 programs an SM
    paged_decode_attention(*big, 0.25, num_splits=1, tiles={FEW: few, MANY: many})
    paged_decode_attention(*big, 0.25, num_splits=1, tiles={FEW: few})
    assert launched == [(16, 2, True), (32, 8, False), (td.BLOCK_N, 4, False)]


def test_empty_sequence_gives_zeros_not_nan():
    """A padded batch slot with seq_len 0 (outside the API's promise) must not poison anything."""
    q, k, v, tables, lens_t = make_case([5, 3], 4, 2, 16, 4, torch.float32, 3)
    lens_t[1] = 0
    for splits in (1, 2):
        # pdl=False: the lengths were just written, and a PDL launch reads them before its wait.
        out = paged_decode_attention(q, k, v, tables, lens_t, 0.25, num_splits=splits, pdl=False)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[:1], reference(q[:1], k, v, tables[:1], lens_t[:1], 0.25), atol=1e-4,
                                   rtol=0)


def test_rejects_unsupported_head_dim():
    q, k, v, tables, lens_t = make_case([3], 2, 1, 16, 4, torch.float32, 0)
    with pytest.raises(AssertionError, match="head_dim"):
        paged_decode_attention(q[..., :8], k[..., :8], v[..., :8], tables, lens_t, 1.0)


def test_num_splits_heuristic():
    # Batch 1, long context: fills ~2 programs per SM, capped.
    assert choose_num_splits(1, 8, 256, 16) == min(MAX_SPLITS, math.ceil(264 / 8))
    assert choose_num_splits(1, 1, 4096, 16) == MAX_SPLITS
    # Big batches already fill the GPU.
    assert choose_num_splits(64, 8, 256, 16) == 1
    # Never more splits than BLOCK_N chunks (hence blocks) in the table's span.
    assert choose_num_splits(1, 8, 3, 16) == 1
    assert choose_num_splits(1, 8, 10, BLOCK_N) == 10
    assert choose_num_splits(1, 8, 1, 4) == 1


@cuda_only
def test_large_bf16_gpu():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 4097, (4,), generator=g).tolist()
    lens[0] = 4096
    q, k, v, tables, lens_t = make_case(lens, 32, 8, 128, 16, torch.bfloat16, 0)
    for splits in (None, 1, 7):
        out = paged_decode_attention(q, k, v, tables, lens_t, 128 ** -0.5, num_splits=splits)
        torch.testing.assert_close(out.float(), reference(q, k, v, tables, lens_t, 128 ** -0.5),
                                   atol=2e-2, rtol=0)


@cuda_only
def test_cuda_graph_replay():
    hq, hkv, d, bs = 32, 8, 128, 16
    lens_a, lens_b = [1000, 1, 300, 17], [5, 2048, 64, 999]
    (q, k, v, tables, lens_t), (q2, k2, v2, tables2, lens2) = paired_cases(
        lens_a, lens_b, hq, hkv, d, bs, torch.float16, (4, 5))
    out = torch.empty_like(q)
    ws = decode_workspace(4, hq, hkv, d, choose_num_splits(4, hkv, tables.shape[1], bs), DEVICE)
    paged_decode_attention(q, k, v, tables, lens_t, 0.1, out=out, workspace=ws)   # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, lens_t, 0.1, out=out, workspace=ws)
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out.float(), reference(q, k, v, tables, lens_t, 0.1), atol=2e-3, rtol=0)
    q.copy_(q2), k.copy_(k2), v.copy_(v2), tables.copy_(tables2), lens_t.copy_(lens2)
    graph.replay()
    torch.testing.assert_close(out.float(), reference(q, k, v, tables, lens_t, 0.1), atol=2e-3, rtol=0)


def test_backend_decode_step_equals_torch_reference():
    """TritonPagedAttention.rotary_attend on a pure decode step (rotary, cache write and attention in the
    decode kernel's one launch) against the torch backend's rotary + write + attention."""
    from loopserve.attention.metadata import AttentionMetadata, KVCache
    from loopserve.attention.torch_ref import TorchPagedAttention
    from loopserve.attention.triton_backend import TritonPagedAttention
    from loopserve.model.llama import RotaryEmbedding

    hq, hkv, d, bs = 8, 2, 32, 4
    lens = [70, 1, 33]
    q, k_cache, v_cache, tables, lens_t = make_case(lens, hq, hkv, d, bs, torch.float32, 12)
    # The torch backend's padded SDPA reads unused slots under its mask; the engine's are finite (zeroed
    # at start), not make_case's NaN poison.
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    gen = torch.Generator().manual_seed(3)
    k_new = torch.randn(len(lens), hkv, d, generator=gen).to(DEVICE)
    v_new = torch.randn(len(lens), hkv, d, generator=gen).to(DEVICE)
    positions = lens_t.long() - 1
    slots = torch.stack([tables[b, p // bs] * bs + p % bs for b, p in enumerate(positions.tolist())])
    with torch.device(DEVICE):
        cos_sin = RotaryEmbedding(d, 128, 10000.0, None).cos_sin_cache

    def run(backend):
        cache = KVCache(k_cache.clone(), v_cache.clone(), False)
        meta = AttentionMetadata(query_start_loc=list(range(len(lens) + 1)), seq_lens=lens, slot_mapping=slots,
                                 block_tables=tables, decode_indices=list(range(len(lens))), prefill_indices=[],
                                 query_start_loc_t=torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE),
                                 seq_lens_t=lens_t, max_query_len=1)
        out = backend.rotary_attend(q.clone(), k_new.clone(), v_new.clone(), positions, cos_sin, cache, meta,
                                    d ** -0.5)
        return out, cache, meta

    got, got_cache, meta = run(TritonPagedAttention())
    want, want_cache, _ = run(TorchPagedAttention())
    assert meta.derived["triton_fused_decode"] and "triton_decode_ws" in meta.derived  # the one-launch path
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    flat = lambda c: c.flatten(0, 1)  # noqa: E731
    torch.testing.assert_close(flat(got_cache.key)[slots], flat(want_cache.key)[slots], atol=1e-5, rtol=0)
    assert torch.equal(flat(got_cache.value)[slots], flat(want_cache.value)[slots])

"""Triton paged prefill/extend attention against a plain torch reference.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (small shapes keep it fast).
"""
import pytest
import torch

# tests/conftest.py runs Triton in its interpreter on machines without CUDA.
pytest.importorskip("triton", reason="triton is not installed: these kernels cannot run")

from loopserve.attention.triton_extend import ExtendTile, _launch, paged_extend_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# The narrowest key tile a test launches: 8 keys sit between the tested cache block sizes (4 and 16)
# in the interpreter; on a GPU, tl.dot needs K >= 16, and the P.V product's K is BLOCK_N.
NARROW_BLOCK_N = 8 if DEVICE.type == "cpu" else 16

# (cached prefix, new tokens) per sequence: pure prefills (one not a multiple of any tile, one of a
# single token), extends over prefixes of various lengths, and decode rows.
MIXED = [(0, 37), (45, 20), (70, 1), (0, 1), (100, 33), (9, 1), (3, 5)]


def make_batch(specs, hq, hkv, d, block_size, dtype, seed, table_dtype=torch.int64, device=DEVICE):
    """Random paged cache holding every sequence's keys in shuffled blocks; unused slots are NaN so
    any read past a sequence's length shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in specs]
    nblk = [-(-n // block_size) for n in lens]
    num_blocks = sum(nblk) + 3
    max_blocks = max(nblk) + 2                                   # padded with block 0
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(specs), max_blocks, dtype=torch.int64)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    at = 0
    for b, (n, L) in enumerate(zip(nblk, lens)):
        tables[b, :n] = perm[at:at + n]
        at += n
        pos = torch.arange(L)
        used[tables[b, pos // block_size], pos % block_size] = True
    shape = (num_blocks, block_size, hkv, d)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    k_cache[~used] = float("nan")
    v_cache[~used] = float("nan")
    T = sum(n for _, n in specs)
    q = torch.randn(T, hq, d, generator=gen)
    qsl = torch.tensor([0] + [n for _, n in specs]).cumsum(0)
    return {
        "q": q.to(device, dtype), "k_cache": k_cache.to(device, dtype), "v_cache": v_cache.to(device, dtype),
        "block_tables": tables.to(device, table_dtype), "query_start_loc": qsl.to(device, torch.int32),
        "seq_lens": torch.tensor(lens, dtype=torch.int32, device=device),
        "max_query_len": max(n for _, n in specs), "scale": d ** -0.5,
    }


def reference(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale):
    """Per sequence: gather K/V from the block table, repeat KV heads, causal-with-offset softmax (fp32)."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, L in enumerate(lens):
        s, e = qsl[b], qsl[b + 1]
        n = e - s
        ids = block_tables[b, :-(-L // bs)].long()
        k = k_cache[ids].flatten(0, 1)[:L].float().repeat_interleave(group, 1)     # [L, Hq, D]
        v = v_cache[ids].flatten(0, 1)[:L].float().repeat_interleave(group, 1)
        qq = q[s:e].float()
        scores = torch.einsum("qhd,khd->hqk", qq, k) * scale
        q_pos = torch.arange(L - n, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def check(batch, out, dtype):
    ref = reference(**batch)
    assert out.dtype == dtype and out.shape == batch["q"].shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_mixed_batch(hq, hkv, d, block_size, dtype):
    seed = hq * 1000 + hkv * 100 + d + block_size
    batch = make_batch(MIXED, hq, hkv, d, block_size, dtype, seed)
    check(batch, paged_extend_attention(**batch), dtype)


@pytest.mark.parametrize("specs", [
    [(0, 50)],                              # one pure prefill
    [(0, 16), (0, 17), (0, 15)],            # prefills around a tile boundary
    [(0, 1), (7, 1), (30, 1), (63, 1)],     # decode rows only
    [(120, 3), (31, 30), (64, 16)],         # extends only
], ids=["prefill", "prefills", "decodes", "extends"])
def test_batch_shapes(specs):
    batch = make_batch(specs, 4, 2, 32, 4, torch.float32, seed=len(specs))
    check(batch, paged_extend_attention(**batch), torch.float32)


@pytest.mark.parametrize("block_size", [4, 32])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16)])
def test_tile_sizes(block_m, block_n, block_size):
    # Cache blocks both smaller and larger than a key tile, tiles both square and tall.
    batch = make_batch([(0, 40), (50, 23), (77, 1)], 4, 2, 16, block_size, torch.float32, seed=block_size)
    out = torch.empty_like(batch["q"])
    _launch(**batch, out=out, block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)
    check(batch, out, torch.float32)


def test_register_capped_tile_reaches_the_launch(monkeypatch):
    """A tile's register cap goes to the kernel's launch as Triton's maxnreg (the interpreter drops it),
    and leaves the result alone."""
    import loopserve.attention.triton_extend as te

    batch = make_batch([(0, 40), (50, 23)], 4, 2, 16, 4, torch.float32, seed=3)
    launches = []
    orig = te._launch
    monkeypatch.setattr(te, "_launch", lambda *a, **kw: launches.append(a[-1]) or orig(*a, **kw))
    tile = ExtendTile(16, NARROW_BLOCK_N, 1, 1, max_registers=128)
    assert str(tile).endswith("/1w/1s/r128")
    check(batch, paged_extend_attention(**batch, tiles={"few": tile, "many": tile}), torch.float32)
    assert launches == [128]


@pytest.mark.parametrize("num_splits", [3, 8])
def test_key_range_splits(num_splits):
    """Each tile's keys shared among programs, then merged: some splits of short sequences see no key
    (or no key visible to some of their rows) and must weigh nothing in the merge."""
    batch = make_batch(MIXED + [(200, 4)], 8, 2, 16, 4, torch.float32, seed=num_splits)
    check(batch, paged_extend_attention(**batch, num_splits=num_splits), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_skip_single_leaves_single_token_rows_alone(num_splits):
    batch = make_batch(MIXED, 4, 2, 16, 4, torch.float32, seed=21)
    out = torch.full_like(batch["q"], 5.0)
    paged_extend_attention(**batch, out=out, skip_single=True, num_splits=num_splits)
    qsl = batch["query_start_loc"].tolist()
    single = [qsl[b] for b, (_, n) in enumerate(MIXED) if n == 1]
    multi = [r for r in range(out.shape[0]) if r not in single]
    if num_splits == 1:
        assert (out[single] == 5.0).all()  # split, the merge writes them (the caller overwrites them)
    torch.testing.assert_close(out[multi], reference(**batch)[multi], atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_listed_sequences_only(num_splits):
    """seq_ids: the grid covers the listed sequences (in any order), which get exact attention; unsplit,
    every other row is left as it was (split, the merge writes them; a mixed step overwrites them)."""
    batch = make_batch(MIXED, 4, 2, 16, 4, torch.float32, seed=33)
    listed = [4, 0, 6]                                   # prefills and extends of MIXED, shuffled
    out = torch.full_like(batch["q"], 5.0)
    seq_ids = torch.tensor(listed, dtype=torch.int32, device=DEVICE)
    paged_extend_attention(**batch, out=out, num_splits=num_splits, seq_ids=seq_ids)
    qsl = batch["query_start_loc"].tolist()
    rows = [r for b in listed for r in range(qsl[b], qsl[b + 1])]
    torch.testing.assert_close(out[rows], reference(**batch)[rows], atol=ATOL[torch.float32], rtol=0)
    if num_splits == 1:
        others = [r for r in range(out.shape[0]) if r not in rows]
        assert (out[others] == 5.0).all()


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 2), (4, 4)])  # groups of 4, 3 (spare rows) and 1
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gqa_packed_tiles(hq, hkv, num_splits):
    """One program per KV head over the tokens of its whole query-head group: the reference, with and
    without key-range splits, and single-token rows skipped on request."""
    from loopserve.attention.triton_extend import FEW, MANY

    packed = ExtendTile(16, NARROW_BLOCK_N, 1, 1, pack_gqa=True)
    tiles = {FEW: packed, MANY: packed}
    batch = make_batch(MIXED, hq, hkv, 16, 4, torch.float32, seed=hq * 7 + num_splits)
    check(batch, paged_extend_attention(**batch, num_splits=num_splits, tiles=tiles), torch.float32)
    out = torch.full_like(batch["q"], 5.0)
    paged_extend_attention(**batch, out=out, skip_single=True, num_splits=1, tiles=tiles)
    qsl = batch["query_start_loc"].tolist()
    single = [qsl[b] for b, (_, n) in enumerate(MIXED) if n == 1]
    assert (out[single] == 5.0).all()


@pytest.mark.parametrize("spec,hq,hkv,packed", [
    ([(0, 5), (9, 3), (20, 1)], 8, 2, True),  # groups of 4, 4 tokens a packed tile: 2 programs a KV head, not 4
    ([(0, 20), (3, 2)], 8, 2, False),         # at least as many new tokens as the tile has rows
    ([(0, 15), (9, 3)], 8, 2, False),         # 4 packed programs a KV head: no fewer than its 4 heads
    ([(7, 9)], 12, 2, True),                  # groups of 6, 2 tokens a packed tile (4 spare rows): 5, not 6
    ([(7, 13)], 12, 2, False),                # 7 packed programs would be more than 6 heads
])
def test_short_extends_pack_the_gqa_group(spec, hq, hkv, packed, monkeypatch):
    """Fewer new tokens than the tile has rows (BLOCK_M = 16 here): the launch packs the query-head
    group into the rows, whatever tile it was given, where that takes fewer programs than there are
    query heads; the result is the reference's."""
    from loopserve.attention import triton_extend
    from loopserve.attention.triton_extend import FEW, MANY, SHORT

    launched = []
    orig = triton_extend._launch
    monkeypatch.setattr(triton_extend, "_launch", lambda *a, **kw: launched.append(a[15]) or orig(*a, **kw))
    batch = make_batch(spec, hq, hkv, 16, 4, torch.float32, seed=41)
    tile = ExtendTile(16, NARROW_BLOCK_N, 1, 1)  # the interpreter's default; a GPU's fp32 one is 32 rows
    check(batch, paged_extend_attention(**batch, tiles={FEW: tile, MANY: tile, SHORT: tile}), torch.float32)
    assert launched == [packed]


def test_packed_launches_count_their_programs():
    """A packed launch's split choice counts its own programs: on the 8B shape (32 query heads, 8 KV
    heads), 16 new tokens are 8 packed programs (split 8 ways) against 32 unpacked (4 ways)."""
    from loopserve.attention.triton_extend import launched_programs, live_programs_of

    live = live_programs_of(1, 32, 16)
    packed, plain = ExtendTile(64, 64, 4, 2, pack_gqa=True), ExtendTile(64, 64, 4, 2)
    assert (launched_programs(live, 32, 8, 16, plain), launched_programs(live, 32, 8, 16, packed)) == (32, 8)
    assert launched_programs(live_programs_of(3, 32, 40), 32, 8, 40, packed) == 3 * 8 * 3  # 16 tokens a tile
    assert launched_programs(live_programs_of(1, 32, 256), 32, 8, 256, packed) == 128  # as many as unpacked


def test_split_choice():
    from loopserve.attention.triton_extend import MAX_EXTEND_SPLITS, choose_extend_splits
    assert choose_extend_splits(4096, 132) == 1 and choose_extend_splits(66, 132) == 1
    assert choose_extend_splits(128, 132) == 1                  # 256 new tokens x 32 heads: split was slower
    assert choose_extend_splits(32, 132) == 4                   # 64 new tokens x 32 heads: 100 SMs idle
    assert choose_extend_splits(40, 132) == 3                   # 120 programs: one wave, not 160 in two
    assert choose_extend_splits(1, 132) == MAX_EXTEND_SPLITS
    # A tile two of which fit an SM: 256 new tokens over a cached prefix split two ways, one wave
    assert choose_extend_splits(128, 132, per_sm=2) == 2 and choose_extend_splits(140, 132, per_sm=2) == 1
    assert choose_extend_splits(32, 132, per_sm=2) == MAX_EXTEND_SPLITS


def test_out_strided_q_int32_tables_and_loose_max_query_len():
    hq, d = 4, 16
    batch = make_batch([(0, 21), (40, 9), (11, 1)], hq, 2, d, 16, torch.float32, seed=7,
                       table_dtype=torch.int32)
    # q as a slice of a wider projection output (non-contiguous rows), out as a strided view too.
    wide = torch.randn(batch["q"].shape[0], hq + 3, d, device=DEVICE)
    wide[:, 1:hq + 1] = batch["q"]
    batch["q"] = wide[:, 1:hq + 1]
    out_wide = torch.full((batch["q"].shape[0], hq + 2, d), 7.0, device=DEVICE)
    out = out_wide[:, 2:]
    batch["max_query_len"] = 64                  # an upper bound is enough: extra tiles exit early
    got = paged_extend_attention(**batch, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert (out_wide[:, :2] == 7.0).all()
    check(batch, out, torch.float32)


def test_empty_batch():
    batch = make_batch([(5, 3)], 2, 2, 16, 4, torch.float32, seed=0)
    batch["q"] = batch["q"][:0]
    batch["query_start_loc"] = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    batch["max_query_len"] = 0
    assert paged_extend_attention(**batch).shape == (0, 2, 16)


def test_rejects_bad_head_dim():
    batch = make_batch([(0, 3)], 2, 2, 24, 4, torch.float32, seed=0)
    with pytest.raises(AssertionError):
        paged_extend_attention(**batch)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_large_bf16_gpu():
    batch = make_batch([(8192, 256), (0, 1024)], 32, 8, 128, 16, torch.bfloat16, seed=3)
    check(batch, paged_extend_attention(**batch), torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("num_splits", [None, 1])
def test_cached_prefix_plus_256_bf16_gpu(num_splits):
    # The cached-prefix TTFT shape: 128 programs, so the default splits the 8k keys (wide key tiles).
    batch = make_batch([(8192, 256)], 32, 8, 128, 16, torch.bfloat16, seed=4)
    check(batch, paged_extend_attention(**batch, num_splits=num_splits), torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_tiles_gpu(dtype):
    # D=128 picks a different tile config than the matrix above.
    batch = make_batch(MIXED, 8, 2, 128, 16, dtype, seed=11)
    check(batch, paged_extend_attention(**batch), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter's candidates are checked against "
                    "each other and the torch reference's tokens in tests/attention/test_extend_tuning.py")
@pytest.mark.parametrize("regime", ["few", "many"])
@pytest.mark.parametrize("d", [64, 128])
def test_every_candidate_tile_attends_as_the_reference(regime, d):
    """Each bf16 tile the startup tuner may keep gives the reference on a mixed batch, under whatever
    splits and GQA packing its launch picks."""
    from loopserve.attention.triton_extend import FEW, MANY, SHORT, candidate_extend_tiles

    dtype = torch.bfloat16
    tiles = candidate_extend_tiles(FEW if regime == "few" else MANY, d, dtype, DEVICE)
    assert len(tiles) > 1
    batch = make_batch(MIXED, 8, 2, d, 16, dtype, seed=d + len(regime))
    for tile in tiles:
        out = paged_extend_attention(**batch, tiles={FEW: tile, MANY: tile, SHORT: tile})
        torch.testing.assert_close(out.float(), reference(**batch), atol=ATOL[dtype], rtol=0,
                                   msg=lambda m: f"{tile}: {m}")


class _RecordingKernel:
    """Stands in for a @triton.jit kernel and keeps what each launch returns (the compiled kernel)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: list = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            compiled = launch(*args, **kwargs)
            self.compiled.append(compiled)
            return compiled
        return run


@cuda_only
def test_tiles_hold_the_programs_an_sm_they_are_tuned_for(monkeypatch):
    """With the GPU machine's own Triton (the compile test uses this machine's): each candidate tile
    meant to run several programs an SM holds that many, launched as its regime launches it (few
    programs: split key ranges; many: unsplit), and a register cap holds without spills where long
    prompts launch it. A tile that held fewer would leave its launch a second, mostly idle wave."""
    import loopserve.attention.triton_extend as te
    from bench.sm90_compile import programs_an_sm

    if torch.cuda.get_device_capability(DEVICE) != (9, 0):
        pytest.skip("the programs-an-SM arithmetic is sm_90's (H100, H200)")
    recorder = _RecordingKernel(te._extend_kernel)
    monkeypatch.setattr(te, "_extend_kernel", recorder)
    # The 8B shape (32 query heads, 8 KV heads, head_dim 128), 256 new tokens: no GQA packing.
    batch = make_batch([(300, 256)], 32, 8, 128, 16, torch.bfloat16, seed=7)
    checked = []
    for regime, tiles in te._GPU_EXTEND_CANDIDATES.items():
        for tile in (t for t in tiles if t.per_sm > 1 or t.max_registers):
            recorder.compiled.clear()
            paged_extend_attention(**batch, tiles={te.FEW: tile, te.MANY: tile},
                                   num_splits=2 if regime == te.FEW else 1)
            kernel = recorder.compiled[0]
            if not hasattr(kernel, "n_regs"):
                pytest.skip(f"this Triton's launch returns no compiled kernel ({type(kernel).__name__})")
            usage = (kernel.n_regs, kernel.n_spills, kernel.metadata.shared, kernel.metadata.num_warps)
            assert programs_an_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps) >= tile.per_sm, \
                (str(tile), usage)
            if tile.max_registers:
                assert kernel.n_regs <= tile.max_registers, (str(tile), usage)
                assert regime == te.FEW or kernel.n_spills == 0, (str(tile), usage)
            checked.append(str(tile))
    assert len(checked) >= 4, checked


@cuda_only
def test_cuda_graph_capture():
    batch = make_batch(MIXED, 4, 2, 64, 16, torch.float16, seed=5)
    out = torch.empty_like(batch["q"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_extend_attention(**batch, out=out)         # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_extend_attention(**batch, out=out)
    batch["q"].copy_(torch.randn_like(batch["q"]))
    graph.replay()
    torch.cuda.synchronize()
    check(batch, out, torch.float16)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_mixed_step_routes_single_token_rows_to_the_decode_kernel(hq, hkv):
    """The backend's mixed step: the extend kernel skips 1-token sequences (their rows stay as they
    were) and the decode kernel fills them; together they equal the reference for every row."""
    from loopserve.attention.metadata import AttentionMetadata, KVCache
    from loopserve.attention.triton_backend import TritonPagedAttention

    batch = make_batch(MIXED, hq, hkv, 32, 4, torch.float32, seed=hq + hkv)
    qsl = batch["query_start_loc"].tolist()
    single = [i for i in range(len(MIXED)) if MIXED[i][1] == 1]
    sentinel = torch.full_like(batch["q"], 7.0)
    # Unsplit: with key-range splits the merge writes those rows too (the decode kernel overwrites them).
    skipped = paged_extend_attention(**batch, out=sentinel.clone(), skip_single=True, num_splits=1)
    single_rows = [qsl[i] for i in single]
    assert torch.equal(skipped[single_rows], sentinel[single_rows])

    meta = AttentionMetadata(query_start_loc=qsl, seq_lens=batch["seq_lens"].tolist(), slot_mapping=None,
                             block_tables=batch["block_tables"], decode_indices=single,
                             prefill_indices=[i for i in range(len(MIXED)) if i not in single],
                             query_start_loc_t=batch["query_start_loc"], seq_lens_t=batch["seq_lens"],
                             max_query_len=batch["max_query_len"])
    cache = KVCache(batch["k_cache"], batch["v_cache"], False)
    out = TritonPagedAttention().attend(batch["q"], None, None, cache, meta, batch["scale"])
    check(batch, out, torch.float32)
    assert "triton_single_rows" in meta.derived  # built once, reused by every layer of the step

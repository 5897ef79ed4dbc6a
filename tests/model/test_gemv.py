"""The fused small-batch GEMV (model/gemv.py) against the separate ops it replaces, and through whole
decode forwards. Without CUDA the kernel runs in Triton's interpreter on CPU tensors."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run")

from loopserve.model.gemv import (MAX_GEMV_ROWS, SPLIT_K_CANDIDATE_TILES, GemvTile, candidate_tiles,  # noqa: E402
                                  fused_gemv, gemv_torch, gemv_workspace, launch_shape, norm_block)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(m, n, k, dtype, silu, seed, on_device=False):
    """x and w (drawn on DEVICE with on_device: an lm_head's 128k x 4k fp32 draw takes seconds on a CPU)."""
    gen = torch.Generator(DEVICE if on_device else "cpu").manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=gen, device=gen.device)
    w = torch.randn(n, k, generator=gen, device=gen.device) / k ** 0.5
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["plain", "norm", "silu", "bias_residual", "norm_bias"])
def test_matches_separate_ops(kind, m, dtype):
    n, k = 37, 70  # neither a multiple of the tiles
    silu = kind == "silu"
    x, w, gen = _inputs(m, n, k, dtype, silu, seed=m * 10 + len(kind))
    kw = {}
    if kind.startswith("norm"):
        kw.update(norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, dtype), eps=1e-5)
    if silu:
        kw["silu_mul"] = True
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if "bias" in kind else None
    if "residual" in kind:
        kw["residual"] = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    got = fused_gemv(x, w, bias, **kw)
    want = gemv_torch(x, w, bias, **kw)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 3])
def test_fp32_output_rounds_as_the_cast_after_the_separate_ops(m, dtype):
    """out_dtype=fp32 (the logits GEMV: final RMSNorm, lm_head, fp32 logits): the product is rounded to
    the activation dtype first, so it is the separate ops' result cast afterwards, not a wider one."""
    n, k = 53, 70
    x, w, gen = _inputs(m, n, k, dtype, False, seed=m + 40)
    kw = dict(norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, dtype), eps=1e-5,
              out_dtype=torch.float32)
    got = fused_gemv(x, w, **kw)
    want = gemv_torch(x, w, **kw)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=ATOL[dtype])
    # Every value is one the activation dtype holds: rounded before the fp32 store.
    assert torch.equal(got, got.to(dtype).float())


def test_norm_over_a_row_wider_than_one_pre_pass_load():
    """The RMSNorm pre-pass loads as many columns as the registers allow; wider rows take several
    loads, and the last is masked."""
    x, w, gen = _inputs(2, 8, 9000, torch.float32, False, seed=9)
    nw = (1 + 0.1 * torch.randn(9000, generator=gen)).to(DEVICE)
    assert norm_block(2, 9000, 1) == 512  # one warp, two rows: eighteen loads
    got = fused_gemv(x, w, norm_weight=nw, eps=1e-6, tile=GemvTile(8, 4096, 1))
    torch.testing.assert_close(got, gemv_torch(x, w, norm_weight=nw, eps=1e-6), atol=1e-4, rtol=1e-4)


def test_norm_pre_pass_load_fits_the_registers():
    """32 fp32 values a thread at most: ptxas (sm_90) spilled 4-row launches at 4 warps with more
    (tests/attention/test_compile_hopper.py)."""
    assert norm_block(1, 4096, 4) == 4096 and norm_block(1, 8192, 8) == 8192
    assert norm_block(4, 4096, 4) == 1024 and norm_block(4, 4096, 8) == 2048
    assert norm_block(1, 576, 1) == 1024 and norm_block(3, 100, 1) == 128


def test_explicit_tile_config():
    x, w, _ = _inputs(3, 40, 96, torch.float32, False, seed=5)
    got = fused_gemv(x, w, tile=GemvTile(16, 256, 1))  # 64 at 3 rows, above K's remainder: masked tail
    torch.testing.assert_close(got, gemv_torch(x, w), atol=2e-5, rtol=0)


def test_launch_shape_scales_k_tiles_with_the_rows():
    tile = GemvTile(16, 512, 8)
    assert launch_shape(tile, 1, 4096) == (16, 512, 8)
    assert launch_shape(tile, 2, 4096) == (16, 256, 8)
    assert launch_shape(tile, 3, 4096) == (16, 128, 8)  # rows round up to 4
    assert launch_shape(tile, 1, 70) == (16, 128, 8)    # never past K
    # warps never outnumber 8 elements a thread
    assert launch_shape(GemvTile(8, 256, 4), 4, 4096) == (8, 64, 2)
    assert launch_shape(GemvTile(8, 32, 1), 4, 70) == (8, 8, 1)


@pytest.mark.parametrize("k", [70, 300], ids=["k-in-one-tile", "k-over-many-tiles"])
@pytest.mark.parametrize("kind", ["norm", "silu_residual"])
@pytest.mark.parametrize("m", [1, 3])
def test_every_candidate_tile_matches(kind, m, k):
    """The tiles the startup tuner may pick, with a K inside one tile (the second tile in flight is all
    masked) and over several (each tile's loads issued an iteration ahead, a masked tail)."""
    n = 45
    silu = kind.startswith("silu")
    x, w, gen = _inputs(m, n, k, torch.float32, silu, seed=m + k)
    kw = dict(silu_mul=True, residual=torch.randn(m, n, generator=gen).to(DEVICE)) if silu else dict(
        norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE), eps=1e-5)
    want = gemv_torch(x, w, **kw)
    tiles = candidate_tiles(n, DEVICE)
    assert len(tiles) == len(set(tiles)) >= 3
    for tile in tiles:
        torch.testing.assert_close(fused_gemv(x, w, tile=tile, **kw), want, atol=2e-5, rtol=2e-5, msg=str(tile))


@pytest.mark.parametrize("split_k", [2, 3, 7], ids=["split2", "split3", "more-splits-than-tiles"])
@pytest.mark.parametrize("m", [1, 3])
def test_split_k_matches_and_leaves_its_tickets_zero(split_k, m):
    """K divided among programs (5 K tiles of 16 at K = 70: uneven shares, and with 7 splits some
    empty): the separate ops' result with every prologue and epilogue, through one workspace shared by
    launches of different shapes in turn (as a forward's layers share it), whose ticket counters every
    launch leaves zero; and the same result as the unsplit tile, whichever split finishes last."""
    k = 70
    tile = GemvTile(8, 16 * triton.next_power_of_2(m), 1, split_k)  # 16 K columns a tile at m rows
    cases = []
    for n, kind in ((45, "norm_bias"), (19, "silu_residual"), (45, "plain")):
        silu = kind.startswith("silu")
        x, w, gen = _inputs(m, n, k, torch.float32, silu, seed=n + split_k)
        kw = {}
        if kind.startswith("norm"):
            kw.update(norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE), eps=1e-5)
        if silu:
            kw.update(silu_mul=True, residual=torch.randn(m, n, generator=gen).to(DEVICE))
        bias = torch.randn(n, generator=gen).to(DEVICE) if "bias" in kind else None
        cases.append((n, x, w, bias, kw))
    workspace = gemv_workspace([(tile, n) for n, *_ in cases], m, DEVICE)
    assert workspace.partials.numel() == split_k * m * 45 and workspace.tickets.numel() == 6
    for n, x, w, bias, kw in cases:
        got = fused_gemv(x, w, bias, tile=tile, workspace=workspace, **kw)
        torch.testing.assert_close(got, gemv_torch(x, w, bias, **kw), atol=2e-5, rtol=2e-5)
        unsplit = fused_gemv(x, w, bias, tile=GemvTile(8, tile.block_k, 1), **kw)
        torch.testing.assert_close(got, unsplit, atol=1e-6, rtol=1e-6)
        assert (workspace.tickets == 0).all()
    # Without a workspace the call makes its own.
    n, x, w, bias, kw = cases[0]
    torch.testing.assert_close(fused_gemv(x, w, bias, tile=tile, **kw), gemv_torch(x, w, bias, **kw),
                               atol=2e-5, rtol=2e-5)


def test_a_workspace_only_where_a_choice_splits_k():
    from loopserve.model.gemv import CUBLAS

    plain = [(GemvTile(8, 16, 1), 100), (CUBLAS, 300), (None, 50)]
    assert gemv_workspace(plain, 4, DEVICE) is None
    ws = gemv_workspace(plain + [(GemvTile(4, 16, 1, 3), 20), (GemvTile(8, 16, 1, 2), 64)], 2, DEVICE)
    assert ws.partials.dtype == torch.float32 and ws.partials.numel() == max(3 * 2 * 20, 2 * 2 * 64)
    assert ws.tickets.dtype == torch.int32 and ws.tickets.tolist() == [0] * 8  # 64 / 8 > 20 / 4
    assert ws.holds(GemvTile(8, 16, 1, 2), 2, 64) and not ws.holds(GemvTile(4, 16, 1, 2), 2, 64)


def test_strided_rows_and_refusals():
    x, w, _ = _inputs(2, 16, 32, torch.float32, False, seed=0)
    wide = torch.zeros(2, 48, device=DEVICE)
    wide[:, 8:40] = x
    torch.testing.assert_close(fused_gemv(wide[:, 8:40], w), gemv_torch(x, w), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="<= 4"):
        fused_gemv(torch.zeros(MAX_GEMV_ROWS + 1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtypes"):
        fused_gemv(x.half(), w)
    assert fused_gemv(x[:0], w).shape == (0, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and the 8B shapes need a GPU")
@pytest.mark.parametrize("tile", [None, *SPLIT_K_CANDIDATE_TILES], ids=str)
@pytest.mark.parametrize("m", [1, 4])
def test_8b_shapes_bf16_gpu(m, tile):
    """The default tile and the split-K candidates at the 8B roles' shapes, the logits GEMV's included."""
    for n, k, kw in ((6144, 4096, "norm"), (4096, 4096, "residual"), (28672, 4096, "norm"), (4096, 14336, "silu"),
                     (128256, 4096, "logits")):
        x, w, gen = _inputs(m, n, k, torch.bfloat16, kw == "silu", seed=n, on_device=True)
        norm = dict(norm_weight=torch.ones(k, device=DEVICE, dtype=torch.bfloat16), eps=1e-5)
        extra = {"norm": norm, "logits": dict(norm, out_dtype=torch.float32), "silu": dict(silu_mul=True),
                 "residual": dict(residual=torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16))}[kw]
        torch.testing.assert_close(fused_gemv(x, w, tile=tile, **extra).float(),
                                   gemv_torch(x, w, **extra).float(), atol=3e-2, rtol=3e-2)


def test_fused_decode_layers_give_the_same_tokens(make_llm, monkeypatch):
    """Whole forwards: decode steps of up to 4 sequences (and prompts of up to 4 tokens) through the fused
    layers give the unfused model's greedy tokens and logprobs."""
    from loopserve import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in ([5, 6, 7], list(range(10, 40)), [3], list(range(50, 61)))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    ref = make_llm(enforce_eager=True).generate(prompts, params)
    from loopserve.model import gemv

    calls = []
    monkeypatch.setattr(gemv, "fused_gemv",
                        lambda x, w, *a, **kw: calls.append((x.shape[0], w.shape[0], kw.get("out_dtype")))
                        or fused_gemv(x, w, *a, **kw))
    llm = make_llm(enforce_eager=True, fused_decode_gemv="on")
    assert llm.engine.model.fused_gemv_rows == MAX_GEMV_ROWS
    got = llm.generate(prompts, params)
    # A lone 3-token prompt: its prefill (3 rows) and its decode steps (1 row) take the fused layers too.
    lone = [{"prompt_token_ids": [90, 91, 92]}]  # not in the prefix cache
    got += llm.generate(lone, params)
    ref += make_llm(enforce_eager=True).generate(lone, params)
    assert {1, 3, 4} <= {rows for rows, _, _ in calls}
    # Decode steps end in the logits GEMV (final norm, lm_head, fp32 logits); a prefill, whose logits
    # are one row's of several, in cuBLAS.
    vocab = llm.engine.model.lm_head_weight.shape[0]
    assert {rows for rows, n, out in calls if n == vocab and out == torch.float32} == {1, 4}
    for a, b in zip(got, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert all(la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4) for t in la)

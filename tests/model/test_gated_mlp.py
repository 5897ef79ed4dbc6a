"""The MLP's gate_up GEMM with the SiLU-mul in its epilogue (model/gated_mlp.py) against cuBLAS (or torch)
and the separate kernel, and its startup tuning (runner/gated_mlp_tuning.py). Without CUDA the kernel
runs in Triton's interpreter on CPU tensors and a stand-in timer ranks the candidates."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run")

from loopserve import SamplingParams  # noqa: E402
from loopserve.model import gated_mlp  # noqa: E402
from loopserve.model.gated_mlp import (UNFUSED, GatedTile, candidate_tiles, choice_for_rows,  # noqa: E402
                                       gate_up_silu, gate_up_silu_unfused, gated_problem)
from loopserve.runner import gated_mlp_tuning  # noqa: E402
from loopserve.runner.gated_mlp_tuning import tune_gated_mlp  # noqa: E402
from tests.conftest import StandInTimer  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(m, k, inter, dtype, seed):
    gen = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE)
    w = torch.randn(2 * inter, k, generator=gen, device=DEVICE) / k ** 0.5
    return x.to(dtype), w.to(dtype)


def _check(x, w, tile):
    got = gate_up_silu(x, w, tile)
    # The reference rounds gate and up to the activation dtype, as cuBLAS's output is.
    want = gate_up_silu_unfused(x, w, use_triton=False)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[x.dtype], rtol=ATOL[x.dtype])


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", [torch.bfloat16] if ON_GPU else CPU_DTYPES, ids=str)
@pytest.mark.parametrize("tile", candidate_tiles(DEVICE, torch.bfloat16 if ON_GPU else torch.float32), ids=str)
@pytest.mark.parametrize("m, k, inter", [(37, 70, 45), (64, 64, 32), (1, 48, 16), (37, 64, 40)])
def test_every_candidate_matches_the_separate_ops(tile, dtype, m, k, inter):
    """Rows, features and K that are not multiples of the tile (masked K tiles, rows and features read
    again but never stored), and K that is (unmasked loads). TMA tiles take bulk copies where the rows
    are 16-byte aligned (the last three shapes; in the last a gate tile past N reads up's first rows,
    never stored) and plain loads where not (the first)."""
    _check(*_inputs(m, k, inter, dtype, seed=m + k), tile)


class _Refused:
    def __getitem__(self, grid):
        raise AssertionError("this kernel was not to be launched")


def test_tma_tiles_take_bulk_copies_where_the_rows_are_aligned(monkeypatch):
    tile = next(t for t in candidate_tiles(DEVICE, torch.float16) if t.tma)
    aligned = _inputs(37, 64, 40, torch.float16, seed=3)
    unaligned = _inputs(37, 70, 40, torch.float16, seed=3)  # 140-byte rows
    with monkeypatch.context() as m:
        m.setattr(gated_mlp, "_gate_up_silu_kernel", _Refused())
        _check(*aligned, tile)
        with pytest.raises(AssertionError, match="not to be launched"):
            gate_up_silu(*unaligned, tile)
    monkeypatch.setattr(gated_mlp, "_gate_up_silu_tma_kernel", _Refused())
    _check(*unaligned, tile)


# One tile of each kind: plain loads, TMA, persistent TMA (every GPU tile runs the small shapes of the test
# above, and the startup tuner leaves out any whose result differs from cuBLAS's).
GPU_KINDS = [next(t for t in gated_mlp.GPU_CANDIDATE_TILES if (t.tma, bool(t.persistent_per_sm)) == kind)
             for kind in ((False, False), (True, False), (True, True))]


@pytest.mark.skipif(not ON_GPU, reason="the 8B shapes take minutes in the interpreter; the GPU runs them")
@pytest.mark.parametrize("tile", GPU_KINDS, ids=str)
@pytest.mark.parametrize("m", [1, 300])
def test_each_kind_of_gpu_tile_at_the_8b_shape(tile, m):
    _check(*_inputs(m, 4096, 14336, torch.bfloat16, seed=m), tile)


@pytest.mark.parametrize("programs_an_sm", [1, 2])
def test_persistent_programs_take_every_tile_in_turn(monkeypatch, programs_an_sm):
    """Fewer persistent programs than output tiles: each takes tile after tile (7 x 5 tiles over 3 or
    6 programs, row and feature edges included); more programs than tiles: a program a tile."""
    tile = next(t for t in candidate_tiles(DEVICE, torch.float16) if t.persistent_per_sm)
    tile = GatedTile(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tma=True,
                     persistent_per_sm=programs_an_sm)
    monkeypatch.setattr(gated_mlp, "sm_count", lambda device: 3)
    _check(*_inputs(7 * tile.block_m - 3, 64, 5 * tile.block_n - 8, torch.float16, seed=4), tile)
    monkeypatch.setattr(gated_mlp, "sm_count", lambda device: 64)
    _check(*_inputs(2 * tile.block_m, 64, 3 * tile.block_n, torch.float16, seed=5), tile)


def test_the_output_buffer_is_written_and_no_rows_is_nothing():
    tile = candidate_tiles(DEVICE, torch.float16)[0]
    x, w = _inputs(5, 32, 16, torch.float16, seed=1)
    out = torch.full((5, 16), float("nan"), dtype=torch.float16, device=DEVICE)
    assert gate_up_silu(x, w, tile, out=out) is out and not out.isnan().any()
    assert gate_up_silu(x[:0], w, tile).shape == (0, 16)


def test_inputs_the_kernel_cannot_take_are_refused():
    x, w = _inputs(3, 16, 8, torch.float32, seed=2)
    assert gated_problem(x, w) is None
    assert "expected" in gated_problem(x, w[:-1])  # an odd number of rows: no [gate; up] halves
    assert "expected" in gated_problem(x[:, :8], w)
    assert "dtypes" in gated_problem(x.half(), w)
    assert "contiguous" in gated_problem(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="dtypes"):
        gate_up_silu(x.half(), w, candidate_tiles(DEVICE, torch.float16)[0])


def test_fp32_on_a_gpu_has_no_candidates():
    """tl.dot would round fp32 to tf32 where cuBLAS does not, so fp32 models keep the separate ops."""
    assert candidate_tiles(torch.device("cuda"), torch.float32) == []
    assert candidate_tiles(torch.device("cuda"), torch.bfloat16) == list(gated_mlp.GPU_CANDIDATE_TILES)
    assert candidate_tiles(torch.device("cpu"), torch.float32) == list(gated_mlp.INTERPRETER_CANDIDATE_TILES)


def test_a_step_takes_the_choice_of_the_largest_tuned_rows_it_reaches():
    a, b = GatedTile(16, 16, 16, 1, 1), GatedTile(32, 16, 32, 2, 1)
    choices = ((256, a), (1024, UNFUSED), (4096, b))
    assert [choice_for_rows(choices, t) for t in (1, 255, 256, 1023, 1024, 4095, 4096, 9000)] == \
        [UNFUSED, UNFUSED, a, a, UNFUSED, UNFUSED, b, b]
    assert choice_for_rows((), 8192) == UNFUSED


def test_tuned_choices_keep_only_the_changes():
    a = GatedTile(16, 16, 16, 1, 1)
    compact = gated_mlp_tuning._compact
    assert compact([(256, UNFUSED), (1024, a), (4096, a)]) == ((1024, a),)
    assert compact([(256, a), (1024, UNFUSED), (4096, a)]) == ((256, a), (1024, UNFUSED), (4096, a))
    assert compact([(256, UNFUSED)]) == ()
    assert gated_mlp_tuning.tuning_rows(2048) == [256, 1024] and gated_mlp_tuning.tuning_rows(100) == []


# The longest makes a step of more than 256 rows, the GPU tuner's smallest row count.
PROMPTS = [{"prompt_token_ids": ids} for ids in ([5, 6, 7], list(range(10, 30)), list(range(40, 110)),
                                                  [50 + i % 300 for i in range(300)])]


def _tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_the_fastest_choice_at_each_row_count_runs_the_mlps_and_decodes_the_same(make_llm, monkeypatch):
    """Every candidate (UNFUSED and the tiles) runs at each tuned row count and gives the same result;
    each row count keeps the one the timer ranks first, a tile the compiler rejects is left out, and
    every MLP then runs the choice for its step's rows, decoding the untuned tokens."""
    ref = _tokens(make_llm(enforce_eager=True))
    llm = make_llm(enforce_eager=True)
    model = llm.engine.model
    assert model.gated_choices == ()  # no graphs, no tuning: the separate ops
    monkeypatch.setattr(gated_mlp_tuning, "TUNING_ROWS", (4, 16, 64))
    broken = GatedTile(24, 16, 16, 1, 1)  # BLOCK_M must be a power of two: Triton refuses it
    monkeypatch.setattr(gated_mlp_tuning, "candidate_tiles",
                        lambda device, dtype: list(gated_mlp.INTERPRETER_CANDIDATE_TILES) + [broken])
    runnable = [UNFUSED, *gated_mlp.INTERPRETER_CANDIDATE_TILES]
    # 4 rows: UNFUSED fastest; 16 rows: the last tile; 64 rows: the first tile.
    fastest_at = [0, len(runnable) - 1, 1]
    timer = StandInTimer(lambda call, n: fastest_at[call])
    timings = tune_gated_mlp(model, max_rows=64, time_fn=timer)
    assert timer.candidates == [len(runnable)] * 3  # the broken tile never reached the timer
    assert list(timings) == ["4 rows", "16 rows", "64 rows"]
    assert [t.chosen for t in timings.values()] == [runnable[i] for i in fastest_at]
    assert all(list(t.ms) == [str(c) for c in runnable] for t in timings.values())
    want = ((16, runnable[-1]), (64, runnable[1]))
    assert model.gated_choices == want
    assert all(layer.mlp.gated_choices == want for layer in model.model.layers)

    fused_rows = []
    real = gated_mlp.gate_up_silu

    def counted(x, weight, tile, out=None):
        fused_rows.append((x.shape[0], tile))
        return real(x, weight, tile, out)

    monkeypatch.setattr(gated_mlp, "gate_up_silu", counted)
    assert _tokens(llm) == ref
    # The 20- and 40-token prompts (in one step or apart) took the fused GEMM with their rows' tile;
    # decode steps of one to three rows did not.
    assert fused_rows and all(rows >= 16 for rows, _ in fused_rows)
    assert {tile for rows, tile in fused_rows} <= {runnable[-1], runnable[1]}
    assert all(tile == (runnable[1] if rows >= 64 else runnable[-1]) for rows, tile in fused_rows)


@pytest.mark.skipif(not ON_GPU, reason="the tuner times CUDA graphs on a GPU")
def test_engine_tunes_the_choices_on_a_gpu(make_llm):
    """With graphs and a 16-bit model, the runner tunes each row count the token budget reaches before
    capturing, keeps the fastest of each, and decodes as the untuned engine does."""
    ref = _tokens(make_llm(enforce_eager=True, dtype="bf16"))
    llm = make_llm(enforce_eager=False, dtype="bf16", max_num_seqs=8)
    timings = llm.engine.runner.gated_timings
    assert list(timings) == [f"{rows} rows" for rows in gated_mlp_tuning.tuning_rows(2048)]
    for t in timings.values():
        assert UNFUSED in t.ms and all(ms > 0 for ms in t.ms.values())
        assert t.ms[str(t.chosen)] == min(t.ms.values())
    assert llm.engine.model.gated_choices == gated_mlp_tuning._compact(
        [(int(key.split()[0]), t.chosen) for key, t in timings.items()])
    assert _tokens(llm) == ref
    assert make_llm(enforce_eager=False, max_num_seqs=8).engine.runner.gated_timings == {}  # fp32: no candidates


"""Startup tuning of the extend kernel's tiles (runner/extend_tuning.py). On CPU the candidates run in
Triton's interpreter and a stand-in timer ranks them; on a GPU they are timed in CUDA graphs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")  # interpreter on CPU: tests/conftest.py

from loopserve import SamplingParams  # noqa: E402
from loopserve.attention.triton_extend import SHORT, SHORT_MAX_QUERY_LEN, candidate_extend_tiles  # noqa: E402
from loopserve.device_caps import FEW, MANY  # noqa: E402
from loopserve.runner.extend_tuning import tune_extend_tiles  # noqa: E402
from tests.conftest import StandInTimer  # noqa: E402

PROMPTS = [{"prompt_token_ids": ids} for ids in (list(range(3, 40)), [7, 8, 9], list(range(60, 130)))]
SHORT_PROMPTS = [{"prompt_token_ids": ids} for ids in (list(range(5, 25)), [4, 5, 6])]


def _tokens(llm, prompts=PROMPTS):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_each_regime_keeps_its_fastest_tile_and_attends_the_same(make_llm, monkeypatch, device):
    """Every candidate tile attends the tuning shapes alike; each regime keeps the one the timer ranks
    first; prompts then attend with the kept tiles (short launches with SHORT's) and give the torch
    reference's tokens."""
    if device == "cuda":
        pytest.skip("fp32 on a GPU times its one default tile, so there is no choice to check here; the "
                    "interpreter runs this test, and test_engine_tunes_*_on_a_gpu the GPU's tuning")
    ref = _tokens(make_llm(attention_backend="torch", enforce_eager=True))
    ref_short = _tokens(make_llm(attention_backend="torch", enforce_eager=True), SHORT_PROMPTS)
    llm = make_llm(attention_backend="triton", enforce_eager=True)
    runner = llm.engine.runner
    assert runner.backend.extend_tiles == {} and runner.extend_timings == {}  # no graphs, no tuning
    head_dim = runner.cfg.head_dim
    candidates = candidate_extend_tiles(FEW, head_dim, torch.float32, torch.device("cpu"))
    for regime in (MANY, SHORT):
        assert candidates == candidate_extend_tiles(regime, head_dim, torch.float32, torch.device("cpu"))
    # By call: FEW keeps the last candidate, MANY the second, SHORT the third.
    timer = StandInTimer(lambda call, n: [n - 1, 1, 2][call])
    timings = tune_extend_tiles(runner.backend, runner.kv_caches[0], runner.cfg.num_heads, max_model_len=48,
                                time_fn=timer)
    assert timer.candidates == [len(candidates)] * 3 and list(timings) == [FEW, MANY, SHORT]
    assert runner.backend.extend_tiles == {FEW: candidates[-1], MANY: candidates[1], SHORT: candidates[2]}
    for t in timings.values():
        assert t.ms[str(t.chosen)] == min(t.ms.values()) and list(t.ms) == [str(c) for c in candidates]
    from loopserve.attention import triton_extend

    launched = []
    orig = triton_extend._launch
    monkeypatch.setattr(triton_extend, "_launch",
                        lambda *a, **kw: launched.append((triton_extend.ExtendTile(*a[9:13], a[15]), a[6]))
                        or orig(*a, **kw))
    assert _tokens(llm) == ref and _tokens(llm, SHORT_PROMPTS) == ref_short
    # The test's prompts are few programs: launches of 64 new tokens or more took FEW's tile, shorter
    # ones SHORT's; packed only where that takes fewer programs (groups of 2: at most half a tile's rows).
    assert {q >= SHORT_MAX_QUERY_LEN for _, q in launched} == {True, False}
    for tile, max_query_len in launched:
        kept = candidates[-1] if max_query_len >= SHORT_MAX_QUERY_LEN else candidates[2]
        assert dataclasses.replace(tile, pack_gqa=False) == dataclasses.replace(kept, per_sm=1)
        assert tile.pack_gqa == (max_query_len <= kept.block_m // 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuner times CUDA graphs on a GPU")
def test_engine_tunes_the_extend_tiles_on_a_gpu(make_llm):
    """With CUDA graphs, the runner tunes the three regimes before capturing the prefill graphs, and
    the engine then decodes as the eager one does."""
    ref = _tokens(make_llm(enforce_eager=True))
    llm = make_llm(enforce_eager=False, max_num_seqs=8)
    timings = llm.engine.runner.extend_timings
    assert list(timings) == [FEW, MANY, SHORT]
    for regime, t in timings.items():
        assert llm.engine.runner.backend.extend_tiles[regime] == t.chosen
        assert t.ms[str(t.chosen)] == min(t.ms.values()) and all(ms > 0 for ms in t.ms.values())
    assert _tokens(llm) == ref

"""Startup tuning of the decode kernel's tiles (runner/decode_tuning.py). On CPU the candidates run in
Triton's interpreter and a stand-in timer ranks them; on a GPU they are timed in CUDA graphs."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")  # interpreter on CPU: tests/conftest.py

from loopserve import SamplingParams  # noqa: E402
from loopserve.attention.triton_decode import candidate_decode_tiles  # noqa: E402
from loopserve.device_caps import FEW, MANY, sm_count  # noqa: E402
from loopserve.runner.decode_tuning import tune_decode_tiles  # noqa: E402
from tests.conftest import StandInTimer  # noqa: E402

PROMPTS = [{"prompt_token_ids": ids} for ids in (list(range(3, 40)), [7, 8, 9], list(range(60, 90)))]


def _tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_each_regime_keeps_its_fastest_tile_and_decodes_the_same(make_llm, monkeypatch, device):
    """Every candidate tile attends the tuning shapes alike (batch 1, and a batch large enough for a
    many-programs grid); each regime keeps the one the timer ranks first; decode steps then launch with
    the kept tiles and give the torch reference's tokens."""
    if device == "cuda":
        pytest.skip("fp32 on a GPU times its one default tile, so there is no choice to check here; the "
                    "interpreter runs this test, and test_engine_tunes_*_on_a_gpu the GPU's tuning")
    from loopserve import device_caps
    from loopserve.attention import triton_decode
    from loopserve.runner import decode_tuning

    # An 8-SM device: a many-programs grid within the interpreter's reach (9 sequences x 2 KV heads).
    for module in (device_caps, triton_decode, decode_tuning):
        monkeypatch.setattr(module, "sm_count", lambda device: 8)
    ref = _tokens(make_llm(attention_backend="torch", enforce_eager=True))
    llm = make_llm(attention_backend="triton", enforce_eager=True)
    runner = llm.engine.runner
    assert runner.backend.decode_tiles == {} and runner.decode_timings == {}  # no graphs, no tuning
    candidates = candidate_decode_tiles(FEW, torch.float32, torch.device("cpu"))
    assert candidates == candidate_decode_tiles(MANY, torch.float32, torch.device("cpu"))
    timer = StandInTimer(lambda call, n: n - 1 if call == 0 else 1)  # FEW keeps the last candidate, MANY the second

    many_batch = 9  # two KV heads: more than two programs an SM
    timings = tune_decode_tiles(runner.backend, runner.kv_caches[0], runner.cfg.num_heads, many_batch,
                                table_width=12, time_fn=timer)
    assert timer.calls == [(len(candidates), 1), (len(candidates), many_batch)] and list(timings) == [FEW, MANY]
    assert runner.backend.decode_tiles == {FEW: candidates[-1], MANY: candidates[1]}
    for t in timings.values():
        assert t.ms[str(t.chosen)] == min(t.ms.values()) and list(t.ms) == [str(c) for c in candidates]

    launched = []
    orig = triton_decode.paged_decode_attention
    monkeypatch.setattr(triton_decode, "paged_decode_attention",
                        lambda *a, **kw: launched.append(kw.get("tiles")) or orig(*a, **kw))
    assert _tokens(llm) == ref
    assert launched and all(tiles == {FEW: candidates[-1], MANY: candidates[1]} for tiles in launched)


def test_a_regime_the_graphs_never_launch_is_not_tuned(make_llm):
    """Decode graphs of at most 8 sequences never make a many-programs grid, and a pool too small for
    the large batch cannot hold its shape: only the few-programs tile is timed."""
    llm = make_llm(attention_backend="triton", enforce_eager=True, num_kv_blocks=64)
    runner = llm.engine.runner
    fake = lambda fns: [1.0 + i for i in range(len(fns))]  # noqa: E731
    for max_batch in (8, sm_count(torch.device("cpu")) + 1):
        timings = tune_decode_tiles(runner.backend, runner.kv_caches[0], runner.cfg.num_heads, max_batch,
                                    table_width=4, time_fn=fake)
        assert list(timings) == [FEW]
        assert runner.backend.decode_tiles == {FEW: candidate_decode_tiles(FEW, torch.float32, runner.device)[0]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuner times CUDA graphs on a GPU")
@pytest.mark.parametrize("max_num_seqs", [8, 256])
def test_engine_tunes_the_decode_tiles_on_a_gpu(make_llm, max_num_seqs):
    """With CUDA graphs, the runner tunes the decode tiles before capturing the decode graphs (a
    many-programs tile only where its largest graph makes such a grid: 256 sequences x 2 KV heads),
    and the engine then decodes as the eager one does."""
    ref = _tokens(make_llm(enforce_eager=True))
    llm = make_llm(enforce_eager=False, max_num_seqs=max_num_seqs, num_kv_blocks=2048)
    timings = llm.engine.runner.decode_timings
    assert list(timings) == ([FEW] if max_num_seqs == 8 else [FEW, MANY])
    for regime, t in timings.items():
        assert llm.engine.runner.backend.decode_tiles[regime] == t.chosen
        assert t.ms[str(t.chosen)] == min(t.ms.values()) and all(ms > 0 for ms in t.ms.values())
    assert _tokens(llm) == ref

"""The fused layers' startup GEMV tuning (runner/gemv_tuning.py). On CPU the candidates run in
Triton's interpreter and a stand-in timer ranks them; on a GPU they are timed in CUDA graphs."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run")

from loopserve import SamplingParams  # noqa: E402
from loopserve.model import gemv  # noqa: E402
from loopserve.model.llama import LOGITS_ROLE  # noqa: E402
from loopserve.runner.gemv_tuning import tune_gemv_choices  # noqa: E402
from tests.conftest import StandInTimer  # noqa: E402

ROLES = ["qkv", "o", "gate_up", "down", LOGITS_ROLE]
PROMPTS = [{"prompt_token_ids": ids} for ids in ([5, 6, 7], list(range(10, 30)))]


def _tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_the_fastest_choice_of_each_role_is_kept_and_decodes_the_same(make_llm, monkeypatch):
    """Every candidate (the tiles and cuBLAS) runs each role's chain (one GEMV per layer; the logits
    role's one GEMV) and gives the same result; the role keeps the one the timer ranks first, a tile the
    compiler rejects is left out, and decoding with a mix of tiles and cuBLAS roles gives the untuned
    tokens."""
    ref = _tokens(make_llm(enforce_eager=True))
    llm = make_llm(enforce_eager=True, fused_decode_gemv="on")
    model = llm.engine.model
    assert model.gemv_choices == {}  # no graphs, no tuning: the default tiles (test_gemv.py checks them)

    broken = gemv.GemvTile(3, 32, 1)  # BLOCK_N must be a power of two: Triton refuses it
    real_candidates = gemv.candidate_tiles
    monkeypatch.setattr("loopserve.runner.gemv_tuning.candidate_tiles",
                        lambda n, device: real_candidates(n, device) + [broken])
    roles = model.model.layers[0].gemv_roles
    out_features = {**{role: roles[role][0].weight.shape[0] for role in ROLES[:-1]},
                    LOGITS_ROLE: model.lm_head_weight.shape[0]}
    runnable = {role: real_candidates(out_features[role], llm.engine.runner.device) + [gemv.CUBLAS]
                for role in ROLES}
    # Role i's fastest is candidate (-1 - i): cuBLAS for qkv, tiles for the others.
    want = {role: runnable[role][-1 - i] for i, role in enumerate(ROLES)}
    timer = StandInTimer(lambda call, n: n - 1 - call)
    timings = tune_gemv_choices(model, timer)
    assert list(timings) == ROLES and model.gemv_choices == want
    assert timer.candidates == [len(runnable[role]) for role in ROLES]  # the broken tile never reached the timer
    for role, t in timings.items():
        assert list(t.ms) == [str(c) for c in runnable[role]] and t.chosen == want[role]
        assert t.ms[str(t.chosen)] == min(t.ms.values())
    assert _tokens(llm) == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuner times CUDA graphs on a GPU")
def test_engine_tunes_the_choices_on_a_gpu(make_llm):
    """With decode graphs and the fused path possible, the runner tunes every role before capturing:
    each role keeps its fastest choice, and the engine decodes as the cuBLAS graphs do."""
    ref = _tokens(make_llm(enforce_eager=False, max_num_seqs=8, fused_decode_gemv="off"))
    llm = make_llm(enforce_eager=False, max_num_seqs=8, fused_decode_gemv="on")
    timings = llm.engine.runner.gemv_timings
    assert list(timings) == ROLES
    for role, t in timings.items():
        assert llm.engine.model.gemv_choices[role] == t.chosen and t.ms[str(t.chosen)] == min(t.ms.values())
        assert gemv.CUBLAS in t.ms and all(ms > 0 for ms in t.ms.values())
    assert _tokens(llm) == ref
    assert make_llm(enforce_eager=False, max_num_seqs=8, fused_decode_gemv="off").engine.runner.gemv_timings == {}

"""The Triton attention backend through the whole engine: greedy tokens equal the torch reference's for
decodes, chunked prefills, prefix-cache extends and mixed batches (on CPU in Triton's interpreter), and
on a GPU, CUDA-graph decode steps (with padded batch sizes) equal eager ones."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")  # interpreter on CPU: tests/conftest.py

from loopserve import SamplingParams  # noqa: E402

SHARED = list(range(3, 40))  # a shared prefix: later prompts hit the prefix cache and extend it


def _prompts() -> list[dict]:
    return [{"prompt_token_ids": ids} for ids in
            (SHARED + [41, 42], [7, 8, 9], SHARED + [50, 51, 52, 53, 54], list(range(60, 130)), [11])]


def _run(llm, staggered: bool) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    if not staggered:
        return [o.outputs[0].token_ids for o in llm.generate(_prompts(), params)]
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in _prompts()]


@pytest.mark.parametrize("staggered", [False, True])
def test_triton_backend_greedy_equals_torch(make_llm, staggered):
    # A small token budget forces chunked prefills mixed with decodes in one step.
    kw = dict(max_num_batched_tokens=24, enforce_eager=True)
    ref = _run(make_llm(attention_backend="torch", **kw), staggered)
    got = _run(make_llm(attention_backend="triton", **kw), staggered)
    assert got == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager(make_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = _prompts()
    for n in (1, 3, 5):  # 3 and 5 replay padded graphs (sizes 4 and 8)
        eager = make_llm(enforce_eager=True).generate(prompts[:n], params)
        graphed_llm = make_llm(enforce_eager=False, max_num_seqs=8)
        assert graphed_llm.engine.runner.graphs is not None
        graphed = graphed_llm.generate(prompts[:n], params)
        assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]


def test_fused_kernels_through_the_model_equal_torch(make_llm, monkeypatch):
    """Every fused kernel (RMSNorm, add+RMSNorm, rotary + KV-cache write, SiLU-mul) and the Triton
    attention inside whole forwards, with overlap scheduling: the torch path's greedy tokens. On CPU
    the kernels run in the interpreter (the model dispatches to them only for CUDA tensors, so the
    dispatch is widened here)."""
    from loopserve.model import fused_ops

    kw = dict(max_num_batched_tokens=24, enforce_eager=True)
    ref = _run(make_llm(attention_backend="torch", **kw), staggered=False)
    if not torch.cuda.is_available():
        calls = []

        def use_triton(x, use_triton, unsupported):
            calls.append(unsupported is None)
            return unsupported is None

        monkeypatch.setattr(fused_ops, "_use_triton", use_triton)
    got = _run(make_llm(attention_backend="triton", overlap_scheduling=True, **kw), staggered=False)
    assert got == ref
    if not torch.cuda.is_available():
        assert calls and all(calls)  # every op took its kernel


def test_pure_decode_after_a_separate_cache_write_reads_no_tile_early(make_llm, monkeypatch):
    """Where the decode launch cannot rotate and store the new tokens itself (rotary_store_problem), the
    kernel just before it stores them. So the launch must not read its first K/V tile before waiting
    for that kernel (programmatic dependent launch): no prefetch. With the tokens stored in the launch,
    the regime decides."""
    from loopserve.attention import triton_decode
    from loopserve.model import fused_ops

    ref = _run(make_llm(attention_backend="torch", enforce_eager=True), staggered=False)
    calls = []
    launch = triton_decode.paged_decode_attention

    def spy(*args, **kwargs):
        if kwargs.get("q_rows") is None:  # a pure decode step's launch
            calls.append((kwargs.get("new_tokens") is not None, kwargs.get("prefetch")))
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_decode, "paged_decode_attention", spy)
    assert _run(make_llm(attention_backend="triton", enforce_eager=True), staggered=False) == ref
    assert calls and set(calls) == {(True, None)}
    calls.clear()
    monkeypatch.setattr(fused_ops, "rotary_store_problem", lambda *args: "forced: a separate cache write")
    assert _run(make_llm(attention_backend="triton", enforce_eager=True), staggered=False) == ref
    assert calls and set(calls) == {(False, False)}


def test_prefill_graph_layout_equals_torch(make_llm, with_prefill_graphs):
    """The static layout a prefill graph replays (tokens padded to the graph's size, empty sequence
    slots, 1-token rows routed to the decode kernel with the others parked on the padding row, logits
    rows padded) gives the torch reference's greedy tokens. Run eagerly here (in the interpreter on
    CPU): what the graph would capture, fed exactly as a replay is."""
    kw = dict(max_num_batched_tokens=24, enforce_eager=True)
    ref = _run(make_llm(attention_backend="torch", **kw), staggered=False)
    llm = make_llm(attention_backend="triton", overlap_scheduling=True, **kw)
    served = with_prefill_graphs(llm, sizes=[8, 16, 32], max_seqs=4)
    # Every static input starts 16-byte aligned (a graph's kernels are the variants the tuners timed),
    # though 5 query starts (20 bytes) come first in the int32 buffer.
    graphs = llm.engine.runner.step_graphs[0]
    inputs = [graphs.input_ids, graphs.positions, graphs.slot_mapping, graphs.logits_rows, graphs.single_q_rows,
              graphs.single_rows, graphs.query_start_loc, graphs.seq_lens, graphs.prompt_ids, graphs.single_lens]
    assert [v.numel() for v in inputs[-4:]] == [5, 4, 4, 4]
    assert all(v.data_ptr() % 16 == 0 for v in inputs)
    assert _run(llm, staggered=False) == ref
    # Both variants and several sizes served steps; steps of 5 sequences (> 4 slots) ran eagerly.
    assert {w for _, _, w in served} == {True, False} and len({t for _, t, _ in served}) >= 2


def test_mixed_step_graph_layout_equals_torch(make_llm, with_prefill_graphs):
    """Mixed-step graphs: more sequence slots than prompt slots, so the extend kernel's grid covers the
    prompt slots (padded with a slot it skips) and the decode kernel every slot (16 of the set's 32
    in the 16-token graph: no more slots than tokens). Steps of five sequences with at most two prompt
    chunks replay the second set's layout, the rest the first set's or eagerly; the torch
    reference's greedy tokens either way."""
    kw = dict(max_num_batched_tokens=24, enforce_eager=True)
    ref = _run(make_llm(attention_backend="torch", **kw), staggered=False)
    llm = make_llm(attention_backend="triton", overlap_scheduling=True, **kw)
    served = with_prefill_graphs(llm, sizes=[8, 16, 32], max_seqs=[4, 32], max_prompts=2)
    steps = []
    step_graphs_for = llm.engine.runner.step_graphs_for

    def record(num_tokens, host, num_logits):
        graphs = step_graphs_for(num_tokens, host, num_logits)
        steps.append((len(host.seq_lens), len(host.prefill_idx), graphs))
        return graphs

    llm.engine.runner.step_graphs_for = record
    assert _run(llm, staggered=False) == ref
    mixed = llm.engine.runner.step_graphs[1]
    assert any(b == 5 and 0 < p <= 2 and g is mixed for b, p, g in steps)  # decodes beside prompt chunks
    assert all(g is None for b, p, g in steps if b > 4 and p > 2)  # more prompts than slots: eager
    assert {(k, w) for k, _, w in served} >= {(0, False), (1, True)}
    assert all(w for k, _, w in served if k == 1)  # the mixed set has only the variant with 1-token rows
    assert any(t < 32 for k, t, _ in served if k == 1)  # a graph with fewer slots than the set's 32


def test_static_forwards_refuse_host_round_trips():
    """The guard the graph layout tests run their static forwards under (tests/conftest.py): loopserve
    code reading a tensor on the host, or uploading to it, fails; other code (Triton's interpreter,
    this test) does not."""
    from tests.conftest import host_round_trips_refused

    x = torch.ones(2, dtype=torch.long)
    in_loopserve = {"__name__": "loopserve.model.fake", "x": x}
    before = {name: name in vars(torch.Tensor) for name in ("item", "__bool__", "tolist")}
    with host_round_trips_refused():
        assert x.tolist() == [1, 1] and int(x[0]) == 1
        for line in ("x.tolist()", "x[0].item()", "bool(x[0])", "int(x[0])", "[0, 1][x[0]]", "x.cpu()"):
            with pytest.raises(AssertionError, match="host round trip"):
                exec(line, in_loopserve)
        import loopserve.attention.triton_backend as triton_backend
        with pytest.raises(AssertionError, match="to_device"):
            triton_backend.to_device([1], torch.long, x.device)
    exec("x.tolist()", in_loopserve)  # restored, as torch defines them
    assert {name: name in vars(torch.Tensor) for name in ("item", "__bool__", "tolist")} == before


@pytest.mark.parametrize("fused_gemv", ["off", "on"])
def test_decode_graph_layout_equals_torch(make_llm, with_decode_graphs, fused_gemv, monkeypatch):
    """The static layout a decode graph replays (inputs packed and laid into its buffers by one
    kernel, pending tokens from the step before, rows padded to the graph's size with the scratch
    block, the graph's own greedy argmax as the tokens) gives the torch reference's greedy tokens,
    with the cuBLAS layers and with the fused GEMVs, under overlap scheduling. Run eagerly here (in
    the interpreter on CPU): what the graph would capture, fed exactly as a replay is."""
    from loopserve.runner.sampler import Sampler

    ref = _run(make_llm(attention_backend="torch", enforce_eager=True), staggered=False)
    llm = make_llm(attention_backend="triton", overlap_scheduling=True, enforce_eager=True,
                   fused_decode_gemv=fused_gemv)
    served = with_decode_graphs(llm, sizes=[1, 2, 8])
    greedy_given = []
    orig = Sampler.sample_batch
    monkeypatch.setattr(Sampler, "sample_batch", lambda self, logits, rows, greedy_ids=None: greedy_given.append(
        greedy_ids is not None) or orig(self, logits, rows, greedy_ids))
    assert _run(llm, staggered=False) == ref
    # Five sequences decode together, padded to a graph of 8, their inputs pending on the step before.
    assert served and {b for b, _ in served} == {8} and greedy_given.count(True) == len(served)
    assert all(pending for _, pending in served[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_prefill_equals_eager(make_llm):
    """Captured prefill graphs (prefills, prefix-cache extends, chunked and mixed steps) against eager."""
    for kw in (dict(max_num_batched_tokens=24), dict()):
        eager = [_run(make_llm(enforce_eager=True, **kw), staggered=s) for s in (False, True)]
        llm = make_llm(enforce_eager=False, max_num_seqs=8, **kw)
        assert llm.engine.runner.step_graphs and llm.engine.runner.step_graphs[0].graphs
        assert [_run(llm, staggered=s) for s in (False, True)] == eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_mixed_steps_equal_eager(make_llm):
    """Twelve 5-token prompts and a 24-token budget: the second and third steps hold 9 and 12
    sequences, decodes beside up to 4 prompt chunks, which only the mixed-step graphs (the second set)
    hold; they replay and give the eager engine's tokens."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [3 + 7 * i + j for j in range(5)]} for i in range(12)]
    kw = dict(max_num_batched_tokens=24, max_num_seqs=16)
    eager = make_llm(enforce_eager=True, **kw).generate(prompts, params)
    llm = make_llm(enforce_eager=False, **kw)
    runner = llm.engine.runner
    assert len(runner.step_graphs) == 2 and runner.step_graphs[1].max_seqs == 16
    served = []
    choose = runner.step_graphs_for
    runner.step_graphs_for = lambda *a: served.append(choose(*a)) or served[-1]
    graphed = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
    assert runner.step_graphs[1] in served


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_gemv_auto_keeps_the_faster_graph(make_llm):
    """fused_decode_gemv="auto": every decode graph size up to MAX_GEMV_ROWS is timed both ways, the
    faster kept, eager forwards follow; the engine then decodes through whichever graphs won."""
    from loopserve.model.gemv import MAX_GEMV_ROWS
    from loopserve.runner.cuda_graphs import pick_fused_sizes

    llm = make_llm(enforce_eager=False, max_num_seqs=8, fused_decode_gemv="auto")
    graphs = llm.engine.runner.graphs
    assert set(graphs.fused_timings) == {b for b in graphs.sizes if b <= MAX_GEMV_ROWS}
    assert all(ms > 0 for pair in graphs.fused_timings.values() for ms in pair)
    assert (graphs.fused_sizes, llm.engine.model.fused_gemv_rows) == pick_fused_sizes(graphs.fused_timings)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert all(len(o.outputs[0].token_ids) == 8 for o in llm.generate(_prompts()[:3], params))


def test_pdl_only_where_the_device_has_it(make_llm):
    """Programmatic dependent launch is on by default where the device has it (Hopper and later, CUDA)
    and off when asked; the runner, the attention backend and the model's fused GEMVs agree."""
    from loopserve.device_caps import pdl_supported

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for asked in (True, False):
        llm = make_llm(attention_backend="triton", enforce_eager=True, programmatic_dependent_launch=asked)
        runner = llm.engine.runner
        assert runner.pdl == (asked and pdl_supported(device))
        assert runner.backend.pdl == runner.pdl and llm.engine.model.use_pdl == runner.pdl
    assert make_llm(attention_backend="torch", enforce_eager=True).engine.runner.pdl is False


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="programmatic dependent launch needs a Hopper (or later) GPU")
@pytest.mark.parametrize("gemv", ["on", "off"])
def test_pdl_graphs_equal_plain_launches(make_llm, gemv):
    """Decode graphs whose attention and fused GEMV kernels launch with programmatic dependent launch
    (each reads weights and old K/V before waiting for the kernel before it) decode the same greedy
    tokens as graphs of plain launches, at batch sizes 1 to 5 (padded graphs)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for pdl in (True, False):
        llm = make_llm(enforce_eager=False, max_num_seqs=8, fused_decode_gemv=gemv, programmatic_dependent_launch=pdl)
        assert llm.engine.runner.pdl is pdl and llm.engine.runner.graphs is not None
        outs.append([[o.outputs[0].token_ids for o in llm.generate(_prompts()[:n], params)] for n in (1, 3, 5)])
    assert outs[0] == outs[1]


def test_pick_fused_sizes():
    from loopserve.runner.cuda_graphs import pick_fused_sizes

    assert pick_fused_sizes({}) == ([], 0)
    assert pick_fused_sizes({1: (1.0, 0.8), 2: (1.1, 0.9), 4: (1.2, 1.0)}) == ([1, 2, 4], 4)
    # Eager forwards take the fused layers only up to the first size that did not choose them.
    assert pick_fused_sizes({1: (1.0, 0.8), 2: (1.1, 1.2), 4: (1.2, 1.0)}) == ([1, 4], 1)
    assert pick_fused_sizes({1: (1.0, 1.0), 2: (1.1, 0.9)}) == ([2], 0)  # a tie keeps cuBLAS


def test_fused_decode_gemv_modes():
    from loopserve.config import EngineConfig

    with pytest.raises(ValueError, match="fused_decode_gemv must be one of auto, on, off"):
        EngineConfig(fused_decode_gemv=True)


def test_step_graph_ladders_stop_at_the_token_budget():
    from loopserve.config import (DEFAULT_MIXED_GRAPH_MAX_PROMPTS, DEFAULT_MIXED_GRAPH_TOKENS,
                                  DEFAULT_PREFILL_GRAPH_TOKENS, EngineConfig, SchedulerConfig, StepGraphSpec)
    from loopserve.engine.core import _step_graph_specs

    def specs(eager=False, mixed=True, **kw):
        return _step_graph_specs(EngineConfig(enforce_eager=eager, mixed_step_graphs=mixed), SchedulerConfig(**kw))

    assert specs(max_num_batched_tokens=24, max_num_seqs=4) == [StepGraphSpec((16, 32), 4, 4)]
    assert specs(max_num_batched_tokens=512)[0].token_sizes[-1] == 512
    few, mixed = specs(max_num_batched_tokens=1 << 16, max_num_seqs=256)
    assert few == StepGraphSpec(DEFAULT_PREFILL_GRAPH_TOKENS, 8, 8)
    assert mixed == StepGraphSpec(DEFAULT_MIXED_GRAPH_TOKENS, 256, DEFAULT_MIXED_GRAPH_MAX_PROMPTS)
    # Past 256 tokens the mixed ladder steps by 64 (a compute-bound step pays for its padding).
    assert all(b - a == 64 for a, b in zip(mixed.token_sizes, mixed.token_sizes[1:]) if a >= 256)
    assert len(specs(max_num_seqs=256, mixed=False)) == 1 and specs(eager=True) == []

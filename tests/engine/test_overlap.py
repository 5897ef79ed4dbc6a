"""Overlap scheduling on the tiny model: step N+1 is scheduled and launched before step N's tokens are
read back, its pending inputs filled from N's samples on the device. Every output must equal the
synchronous engine's, whatever stops, preempts, aborts or needs its tokens on the host first."""
from __future__ import annotations

import random

import pytest

from loopserve import SamplingParams
from loopserve.structured import StructuredOutputsParams


def prompts(n, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


def outputs(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def counting_launches(llm) -> dict:
    """Count launches made while the previous step was still unread, and pending inputs filled on device."""
    runner = llm.engine.runner
    orig = runner.launch
    counts = {"overlapped": 0, "filled": 0, "constrained": 0}

    def launch(out, prev=None, before_sampling=None):
        if prev is not None and prev.batch is not None:
            counts["overlapped"] += 1
            pending = [s.request for s in out.seqs if s.request.has_pending_token]
            counts["filled"] += len(pending)
            counts["constrained"] += sum(1 for r in pending if r.grammar is not None or r.params.repetition_penalty != 1
                                         or r.params.presence_penalty or r.params.frequency_penalty)
        return orig(out, prev, before_sampling)

    runner.launch = launch
    return counts


def both(make_llm, ps, params, **kw):
    sync = make_llm(overlap_scheduling=False, **kw)
    over = make_llm(overlap_scheduling=True, **kw)
    counts = counting_launches(over)
    return outputs(sync.generate(ps, params)), outputs(over.generate(ps, params)), counts, sync, over


def test_overlap_is_on_by_default_only_on_cuda_and_never_with_speculation(make_llm, device):
    assert make_llm().engine.overlap is (device.startswith("cuda"))
    assert make_llm(overlap_scheduling=True).engine.overlap
    spec = make_llm(overlap_scheduling=True, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert not spec.engine.overlap


def test_staggered_batch_matches_synchronous_and_overlaps(make_llm):
    ps = prompts(24)
    sync = make_llm(overlap_scheduling=False)
    over = make_llm(overlap_scheduling=True)
    counts = counting_launches(over)
    rng = random.Random(3)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 14), ignore_eos=rng.random() < 0.5)
              for _ in ps]
    expected = outputs(sync.generate(ps, params))
    # Staggered arrivals through the step loop the LLM uses.
    engine, pending, done = over.engine, list(enumerate(ps)), {}
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i, p = pending.pop(0)
                assert over._add(p, params[i]) == str(i)
        for update in over._step().updates:
            if update.output.finished:
                done[int(update.output.request_id)] = outputs([update.output])[0]
    assert [done[i] for i in range(len(ps))] == expected
    assert counts["overlapped"] >= 15 and counts["filled"] > 100
    assert engine._in_flight is None  # drained: nothing left launched and unread


def test_chunked_prefill_preemption_and_prefix_hits_match(make_llm):
    ps = prompts(16)
    ps += [ps[0], ps[3], {"prompt_token_ids": ps[5]["prompt_token_ids"] + [7, 8, 9]}]  # prefix-cache hits
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(num_kv_blocks=24, max_num_seqs=16, max_num_batched_tokens=16, long_prefill_token_threshold=7)
    sync, over, counts, _, llm = both(make_llm, ps, params, **kw)
    assert over == sync
    assert llm.stats().num_preemptions > 0 and llm.stats().prefix_hit_tokens > 0
    assert counts["filled"] > 0


def test_stops_found_a_step_late_end_requests_exactly_like_synchronous(make_llm):
    llm = make_llm(overlap_scheduling=False)
    p = prompts(6, seed=2)
    free = [o.outputs[0] for o in llm.generate(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    eos = llm.engine.eos_token_ids[0]
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[free[0].token_ids[3]]),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[free[1].text[4:7]]),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=10, stop_token_ids=[free[2].token_ids[1]]),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[eos, free[4].token_ids[5]]),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    ]
    sync, over, _, _, _ = both(make_llm, p, params)
    assert over == sync
    assert [o[0][1] for o in over] == ["stop", "stop", over[2][0][1], "length", "stop", "length"]
    assert len(over[2][0][0]) >= 10  # min_tokens held the stop token back


def test_logprobs_seeded_sampling_and_n_match(make_llm):
    ps = prompts(5, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, top_k=20, max_tokens=8, seed=11, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, max_tokens=8, seed=5, n=3, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=8, seed=2, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    sync_llm = make_llm(overlap_scheduling=False)
    over_llm = make_llm(overlap_scheduling=True)
    a, b = sync_llm.generate(ps, params), over_llm.generate(ps, params)
    assert outputs(b) == outputs(a)
    for x, y in zip(a, b):
        for cx, cy in zip(x.outputs, y.outputs):
            if cx.logprobs is not None:
                for ex, ey in zip(cx.logprobs, cy.logprobs):
                    assert ex.keys() == ey.keys()
                    assert all(ex[t].logprob == pytest.approx(ey[t].logprob, abs=1e-5) and ex[t].rank == ey[t].rank
                               for t in ex)


def test_grammar_and_penalty_requests_overlap_too(make_llm):
    """A constrained request's next mask, and a penalised request's next sample, depend on the token
    just sampled: the engine reads it back after queueing the next forward and before its sampling."""
    ps = prompts(6, seed=7)
    choices = ["alpha", "beta gamma", "delta.epsilon"]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(choice=choices)),
              SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, presence_penalty=1.5, frequency_penalty=0.5,
                             ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    sync, over, counts, _, llm = both(make_llm, ps, params)
    assert over == sync
    assert counts["overlapped"] > 5 and counts["constrained"] > 10


def test_abort_while_its_step_is_in_flight(make_llm):
    ps = prompts(4, seed=8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = outputs(make_llm(overlap_scheduling=False).generate(ps, params))
    llm = make_llm(overlap_scheduling=True)
    for i, p in enumerate(ps):
        assert llm._add(p, params) == str(i)
    done = {}
    aborted = False
    while llm.engine.has_unfinished():
        for update in llm._step().updates:
            if update.output.finished:
                done[update.output.request_id] = update.output
        running = llm.engine.scheduler.running
        if not aborted and llm.engine._in_flight is not None and any(r.request_id == "1" for r in running) \
                and llm.engine.requests["1"].num_output_tokens >= 3:
            assert llm.engine.requests["1"].has_pending_token
            llm._abort_all(["1"])
            aborted = True
    assert aborted and "1" not in done
    for i in (0, 2, 3):
        assert outputs([done[str(i)]]) == [expected[i]]


def test_session_turns_pin_and_hit_the_same_blocks(make_llm):
    """A turn finished a step late (its next step already launched) pins exactly the blocks a
    synchronous engine pins: the next turn hits the same prefix and generates the same tokens."""
    p = prompts(1, lo=30, hi=30)[0]["prompt_token_ids"]
    params = SamplingParams(temperature=0, max_tokens=9)
    results = []
    for overlap in (False, True):
        llm = make_llm(overlap_scheduling=overlap)
        first = llm.generate({"prompt_token_ids": p}, params, session_id="s", retention_s=60)[0]
        ext = p + first.outputs[0].token_ids + [5, 6, 7]
        second = llm.generate({"prompt_token_ids": ext}, params, session_id="s", retention_s=60)[0]
        results.append((outputs([first, second]), second.num_cached_tokens, llm.stats().retention.sessions))
    assert results[1] == results[0]
    assert results[0][1] >= len(p)


def test_launching_a_step_never_waits_for_the_device(make_llm, device):
    """Overlap only pays if launching step N+1 queues its work without waiting for step N: inputs,
    forward, sampling (greedy, top-k/top-p/min-p, seeded, logprobs, penalties, min_tokens) and the copy
    of its tokens. The read-back of step N in between is the one wait allowed, so it runs unchecked."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda: torch.cuda.set_sync_debug_mode finds host synchronisations")
    import torch

    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.95, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.1, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, logprobs=3, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=4, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
                             min_tokens=4, max_tokens=8)]
    ps = prompts(len(params), seed=12)
    llm = make_llm(overlap_scheduling=True)
    llm.generate(ps, params)  # warm-up: kernels compiled, graphs captured, allocator pools filled
    runner = llm.engine.runner
    orig, launches = runner.launch, []

    def unchecked(read_back):
        def run():
            torch.cuda.set_sync_debug_mode(0)
            try:
                read_back()
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return run

    def launch(out, prev=None, before_sampling=None):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = orig(out, prev, unchecked(before_sampling) if before_sampling is not None else None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        launches.append(prev is not None)
        return step

    runner.launch = launch
    outs = llm.generate(ps, params)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs[:-1])
    assert sum(launches) >= 5

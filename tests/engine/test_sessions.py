"""Agent-session features in the engine: retention pins, expiry, memory pressure, host offload,
copy-on-write at a divergence (fan-out, n > 1), and head-of-line protection for long prompts."""
import random

import pytest

from loopserve import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


def turn(tokens):
    return {"prompt_token_ids": list(tokens)}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fill_cache(llm, n_prompts, length, seed):
    """Other traffic: distinct prompts that together need more blocks than the pool has free."""
    for i in range(n_prompts):
        llm.generate(turn(ids(length, seed * 1000 + i)), GREEDY)


def test_retained_turn_survives_cache_churn_and_unretained_does_not(make_llm):
    # 40 blocks x 4 tokens; each turn holds ~12 blocks, the churn needs ~13 blocks per prompt.
    llm = make_llm(num_kv_blocks=40)
    a1 = ids(40, 1)
    b1 = ids(40, 2)
    ra = llm.generate(turn(a1), GREEDY, session_id="A", retention_s=30)[0]
    rb = llm.generate(turn(b1), GREEDY)[0]  # no session: ordinary cache only
    assert llm.stats().retention.sessions == 1
    # 40 prompt + 8 output tokens, 47 of them computed: 11 full blocks and the partial 12th.
    assert llm.stats().retention.pinned_blocks == 12
    fill_cache(llm, 6, 48, seed=3)
    a2 = a1 + ra.outputs[0].token_ids + ids(5, 4)
    b2 = b1 + rb.outputs[0].token_ids + ids(5, 5)
    out_a = llm.generate(turn(a2), GREEDY, session_id="A", retention_s=30)[0]
    out_b = llm.generate(turn(b2), GREEDY)[0]
    # Every token of the last turn (prompt + output) but the last output token, which has no KV yet:
    # 11 pinned full blocks and a copy of the pinned partial block.
    assert out_a.num_cached_tokens == 47
    assert out_b.num_cached_tokens == 0   # evicted by the churn
    fresh = make_llm(enable_prefix_caching=False)
    assert out_a.outputs[0].token_ids == fresh.generate(turn(a2), GREEDY)[0].outputs[0].token_ids


def test_pin_expires_after_its_hint(make_llm):
    llm = make_llm(num_kv_blocks=40)
    clock = FakeClock()
    llm.engine.scheduler.retention.clock = clock
    a1 = ids(40, 1)
    llm.generate(turn(a1), GREEDY, session_id="A", retention_s=5)
    clock.now += 4.9
    assert llm.engine.expire_sessions() == 0
    clock.now += 0.2
    assert llm.engine.expire_sessions() == 1
    stats = llm.stats()
    assert stats.retention.sessions == 0 and stats.retention.expired_total == 1
    assert stats.num_free_blocks == stats.num_blocks  # unpinned: back to ordinary (evictable) cache
    fill_cache(llm, 6, 48, seed=3)
    assert llm.generate(turn(a1 + ids(5, 9)), GREEDY, session_id="A")[0].num_cached_tokens == 0


def test_new_turn_replaces_the_sessions_pin(make_llm):
    llm = make_llm(num_kv_blocks=64)
    a1 = ids(40, 1)
    r1 = llm.generate(turn(a1), GREEDY, session_id="A", retention_s=30)[0]
    a2 = a1 + r1.outputs[0].token_ids + ids(8, 2)
    llm.generate(turn(a2), GREEDY, session_id="A", retention_s=30)
    stats = llm.stats().retention
    assert stats.sessions == 1 and stats.pinned_total == 2
    assert stats.pinned_blocks == -(-(len(a2) + 8 - 1) // 4)


def test_aborted_turn_keeps_the_previous_pin(make_llm):
    llm = make_llm(num_kv_blocks=64)
    llm.generate(turn(ids(40, 1)), GREEDY, session_id="A", retention_s=30)
    before = llm.stats().retention.pinned_blocks
    rid = llm._add(turn(ids(30, 2)), GREEDY, "A", 30)
    llm._step()
    llm._abort_all([rid])
    stats = llm.stats().retention
    assert stats.pinned_total == 1 and stats.pinned_blocks == before


def test_memory_pressure_releases_pins_before_preempting(make_llm, device):
    llm = make_llm(num_kv_blocks=40)
    for s in range(3):  # three sessions pin 12 blocks each: 36 of 40
        llm.generate(turn(ids(40, s)), GREEDY, session_id=f"S{s}", retention_s=30 + s)
    assert llm.stats().retention.pinned_blocks == 36
    # Two new requests need 26 blocks: pins go, closest to expiry first; nobody is preempted.
    new = [turn(ids(44, 10)), turn(ids(44, 11))]
    outs = llm.generate(new, GREEDY)
    stats = llm.stats()
    assert stats.num_preemptions == 0
    assert stats.retention.pressure_total >= 2
    assert "S0" not in llm.engine.scheduler.retention  # the soonest to expire went first
    fresh = make_llm(enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in fresh.generate(new, GREEDY)]


def test_pressure_never_releases_the_requesting_sessions_own_pin(make_llm):
    llm = make_llm(num_kv_blocks=30)
    a1 = ids(40, 1)
    r1 = llm.generate(turn(a1), GREEDY, session_id="A", retention_s=30)[0]
    llm.generate(turn(ids(40, 2)), GREEDY, session_id="B", retention_s=60)
    a2 = a1 + r1.outputs[0].token_ids + ids(20, 3)
    out = llm.generate(turn(a2), GREEDY, session_id="A", retention_s=30)[0]
    assert out.num_cached_tokens == 47
    assert "B" not in llm.engine.scheduler.retention  # B's pin made room for A's growth


def test_host_offload_restores_a_pressured_session_instead_of_recomputing(make_llm):
    llm = make_llm(num_kv_blocks=40, host_kv_cache_bytes=1 << 20)
    assert llm.stats().host_kv_blocks > 0
    a1 = ids(40, 1)
    ra = llm.generate(turn(a1), GREEDY, session_id="A", retention_s=30)[0]
    # Traffic that needs the whole pool: A's pin is released under pressure and its blocks are offloaded.
    llm.generate([turn(ids(60, 5)), turn(ids(60, 6))], GREEDY)
    stats = llm.stats()
    assert stats.retention.pressure_total == 1
    assert stats.kv_moves.offloaded_blocks > 0
    a2 = a1 + ra.outputs[0].token_ids + ids(6, 7)
    out = llm.generate(turn(a2), GREEDY, session_id="A", retention_s=30)[0]
    stats = llm.stats()
    assert stats.kv_moves.restored_blocks > 0
    assert out.num_cached_tokens == 44  # device hits + restored blocks (the partial block was not kept)
    fresh = make_llm(enable_prefix_caching=False)
    assert out.outputs[0].token_ids == fresh.generate(turn(a2), GREEDY)[0].outputs[0].token_ids


def test_fan_out_branches_copy_the_divergence_block_and_match(make_llm):
    llm = make_llm()
    prefix = ids(42, 1)  # 10 full blocks + 2 tokens of the 11th
    llm.generate(turn(prefix + ids(10, 2)), GREEDY)  # the orchestrator: its blocks are cached
    branches = [turn(prefix + ids(12, 10 + j)) for j in range(4)]
    outs = llm.generate(branches, GREEDY)
    moves = llm.stats().kv_moves
    assert moves.cow_copies >= 4 and moves.cow_tokens >= 4 * 2
    assert all(o.num_cached_tokens >= 42 for o in outs)
    fresh = make_llm(enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in fresh.generate(branches, GREEDY)]


def test_n_greedy_samples_share_everything_and_agree(make_llm):
    llm = make_llm()
    p = turn(ids(23, 4))
    out = llm.generate(p, SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    alone = make_llm(enable_prefix_caching=False).generate(p, GREEDY)[0].outputs[0].token_ids
    assert [o.token_ids for o in out.outputs] == [alone] * 3
    assert out.num_cached_tokens == 22


def record_steps(engine):
    """Wrap the scheduler so every step's (request id, tokens) list is kept."""
    steps = []
    schedule = engine.scheduler.schedule

    def wrapped():
        out = schedule()
        steps.append([(s.request.request_id, s.num_new_tokens) for s in out.seqs])
        return out

    engine.scheduler.schedule = wrapped
    return steps


@pytest.mark.parametrize("chunk", [16, 48])
def test_long_prompt_yields_to_short_requests(make_llm, chunk):
    llm = make_llm(max_num_batched_tokens=128, long_prompt_threshold=64, long_prompt_chunk=chunk,
                   num_kv_blocks=512)
    steps = record_steps(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # The long prompt arrives first; FCFS alone would give it the per-step cap (64) from step one.
    outs = llm.generate([turn(ids(600, 1))] + [turn(ids(30, 10 + i)) for i in range(3)], params)
    long_id = next(rid for step in steps for rid, n in step if n > 30)
    short_busy = [step for step in steps if any(rid != long_id for rid, _ in step)]
    for step in short_busy:
        for pos, (rid, n) in enumerate(step):
            if rid == long_id:
                assert n <= chunk and pos == len(step) - 1, step
    assert max(n for step in steps for rid, n in step if rid == long_id) == 64  # alone: the full cap
    fresh = make_llm(enable_prefix_caching=False)
    alone = [fresh.generate(turn(p), params)[0].outputs[0].token_ids
             for p in [ids(600, 1)] + [ids(30, 10 + i) for i in range(3)]]
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_long_prompt_alone_ramps_up_to_the_full_cap(make_llm):
    llm = make_llm(max_num_batched_tokens=128, long_prompt_threshold=64, long_prompt_chunk=16)
    steps = record_steps(llm.engine)
    llm.generate(turn(ids(300, 1)), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    # The chunk doubles each step it runs alone, up to the cap (half the budget), until the rest
    # is short enough (<= threshold) to go at the cap anyway.
    assert [n for step in steps for _, n in step][:6] == [16, 32, 64, 64, 64, 60]


def test_a_mostly_cached_long_prompt_counts_as_short(make_llm):
    """An agent step resends a long history that is nearly all cached: it must not be treated as a long
    cold prompt (that would let a real one take big chunks beside it)."""
    llm = make_llm(max_num_batched_tokens=128, long_prompt_threshold=64, long_prompt_chunk=16, num_kv_blocks=512)
    history = ids(300, 7)
    llm.generate(turn(history), GREEDY)
    steps = record_steps(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([turn(ids(600, 8)), turn(history + ids(10, 9))], params)
    cold = next(rid for step in steps for rid, n in step if n >= 16)
    first = steps[0]
    assert len(first) == 2 and dict(first)[cold] == 16  # the cached step ran beside a 16-token chunk

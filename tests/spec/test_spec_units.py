"""Speculative decoding pieces without a model: config, n-gram lookup, rejection sampler statistics,
adaptive length, scheduler rollback."""
import math

import numpy as np
import pytest
import torch

from loopserve.config import SchedulerConfig, SpeculativeConfig
from loopserve.engine.kv_cache import KVCacheManager
from loopserve.engine.request import Request
from loopserve.engine.scheduler import Scheduler
from loopserve.sampling_params import SamplingParams
from loopserve.spec.adaptive import AdaptiveLength, expected_tokens
from loopserve.spec.base import TokenView
from loopserve.spec.ngram import ngram_lookup
from loopserve.spec.verify import point_mass_accept, rejection_accept


# ---- config -----------------------------------------------------------------------------------

def test_config_from_dict_and_validation():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
                                       "prompt_lookup_min": 2})
    assert cfg.method == "ngram" and cfg.num_speculative_tokens == 5
    assert SpeculativeConfig.from_dict(None) is None
    assert SpeculativeConfig.from_dict(cfg) is cfg
    with pytest.raises(ValueError, match=r"speculative_config\.method must be one of ngram, draft_model, lookahead"):
        SpeculativeConfig.from_dict({"method": "medusa"})
    with pytest.raises(ValueError, match=r"speculative_config\.method is required"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 3})
    with pytest.raises(ValueError, match=r"unknown field\(s\) bogus; allowed: method"):
        SpeculativeConfig.from_dict({"method": "ngram", "bogus": 1})
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be an integer in \[1, 64\], got 0"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match=r"prompt_lookup_max must be an integer >= prompt_lookup_min \(3\)"):
        SpeculativeConfig.from_dict({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match=r"speculative_config\.model must be a draft model"):
        SpeculativeConfig.from_dict({"method": "draft_model"})
    with pytest.raises(ValueError, match=r"speculative_config\.model must be unset"):
        SpeculativeConfig.from_dict({"method": "ngram", "model": "x"})
    with pytest.raises(ValueError, match="must be a dict"):
        SpeculativeConfig.from_dict("ngram")


# ---- n-gram lookup ----------------------------------------------------------------------------

def test_ngram_lookup_longest_and_most_recent_match():
    arr = np.array([1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 1, 2, 3])
    # suffix (1, 2, 3) of length 3 occurs at 0 -> continues 9, 9, 2
    assert ngram_lookup(arr, 2, 3, 3) == [9, 9, 2]
    # with n <= 2 the most recent (2, 3) is at 5 -> 7, 8, 5
    assert ngram_lookup(arr, 2, 2, 3) == [7, 8, 5]
    assert ngram_lookup(np.array([4, 5, 6, 7]), 1, 3, 3) == []


def test_ngram_lookup_copies_through_its_own_output():
    # Period-1 and period-2 loops still yield k tokens.
    assert ngram_lookup(np.array([3, 7, 7, 7]), 2, 2, 5) == [7, 7, 7, 7, 7]
    assert ngram_lookup(np.array([9, 1, 2, 1, 2]), 2, 2, 5) == [1, 2, 1, 2, 1]


def test_token_view_slices_like_a_list():
    base, extra = [1, 2, 3], [4, 5]
    v = TokenView(base, extra)
    full = base + extra
    assert len(v) == 5 and list(v) == full and v[-1] == 5 and v[3] == 4
    for s in [slice(0, 5), slice(1, 4), slice(3, 5), slice(4, 9), slice(2, 2)]:
        assert v[s] == full[s]


# ---- rejection sampler ------------------------------------------------------------------------

def _chi2_critical(df: int, z: float = 3.29) -> float:
    """Upper quantile of chi-square (alpha ~ 5e-4) by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_follows(counts: np.ndarray, p: np.ndarray) -> None:
    n = counts.sum()
    expected = p * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was emitted"
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    assert chi2 < _chi2_critical(int(keep.sum()) - 1), (chi2, counts, expected)
    assert 0.5 * np.abs(counts / n - p).sum() < 0.03


def _random_dists(gen, rows, vocab, sparse=False):
    logits = torch.randn(rows, vocab, generator=gen) * 1.5
    if sparse:  # a few tokens impossible: proposals outside the target's support must be rejected
        logits[:, :2] = float("-inf")
    return logits.softmax(-1)


@pytest.mark.parametrize("kind", ["draft", "point"])
def test_rejection_sampling_emits_the_target_distribution(kind):
    gen = torch.Generator().manual_seed(0)
    vocab, k, trials = 6, 3, 12000
    p = _random_dists(gen, k + 1, vocab, sparse=True)
    q = _random_dists(gen, k, vocab)
    counts = np.zeros((k + 1, vocab))
    accepted = 0
    for _ in range(trials):
        if kind == "draft":
            proposed = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(k)]
            out = rejection_accept(p, q, proposed, gen)
        else:
            proposed = [3, 2, 5]  # a deterministic guess (n-gram / lookahead)
            out = point_mass_accept(p, proposed, gen, rewind=False)
        assert 1 <= len(out) <= k + 1 and out[:-1] == proposed[:len(out) - 1]
        accepted += len(out) - 1
        for j, t in enumerate(out):
            counts[j, t] += 1
    assert accepted > 0
    # Token j's distribution is p_j (p_j does not depend on earlier tokens here), whichever way it came:
    # an accepted proposal, a residual sample, or the bonus row.
    for j in range(k + 1):
        if counts[j].sum() > 500:
            _assert_follows(counts[j], p[j].numpy())


def test_point_mass_with_seeded_generator_consumes_one_row_per_emitted_token():
    vocab = 50
    p = torch.rand(4, vocab).softmax(-1)
    g1 = torch.Generator().manual_seed(7)
    out = point_mass_accept(p, [1, 2, 3], g1, rewind=True)
    # The same noise the plain sampler would draw, one row per emitted token:
    g2 = torch.Generator().manual_seed(7)
    expect = []
    for j in range(len(out)):
        noise = torch.empty(vocab).uniform_(generator=g2).log_().neg_()
        expect.append(int((p[j] / noise).argmax()))
    assert out == expect
    assert torch.equal(g1.get_state(), g2.get_state())


# ---- adaptive length --------------------------------------------------------------------------

def test_adaptive_length_grows_shrinks_switches_off_and_reprobes():
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=8, reprobe_interval=4)
    ad = AdaptiveLength(cfg)
    st = ad.new_state()
    k0 = ad.length(st)
    for _ in range(10):
        ad.observe(st, ad.length(st), ad.length(st))  # everything accepted
    assert ad.length(st) > k0 and ad.length(st) == 8
    for _ in range(30):
        k = ad.length(st)
        if k:
            ad.observe(st, k, 0)  # nothing accepted
    st.off_steps = 0
    assert ad.length(st) == 0  # acceptance too low to pay: switched off
    lengths = [ad.length(st) for _ in range(4)]
    assert lengths == [0, 0, 1, 0]  # off, a one-token probe, off again (the probe failed too)
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1


def test_adaptive_length_shrinks_with_the_batch():
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=8)
    ad = AdaptiveLength(cfg)
    assert ad.token_cost(1) == pytest.approx(cfg.verify_token_cost)
    assert ad.token_cost(1) < ad.token_cost(8) < ad.token_cost(64) < 1.0
    ks = [ad.best(0.8, b)[0] for b in (1, 4, 16)]
    assert ks[0] > ks[1] >= ks[2] >= 1
    assert ad.best(0.5, 1)[1] > cfg.min_gain > ad.best(0.5, 16)[1]  # pays alone, not in a big batch
    with_draft = AdaptiveLength(cfg, draft_token_cost=0.5)
    assert with_draft.best(0.8, 1)[0] < ks[0]


def test_failed_probes_back_off_exponentially():
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=4, reprobe_interval=4)
    ad = AdaptiveLength(cfg)
    st = ad.new_state()
    st.accepted = 0.0  # nothing is ever accepted
    gaps, off = [], 0
    while len(gaps) < 6:
        k = ad.length(st)
        if k == 0:
            off += 1
            continue
        assert k == 1  # only one-token probes
        ad.observe(st, k, 0)
        gaps.append(off)
        off = 0
    assert gaps == [3, 7, 15, 31, 63, 63]  # each failed probe doubles the pause, up to 2^4 intervals
    st.accepted = st.tried  # acceptance recovers: the next probe succeeds and resets the pause
    while ad.length(st) == 0:
        pass
    assert ad.length(st) > 1 and st.backoff == 0


def test_measured_step_overhead_switches_speculation_off():
    cfg = SpeculativeConfig(method="lookahead", num_speculative_tokens=5)
    ad = AdaptiveLength(cfg)
    rate = 0.3
    assert ad.best(rate, 1)[1] > cfg.min_gain  # the constant model alone says it pays
    for _ in range(10):
        ad.step_cost.record(1, 0, 0.075)   # plain decode step
        ad.step_cost.record(1, 2, 0.110)   # a 2-token verify step costs ~1.47 decodes, not 1.2
    assert ad.step_cost.overhead(1) == pytest.approx(0.110 / 0.075 - 1 - 2 * ad.token_cost(1), abs=1e-6)
    assert ad.best(rate, 1)[1] < cfg.min_gain  # measured: it does not
    assert ad.step_cost.overhead(4) == 0.0  # nothing measured at batch 4: the model alone
    assert ad.best(0.95, 1)[1] > cfg.min_gain  # high acceptance still pays despite the overhead


def test_doubtful_requests_get_plain_steps_until_a_baseline_is_measured():
    from loopserve.engine.request import RequestStatus
    from loopserve.spec.base import Proposal
    from loopserve.spec.decoder import SpecDecoder

    class Echo:
        method, wants_predictions = "ngram", False

        def propose(self, wants):
            return {r.request_id: Proposal([1] * k) for r, k in wants}

    def running(name: str) -> Request:
        r = Request(name, [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), 1024)
        r.status, r.num_computed_tokens = RequestStatus.RUNNING, 2
        return r

    dec = SpecDecoder(SpeculativeConfig(method="ngram", num_speculative_tokens=4), Echo())
    req = running("a")
    dec.states["a"] = st = dec.adaptive.new_state()
    st.accepted, st.tried = 0.4, 1.0  # modelled gain ~1.3: an unmeasured overhead could flip it
    plain = []
    for _ in range(12):
        req.spec_token_ids = []
        dec.propose([req])
        plain.append(not req.spec_token_ids)
    assert plain == [False, False, False, True] * 3
    for _ in range(4):
        dec.adaptive.step_cost.record(1, 0, 0.05)  # the baseline is measured: no more plain steps
    for _ in range(8):
        req.spec_token_ids = []
        dec.propose([req])
        assert req.spec_token_ids
    # A request copying its prompt is never held back, baseline or not.
    dec2 = SpecDecoder(SpeculativeConfig(method="ngram", num_speculative_tokens=4), Echo())
    dec2.states["b"] = dec2.adaptive.new_state()
    dec2.states["b"].accepted = 1.0
    req_b = running("b")
    for _ in range(8):
        req_b.spec_token_ids = []
        dec2.propose([req_b])
        assert req_b.spec_token_ids


def test_adaptive_off_keeps_k_fixed():
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False)
    ad = AdaptiveLength(cfg)
    st = ad.new_state()
    for _ in range(5):
        ad.observe(st, 3, 0)
    assert ad.length(st) == 3


# ---- scheduler rollback -----------------------------------------------------------------------

def _sched(num_blocks=32, budget=64):
    kv = KVCacheManager(num_blocks, 4, True)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=1024,
                          long_prefill_token_threshold=budget)
    return Scheduler(cfg, kv), kv


def test_scheduler_schedules_proposals_and_rolls_back_rejected_ones():
    s, kv = _sched()
    r = Request("a", list(range(10, 19)), SamplingParams(max_tokens=20, ignore_eos=True), 1024)
    s.add(r)
    out = s.schedule()
    s.update(out, {"a": 50})  # prefill: 9 tokens computed, 1 output
    assert r.num_computed_tokens == 9 and r.num_tokens == 10
    r.spec_token_ids = [51, 52, 53, 54, 55, 56]
    out = s.schedule()
    seq = out.seqs[0]
    assert seq.num_new_tokens == 7 and seq.num_spec_tokens == 6 and seq.samples
    assert len(kv.block_ids("a")) == 4  # 16 positions cover 9 + 7
    # Two proposals accepted, then the target's own token.
    s.update(out, {"a": [51, 52, 99]})
    assert r.output_token_ids == [50, 51, 52, 99]
    assert r.num_computed_tokens == 12 and r.num_tokens == 13 and r.spec_token_ids == []
    assert len(kv.block_ids("a")) == 3  # the block that held only rejected tokens was released
    assert kv._num_hashed["a"] == 3  # 12 computed tokens: three full blocks of real tokens
    assert len(r.block_hashes) == 3  # hashes only ever cover computed (accepted) tokens


def test_scheduler_trims_proposals_to_budget_max_tokens_and_stops_inside_runs():
    s, kv = _sched(budget=4)
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[77]), 1024)
    s.add(r)
    s.update(s.schedule(), {"a": 5})
    r.spec_token_ids = [6, 7, 8, 9, 10, 11]
    out = s.schedule()
    assert out.seqs[0].num_spec_tokens == 3  # the budget of 4 leaves 3 after the known token
    s.update(out, {"a": [6, 7, 8, 9]})
    assert r.num_output_tokens == 5 and r.status.finished  # max_tokens reached exactly
    r2 = Request("b", [1, 2, 3], SamplingParams(max_tokens=20, stop_token_ids=[77]), 1024)
    s.add(r2)
    s.update(s.schedule(), {"b": 5})
    r2.spec_token_ids = [77, 8, 9]
    out = s.schedule()
    finished = s.update(out, {"b": [77, 8, 9, 4]})
    assert finished == [r2] and r2.output_token_ids == [5, 77] and r2.stop_reason == 77
    assert kv.num_free_blocks == kv.num_blocks


def test_room_for_max_tokens_limits_proposals():
    s, _ = _sched()
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), 1024)
    s.add(r)
    s.update(s.schedule(), {"a": 5})
    r.spec_token_ids = [6, 7, 8, 9]
    out = s.schedule()
    assert out.seqs[0].num_spec_tokens == 1  # 2 outputs left: one proposal + the target's token


# ---- batched short-query attention (verify passes) ----------------------------------------------

def test_short_query_attention_batched_matches_per_sequence(monkeypatch):
    import loopserve.attention.torch_ref as ref
    from loopserve.attention.metadata import AttentionMetadata, KVCache

    gen = torch.Generator().manual_seed(0)
    bs, nblocks, hq, hkv, d = 4, 32, 4, 2, 8
    new = [2, 6, 1, 3, 40]     # verify passes, a decode, and a long prefill chunk in one batch
    total = [9, 14, 5, 3, 45]  # the 4th has no cached context, the 5th is long: both stay per-sequence
    cache = KVCache(torch.randn(nblocks, bs, hkv, d, generator=gen), torch.randn(nblocks, bs, hkv, d, generator=gen))
    tables, slots, start, nxt = [], [], [0], 0
    for n, t in zip(new, total):
        ids = list(range(nxt, nxt + -(-t // bs)))
        nxt += len(ids)
        tables.append(ids + [0] * (12 - len(ids)))
        slots += [ids[p // bs] * bs + p % bs for p in range(t - n, t)]
        start.append(start[-1] + n)
    T = start[-1]
    q, k, v = (torch.randn(T, h, d, generator=gen) for h in (hq, hkv, hkv))

    def run():
        meta = AttentionMetadata(start, total, torch.tensor(slots), torch.tensor(tables),
                                 decode_indices=[2], prefill_indices=[0, 1, 3, 4])
        c = KVCache(cache.key.clone(), cache.value.clone())
        return ref.TorchPagedAttention().forward(q, k, v, c, meta, d ** -0.5), meta

    batched, meta = run()
    assert meta.derived["short"] and meta.derived["short"][0] == {0, 1}
    monkeypatch.setattr(ref, "SHORT_QUERY", 0)
    alone, meta = run()
    assert meta.derived["short"] == ()
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_heads_outer_cache_layout_matches_the_blocks_first_one():
    """The CPU layout (KVCache.heads_outer) gives the same attention as the blocks-first one on a batch
    mixing decodes (several), short verify passes and prefill chunks over cached context."""
    from loopserve.attention.metadata import AttentionMetadata, KVCache
    from loopserve.attention.torch_ref import TorchPagedAttention

    gen = torch.Generator().manual_seed(1)
    bs, nblocks, hq, hkv, d = 4, 48, 6, 2, 8
    new = [1, 3, 1, 5, 20, 1]
    total = [17, 11, 6, 9, 31, 2]
    pool_k, pool_v = (torch.randn(nblocks, bs, hkv, d, generator=gen) for _ in range(2))
    tables, slots, start, nxt = [], [], [0], 0
    for n, t in zip(new, total):
        ids = list(range(nxt, nxt + -(-t // bs)))
        nxt += len(ids)
        tables.append(ids + [0] * (12 - len(ids)))
        slots += [ids[p // bs] * bs + p % bs for p in range(t - n, t)]
        start.append(start[-1] + n)
    T = start[-1]
    q, k, v = (torch.randn(T, h, d, generator=gen) for h in (hq, hkv, hkv))

    def run(heads_outer):
        meta = AttentionMetadata(start, total, torch.tensor(slots), torch.tensor(tables),
                                 decode_indices=[0, 2, 5], prefill_indices=[1, 3, 4])
        if heads_outer:
            cache = KVCache(pool_k.permute(2, 0, 1, 3).contiguous(), pool_v.permute(2, 0, 1, 3).contiguous(), True)
        else:
            cache = KVCache(pool_k.clone(), pool_v.clone())
        out = TorchPagedAttention().forward(q, k, v, cache, meta, d ** -0.5)
        written = cache.key.permute(1, 2, 0, 3) if heads_outer else cache.key
        return out, written

    (a, ka), (b, kb) = run(False), run(True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ka, kb)  # new keys land in the same slots

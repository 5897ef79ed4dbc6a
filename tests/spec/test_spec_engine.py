"""Speculative decoding end to end on tiny random models: lossless greedy output with every proposer,
rollback without leaks or poisoned prefix-cache blocks, preemption, stops, logprobs, seeds, sampling."""
import random

import pytest

from loopserve import SamplingParams
from loopserve.spec.base import Proposal

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def prompts(n, seed=0, lo=3, hi=40, repeat=True):
    """Random token prompts; with `repeat`, half of them repeat a chunk (n-gram lookup finds it)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))]
        if repeat and i % 2:
            ids = ids + ids[: max(2, len(ids) // 2)]
        out.append({"prompt_token_ids": ids})
    return out


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def spec_configs(tiny_llama, tiny_draft):
    return {
        "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 1},
        "lookahead": {"method": "lookahead", "num_speculative_tokens": 5},
        "draft": {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": 4},
        "self_draft": {"method": "draft_model", "model": str(tiny_llama), "num_speculative_tokens": 4},
    }


# Speculate at every step whatever the acceptance, and at any batch size: the tests are about correctness.
ALWAYS = {"adaptive": False, "disable_by_batch_size": 1000}


class OracleProposer:
    """Proposes a known continuation with some tokens deliberately wrong: exercises accept + reject."""
    method = "oracle"
    wants_predictions = False

    def __init__(self, continuations, corrupt_every=3, k=4):
        self.cont = continuations  # prompt tuple -> full greedy output
        self.corrupt_every = corrupt_every
        self.k = k
        self.calls = 0

    def propose(self, wants):
        out = {}
        for req, k in wants:
            full = self.cont.get(tuple(req.prompt_token_ids))
            if full is None:
                continue
            toks = list(full[req.num_output_tokens:req.num_output_tokens + k])
            self.calls += 1
            if toks and self.corrupt_every and self.calls % self.corrupt_every == 0:
                toks[len(toks) // 2] = (toks[len(toks) // 2] + 1) % 300
            if toks:
                out[req.request_id] = Proposal(toks)
        return out

    def observe(self, *a):
        pass

    def release(self, rid):
        pass


def with_oracle(llm, continuations, **kw):
    llm.engine.spec.proposer = OracleProposer(continuations, **kw)
    return llm


# ---- greedy: identical output ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ngram", "lookahead", "draft", "self_draft"])
@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_output_identical(make_llm, tiny_llama, tiny_draft, method, batch):
    ps = prompts(batch if batch > 1 else 4, seed=batch)
    ref = token_ids(make_llm().generate(ps, GREEDY))
    cfg = {**spec_configs(tiny_llama, tiny_draft)[method], **ALWAYS}
    llm = make_llm(speculative_config=cfg)
    if batch == 1:
        assert [token_ids(llm.generate(p, GREEDY))[0] for p in ps] == ref
    else:
        assert token_ids(llm.generate(ps, GREEDY)) == ref
    st = llm.stats().spec_decode
    assert st.method == spec_configs(tiny_llama, tiny_draft)[method]["method"]
    if method != "ngram":
        assert st.num_draft_tokens > 0
    if method == "self_draft":  # the target drafting for itself: everything is accepted
        assert st.acceptance_rate == 1.0 and st.mean_accepted_length > 4


def test_ngram_on_looping_text_accepts_and_saves_forwards(make_llm, looping_model):
    ps = prompts(4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ref = token_ids(make_llm(model=looping_model).generate(ps, params))
    # Adaptive speculation weighs measured step times, which CPU contention (xdist) skews: it failed
    # this test once beside another worker. The acceptance asked for is the proposer's, so speculation
    # stays on.
    llm = make_llm(model=looping_model,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 5, **ALWAYS})
    assert token_ids(llm.generate(ps, params)) == ref
    st = llm.stats().spec_decode
    assert st.num_accepted_tokens > 50 and st.acceptance_rate > 0.5 and st.mean_accepted_length > 2.0


@pytest.mark.parametrize("method", ["lookahead", "ngram"])
def test_lookahead_and_ngram_find_the_cycle(make_llm, looping_model, method):
    ps = prompts(2, seed=4, repeat=False)
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    ref = token_ids(make_llm(model=looping_model).generate(ps, params))
    # Adaptive speculation weighs measured step times, which CPU contention (xdist) skews: this test is
    # about the proposers finding the cycle, so speculation stays on.
    llm = make_llm(model=looping_model,
                   speculative_config={"method": method, "num_speculative_tokens": 4, **ALWAYS})
    assert token_ids(llm.generate(ps, params)) == ref
    assert llm.stats().spec_decode.num_accepted_tokens > 20


def test_oracle_with_wrong_tokens_rolls_back_and_matches(make_llm):
    ps = prompts(8, seed=5)
    ref = token_ids(make_llm().generate(ps, GREEDY))
    conts = {tuple(p["prompt_token_ids"]): r for p, r in zip(ps, ref)}
    llm = with_oracle(make_llm(speculative_config={"method": "ngram", **ALWAYS}), conts)
    assert token_ids(llm.generate(ps, GREEDY)) == ref
    st = llm.stats().spec_decode
    assert st.num_accepted_tokens > 0 and st.num_accepted_tokens < st.num_draft_tokens  # both paths taken


# ---- rollback vs the prefix cache ----------------------------------------------------------------

def test_rejected_tokens_never_reach_the_prefix_cache(make_llm):
    p = prompts(1, seed=6, lo=30, hi=30, repeat=False)[0]
    fresh = make_llm(enable_prefix_caching=False)
    ref = token_ids(fresh.generate(p, GREEDY))[0]
    # Every proposal wrong in its middle: rejected tokens get KV written into blocks of the request.
    llm = with_oracle(make_llm(speculative_config={"method": "ngram", **ALWAYS}),
                      {tuple(p["prompt_token_ids"]): ref}, corrupt_every=1)
    assert token_ids(llm.generate(p, GREEDY))[0] == ref
    assert llm.stats().spec_decode.num_draft_tokens > llm.stats().spec_decode.num_accepted_tokens
    # A later request extending prompt + output hits the blocks cached from that run (prompt and
    # generated ones) and must continue exactly as a cache-less engine does.
    ext = {"prompt_token_ids": p["prompt_token_ids"] + ref + [5, 6, 7]}
    hit = llm.generate(ext, GREEDY)[0]
    assert hit.num_cached_tokens >= 48
    assert hit.outputs[0].token_ids == token_ids(fresh.generate(ext, GREEDY))[0]


# ---- preemption, chunked prefill, mixed batches ---------------------------------------------------

@pytest.mark.parametrize("method", ["self_draft", "ngram"])
def test_preemption_during_speculation(make_llm, tiny_llama, tiny_draft, method):
    ps = prompts(16, seed=7)
    ref = token_ids(make_llm().generate(ps, GREEDY))
    cfg = {**spec_configs(tiny_llama, tiny_draft)[method], **ALWAYS}
    llm = make_llm(num_kv_blocks=28, max_num_seqs=16, speculative_config=cfg)
    assert token_ids(llm.generate(ps, GREEDY)) == ref
    assert llm.stats().num_preemptions > 0


def test_chunked_prefill_and_tiny_budget(make_llm, tiny_llama):
    ps = prompts(8, seed=8)
    ref = token_ids(make_llm().generate(ps, GREEDY))
    cfg = {"method": "draft_model", "model": str(tiny_llama), **ALWAYS}
    llm = make_llm(max_num_batched_tokens=6, long_prefill_token_threshold=3, speculative_config=cfg)
    assert token_ids(llm.generate(ps, GREEDY)) == ref
    assert llm.stats().spec_decode.num_accepted_tokens > 0


def test_mixed_batch_greedy_sampling_logprobs_penalties(make_llm, tiny_llama):
    """Greedy rows with penalties see the proposed tokens before them as output (so the verify rows are
    processed exactly as one-token steps would be); sampling and logprob rows share the batch."""
    ps = prompts(16, seed=9)
    kinds = [GREEDY,
             SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.3)]
    params = [kinds[i % 4] for i in range(16)]
    ref = make_llm().generate(ps, params)
    llm = make_llm(speculative_config={"method": "draft_model", "model": str(tiny_llama), **ALWAYS})
    got = llm.generate(ps, params)
    assert llm.stats().spec_decode.num_accepted_tokens > 0
    for i, (r, g) in enumerate(zip(ref, got)):
        assert len(g.outputs[0].token_ids) == 24
        if i % 4 != 1:
            assert g.outputs[0].token_ids == r.outputs[0].token_ids
        if i % 4 == 2:
            for a, b in zip(r.outputs[0].logprobs, g.outputs[0].logprobs):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
            assert g.outputs[0].cumulative_logprob == pytest.approx(r.outputs[0].cumulative_logprob, abs=1e-3)


# ---- stops inside accepted runs ------------------------------------------------------------------

def test_stops_inside_accepted_runs(make_llm, tiny_llama):
    """The target drafting for itself accepts every proposal, so each stop lands inside a run."""
    p = prompts(1, seed=2, repeat=False)[0]
    plain = make_llm()
    llm = make_llm(speculative_config={"method": "draft_model", "model": str(tiny_llama),
                                       "num_speculative_tokens": 5, **ALWAYS})
    free = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert free.token_ids == plain.generate(p, SamplingParams(temperature=0, max_tokens=20,
                                                              ignore_eos=True))[0].outputs[0].token_ids
    for max_tokens in (1, 2, 7, 11):
        o = llm.generate(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0].outputs[0]
        assert o.token_ids == free.token_ids[:max_tokens] and o.finish_reason == "length"
    tok = free.token_ids[3]
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tok]))[0]
    o = o.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == tok
    assert o.token_ids == free.token_ids[:free.token_ids.index(tok) + 1]
    stop = free.text[4:7]
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    ref = plain.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.text == ref.text and o.token_ids == ref.token_ids
    # EOS: make the 5th generated token the engine's EOS.
    for engine in (llm.engine, plain.engine):
        engine.eos_token_ids = (free.token_ids[4],)
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert o.finish_reason == "stop" and o.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[4]) + 1]
    assert o.token_ids == plain.generate(p, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].token_ids
    # min_tokens masks EOS in the verify rows before it is reached, as the plain sampler does.
    minned = SamplingParams(temperature=0, max_tokens=20, min_tokens=8)
    o = llm.generate(p, minned)[0].outputs[0]
    assert o.token_ids == plain.generate(p, minned)[0].outputs[0].token_ids and len(o.token_ids) >= 8
    assert llm.stats().spec_decode.num_accepted_tokens > 0


# ---- seeds and sampling --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ngram", "lookahead", "oracle"])
def test_seeded_sampling_with_deterministic_proposals_equals_plain(make_llm, method, looping_model):
    """Point-mass verification draws one row of the request's noise per emitted token, as the plain
    sampler does: a seeded request samples exactly the tokens it samples without speculation."""
    ps = prompts(6, seed=10)
    # Low temperature on the looping model: mostly cycles (proposals accepted), sometimes not (rejected).
    params = [SamplingParams(temperature=0.3, top_k=20, max_tokens=40, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    model = looping_model if method != "oracle" else None
    kw = {"model": model} if model else {}
    ref = token_ids(make_llm(**kw).generate(ps, params))
    cfg = {"method": "lookahead"} if method == "lookahead" else {"method": "ngram", "prompt_lookup_min": 1}
    llm = make_llm(speculative_config={**cfg, **ALWAYS}, **kw)
    if method == "oracle":
        with_oracle(llm, {tuple(p["prompt_token_ids"]): r for p, r in zip(ps, ref)})
    assert token_ids(llm.generate(ps, params)) == ref
    assert llm.stats().spec_decode.num_accepted_tokens > 0


def test_seeded_sampling_with_draft_model_is_reproducible(make_llm, tiny_draft):
    ps = prompts(5, seed=11)
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=7, ignore_eos=True)
    cfg = {"method": "draft_model", "model": str(tiny_draft), **ALWAYS}
    llm = make_llm(speculative_config=cfg)
    alone = token_ids(llm.generate(ps[0], params))[0]
    noisy = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 4
    mixed = token_ids(llm.generate(ps[1:] + [ps[0]], noisy + [params]))
    assert mixed[-1] == alone
    assert token_ids(make_llm(speculative_config=cfg).generate(ps[0], params))[0] == alone


def _chi2_ok(counts: dict, probs: dict, n: int) -> bool:
    import math
    cells = [c for c in probs if probs[c] * n >= 5]
    chi2 = sum((counts.get(c, 0) - probs[c] * n) ** 2 / (probs[c] * n) for c in cells)
    rest = n - sum(counts.get(c, 0) for c in cells)
    rest_p = 1 - sum(probs[c] for c in cells)
    if rest_p * n >= 5:
        chi2 += (rest - rest_p * n) ** 2 / (rest_p * n)
        df = len(cells)
    else:
        df = len(cells) - 1
    crit = df * (1 - 2 / (9 * df) + 3.29 * math.sqrt(2 / (9 * df))) ** 3
    return chi2 < crit


@pytest.mark.parametrize("method", ["draft", "ngram_oracle"])
def test_sampled_sequences_follow_the_target_distribution(make_llm, near_draft, method):
    """Joint distribution of four sampled tokens (top-k 2: 16 outcomes) against the exact target
    probabilities, for a real draft distribution q and for deterministic proposals. Token 1 comes from
    the prefill; tokens 2-4 from verify passes (k <= 2), through acceptance, residual and bonus draws."""
    import itertools
    import math

    p = prompts(1, seed=12, repeat=False)[0]["prompt_token_ids"]
    plain = make_llm()
    top, length = 2, 4
    lp_params = SamplingParams(temperature=0, max_tokens=1, logprobs=top, ignore_eos=True)
    cache: dict = {}

    def dist(prefix):
        if prefix not in cache:
            entry = plain.generate({"prompt_token_ids": p + list(prefix)}, lp_params)[0].outputs[0].logprobs[0]
            best = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top]
            z = sum(math.exp(v.logprob) for _, v in best)
            cache[prefix] = {t: math.exp(v.logprob) / z for t, v in best}
        return cache[prefix]

    joint = {(): 1.0}
    for _ in range(length):
        joint = {seq + (t,): pr * pt for seq, pr in joint.items() for t, pt in dist(seq).items()}
    if method == "draft":
        cfg = {"method": "draft_model", "model": str(near_draft), "num_speculative_tokens": 2, **ALWAYS}
    else:
        cfg = {"method": "ngram", "num_speculative_tokens": 2, **ALWAYS}
    llm = make_llm(num_kv_blocks=4096, max_num_seqs=256, max_num_batched_tokens=4096, speculative_config=cfg)
    if method != "draft":
        greedy = tuple(next(iter(itertools.islice(sorted(joint, key=joint.get, reverse=True), 1))))
        with_oracle(llm, {tuple(p): list(greedy)}, corrupt_every=0)
    n = 1500
    outs = llm.generate([{"prompt_token_ids": p}] * n,
                        SamplingParams(temperature=1.0, top_k=top, max_tokens=length, ignore_eos=True))
    counts: dict = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(joint)
    st = llm.stats().spec_decode
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens
    assert _chi2_ok(counts, joint, n), (counts, {k: round(v * n) for k, v in joint.items()})


def test_verify_passes_through_the_prefill_graph_layout(make_llm, with_prefill_graphs):
    """Speculative verify steps (k + 1 logits rows, some proposals wrong) through the static layout a
    prefill graph replays (Triton attention in the interpreter on CPU): the plain engine's tokens."""
    ps = prompts(1, seed=5)
    ref = token_ids(make_llm().generate(ps, GREEDY))
    conts = {tuple(p["prompt_token_ids"]): r for p, r in zip(ps, ref)}
    llm = with_oracle(make_llm(attention_backend="triton", enforce_eager=True,
                               speculative_config={"method": "ngram", **ALWAYS}), conts)
    served = with_prefill_graphs(llm, sizes=[8, 64], max_seqs=8)
    assert token_ids(llm.generate(ps, GREEDY)) == ref
    assert llm.stats().spec_decode.num_drafts >= 3 and (0, 8, False) in served  # 5-token verify steps

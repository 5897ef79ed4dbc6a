"""Sampler: greedy, seeded reproducibility, truncation (top-k/top-p/min-p), distribution, penalties,
min_tokens, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from loopserve.runner.sampler import SampledToken, Sampler, SamplingRow
from loopserve.sampling_params import SamplingParams

EOS = 3


def row(params=None, prompt=(), output=(), generator=None, **kw):
    return SamplingRow(params or SamplingParams(**kw), list(prompt), list(output), generator)


def tv_distance(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def draws(sampler, logits_row, n, **params):
    """n independent samples of one logits row (one batch of n identical rows, shared generator)."""
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    p = SamplingParams(**params)
    out = sampler.sample(logits, [row(p) for _ in range(n)])
    return torch.tensor([o.token_id for o in out])


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    s = Sampler([EOS])
    out = s.sample(logits, [row(temperature=0.0) for _ in range(6)])
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()
    assert all(isinstance(o, SampledToken) and o.logprob is None and o.top_logprobs is None and o.rank is None
               for o in out)


def test_precomputed_argmax_serves_only_plain_greedy_steps():
    """A decode graph's own argmax (greedy_ids) is the step's tokens when every row is greedy with
    nothing to edit; a row that samples, penalises or asks for logprobs makes the sampler work from
    the logits."""
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    stand_in = torch.tensor([7, 8, 9])  # not the argmax: shows which one was used
    s = Sampler([EOS])
    plain = s.sample_batch(logits, [row(temperature=0.0)] * 3, greedy_ids=stand_in)
    assert plain.token_ids is stand_in
    for edited in (dict(temperature=0.0, logprobs=1), dict(temperature=0.0, repetition_penalty=1.3),
                   dict(temperature=0.0, presence_penalty=0.5), dict(temperature=0.9, seed=1)):
        rows = [row(temperature=0.0), row(output=[4], **edited), row(temperature=0.0)]
        got = [t.token_id for t in s.sample_batch(logits, rows, greedy_ids=stand_in).tokens()]
        assert got[0] == logits[0].argmax().item() and got[2] == logits[2].argmax().item(), edited


def test_greedy_tie_takes_first_and_input_not_modified():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    before = logits.clone()
    s = Sampler([EOS])
    assert s.sample(logits, [row(temperature=0.0, repetition_penalty=1.5, prompt=[0])])[0].token_id == 1
    s.sample(logits, [row(temperature=1.0, top_p=0.5, min_p=0.1, presence_penalty=1.0, output=[1],
                          min_tokens=5, logprobs=2)])
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    s = Sampler([EOS], seed=123)
    out = s.sample(logits, [row(temperature=1.3, top_k=1) for _ in range(8)])
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_and_sampled():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    s = Sampler([EOS])
    rows = [row(temperature=0.0), row(temperature=1.0, top_k=2), row(temperature=0.0), row(temperature=0.8)]
    out = s.sample(logits, rows)
    assert out[0].token_id == logits[0].argmax().item()
    assert out[2].token_id == logits[2].argmax().item()
    assert out[1].token_id in logits[1].topk(2).indices.tolist()
    assert 0 <= out[3].token_id < 30


def test_seeded_rows_reproducible_regardless_of_batch():
    torch.manual_seed(3)
    steps, vocab = 12, 64
    all_logits = torch.randn(steps, 5, vocab)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, min_p=0.01, seed=42)

    def run(batch_fn):
        s = Sampler([EOS], seed=999)
        gen = Sampler.make_generator(42, "cpu")
        toks = []
        for t in range(steps):
            rows, pos = batch_fn(t, gen)
            logits = all_logits[t].clone()
            logits[pos] = all_logits[t, 0]  # the seeded request always sees the same logits
            toks.append(s.sample(logits[:len(rows)], rows)[pos].token_id)
        return toks

    alone = run(lambda t, g: ([row(params, generator=g)], 0))
    # Batched with unseeded and differently-seeded rows, at a position that changes every step.
    def crowded(t, g):
        others = [row(temperature=0.7), row(temperature=0.0),
                  row(temperature=1.0, generator=Sampler.make_generator(t, "cpu"))]
        pos = t % 4
        rows = others[:pos] + [row(params, generator=g)] + others[pos:]
        return rows, pos
    crowd = run(crowded)
    assert alone == crowd
    # A different seed gives a different stream (overwhelmingly likely over 12 steps).
    s = Sampler([EOS])
    g2 = Sampler.make_generator(43, "cpu")
    other = [s.sample(all_logits[t, :1], [row(params, generator=g2)])[0].token_id for t in range(steps)]
    assert other != alone


def test_unseeded_rows_follow_sampler_seed():
    logits = torch.randn(4, 40)
    a = [o.token_id for o in Sampler([EOS], seed=7).sample(logits, [row() for _ in range(4)])]
    b = [o.token_id for o in Sampler([EOS], seed=7).sample(logits, [row() for _ in range(4)])]
    assert a == b


def test_top_k_never_outside():
    torch.manual_seed(4)
    logits = torch.randn(40)
    s = Sampler([EOS])
    got = draws(s, logits, 4000, temperature=1.5, top_k=5)
    allowed = set(logits.topk(5).indices.tolist())
    assert set(got.tolist()) <= allowed
    assert len(set(got.tolist())) == 5


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_never_outside(top_p):
    torch.manual_seed(5)
    logits = torch.randn(40) * 2
    s = Sampler([EOS])
    got = draws(s, logits, 4000, temperature=1.0, top_p=top_p)
    probs = logits.softmax(-1)
    sp, order = probs.sort(descending=True)
    keep = int(((sp.cumsum(0) - sp) < top_p).sum())  # smallest prefix with mass >= top_p
    allowed = set(order[:keep].tolist())
    assert set(got.tolist()) <= allowed
    # and the kept set is sampled in proportion to the renormalised probabilities
    counts = torch.bincount(got, minlength=40).float()
    ref = torch.zeros(40)
    ref[order[:keep]] = sp[:keep] / sp[:keep].sum()
    assert tv_distance(counts, ref) < 0.05


def test_min_p_never_outside():
    torch.manual_seed(6)
    logits = torch.randn(40) * 2
    s = Sampler([EOS])
    got = draws(s, logits, 4000, temperature=1.0, min_p=0.2)
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert set(got.tolist()) <= allowed


def test_top_k_top_p_combined():
    torch.manual_seed(7)
    logits = torch.randn(40)
    s = Sampler([EOS])
    got = draws(s, logits, 3000, temperature=1.0, top_k=10, top_p=0.5)
    # top-p applies to the renormalised top-k distribution
    vals, idx = logits.topk(10)
    p = vals.softmax(-1)
    keep = int(((p.cumsum(0) - p) < 0.5).sum())
    assert set(got.tolist()) <= set(idx[:keep].tolist())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5, 0.2])
    s = Sampler([EOS], seed=11)
    n = 40000
    got = draws(s, logits, n, temperature=temperature)
    counts = torch.bincount(got, minlength=8).float()
    expected = (logits / temperature).softmax(-1)
    assert tv_distance(counts, expected) < 0.015


def test_distribution_with_per_row_generators():
    logits = torch.tensor([0.3, -0.2, 1.0, 0.0, 0.7])
    s = Sampler([EOS])
    n = 6000
    rows = [row(temperature=1.0, generator=Sampler.make_generator(i, "cpu")) for i in range(n)]
    got = torch.tensor([o.token_id for o in s.sample(logits.repeat(n, 1), rows)])
    counts = torch.bincount(got, minlength=5).float()
    assert tv_distance(counts, logits.softmax(-1)) < 0.03


def test_repetition_penalty_formula():
    s = Sampler([EOS])
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]])
    r = row(repetition_penalty=2.0, prompt=[0, 1], output=[5, 1])
    out = s.process_logits(logits, [r])
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.5, 0.0]]))


def test_presence_frequency_penalty_formula():
    s = Sampler([EOS])
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    # output counts: token 1 x3, token 2 x1; prompt tokens do not count
    r = row(presence_penalty=0.5, frequency_penalty=0.25, prompt=[0, 0, 4], output=[1, 2, 1, 1])
    out = s.process_logits(logits, [r])
    expected = torch.tensor([[1.0, 1.0 - 3 * 0.25 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0]])
    assert torch.allclose(out, expected)
    # negative penalties encourage repetition
    r = row(presence_penalty=-1.0, frequency_penalty=-0.5, output=[3, 3])
    assert torch.allclose(s.process_logits(logits, [r]), torch.tensor([[1.0, 1.0, 1.0, 3.0, 1.0]]))


def test_penalties_vectorised_per_row():
    s = Sampler([EOS])
    logits = torch.full((3, 4), 2.0)
    rows = [row(repetition_penalty=2.0, output=[1]), row(), row(frequency_penalty=1.0, output=[2, 2])]
    out = s.process_logits(logits, rows)
    assert torch.allclose(out, torch.tensor([[2.0, 1.0, 2.0, 2.0], [2.0] * 4, [2.0, 2.0, 0.0, 2.0]]))


def test_penalties_affect_greedy_choice():
    s = Sampler([EOS])
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    assert s.sample(logits, [row(temperature=0.0, output=[0])])[0].token_id == 0
    assert s.sample(logits, [row(temperature=0.0, output=[0], repetition_penalty=2.0)])[0].token_id == 1
    assert s.sample(logits, [row(temperature=0.0, output=[0, 0], frequency_penalty=1.0)])[0].token_id == 1


def test_min_tokens_blocks_eos_and_stop_ids():
    s = Sampler([EOS, 7])
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 5] = 8.0
    logits[0, 2] = 7.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    assert s.sample(logits, [row(p, output=[1])])[0].token_id == 2  # eos ids and stop ids masked
    assert s.sample(logits, [row(p, output=[1, 1, 1])])[0].token_id == EOS  # min_tokens reached
    # ignore_eos: EOS not masked by min_tokens (the stop id still is)
    p2 = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert s.sample(logits, [row(p2, output=[])])[0].token_id == EOS
    # sampled rows too: EOS never drawn while blocked
    p3 = SamplingParams(temperature=1.0, min_tokens=2)
    got = [o.token_id for o in s.sample(logits.repeat(500, 1), [row(p3, output=[1]) for _ in range(500)])]
    assert EOS not in got and 7 not in got


def test_logprobs_raw_and_ranks():
    torch.manual_seed(8)
    logits = torch.randn(3, 30)
    s = Sampler([EOS])
    rows = [row(temperature=0.0, logprobs=5, repetition_penalty=1.7, prompt=[1, 2]),
            row(temperature=0.9, top_k=10, logprobs=0),
            row(temperature=0.5)]
    out = s.sample(logits, rows)
    lp = torch.log_softmax(logits, -1)
    for i in (0, 1):
        o = out[i]
        assert o.logprob == pytest.approx(lp[i, o.token_id].item(), abs=1e-5)
        assert o.rank == int((lp[i] > lp[i, o.token_id]).sum()) + 1
    top = out[0].top_logprobs
    ref_v, ref_i = lp[0].topk(5)
    assert [t for t, _ in top] == ref_i.tolist()
    assert [v for _, v in top] == pytest.approx(ref_v.tolist(), abs=1e-5)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs is None and out[2].rank is None
    # greedy without penalties: the argmax has rank 1
    o = s.sample(logits[:1], [row(temperature=0.0, logprobs=1)])[0]
    assert o.rank == 1 and o.top_logprobs[0][0] == o.token_id


def test_nan_and_degenerate_rows_are_safe():
    s = Sampler([EOS])
    v = 16
    nan_row = torch.randn(v)
    nan_row[3] = float("nan")
    all_masked = torch.full((v,), float("-inf"))
    pos_inf = torch.zeros(v)
    pos_inf[9] = float("inf")
    logits = torch.stack([nan_row, all_masked, pos_inf, torch.zeros(v)])
    out = s.sample(logits, [row(temperature=1.0, top_p=0.9) for _ in range(4)])
    assert all(0 <= o.token_id < v for o in out)
    assert out[0].token_id != 3  # NaN is never sampled
    assert out[2].token_id == 9  # +inf takes all the mass
    out = s.sample(logits, [row(temperature=1.0) for _ in range(4)])
    assert out[0].token_id != 3 and out[2].token_id == 9
    out = s.sample(logits, [row(temperature=0.0) for _ in range(4)])
    assert all(0 <= o.token_id < v for o in out)


def test_zero_noise_never_picks_masked_token(monkeypatch):
    # Noise of exactly 0 (U = 1) must not let a zero-probability token win through 0/0 = NaN.
    s = Sampler([EOS])
    logits = torch.tensor([[float("-inf"), 0.0, 1.0]])
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.fill_(1.0))
    assert s.sample(logits, [row(temperature=1.0)])[0].token_id in (1, 2)
    g = Sampler.make_generator(0, "cpu")
    assert s.sample(logits.repeat(2, 1), [row(temperature=1.0, generator=g), row(temperature=0.5)])[0].token_id \
        in (1, 2)


def test_bf16_logits_and_empty_batch():
    s = Sampler([EOS])
    assert s.sample(torch.zeros(0, 10), []) == []
    logits = torch.randn(2, 20).to(torch.bfloat16)
    out = s.sample(logits, [row(temperature=0.0), row(temperature=0.7, logprobs=2)])
    assert out[0].token_id == logits[0].float().argmax().item()
    assert math.isfinite(out[1].logprob)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        Sampler([EOS]).sample(torch.zeros(2, 5), [row()])


def _reference_allowed(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Full-sort reference for one row: bool mask of the tokens top-k then top-p keep."""
    x = x.double()
    order = x.argsort(descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    k = top_k if top_k > 0 else x.numel()
    cand = order[:k]
    p = x[cand].softmax(-1)
    cum_before = p.cumsum(0) - p
    n = max(1, int((cum_before < top_p).sum()))
    keep[cand[:n]] = True
    return keep


@pytest.mark.parametrize("candidates", [4, 16, 64, 1024])
def test_top_k_top_p_match_full_sort_reference(monkeypatch, candidates):
    # The top-p fast path looks at TOP_P_CANDIDATES tokens and falls back to a full sort when the
    # nucleus does not fit; both must agree with a plain full-sort implementation. 64 is the whole
    # vocab: the CUDA path (one sort, no fallback and so no read-back).
    import loopserve.runner.sampler as sampler_mod
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(9)
    vocab = 64
    specs = [(-1, 0.3), (-1, 0.9), (-1, 0.99), (5, 0.9), (40, 0.95), (8, 1.0), (-1, 1.0), (1, 0.5), (30, 0.2)]
    scales = [0.5, 1.0, 3.0, 8.0]
    x = torch.randn(len(specs) * len(scales), vocab, generator=gen)
    rows_k, rows_p = [], []
    for i, (k, p) in enumerate(specs * len(scales)):
        x[i] *= scales[i // len(specs)]
        rows_k.append(k if k > 0 else vocab)
        rows_p.append(p)
    thr = Sampler._top_k_top_p_threshold(x, rows_k, rows_p)
    got = x >= thr
    for i in range(x.shape[0]):
        ref = _reference_allowed(x[i], rows_k[i] if rows_k[i] < vocab else -1, rows_p[i])
        assert torch.equal(got[i], ref), (i, rows_k[i], rows_p[i], int(got[i].sum()), int(ref.sum()))
    # and sampling only ever returns allowed tokens
    s = Sampler([EOS])
    rows = [row(temperature=1.0, top_k=k if k < vocab else -1, top_p=p) for k, p in zip(rows_k, rows_p)]
    for _ in range(20):
        out = s.sample(x, rows)
        assert all(got[i, o.token_id] for i, o in enumerate(out))

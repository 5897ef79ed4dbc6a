"""Lossless verification: the target scores a request's k proposed tokens and the token after them in
one forward pass (k + 1 logits rows); this module turns those rows into the tokens the request gains.

Every row is processed exactly as the sampler would process it had the proposed tokens before it been
generated (penalties and min_tokens see them), so the acceptance test uses the target's own sampling
distribution p. Then, per request:

* greedy: accept proposals while they equal the argmax; the first mismatch (or the row after the last
  proposal) contributes the argmax itself. Output is identical to decoding without speculation.
* sampling, deterministic proposal (n-gram, lookahead; a point mass on d): accepting d with probability
  p(d) and otherwise sampling from the residual p without d, renormalised, is the same as drawing
  y ~ p and accepting iff y == d. So each row draws y_j ~ p_j with the sampler's exponential race and
  the run stops at the first y_j != d_j, which it emits. A seeded request's generator is rewound to
  just after the last row used, so it consumes exactly one row of noise per emitted token, as without
  speculation: seeded output is token-for-token the non-speculative output.
* sampling, draft distribution q: standard speculative sampling. Accept d_j with probability
  min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a sample of norm(max(0, p_j - q_j)); if all
  k are accepted, emit a sample of p_k (the bonus token). The emitted tokens are distributed as p.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from loopserve.engine.scheduler import ScheduledSeq
from loopserve.runner.sampler import SampledToken, Sampler, SamplingRow
from loopserve.spec.base import TokenView


def _exp_noise(shape, gen: torch.Generator, device) -> torch.Tensor:
    """E ~ Exp(1) as -log(U), drawn like Sampler.race does (same numbers from the same generator state)."""
    noise = torch.empty(shape, dtype=torch.float32, device=device).uniform_(generator=gen)
    return noise.log_().neg_().clamp_min_(torch.finfo(torch.float32).tiny)


def race_one(weights: torch.Tensor, gen: torch.Generator) -> int:
    """One token drawn proportionally to non-negative weights [V] (need not sum to 1)."""
    return int((weights / _exp_noise(weights.shape, gen, weights.device)).argmax())


def point_mass_accept(p: torch.Tensor, proposed: Sequence[int], gen: torch.Generator,
                      rewind: bool) -> list[int]:
    """p [k+1, V]: the target's distributions; returns accepted proposals + one token (see module doc)."""
    rows = p.shape[0]
    noise = torch.empty_like(p)
    states = []
    if rewind:
        for j in range(rows):  # row by row, as the sampler draws a seeded request's noise
            noise[j].uniform_(generator=gen)
            states.append(gen.get_state())
    else:
        noise.uniform_(generator=gen)
    noise.log_().neg_().clamp_min_(torch.finfo(noise.dtype).tiny)
    drawn = (p / noise).argmax(dim=-1).tolist()
    a = 0
    while a < len(proposed) and drawn[a] == proposed[a]:
        a += 1
    if rewind:
        gen.set_state(states[a])
    return drawn[:a + 1]


def rejection_accept(p: torch.Tensor, q: torch.Tensor, proposed: Sequence[int], gen: torch.Generator) -> list[int]:
    """p [k+1, V] target, q [k, V] draft distributions, proposed drawn from q (see module doc)."""
    k = len(proposed)
    if k:
        idx = torch.tensor(list(proposed), device=p.device).unsqueeze(1)
        p_d = p[:k].gather(1, idx).squeeze(1)
        q_d = q[:k].gather(1, idx).squeeze(1)
        u = torch.rand(k, generator=gen, device=p.device)
        ok = (u * q_d < p_d).tolist()  # P(accept) = min(1, p/q) for u ~ U[0, 1)
        a = ok.index(False) if False in ok else k
    else:
        a = 0
    if a < k:
        residual = (p[a] - q[a]).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:
            residual = p[a]  # p == q: a rejection had probability 0, any fallback is fine
        return list(proposed[:a]) + [race_one(residual, gen)]
    return list(proposed) + [race_one(p[k], gen)]


def verify(sampler: Sampler, logits: torch.Tensor, seqs: list[ScheduledSeq],
           draft_probs: dict[str, torch.Tensor], want_predictions: bool
           ) -> tuple[dict[str, list[SampledToken]], dict[str, list[int]]]:
    """logits: [sum(k_i + 1), V] raw target logits, seq i's rows in order. Returns the tokens each
    request gains and (if asked) the target's argmax at every row of speculating requests."""
    rows: list[SamplingRow] = []
    starts: list[int] = []
    for seq in seqs:
        req = seq.request
        starts.append(len(rows))
        spec = req.spec_token_ids[:seq.num_spec_tokens]
        for j in range(seq.num_spec_tokens + 1):
            out = req.output_token_ids if j == 0 else TokenView(req.output_token_ids, spec[:j])
            rows.append(SamplingRow(req.params, req.prompt_token_ids, out, req.generator))
    x = sampler.process_logits(logits, rows)
    argmax = x.argmax(dim=-1).tolist()

    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = None
    if random_rows:
        sel = torch.tensor(random_rows, device=x.device)
        probs = sampler.probs(x.index_select(0, sel), [rows[i] for i in random_rows])
        where = {r: i for i, r in enumerate(random_rows)}

    emitted: dict[str, list[int]] = {}
    predictions: dict[str, list[int]] = {}
    for seq, r in zip(seqs, starts):
        req = seq.request
        k = seq.num_spec_tokens
        spec = req.spec_token_ids[:k]
        if req.params.greedy:
            a = 0
            while a < k and spec[a] == argmax[r + a]:
                a += 1
            toks = argmax[r:r + a + 1]
        else:
            p = probs[where[r]:where[r] + k + 1]
            gen = req.generator or sampler.generator
            q = draft_probs.get(req.request_id)
            if q is not None and k:
                toks = rejection_accept(p, q[:k].to(p.device, torch.float32), spec, gen)
            else:
                toks = point_mass_accept(p, spec, gen, rewind=req.generator is not None)
        emitted[req.request_id] = toks
        if want_predictions and k:
            predictions[req.request_id] = argmax[r:r + k + 1]

    return _with_logprobs(logits, rows, seqs, starts, emitted), predictions


def _with_logprobs(logits: torch.Tensor, rows: list[SamplingRow], seqs: list[ScheduledSeq], starts: list[int],
                   emitted: dict[str, list[int]]) -> dict[str, list[SampledToken]]:
    """SampledTokens, with logprobs from the raw logits row of each emitted token where asked."""
    out = {rid: [SampledToken(t) for t in toks] for rid, toks in emitted.items()}
    idx: list[int] = []
    tokens: list[int] = []
    owners: list[str] = []
    for seq, r in zip(seqs, starts):
        if seq.request.params.logprobs is None:
            continue
        rid = seq.request.request_id
        for j, t in enumerate(emitted[rid]):
            idx.append(r + j)
            tokens.append(t)
            owners.append(rid)
    if idx:
        sel = torch.tensor(idx, device=logits.device)
        scored = Sampler._with_logprobs(logits.index_select(0, sel), [rows[i] for i in idx],
                                        torch.tensor(tokens, device=logits.device)).tokens()
        pos: dict[str, int] = {}
        for rid, tok in zip(owners, scored):
            j = pos.get(rid, 0)
            out[rid][j] = tok
            pos[rid] = j + 1
    return out

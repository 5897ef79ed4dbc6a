"""Batched token sampler with vLLM semantics.

Order of operations for one step (each stage is skipped when no row in the batch needs it):

1. logprobs (rows with ``params.logprobs is not None``) from the RAW logits: ``log_softmax(logits)``;
2. min_tokens: while ``len(output) < min_tokens`` the EOS ids (unless ``ignore_eos``) and
   ``stop_token_ids`` are masked to -inf;
3. repetition penalty over prompt + output tokens (positive logits divided, negative multiplied);
4. presence / frequency penalties over output tokens (OpenAI formula:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``);
5. greedy rows (``params.greedy``) take the argmax; the other rows go through temperature, top-k,
   top-p, min-p and are sampled with the exponential race ``argmax(probs / E)``, ``E ~ Exp(1)``,
   whose noise comes from the row's own generator when it has one (so a seeded request draws the
   same tokens whatever else is in the batch), else from the sampler's shared generator.

The input logits are never modified: the first stage that edits them works on a copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from loopserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One request (one row of the logits) in the batch."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # per-request seeded generator; None: the sampler's shared one


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # logprob of the sampled token (None when params.logprobs is None)
    top_logprobs: list[tuple[int, float]] | None = None  # top-k (token_id, logprob), best first
    rank: int | None = None  # 1-based rank of the sampled token in the vocab (1 + #tokens strictly better)


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int], seed: int = 0, device: torch.device | str = "cpu"):
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.device = torch.device(device)
        self.generator = self.make_generator(seed, self.device)

    @staticmethod
    def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
        gen = torch.Generator(device=torch.device(device))
        gen.manual_seed(int(seed))
        return gen

    # ------------------------------------------------------------------ public entry point

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        if not rows:
            return []
        num_rows, vocab = logits.shape

        want_logprobs, needs_min_tokens, needs_rep, needs_pres_freq, sample_rows = self._plan(rows)

        # Hot path: all greedy, nothing to edit, no logprobs -> a bare argmax.
        if not (want_logprobs or needs_min_tokens or needs_rep or needs_pres_freq or sample_rows):
            return [SampledToken(t) for t in logits.argmax(dim=-1).tolist()]

        x = self._process(logits, rows, vocab, needs_min_tokens, needs_rep, needs_pres_freq)
        if len(sample_rows) == num_rows:
            token_ids = self._sample_rows(x, [rows[i] for i in sample_rows])
        else:
            token_ids = x.argmax(dim=-1)
            if sample_rows:
                idx = torch.tensor(sample_rows, device=x.device)
                token_ids[idx] = self._sample_rows(x.index_select(0, idx), [rows[i] for i in sample_rows])

        if not want_logprobs:
            return [SampledToken(t) for t in token_ids.tolist()]
        return self._with_logprobs(logits, rows, token_ids)

    # ------------------------------------------------------------------ logit processors

    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Logits after the min_tokens mask and the penalties (what greedy rows take the argmax of).
        Returns a float32 tensor; it is a new one whenever anything changed."""
        _, needs_min_tokens, needs_rep, needs_pres_freq, _ = self._plan(rows)
        return self._process(logits, rows, logits.shape[1], needs_min_tokens, needs_rep, needs_pres_freq)

    def _plan(self, rows: list[SamplingRow]):
        """Which rows need which stage (pure Python: a few attribute reads per row)."""
        want_logprobs = False
        needs_min_tokens: list[int] = []
        needs_rep: list[int] = []
        needs_pres_freq: list[int] = []
        sample_rows: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            if p.logprobs is not None:
                want_logprobs = True
            if p.min_tokens and len(row.output_token_ids) < p.min_tokens and (
                    p.stop_token_ids or (self.eos_token_ids and not p.ignore_eos)):
                needs_min_tokens.append(i)
            if p.repetition_penalty != 1.0:
                needs_rep.append(i)
            if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and len(row.output_token_ids) > 0:
                needs_pres_freq.append(i)
            if not p.greedy:
                sample_rows.append(i)
        return want_logprobs, needs_min_tokens, needs_rep, needs_pres_freq, sample_rows

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow], vocab: int, needs_min_tokens: list[int],
                 needs_rep: list[int], needs_pres_freq: list[int]) -> torch.Tensor:
        x = logits if logits.dtype == torch.float32 else logits.float()
        if not (needs_min_tokens or needs_rep or needs_pres_freq):
            return x
        if x is logits:
            x = x.clone()  # never edit the caller's logits
        if needs_min_tokens:
            self._apply_min_tokens(x, rows, needs_min_tokens, vocab)
        if needs_rep:
            self._apply_repetition_penalty(x, rows, needs_rep)
        if needs_pres_freq:
            self._apply_presence_frequency(x, rows, needs_pres_freq)
        return x

    def _apply_min_tokens(self, x: torch.Tensor, rows: list[SamplingRow], which: list[int], vocab: int) -> None:
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i in which:
            p = rows[i].params
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned.update(self.eos_token_ids)
            for t in banned:
                if 0 <= t < vocab:
                    row_idx.append(i)
                    tok_idx.append(t)
        if row_idx:
            x[torch.tensor(row_idx, device=x.device), torch.tensor(tok_idx, device=x.device)] = float("-inf")

    @staticmethod
    def _token_index(rows: list[SamplingRow], which: list[int], with_prompt: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (local row, token id) index over the rows' output (and prompt) tokens."""
        local_rows: list[int] = []
        tokens: list[int] = []
        for j, i in enumerate(which):
            row = rows[i]
            seq = list(row.output_token_ids)
            if with_prompt:
                seq = list(row.prompt_token_ids) + seq
            tokens.extend(seq)
            local_rows.extend([j] * len(seq))
        return (torch.tensor(local_rows, dtype=torch.long, device=device),
                torch.tensor(tokens, dtype=torch.long, device=device))

    def _apply_repetition_penalty(self, x: torch.Tensor, rows: list[SamplingRow], which: list[int]) -> None:
        dev = x.device
        r, t = self._token_index(rows, which, with_prompt=True, device=dev)
        if t.numel() == 0:
            return
        idx = torch.tensor(which, device=dev)
        sub = x.index_select(0, idx)
        seen = torch.zeros_like(sub, dtype=torch.bool)
        seen[r, t] = True
        pen = torch.tensor([rows[i].params.repetition_penalty for i in which], dtype=sub.dtype,
                           device=dev).unsqueeze(1)
        penalised = torch.where(sub > 0, sub / pen, sub * pen)
        x[idx] = torch.where(seen, penalised, sub)

    def _apply_presence_frequency(self, x: torch.Tensor, rows: list[SamplingRow], which: list[int]) -> None:
        dev = x.device
        r, t = self._token_index(rows, which, with_prompt=False, device=dev)
        idx = torch.tensor(which, device=dev)
        sub = x.index_select(0, idx)
        counts = torch.zeros_like(sub)
        counts.index_put_((r, t), torch.ones(t.numel(), dtype=sub.dtype, device=dev), accumulate=True)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in which], dtype=sub.dtype,
                            device=dev).unsqueeze(1)
        pres = torch.tensor([rows[i].params.presence_penalty for i in which], dtype=sub.dtype,
                            device=dev).unsqueeze(1)
        x[idx] = sub - freq * counts - pres * (counts > 0).to(sub.dtype)

    # ------------------------------------------------------------------ random sampling

    def _sample_rows(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """x: [S, V] processed logits of the non-greedy rows (may be the caller's; not edited in place)."""
        n, vocab = x.shape
        dev = x.device
        temps = torch.tensor([r.params.temperature for r in rows], dtype=x.dtype, device=dev).unsqueeze(1)
        x = x / temps  # new tensor: safe to edit in place from here on
        # NaN -> never picked; +inf -> the largest float, so softmax gives it all the mass instead of NaN.
        x.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))

        top_ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        # top_p = 1 rows get a threshold above 1 so float rounding in the cumsum never drops their tail.
        top_ps = [r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in rows]
        use_k = any(k < vocab for k in top_ks)
        use_p = any(p < 1.0 for p in top_ps)

        if use_p:
            # One descending sort serves both top-k and top-p.
            sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
            if use_k:
                k = torch.tensor(top_ks, device=dev).unsqueeze(1)
                kth = sorted_x.gather(1, k - 1)
                sorted_x.masked_fill_(sorted_x < kth, float("-inf"))  # ties at the k-th value are kept
            probs = sorted_x.softmax(dim=-1)
            cum_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
            p = torch.tensor(top_ps, dtype=probs.dtype, device=dev).unsqueeze(1)
            drop = cum_before >= p
            drop[:, 0] = False  # the best token always survives
            sorted_x.masked_fill_(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, sorted_x)
        elif use_k:
            kmax = max(k for k in top_ks if k < vocab)
            vals = x.topk(kmax, dim=-1).values
            k = torch.tensor([min(k, kmax) for k in top_ks], device=dev).unsqueeze(1)
            kth = vals.gather(1, k - 1)
            off = torch.tensor([k == vocab for k in top_ks], device=dev).unsqueeze(1)
            kth.masked_fill_(off, float("-inf"))
            x.masked_fill_(x < kth, float("-inf"))

        min_ps = [r.params.min_p for r in rows]
        if any(mp > 0.0 for mp in min_ps):
            # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)   (log(0) = -inf keeps everything)
            mp = torch.tensor(min_ps, dtype=x.dtype, device=dev).unsqueeze(1)
            floor = x.amax(dim=-1, keepdim=True) + mp.log()
            x.masked_fill_(x < floor, float("-inf"))

        probs = x.softmax(dim=-1).nan_to_num_(nan=0.0)  # an all -inf row would give NaN
        noise = torch.empty_like(probs)
        if all(r.generator is None for r in rows):
            noise.exponential_(generator=self.generator)
        else:
            for i, r in enumerate(rows):
                noise[i].exponential_(generator=r.generator if r.generator is not None else self.generator)
        # Exp(1) can return exactly 0: keep it positive so a zero-probability token never wins via 0/0.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    # ------------------------------------------------------------------ logprobs

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor) -> list[SampledToken]:
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        idx = torch.tensor(lp_rows, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        chosen = token_ids.index_select(0, idx).unsqueeze(1)
        chosen_lp = lp.gather(1, chosen)
        ranks = (lp > chosen_lp).sum(dim=-1) + 1
        kmax = min(max(rows[i].params.logprobs for i in lp_rows), lp.shape[1])
        if kmax > 0:
            top_vals, top_ids = lp.topk(kmax, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()

        out = [SampledToken(t) for t in token_ids.tolist()]
        for j, (i, clp, rank) in enumerate(zip(lp_rows, chosen_lp.squeeze(1).tolist(), ranks.tolist())):
            k = rows[i].params.logprobs
            out[i].logprob = clp
            out[i].rank = rank
            out[i].top_logprobs = list(zip(top_ids[j][:k], top_vals[j][:k])) if k > 0 else []
        return out

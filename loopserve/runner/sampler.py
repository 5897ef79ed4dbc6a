"""Batched token sampler with vLLM semantics.

Order of operations for one step (each stage is skipped when no row in the batch needs it):

1. logprobs (rows with ``params.logprobs is not None``) from the RAW logits: ``log_softmax(logits)``;
2. min_tokens: while ``len(output) < min_tokens`` the EOS ids (unless ``ignore_eos``) and
   ``stop_token_ids`` are masked to -inf;
3. repetition penalty over prompt + output tokens (positive logits divided, negative multiplied);
4. presence / frequency penalties over output tokens (OpenAI formula:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``);
5. greedy rows (``params.greedy``) take the argmax (runner/argmax.py: spread over the GPU, where
   torch's one-block reduction took 27 us over a 128k vocabulary); the other rows go through
   temperature, top-k, top-p, min-p and are sampled with the exponential race ``argmax(probs / E)``,
   ``E ~ Exp(1)``, whose noise comes from the row's own generator when it has one (so a seeded
   request draws the same tokens whatever else is in the batch), else from the sampler's shared
   generator.

The input logits are never modified: the first stage that edits them works on a copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from loopserve.runner.argmax import greedy_argmax
from loopserve.runner.host_copy import to_device
from loopserve.sampling_params import SamplingParams

# On CPU, top-p first looks for the nucleus among this many best tokens; rows whose nucleus is larger
# fall back to a full-vocab sort (exact either way). Finding those rows reads a flag back from the
# device, so on CUDA top-p sorts the whole vocab at once instead: no host synchronisation, and a GPU
# sorts a 128k vocab in tens of microseconds.
TOP_P_CANDIDATES = 1024


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


@dataclass
class SampledBatch:
    """One step's samples while they may still live on the device.

    `start_copy` queues their device-to-host copies into pinned memory right behind the sampling
    kernels and records an event; `tokens` then waits for that event only, not for whatever the
    device was given after it (the next step, under overlap scheduling)."""
    token_ids: torch.Tensor                      # [S] long
    logprob_rows: list[int]                      # rows that asked for logprobs, and how many top ones
    logprob_ks: list[int]
    chosen_logprobs: torch.Tensor | None = None  # [L] float: the sampled tokens' logprobs
    ranks: torch.Tensor | None = None            # [L] long
    top_logprobs: torch.Tensor | None = None     # [L, kmax] float
    top_ids: torch.Tensor | None = None          # [L, kmax] long
    _host: dict[str, torch.Tensor] | None = None  # pinned host copies, once start_copy has queued them
    _event: object = None

    def start_copy(self) -> None:
        if self.token_ids.device.type != "cuda":
            return
        self._host = {}
        for name in ("token_ids", "chosen_logprobs", "ranks", "top_logprobs", "top_ids"):
            src = getattr(self, name)
            if src is not None:
                self._host[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                self._host[name].copy_(src, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def tokens(self) -> list[SampledToken]:
        if self._event is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()
        out = [SampledToken(t) for t in self._read("token_ids")]
        if not self.logprob_rows:
            return out
        chosen, ranks = self._read("chosen_logprobs"), self._read("ranks")
        top_vals, top_ids = self._read("top_logprobs"), self._read("top_ids")
        for j, (i, k) in enumerate(zip(self.logprob_rows, self.logprob_ks)):
            out[i].logprob = chosen[j]
            out[i].rank = ranks[j]
            out[i].top_logprobs = list(zip(top_ids[j][:k], top_vals[j][:k])) if k > 0 else []
        return out

    def _read(self, name: str) -> list | None:
        t = (self._host or {}).get(name, getattr(self, name))
        return t.tolist() if t is not None else None


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
        return self.sample_batch(logits, rows).tokens()

    def sample_batch(self, logits: torch.Tensor, rows: list[SamplingRow],
                     greedy_ids: torch.Tensor | None = None) -> SampledBatch:
        """The step's tokens (and logprobs) as device tensors; on CUDA nothing here waits for the device.
        greedy_ids: the logits' argmax, already computed (a decode graph's); an all-greedy step with
        nothing to edit takes it as its tokens."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        if not rows:
            return SampledBatch(torch.empty(0, dtype=torch.long, device=logits.device), [], [])
        num_rows, vocab = logits.shape

        want_logprobs, needs_min_tokens, needs_rep, needs_pres_freq, sample_rows = self._plan(rows)

        # Hot path: all greedy, nothing to edit, no logprobs -> a bare argmax.
        if not (want_logprobs or needs_min_tokens or needs_rep or needs_pres_freq or sample_rows):
            return SampledBatch(greedy_argmax(logits) if greedy_ids is None else greedy_ids, [], [])

        x = self._process(logits, rows, vocab, needs_min_tokens, needs_rep, needs_pres_freq)
        if len(sample_rows) == num_rows:
            token_ids = self._sample_rows(x, [rows[i] for i in sample_rows])
        else:
            token_ids = greedy_argmax(x)
            if sample_rows:
                idx = to_device(sample_rows, torch.long, x.device)
                token_ids[idx] = self._sample_rows(x.index_select(0, idx), [rows[i] for i in sample_rows])

        if not want_logprobs:
            return SampledBatch(token_ids, [], [])
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
            idx = to_device([row_idx, tok_idx], torch.long, x.device)
            # A device-side value: `x[i, j] = float` copies a host scalar, a synchronising transfer.
            x.index_put_((idx[0], idx[1]), x.new_full((), float("-inf")))

    @staticmethod
    def _token_index(rows: list[SamplingRow], which: list[int], with_prompt: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (position in `which`, token id) pairs over the rows' output (and prompt) tokens,
        repeats included. Penalties touch only these entries, never a dense [rows, V] tensor."""
        tokens: list[int] = []
        lengths: list[int] = []
        for i in which:
            row = rows[i]
            n = len(tokens)
            if with_prompt:
                tokens.extend(row.prompt_token_ids)
            tokens.extend(row.output_token_ids)
            lengths.append(len(tokens) - n)
        local = to_device(torch.repeat_interleave(torch.arange(len(which)), torch.tensor(lengths)), torch.long, device)
        # numpy converts a long Python list several times faster than torch.tensor does
        return local, to_device(np.array(tokens, dtype=np.int64), torch.long, device)

    def _apply_repetition_penalty(self, x: torch.Tensor, rows: list[SamplingRow], which: list[int]) -> None:
        dev = x.device
        local, tok = self._token_index(rows, which, with_prompt=True, device=dev)
        if tok.numel() == 0:
            return
        # Per-row (global row index, penalty) in one transfer; penalties are exact in float64.
        meta = to_device([[i, rows[i].params.repetition_penalty] for i in which], torch.float64, dev)
        row_idx = meta[:, 0].long()[local]
        pen = meta[:, 1].to(x.dtype)[local]
        vals = x[row_idx, tok]  # a repeated token reads the same value and writes the same result
        x[row_idx, tok] = torch.where(vals > 0, vals / pen, vals * pen)

    def _apply_presence_frequency(self, x: torch.Tensor, rows: list[SamplingRow], which: list[int]) -> None:
        dev = x.device
        vocab = x.shape[1]
        local, tok = self._token_index(rows, which, with_prompt=False, device=dev)
        meta = to_device([[i, rows[i].params.frequency_penalty, rows[i].params.presence_penalty] for i in which],
                         torch.float64, dev)
        row_idx = meta[:, 0].long()[local]
        # frequency: once per occurrence (equal addends, so the accumulation order cannot matter)
        x.index_put_((row_idx, tok), -meta[:, 1].to(x.dtype)[local], accumulate=True)
        # presence: once per distinct (row, token). A dense seen-mask instead of torch.unique, whose output
        # size is data-dependent (a read-back); an unseen token gets x + -0.0, which is x.
        seen = torch.zeros(len(which), vocab, dtype=x.dtype, device=dev)
        seen.index_put_((local, tok), seen.new_ones(()))  # not `= 1.0`: that copies a host scalar
        x.index_add_(0, meta[:, 0].long(), seen.mul_(-meta[:, 2:3].to(x.dtype)))

    # ------------------------------------------------------------------ random sampling

    def _sample_rows(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """x: [S, V] float32 processed logits of the non-greedy rows (may be the caller's: not edited)."""
        return self.race(self.probs(x, rows), rows)

    def probs(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The distribution a non-greedy row samples from: processed logits x [S, V] (not edited) through
        temperature, top-k, top-p and min-p, softmaxed. Speculative verification accepts against it."""
        vocab = x.shape[1]
        dev = x.device
        params = [r.params for r in rows]
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        # Per-row settings go to the device in one transfer: temperature, top_k, top_p, min_p.
        table = to_device([[p.temperature, k, p.top_p, p.min_p] for p, k in zip(params, top_ks)], torch.float32, dev)
        x = x / table[:, 0:1]  # a new tensor: safe to edit in place from here on
        # NaN -> never picked; +inf -> the largest float, so softmax gives it all the mass instead of NaN.
        x.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))

        k_on = [k < vocab for k in top_ks]
        p_on = [p.top_p < 1.0 for p in params]
        if any(k_on) or any(p_on):
            thr = self._top_k_top_p_threshold(x, top_ks, [p.top_p for p in params], table,
                                              candidates=vocab if dev.type == "cuda" else None)
            x.masked_fill_(x < thr, float("-inf"))

        if any(p.min_p > 0.0 for p in params):
            # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)   (log(0) = -inf keeps everything)
            floor = x.amax(dim=-1, keepdim=True) + table[:, 3:4].log()
            x.masked_fill_(x < floor, float("-inf"))

        return x.softmax(dim=-1).nan_to_num_(nan=0.0)  # an all -inf row would give NaN

    def race(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One token per row of probs [S, V] (consumed: divided in place)."""
        n, vocab = probs.shape
        dev = probs.device
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws token i with probability p_i.
        # E = -log(U), U ~ U[0, 1); a row with its own generator gets its own draw of V numbers (the same
        # noise whatever the batch). uniform_ + log is ~5x faster than exponential_ on CPU.
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None]
        if not seeded:
            noise.uniform_(generator=self.generator)
        else:
            for i in seeded:
                noise[i].uniform_(generator=rows[i].generator)
            if len(seeded) < n:
                shared = to_device([i for i, r in enumerate(rows) if r.generator is None], torch.long, dev)
                noise[shared] = torch.empty(len(shared), vocab, dtype=noise.dtype, device=dev).uniform_(
                    generator=self.generator)
        noise.log_().neg_()
        # -log(U) > 0 for U < 1, but keep it strictly positive anyway: a zero-probability token must never
        # win through 0/0 = NaN (argmax treats NaN as the maximum).
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    @staticmethod
    def _top_k_top_p_threshold(x: torch.Tensor, top_ks: list[int], top_ps: list[float],
                               table: torch.Tensor | None = None, candidates: int | None = None) -> torch.Tensor:
        """[n, 1] per-row logit threshold: tokens below it are cut by top-k, then by top-p on the
        renormalised top-k distribution. Thresholds are values, so ties at the cut are all kept.

        top_ks (V where off) / top_ps: host lists; table: optional [n, >=3] device tensor whose columns
        1 and 2 hold the same top_k / top_p (saves host-to-device copies). Instead of sorting the whole
        vocab (very slow on CPU), top-p first looks at the best TOP_P_CANDIDATES tokens; rows whose
        nucleus is not complete within them are redone exactly over the whole vocab.
        """
        n, vocab = x.shape
        dev = x.device
        if table is None:
            table = to_device([[0.0, k, p] for k, p in zip(top_ks, top_ps)], torch.float32, dev)
        k_on = [k < vocab for k in top_ks]
        p_on = [p < 1.0 for p in top_ps]
        k_mask = table[:, 1:2] < vocab
        cand = min(vocab, candidates or TOP_P_CANDIDATES)
        width = min(vocab, max(k if kon else (cand if pon else 1) for k, kon, pon in zip(top_ks, k_on, p_on)))
        vals = x.topk(width, dim=-1).values  # best first
        thr = torch.full((n, 1), float("-inf"), dtype=x.dtype, device=dev)
        if any(k_on):
            kth = vals.gather(1, (table[:, 1:2].clamp(max=width) - 1).long())
            thr = torch.where(k_mask, kth, thr)
        if not any(p_on):
            return thr

        vals = vals.masked_fill(vals < thr, float("-inf"))  # the top-k survivors, best first
        log_norm = vals.logsumexp(dim=-1, keepdim=True)
        if not all(k_on[i] for i in range(n) if p_on[i]):  # rows without top-k normalise over the whole vocab
            log_norm = torch.where(k_mask, log_norm, x.logsumexp(dim=-1, keepdim=True))
        probs = (vals - log_norm).exp()
        cum_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better candidates
        # Keep the shortest prefix whose mass reaches top_p (at least the best token).
        n_keep = (cum_before < table[:, 2:3]).sum(dim=-1, keepdim=True).clamp_(1, width)
        p_mask = table[:, 2:3] < 1.0
        thr = torch.where(p_mask, torch.maximum(thr, vals.gather(1, n_keep - 1)), thr)

        if width < vocab and not all(k_on[i] for i in range(n) if p_on[i]):
            # A top-p row without top-k whose nucleus took every candidate may reach further: redo exactly.
            open_rows = (p_mask & ~k_mask & (n_keep == width)).squeeze(1)
            if bool(open_rows.any()):
                idx = open_rows.nonzero().squeeze(1)
                rows = idx.tolist()
                thr[idx] = Sampler._top_k_top_p_threshold(
                    x.index_select(0, idx), [top_ks[i] for i in rows], [top_ps[i] for i in rows],
                    table.index_select(0, idx), candidates=vocab)
        return thr

    # ------------------------------------------------------------------ logprobs

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor) -> SampledBatch:
        """Logprobs of the RAW logits: log_softmax(x) = x - logsumexp(x), without materialising it."""
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        idx = to_device(lp_rows, torch.long, logits.device)
        x = logits.index_select(0, idx).float()
        lse = x.logsumexp(dim=-1, keepdim=True)
        chosen = x.gather(1, token_ids.index_select(0, idx).unsqueeze(1))
        ks = [rows[i].params.logprobs for i in lp_rows]
        batch = SampledBatch(token_ids, lp_rows, ks, chosen_logprobs=(chosen - lse).squeeze(1),
                             ranks=(x > chosen).sum(dim=-1) + 1)  # rank: 1 + tokens strictly better
        kmax = min(max(ks), x.shape[1])
        if kmax > 0:
            top_vals, batch.top_ids = x.topk(kmax, dim=-1)
            batch.top_logprobs = top_vals - lse
        return batch

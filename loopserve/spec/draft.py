"""Draft-model proposer: a smaller model with the target's tokenizer, run in the engine's process with
its own paged KV pool (KVCacheManager + ModelRunner), drafting k tokens one forward at a time.

Each request has a `_DraftSeq`, the draft's view of it: the same token ids followed by this step's
drafted tokens, and the draft's own computed count and block table. Before drafting, the draft cache
is rolled back to the longest prefix the request still agrees with (drafted tokens the target
rejected are dropped, their blocks released), then the draft catches up on the tokens it has not seen
(the prompt on first use, later the target's own token), then drafts. Only KV of real tokens is ever
hashed into the draft's prefix cache.
"""
from __future__ import annotations

import logging

import torch

from loopserve.config import ModelConfig, SpeculativeConfig
from loopserve.engine.kv_cache import KVCacheManager
from loopserve.engine.request import Request
from loopserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from loopserve.runner.model_runner import ModelRunner
from loopserve.runner.sampler import Sampler, SamplingRow
from loopserve.spec.base import Proposal, TokenView
from loopserve.spec.verify import race_one

log = logging.getLogger(__name__)


class _DraftSeq:
    """Duck-types the parts of Request that KVCacheManager and ModelRunner read."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.request_id = req.request_id
        self.cache_salt = req.cache_salt
        self.session_id = None  # the draft's finished runs (kv_cache.HashedRun) go by first block alone
        self.block_hashes: list[bytes] = []  # the draft's own (same tokens, so the same values)
        self.num_computed_tokens = 0
        self.started = False
        self.base_len = 0                # len(req.all_token_ids) when `drafted` began
        self.drafted: list[int] = []     # tokens drafted this step, at positions base_len, base_len + 1, ...
        self.probs: list[torch.Tensor] = []
        self.spec_token_ids: list[int] = []  # never used: the draft schedules no proposals of its own

    @property
    def all_token_ids(self):
        return TokenView(self.req.all_token_ids, self.drafted) if self.drafted else self.req.all_token_ids

    @property
    def num_tokens(self) -> int:
        return self.req.num_tokens + len(self.drafted)


class DraftModelProposer:
    method = "draft_model"
    wants_predictions = False

    def __init__(self, cfg: SpeculativeConfig, target_config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, sampler: Sampler, max_catchup_tokens: int,
                 enable_prefix_caching: bool = True) -> None:
        from loopserve.fetch import resolve_model
        from loopserve.model import load_model

        self.path = resolve_model(cfg.model)
        self.model, self.model_config = load_model(self.path, cfg.draft_load_format, dtype, device)
        self.vocab = target_config.vocab_size
        if abs(self.model_config.vocab_size - self.vocab) > 1024:
            raise ValueError(f"speculative_config.model {cfg.model!r} has a vocabulary of "
                             f"{self.model_config.vocab_size} tokens, the target {self.vocab}: a draft model "
                             f"must use the target's tokenizer")
        if set(self.model_config.eos_token_ids) != set(target_config.eos_token_ids):
            log.warning("draft model EOS ids %s differ from the target's %s", self.model_config.eos_token_ids,
                        target_config.eos_token_ids)
        self.num_blocks = cfg.draft_num_blocks or num_blocks
        self.kv = KVCacheManager(self.num_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.model_config, self.num_blocks, block_size, device, dtype, sampler)
        self.sampler = sampler
        self.max_positions = self.model_config.max_position_embeddings
        self.max_catchup = max(1, max_catchup_tokens)
        self.seqs: dict[str, _DraftSeq] = {}
        log.info("draft model %s: %d KV blocks", self.path, self.num_blocks)

    # ---- bookkeeping -------------------------------------------------------------------------

    def _rollback(self, ds: _DraftSeq) -> None:
        """Forget drafted tokens; keep the KV of those the request actually has at their positions."""
        if ds.drafted:
            real = ds.req.all_token_ids
            m = 0
            while m < len(ds.drafted) and ds.base_len + m < len(real) and real[ds.base_len + m] == ds.drafted[m]:
                m += 1
            ds.num_computed_tokens = min(ds.num_computed_tokens, ds.base_len + m)
            ds.drafted = []
        ds.probs = []
        # The last token is always fed again: its logits give the first draft token.
        ds.num_computed_tokens = min(ds.num_computed_tokens, ds.req.num_tokens - 1)
        self.kv.truncate(ds)
        self.kv.cache_computed_blocks(ds)  # drafted is empty: only real tokens get hashed

    def release(self, request_id: str) -> None:
        ds = self.seqs.pop(request_id, None)
        if ds is not None:
            if ds.started:
                self._rollback(ds)
            self.kv.free(ds)

    def observe(self, request, proposed, emitted, predictions) -> None:
        pass  # the rollback happens lazily, at the next proposal

    # ---- drafting ----------------------------------------------------------------------------

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[1]
        if v == self.vocab:
            return logits
        if v > self.vocab:
            return logits[:, :self.vocab]
        pad = torch.full((logits.shape[0], self.vocab - v), float("-inf"), dtype=logits.dtype, device=logits.device)
        return torch.cat([logits, pad], dim=1)

    def _sample(self, logits: torch.Tensor, seqs: list[_DraftSeq]) -> None:
        """Draw one draft token per sequence from the draft's processed distribution q (the request's
        own sampling settings); keep q for rejection sampling."""
        logits = self._to_target_vocab(logits)
        rows = [SamplingRow(ds.req.params, ds.req.prompt_token_ids,
                            TokenView(ds.req.output_token_ids, ds.drafted), ds.req.generator) for ds in seqs]
        x = self.sampler.process_logits(logits, rows)
        argmax = x.argmax(dim=-1).tolist()
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        probs = self.sampler.probs(x[random_rows], [rows[i] for i in random_rows]) if random_rows else None
        where = {r: i for i, r in enumerate(random_rows)}
        for i, ds in enumerate(seqs):
            if i in where:
                q = probs[where[i]]
                ds.drafted.append(race_one(q, ds.req.generator or self.sampler.generator))
                ds.probs.append(q)
            else:
                ds.drafted.append(argmax[i])

    def _forward(self, batch: list[tuple[_DraftSeq, int, bool]]) -> None:
        out = SchedulerOutput([ScheduledSeq(ds, n, self.kv.block_ids(ds.request_id), samples=s) for ds, n, s in batch])
        logits, sampling = self.runner.forward_logits(out)
        for ds, n, _ in batch:
            ds.num_computed_tokens += n
        if logits is not None:
            self._sample(logits, [s.request for s in sampling])

    @torch.inference_mode()
    def propose(self, wants: list[tuple[Request, int]]) -> dict[str, Proposal]:
        budget = self.max_catchup
        first: list[tuple[_DraftSeq, int, bool]] = []
        lengths: dict[str, int] = {}
        for req, k in wants:
            ds = self.seqs.get(req.request_id)
            if ds is None:
                ds = self.seqs[req.request_id] = _DraftSeq(req)
            if ds.started:
                self._rollback(ds)
            k = min(k, self.max_positions - req.num_tokens)
            if k <= 0 or budget <= 0:
                continue
            if not ds.started:
                hits = self.kv.find_cached_prefix(ds)  # full blocks of the request's real tokens
                n = req.num_tokens - len(hits) * self.kv.block_size
                if not self.kv.allocate(ds, min(n, budget), hits):
                    continue
                ds.num_computed_tokens = len(hits) * self.kv.block_size
                ds.started = True
            else:
                n = req.num_tokens - ds.num_computed_tokens
                if not self.kv.allocate(ds, min(n, budget)):
                    continue
            catch_up = min(n, budget)
            budget -= catch_up
            ds.base_len = req.num_tokens
            first.append((ds, catch_up, catch_up == n))  # a partial catch-up drafts nothing this step
            if catch_up == n:
                lengths[req.request_id] = k
        if not first:
            return {}
        self._forward(first)
        step = 1
        while True:
            batch = [(ds, 1, True) for ds, _, full in first
                     if full and len(ds.drafted) == step and lengths[ds.request_id] > step
                     and self.kv.allocate(ds, 1)]
            if not batch:
                break
            self._forward(batch)
            step += 1
        out = {}
        for ds, _, full in first:
            if full and ds.drafted:
                probs = torch.stack(ds.probs) if ds.probs else None
                out[ds.request_id] = Proposal(list(ds.drafted), probs)
        return out

"""SpecDecoder: what EngineCore.step does for speculative decoding around schedule / execute / update.

    propose(running)   before scheduling: requests that have caught up (one uncomputed token, so
                       never a prefill chunk) get `spec_token_ids` from the proposer, k chosen per
                       request by AdaptiveLength; nothing at all when too many requests are decoding.
    observe(sched, r)  after the verify forward, before Scheduler.update appends the tokens:
                       metrics, acceptance for AdaptiveLength, trajectories for lookahead.
    record_step(s, t)  the step's wall time (proposing included), for AdaptiveLength's measured
                       overhead of speculating steps.
    release(id)        a request finished, was aborted or preempted: drop its proposer state.
"""
from __future__ import annotations

import torch

from loopserve.config import SpeculativeConfig
from loopserve.engine.request import Request, RequestStatus
from loopserve.engine.scheduler import SchedulerOutput
from loopserve.spec.adaptive import DOUBTFUL_GAIN, PLAIN_PROBE_INTERVAL, AdaptiveLength, AdaptiveState
from loopserve.spec.base import Proposer
from loopserve.spec.metrics import SpecDecodeStats


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, proposer: Proposer) -> None:
        self.cfg = cfg
        self.proposer = proposer
        self.adaptive = AdaptiveLength(cfg, cfg.draft_token_cost if cfg.method == "draft_model" else 0.0)
        self.states: dict[str, AdaptiveState] = {}
        self.stats = SpecDecodeStats(cfg.method)
        self._steps_at: dict[int, int] = {}  # batch size -> speculating steps seen without a plain baseline

    @classmethod
    def build(cls, cfg: SpeculativeConfig, core) -> "SpecDecoder":
        """The proposer for cfg.method, wired to an EngineCore's model config, device and sampler."""
        if cfg.method == "ngram":
            from loopserve.spec.ngram import NgramProposer
            proposer = NgramProposer(cfg)
        elif cfg.method == "lookahead":
            from loopserve.spec.lookahead import LookaheadProposer
            proposer = LookaheadProposer(cfg)
        else:
            from loopserve.spec.draft import DraftModelProposer
            proposer = DraftModelProposer(cfg, core.model_config, core.kv.num_blocks, core.kv.block_size,
                                          core.device, core.dtype, core.sampler,
                                          core.scheduler.config.max_num_batched_tokens,
                                          core.config.cache.enable_prefix_caching)
        return cls(cfg, proposer)

    @property
    def wants_predictions(self) -> bool:
        return self.proposer.wants_predictions

    def propose(self, running: list[Request]) -> dict[str, torch.Tensor]:
        """Set spec_token_ids on running requests; returns the draft distributions (draft model, sampling)."""
        # Constrained requests do not speculate: a proposal would need the grammar's mask at every position.
        decoding = [r for r in running
                    if r.status is RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1
                    and r.grammar is None]
        if not decoding:
            return {}
        if len(decoding) > self.cfg.disable_by_batch_size:
            self.stats.num_disabled_steps += 1
            return {}
        batch = len(decoding)
        if self.cfg.adaptive and self.adaptive.step_cost.needs_plain(batch) and self._doubtful(decoding, batch):
            seen = self._steps_at[batch] = self._steps_at.get(batch, 0) + 1
            if seen % PLAIN_PROBE_INTERVAL == 0:
                return {}  # a plain step: the baseline the measured overhead needs
        wants = []
        for req in decoding:
            # k + 1 tokens may come out of the verify pass: never more than max_tokens / the window allow.
            room = min(req.max_output_tokens - req.num_output_tokens, req.max_model_len - req.num_tokens) - 1
            if room <= 0:
                continue
            st = self.states.get(req.request_id)
            if st is None:
                st = self.states[req.request_id] = self.adaptive.new_state()
            k = min(self.adaptive.length(st, len(decoding)), room)
            if k > 0:
                wants.append((req, k))
        if not wants:
            return {}
        proposals = self.proposer.propose(wants)
        probs = {}
        for req, k in wants:
            prop = proposals.get(req.request_id)
            if prop is None or not prop.token_ids:
                continue
            req.spec_token_ids = list(prop.token_ids[:k])
            if prop.probs is not None:
                probs[req.request_id] = prop.probs[:k]
        return probs

    def _doubtful(self, decoding: list[Request], batch: int) -> bool:
        """Whether some request's modelled gain is small enough for an unmeasured overhead to flip it
        (a request copying its prompt at high acceptance needs no baseline to know it pays)."""
        for req in decoding:
            st = self.states.get(req.request_id)
            rate = st.rate if st is not None else self.cfg.initial_acceptance
            if self.adaptive.best(rate, batch)[1] < DOUBTFUL_GAIN:
                return True
        return False

    def observe(self, sched: SchedulerOutput, sampled: dict, predictions: dict[str, list[int]]) -> None:
        for seq in sched.seqs:
            k = seq.num_spec_tokens
            req = seq.request
            toks = sampled.get(req.request_id)
            if not k or not toks:
                continue
            emitted = [t.token_id for t in toks]
            accepted = len(emitted) - 1
            self.stats.record(k, accepted)
            st = self.states.get(req.request_id)
            if st is not None:
                self.adaptive.observe(st, k, accepted)
            self.proposer.observe(req, req.spec_token_ids[:k], emitted, predictions.get(req.request_id))

    def record_step(self, sched: SchedulerOutput, seconds: float) -> None:
        # Only pure-decode steps compare: a prefill chunk in the step would dwarf the verify tokens.
        if any(s.num_new_tokens != 1 + s.num_spec_tokens for s in sched.seqs):
            return
        self.adaptive.step_cost.record(len(sched.seqs), sum(s.num_spec_tokens for s in sched.seqs), seconds)

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self.proposer.release(request_id)

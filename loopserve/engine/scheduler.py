"""Token-budget scheduler: no prefill phase and no decode phase.

Every request has num_computed_tokens and a target (all its known tokens). Each step hands out
at most max_num_batched_tokens so requests catch up: a decode needs 1 token, a prompt needs many
(capped per step so one long prompt cannot starve running decodes), a prefix-cache hit simply
starts a request further along. Running requests are served first; when blocks run out the
policy's victim is preempted (blocks freed, recomputed later), so the scheduler never deadlocks.

Speculative decoding: a running request that has caught up (one known token left) may carry
proposed `spec_token_ids`; they are scheduled after its known token (trimmed to the budget, to what
max_tokens / the context window can still take, and dropped first when blocks are short) and the
target scores them all in the same forward. `update` keeps only the accepted ones: the computed
count stops at the last accepted token and the blocks past it are released (rollback).

Head-of-line protection: while shorter work is running or waiting, a prompt with more than
long_prompt_threshold tokens left to prefill is scheduled after everyone else (admissions included)
and gets at most long_prompt_chunk tokens a step, so a long cold prompt costs each short agent step
one small chunk of extra step time instead of a whole budget-sized one. Alone, its chunk doubles
every step up to the per-step cap: full speed soon, yet a short request arriving just after a quiet
spell (agents in their tool pauses) never waits behind one huge step.

Overlap scheduling: `commit` is called right after a step is launched (computed counts advance, each
sampling request gets a PENDING_TOKEN), so the next step can be scheduled before this one's tokens are
known; `resolve` swaps the real tokens in and finishes stopped requests. A request whose pending token
ends it by length is not scheduled again; one stopped by its token has already been scheduled once
more, and that row's result is dropped.

Session retention (engine/retention.py): finished turns of a session stay pinned; pins are released
(closest to expiry first) before any request is preempted or left waiting for blocks.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from loopserve.config import SchedulerConfig
from loopserve.engine.kv_cache import KVCacheManager, KVOp
from loopserve.engine.request import PENDING_TOKEN, Request, RequestStatus
from loopserve.engine.retention import SessionRetention


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    # This step reaches the request's last known token, so its logits are sampled.
    samples: bool = False
    # The last num_spec_tokens of num_new_tokens are the request's spec_token_ids (already trimmed).
    num_spec_tokens: int = 0


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # Block copies (offload / restore / copy-on-write) the runner runs, in order, before the forward.
    kv_ops: list[KVOp] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


class FCFSPolicy:
    """Ordering and admission: first come, first served; the latest arrival is preempted first."""

    def requeue(self, waiting: deque[Request], request: Request) -> None:
        waiting.appendleft(request)

    def victim(self, running: list[Request]) -> Request:
        return running[-1]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: FCFSPolicy | None = None) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy or FCFSPolicy()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.retention = SessionRetention(kv)
        self._alone_steps = 0  # consecutive steps in which long prefills had no shorter work beside them

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _is_long(self, req: Request, hit_tokens: int = 0) -> bool:
        return req.num_tokens - max(req.num_computed_tokens, hit_tokens) > self.config.long_prompt_threshold

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        cap = self.config.prefill_cap()
        self.retention.expire()

        # Long prefills yield to everything else when there is anything else.
        long_running = [r for r in self.running if self._is_long(r)]
        contended = len(long_running) < len(self.running)
        long_waiting = 0
        if not contended and self.waiting:
            # Only needed when the running set does not decide it (a prefix lookup per waiting request).
            # A waiting agent step has a long prompt but mostly cached: judge it by what is left to compute.
            long_waiting = sum(1 for r in self.waiting
                               if self._is_long(r, len(self.kv.find_cached_prefix(r)) * self.kv.block_size))
            contended = long_waiting < len(self.waiting)
        deferred = long_running if contended else []
        first = [r for r in self.running if r not in deferred] if deferred else list(self.running)
        chunk = self.config.long_chunk()
        if contended or not (long_running or long_waiting):
            self._alone_steps = 0
            long_cap = min(cap, chunk)
        else:
            long_cap = min(cap, chunk << min(self._alone_steps, 30))
            self._alone_steps += 1

        budget = self._schedule_running(first, out, budget, cap, long_cap)
        if out.preempted:
            return self._finish(out)
        budget = self._admit(out, budget, cap, contended, long_cap)
        if deferred and budget > 0:
            self._schedule_running(deferred, out, budget, long_cap, long_cap, may_preempt=False)
        return self._finish(out)

    def _allocate_or_release(self, req: Request, n: int, hit=()) -> bool:
        """Allocate, releasing other sessions' retention pins while that makes room."""
        while not self.kv.allocate(req, n, hit):
            if not self.retention.release_for_pressure(req.session_id):
                return False
        return True

    def _schedule_running(self, reqs: list[Request], out: SchedulerOutput, budget: int, cap: int, long_cap: int,
                          may_preempt: bool = True) -> int:
        i = 0
        while i < len(reqs) and budget > 0:
            req = reqs[i]
            if req.status is not RequestStatus.RUNNING or req.certain_to_finish:
                i += 1  # preempted by an earlier request of this step, or ends when its step is read back
                continue
            left = req.num_tokens - req.num_computed_tokens
            n = min(left, long_cap if left > self.config.long_prompt_threshold else cap, budget)
            if n <= 0:
                i += 1
                continue
            n_spec = self._num_spec(req, budget - n) if n == left == 1 else 0
            while not (self.kv.allocate(req, n + n_spec) if n_spec else self._allocate_or_release(req, n)):
                if n_spec:
                    n_spec = 0  # give up the proposal before releasing pins or preempting anyone for it
                    continue
                if not may_preempt:
                    break
                victim = self.policy.victim(self.running)
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                del req.spec_token_ids[n_spec:]
                out.seqs.append(ScheduledSeq(req, n + n_spec, [], num_spec_tokens=n_spec))
                budget -= n + n_spec
                i += 1
                continue
            if not may_preempt:
                i += 1
                continue
            break  # the request itself was preempted: every later one already was too
        return budget

    def _admit(self, out: SchedulerOutput, budget: int, cap: int, contended: bool, long_cap: int) -> int:
        """Admit waiting requests in order; when contended, long prompts only after every short one."""
        skipped: list[Request] = []
        long_ones: list[Request] = []
        for long_pass in (False, True):
            if long_pass:
                self.waiting.extendleft(reversed(long_ones))
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if ((req.wait_for is not None and not self._sibling_ready(req.wait_for))
                        or (req.grammar is not None and not req.grammar.ready)):
                    skipped.append(self.waiting.popleft())  # waits without holding up the queue
                    continue
                hit = self.kv.find_prefix(req, self.retention.tail(req.session_id))
                num_hit = hit.num_tokens(self.kv.block_size)
                if contended and not long_pass and self._is_long(req, num_hit):
                    long_ones.append(self.waiting.popleft())
                    continue
                left = req.num_tokens - num_hit
                n = min(left, long_cap if left > self.config.long_prompt_threshold else cap, budget)
                if not self._allocate_or_release(req, n, hit):
                    break
                self.waiting.popleft()
                self.kv.record_hit(req, num_hit)
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                if req.timings.first_scheduled is None:
                    req.timings.first_scheduled = time.monotonic()
                req.num_computed_tokens = num_hit
                req.status = RequestStatus.RUNNING
                req.wait_for = None
                self.running.append(req)
                out.seqs.append(ScheduledSeq(req, n, []))
                budget -= n
            if not long_ones:
                break
        self.waiting.extendleft(reversed(skipped))
        return budget

    @staticmethod
    def _num_spec(req: Request, budget: int) -> int:
        """How many of the request's proposed tokens fit: the budget, and no more than max_tokens /
        the context window can take after the token the target adds itself."""
        if not req.spec_token_ids:
            return 0
        room = min(req.max_output_tokens - req.num_output_tokens, req.max_model_len - req.num_tokens) - 1
        return max(0, min(len(req.spec_token_ids), budget, room))

    def _finish(self, out: SchedulerOutput) -> SchedulerOutput:
        # Tables are read once, after every allocation of this step.
        scheduled = {id(seq.request) for seq in out.seqs}
        for req in self.running:
            if req.spec_token_ids and id(req) not in scheduled:
                req.spec_token_ids.clear()  # a proposal lives for one step only
        for seq in out.seqs:
            req = seq.request
            seq.block_ids = self.kv.block_ids(req.request_id)
            seq.samples = req.num_computed_tokens + seq.num_new_tokens - seq.num_spec_tokens == req.num_tokens
        if out.seqs:
            # Without a forward they stay queued for the next one: nothing reads a block before then.
            out.kv_ops = self.kv.take_ops()
        return out

    @staticmethod
    def _sibling_ready(sibling: Request) -> bool:
        return sibling.status.finished or sibling.num_computed_tokens >= sibling.num_prompt_tokens

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids.clear()
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req.request_id)
        out.seqs = [s for s in out.seqs if s.request is not req]
        self.policy.requeue(self.waiting, req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int | list[int]]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish stopped requests; returns finished.

        With speculation a request gets a list: its accepted proposed tokens, then one token of the
        target's own. Tokens are appended one by one and a stop (EOS, stop token, max_tokens) drops
        the rest. Accepted proposed tokens already have their KV; rejected ones are rolled back.
        """
        if out.kv_ops:
            self.kv.ops_done()  # the runner ran them before the forward
        finished = []
        for seq in out.seqs:
            req = seq.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += seq.num_new_tokens - seq.num_spec_tokens
            tokens = sampled.get(req.request_id)
            if isinstance(tokens, int):
                tokens = [tokens]
            stopped = None
            if tokens:
                num_accepted = len(tokens) - 1
                assert num_accepted <= seq.num_spec_tokens, "more tokens than proposed + 1"
                for i, token in enumerate(tokens):
                    req.append_token(token)
                    if i < num_accepted:
                        req.num_computed_tokens += 1  # written as proposal i, which it equals
                    stopped = req.check_stop()
                    if stopped is not None:
                        break
            req.spec_token_ids.clear()
            if stopped is not None:
                self.finish(req, stopped)
                finished.append(req)
                continue
            if seq.num_spec_tokens:
                self.kv.truncate(req)
            self.kv.cache_computed_blocks(req)
        return finished

    def commit(self, out: SchedulerOutput) -> None:
        """Overlap scheduling: `out` was launched and its results are not read yet. Advance the computed
        counts now and give every sampling request a PENDING_TOKEN, so the next step can be scheduled
        (and launched) before this one's tokens reach the host. No speculation here."""
        if out.kv_ops:
            self.kv.ops_done()  # enqueued before the forward: later device work runs after them
        for seq in out.seqs:
            req = seq.request
            if req.status is not RequestStatus.RUNNING:
                continue  # finished or aborted after it was scheduled: its row's result is dropped
            req.num_computed_tokens += seq.num_new_tokens
            if seq.samples:
                req.append_token(PENDING_TOKEN)
            self.kv.cache_computed_blocks(req)  # every computed token is known: only the new one is pending

    def resolve(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Overlap scheduling: the committed step `out` has been read back; its tokens replace the pending
        ones and stop conditions are checked (a stopped request is finished here). Returns the requests
        that got their token: not those aborted or finished since (a preempted one keeps its token)."""
        resolved = []
        for seq in out.seqs:
            req = seq.request
            if not seq.samples or not req.has_pending_token or req.status.finished:
                continue
            req.resolve_pending_token(sampled[req.request_id])
            stopped = req.check_stop()
            if stopped is not None:
                self.finish(req, stopped)
            resolved.append(req)
        return resolved

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Finish a request wherever it is (running, waiting or preempted) and free its blocks."""
        if req.status.finished:
            return
        if req in self.running:
            self.kv.cache_computed_blocks(req)
            self.running.remove(req)
            if status is not RequestStatus.FINISHED_ABORTED:
                self.retention.pin(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.status = status
        req.timings.finished = time.monotonic()
        self.kv.free(req)

"""EngineCore: schedule -> execute -> update, one step at a time, over token ids only."""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from loopserve.config import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_CUDA_GRAPH_BATCH_SIZES,
    DEFAULT_GPU_HOST_KV_CACHE_BYTES,
    DEFAULT_MIXED_GRAPH_MAX_PROMPTS,
    DEFAULT_MIXED_GRAPH_TOKENS,
    DEFAULT_PREFILL_GRAPH_MAX_SEQS,
    DEFAULT_PREFILL_GRAPH_TOKENS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    StepGraphSpec,
    default_device,
    resolve_dtype,
)
from loopserve.engine.kv_cache import KVCacheManager, KVMoveStats
from loopserve.engine.request import Request, RequestStatus
from loopserve.engine.retention import RetentionStats
from loopserve.engine.scheduler import Scheduler
from loopserve.runner.model_runner import LaunchedStep, ModelRunner, kv_bytes_per_block
from loopserve.runner.sampler import SampledToken, Sampler
from loopserve.sampling_params import SamplingParams
from loopserve.spec.decoder import SpecDecoder
from loopserve.spec.metrics import SpecDecodeStats
from loopserve.structured.manager import StructuredOutputManager

log = logging.getLogger(__name__)

# How long an otherwise idle step waits for a compiling grammar before returning to the loop.
GRAMMAR_POLL_S = 0.005


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    wait_for: str | None = None  # a sibling sample (n > 1) whose prompt blocks this one will share
    arrival_time: float = field(default_factory=time.monotonic)
    session_id: str | None = None  # agent session: the finished turn's blocks stay pinned ...
    retention_s: float = 0.0       # ... for this many seconds (engine/retention.py)
    # The sender has checked every prompt id against the model's vocabulary (the API server: its
    # tokenizer's ids all fit, or it checked them), so add_request need not walk the prompt again: an
    # 8k-token prompt is ~0.15 ms of the engine's one thread on a 2-core VM, before its first launch.
    ids_checked: bool = False


@dataclass
class EngineOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[SampledToken] | None
    finish_reason: str | None = None   # stop | length | abort
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling; on the first output only


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    prefix_cached_tokens: int  # tokens held in blocks that later requests can hit
    spec_decode: SpecDecodeStats | None = None  # speculative decoding counters, when it is on
    retention: RetentionStats = field(default_factory=RetentionStats)
    kv_moves: KVMoveStats = field(default_factory=KVMoveStats)  # offloads, restores, copy-on-write
    host_kv_blocks: int = 0        # host-memory tier size, blocks
    host_kv_blocks_used: int = 0


def _num_kv_blocks(cache: CacheConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_bytes_per_block(model_cfg, cache.block_size, dtype)
    if cache.kv_cache_bytes is not None:
        budget = cache.kv_cache_bytes
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free - total * (1.0 - cache.gpu_memory_utilization))
    else:
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    return max(1, budget // per_block)


def _graph_tokens(ladder: tuple[int, ...], sched: SchedulerConfig) -> tuple[int, ...]:
    """A graph ladder up to its first size that holds a whole step's token budget."""
    budget = sched.max_num_batched_tokens
    return tuple(t for t in ladder if t < budget) + tuple(t for t in ladder if t >= budget)[:1]


def _step_graph_specs(config: EngineConfig, sched: SchedulerConfig) -> list[StepGraphSpec]:
    """Prefill graphs for steps of a few sequences, then (with more running) mixed-step graphs."""
    if config.enforce_eager:
        return []
    few = min(DEFAULT_PREFILL_GRAPH_MAX_SEQS, sched.max_num_seqs)
    specs = [StepGraphSpec(_graph_tokens(DEFAULT_PREFILL_GRAPH_TOKENS, sched), few, few)]
    if config.mixed_step_graphs and sched.max_num_seqs > few:
        specs.append(StepGraphSpec(_graph_tokens(DEFAULT_MIXED_GRAPH_TOKENS, sched), sched.max_num_seqs,
                                   DEFAULT_MIXED_GRAPH_MAX_PROMPTS))
    return specs


def _num_host_blocks(cache: CacheConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    if not cache.enable_prefix_caching:
        return 0
    budget = cache.host_kv_cache_bytes
    if budget is None:
        budget = DEFAULT_GPU_HOST_KV_CACHE_BYTES if device.type == "cuda" else 0
    return budget // kv_bytes_per_block(model_cfg, cache.block_size, dtype)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        from loopserve.fetch import resolve_model
        from loopserve.model import load_model

        self.config = config
        self.device = torch.device(config.device) if config.device else default_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_path = resolve_model(config.model)
        torch.manual_seed(config.seed)
        self.model, self.model_config = load_model(self.model_path, config.load_format, self.dtype, self.device)
        cache = config.cache
        num_blocks = _num_kv_blocks(cache, self.model_config, self.dtype, self.device)
        capacity = num_blocks * cache.block_size
        max_pos = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_pos:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {max_pos}")
        wanted = config.max_model_len or min(max_pos, config.scheduler.max_model_len)
        if wanted > capacity:
            log.warning("max_model_len %d exceeds the KV cache (%d tokens); capping it", wanted, capacity)
        self.max_model_len = min(wanted, capacity)
        sched_cfg = SchedulerConfig(
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs,
            long_prefill_token_threshold=config.scheduler.long_prefill_token_threshold,
            max_model_len=self.max_model_len,
            long_prompt_threshold=config.scheduler.long_prompt_threshold,
            long_prompt_chunk=config.scheduler.long_chunk(on_gpu=self.device.type == "cuda"))
        num_host_blocks = _num_host_blocks(cache, self.model_config, self.dtype, self.device)
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, num_host_blocks)
        self.scheduler = Scheduler(sched_cfg, self.kv)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids, seed=config.seed, device=self.device)
        from loopserve.model.gemv import HAS_TRITON, MAX_GEMV_ROWS
        if config.fused_decode_gemv == "on":
            if not HAS_TRITON:
                raise ValueError("fused_decode_gemv needs triton, which is not installed")
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("fused_decode_gemv needs a CUDA device (or Triton's interpreter, for tests)")
            self.model.fused_gemv_rows = MAX_GEMV_ROWS  # before the runner captures its graphs
        # "auto": the runner's decode graphs time both ways (only with graphs, i.e. on CUDA).
        choose_fused_rows = MAX_GEMV_ROWS if config.fused_decode_gemv == "auto" and HAS_TRITON else 0
        graph_sizes = [] if config.enforce_eager else [
            b for b in DEFAULT_CUDA_GRAPH_BATCH_SIZES if b < sched_cfg.max_num_seqs] + [sched_cfg.max_num_seqs]
        self.runner = ModelRunner(self.model, self.model_config, num_blocks, cache.block_size,
                                  self.device, self.dtype, self.sampler, attention_backend=config.attention_backend,
                                  cuda_graph_sizes=graph_sizes, max_model_len=self.max_model_len,
                                  num_host_blocks=num_host_blocks,
                                  step_graphs=_step_graph_specs(config, sched_cfg),
                                  choose_fused_gemv_rows=choose_fused_rows,
                                  pdl=config.programmatic_dependent_launch,
                                  max_step_tokens=sched_cfg.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._structured: StructuredOutputManager | None = None
        self.spec: SpecDecoder | None = None
        if config.speculative is not None:
            self.spec = SpecDecoder.build(config.speculative, self)
            log.info("speculative decoding: %s, k <= %d", config.speculative.method,
                     config.speculative.num_speculative_tokens)
        # On a CPU the forward is not asynchronous: there is nothing to hide host work behind.
        overlap = self.device.type == "cuda" if config.overlap_scheduling is None else config.overlap_scheduling
        if overlap and self.spec is not None:
            if config.overlap_scheduling:
                log.warning("overlap scheduling is off: speculative decoding needs each step's tokens first")
            overlap = False
        self.overlap = overlap
        self._in_flight: LaunchedStep | None = None  # overlap scheduling: launched, not read back yet
        log.info("engine ready: %s on %s/%s, %d KV blocks x %d tokens (+%d in host memory), max_model_len %d, "
                 "overlap scheduling %s", self.model_path, self.device, self.dtype, num_blocks, cache.block_size,
                 num_host_blocks, self.max_model_len, "on" if overlap else "off")

    @property
    def structured(self) -> StructuredOutputManager:
        """Grammar compiler and masks; created (tokenizer loaded on a worker thread) on first use."""
        if self._structured is None:
            from loopserve.model.tokenizer import load_tokenizer
            path = self.model_path
            self._structured = StructuredOutputManager(lambda: load_tokenizer(path), self.model_config.vocab_size,
                                                       self.eos_token_ids)
            self.runner.structured = self._structured
        return self._structured

    def add_request(self, er: EngineRequest) -> None:
        n = len(er.prompt_token_ids)
        if er.request_id in self.requests:
            raise ValueError(f"request id {er.request_id!r} is already in use")
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but the context window is {self.max_model_len} tokens "
                             f"(at least one must be left for the output)")
        if not er.ids_checked:
            vocab = self.model_config.vocab_size
            bad = next((t for t in er.prompt_token_ids if not (0 <= t < vocab)), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        gen = None
        if er.params.seed is not None:
            gen = Sampler.make_generator(er.params.seed, self.device)
        sibling = self.requests.get(er.wait_for) if er.wait_for else None
        if er.retention_s < 0:
            raise ValueError(f"retention_s must be >= 0, got {er.retention_s}")
        req = Request(er.request_id, er.prompt_token_ids, er.params, self.max_model_len, self.eos_token_ids,
                      cache_salt=er.cache_salt, generator=gen, wait_for=sibling, session_id=er.session_id,
                      retention_s=er.retention_s if er.session_id else 0.0)
        req.timings.arrival = er.arrival_time
        if er.params.structured_outputs is not None:
            req.grammar = self.structured.grammar_for(er.request_id, er.params.structured_outputs)
        self.requests[er.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_ids: list[str]) -> None:
        self.finish(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_ids: list[str], status: RequestStatus, stop_reason: str | None = None) -> None:
        """End requests from outside the step loop (abort, or a stop string found by the detokenizer)."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                req.stop_reason = stop_reason if stop_reason is not None else req.stop_reason
                self.scheduler.finish(req, status)
                if req.grammar is not None:
                    self._structured.forget(rid)
                if self.spec is not None:
                    self.spec.release(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def expire_sessions(self) -> int:
        """End session pins whose retention hint has passed (the step loop does this itself)."""
        return self.scheduler.retention.expire()

    def step(self) -> list[EngineOutput]:
        failed: list[EngineOutput] = []
        if self._structured is not None:
            failed = self._fail_grammars()
        if self.overlap:
            return failed + self._step_overlapped()
        spec = self.spec
        t0 = time.perf_counter()
        draft_probs = spec.propose(self.scheduler.running) if spec is not None else {}
        sched = self.scheduler.schedule()
        if spec is not None:
            for rid in sched.preempted:
                spec.release(rid)
        if sched.empty:
            if self._structured is not None and not failed:
                self._structured.wait_pending(GRAMMAR_POLL_S)  # only grammars are left to wait for
            return failed
        result = self.runner.execute(sched, draft_probs, want_predictions=spec is not None and spec.wants_predictions)
        if spec is not None:
            spec.observe(sched, result.sampled, result.predictions)
            spec.record_step(sched, time.perf_counter() - t0)
        for rid, toks in result.sampled.items():
            grammar = self.requests[rid].grammar
            if grammar is not None:
                grammar.accept([t.token_id for t in toks])
        before = {rid: self.requests[rid].num_output_tokens for rid in result.sampled}
        self.scheduler.update(sched, {k: [t.token_id for t in v] for k, v in result.sampled.items()})
        outputs = failed
        now = time.monotonic()
        for rid, toks in result.sampled.items():
            req = self.requests[rid]
            # A stop inside a run of accepted tokens drops the rest: report only what was appended.
            new = req.output_token_ids[before[rid]:]
            if new:
                outputs.append(self._output(req, new, toks[:len(new)], now))
        return outputs

    def _step_overlapped(self) -> list[EngineOutput]:
        """Overlap scheduling: schedule step N+1 and queue its forward, then read back step N (while
        the device runs N+1's forward), then queue N+1's sampling, which sees N's tokens (grammar
        masks, penalties). The host's share of a step hides behind the device's. N+1 already holds
        rows for requests that N finishes (their results are dropped) and takes N's tokens as inputs
        on the device."""
        outputs: list[EngineOutput] = []
        prev = self._in_flight
        self._in_flight = None
        sched = self.scheduler.schedule()
        if sched.empty:
            if prev is not None:
                outputs += self._resolve(prev)
            elif self._structured is not None:
                self._structured.wait_pending(GRAMMAR_POLL_S)  # only grammars are left to wait for
            return outputs

        def read_back() -> None:
            outputs.extend(self._resolve(prev))

        self._in_flight = self.runner.launch(sched, prev, read_back if prev is not None else None)
        self.scheduler.commit(sched)
        return outputs

    def _resolve(self, step: LaunchedStep) -> list[EngineOutput]:
        result = step.result()
        tokens = {rid: toks[0] for rid, toks in result.sampled.items()}
        resolved = self.scheduler.resolve(step.out, {rid: t.token_id for rid, t in tokens.items()})
        now = time.monotonic()
        outputs = []
        for req in resolved:
            tok = tokens[req.request_id]
            if req.grammar is not None:
                req.grammar.accept([tok.token_id])
            outputs.append(self._output(req, [tok.token_id], [tok], now))
        return outputs

    def _output(self, req: Request, new: list[int], sampled: list[SampledToken], now: float) -> EngineOutput:
        """The engine output for `new` tokens appended to `req` this step (ends the request if it finished)."""
        out = EngineOutput(req.request_id, new, sampled if req.params.logprobs is not None else None,
                           num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0))
        if req.timings.first_token is None:
            req.timings.first_token = now
            out.queue_time = req.timings.first_scheduled - req.timings.arrival
        if req.status.finished:
            out.finish_reason = req.status.value
            out.stop_reason = req.stop_reason
            del self.requests[req.request_id]
            if self.spec is not None:
                self.spec.release(req.request_id)
        return out

    def _fail_grammars(self) -> list[EngineOutput]:
        """Requests whose grammar did not compile end as aborted, with the reason as stop_reason."""
        outputs = []
        for rid, reason in self._structured.failed():
            req = self.requests.get(rid)
            if req is None:
                continue
            log.warning("request %s: %s", rid, reason)
            self.finish([rid], RequestStatus.FINISHED_ABORTED, reason)
            outputs.append(EngineOutput(rid, [], None, finish_reason=RequestStatus.FINISHED_ABORTED.value,
                                        stop_reason=reason, num_prompt_tokens=req.num_prompt_tokens))
        return outputs

    def stats(self) -> EngineStats:
        s = self.kv.stats
        host = self.kv.pool.host
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv.usage(),
                           self.kv.num_blocks, self.kv.num_free_blocks, s.queried_tokens, s.hit_tokens,
                           self.scheduler.num_preemptions, self.kv.pool.num_cached_blocks * self.kv.block_size,
                           spec_decode=copy.deepcopy(self.spec.stats) if self.spec is not None else None,
                           retention=self.scheduler.retention.stats(), kv_moves=copy.copy(self.kv.pool.moves),
                           host_kv_blocks=host.num_slots if host is not None else 0,
                           host_kv_blocks_used=len(host) if host is not None else 0)

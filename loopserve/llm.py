"""Offline API: LLM(model).generate(prompts, params) and .chat(messages), in-process, vLLM-shaped."""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from loopserve.config import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS,
    DEFAULT_SESSION_RETENTION_S,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from loopserve.engine.core import EngineCore, EngineRequest, EngineStats
from loopserve.engine.output_processor import OutputProcessor
from loopserve.engine.request import RequestStatus
from loopserve.model.prompt_encoder import PromptEncoder
from loopserve.outputs import RequestOutput
from loopserve.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str | None = None,
                 load_format: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 tokenizer: str | None = None, block_size: int = CacheConfig.block_size,
                 kv_cache_bytes: int | None = None, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = CacheConfig.gpu_memory_utilization,
                 enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 long_prefill_token_threshold: int | None = None,
                 long_prompt_threshold: int = SchedulerConfig.long_prompt_threshold,
                 long_prompt_chunk: int | None = None,
                 host_kv_cache_bytes: int | None = None,
                 speculative_config: dict | SpeculativeConfig | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False,
                 overlap_scheduling: bool | None = None, fused_decode_gemv: str = "auto",
                 programmatic_dependent_launch: bool = True, mixed_step_graphs: bool = True,
                 prompt_segment_cache_tokens: int = DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS) -> None:
        from loopserve.model import load_tokenizer

        config = EngineConfig(
            model=model, dtype=dtype, device=device, load_format=load_format, seed=seed,
            max_model_len=max_model_len, tokenizer=tokenizer,
            cache=CacheConfig(block_size=block_size, kv_cache_bytes=kv_cache_bytes, num_blocks=num_kv_blocks,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching, host_kv_cache_bytes=host_kv_cache_bytes),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      long_prefill_token_threshold=long_prefill_token_threshold,
                                      long_prompt_threshold=long_prompt_threshold,
                                      long_prompt_chunk=long_prompt_chunk),
            speculative=SpeculativeConfig.from_dict(speculative_config),
            attention_backend=attention_backend, enforce_eager=enforce_eager,
            overlap_scheduling=overlap_scheduling, fused_decode_gemv=fused_decode_gemv,
            programmatic_dependent_launch=programmatic_dependent_launch, mixed_step_graphs=mixed_step_graphs)
        self.engine = EngineCore(config)
        self.tokenizer = load_tokenizer(tokenizer or self.engine.model_path)
        self._processor = OutputProcessor(self.tokenizer)
        self._prompt_encoder = PromptEncoder(self.tokenizer, prompt_segment_cache_tokens)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- prompts -------------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._prompt_encoder.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self._prompt_encoder.encode(prompt["prompt"], add_special_tokens=True)
        raise ValueError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}")

    def render_chat(self, messages: Conversation, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **(chat_template_kwargs or {}))

    def _chat_prompt(self, messages: Conversation, **kw) -> dict[str, Any]:
        text = self.render_chat(messages, **kw)
        # The template already wrote any BOS it wants; don't let the tokenizer add another.
        return {"prompt": text, "prompt_token_ids": self._prompt_encoder.encode(text)}

    # ---- running -------------------------------------------------------------------------------

    def _add(self, prompt: PromptType, params: SamplingParams, session_id: str | None = None,
             retention_s: float | None = None) -> str:
        text, ids = self._tokenize(prompt)
        request_id = str(next(self._ids))
        engine_ids = self._processor.add(request_id, text, ids, params)
        added: list[str] = []
        try:
            for i, rid in enumerate(engine_ids):
                sample_params = params.for_sample(i) if params.n > 1 else params
                self.engine.add_request(EngineRequest(
                    rid, ids, sample_params, wait_for=engine_ids[0] if i else None, session_id=session_id,
                    retention_s=DEFAULT_SESSION_RETENTION_S if retention_s is None else retention_s))
                added.append(rid)
        except Exception:
            self.engine.abort(added)
            self._processor.discard(request_id)
            raise
        return request_id

    def _step(self):
        step = self._processor.process(self.engine.step())
        for rid, stop in step.stopped:
            self.engine.finish([rid], RequestStatus.FINISHED_STOPPED, stop)
        return step

    def _abort_all(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(self._processor.discard(rid))

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 session_id: str | None = None, retention_s: float | None = None) -> list[RequestOutput]:
        """`session_id`: the prompts are turns of one agent session; when each finishes, its cached
        blocks stay pinned for `retention_s` seconds (default DEFAULT_SESSION_RETENTION_S)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        request_ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_ids.append(self._add(prompt, params, session_id, retention_s))
            while self.engine.has_unfinished():
                for update in self._step().updates:
                    results[update.output.request_id] = update.output
        except BaseException:
            self._abort_all(request_ids)
            raise
        return sorted(results.values(), key=lambda r: int(r.request_id))

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._chat_prompt(c, add_generation_prompt=add_generation_prompt,
                                     chat_template_kwargs=chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params)

    def chat_stream(self, messages: Conversation, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the reply's text deltas as they are decoded (n is forced to 1)."""
        params = replace(sampling_params or SamplingParams(), n=1)
        request_id = self._add(self._chat_prompt(messages), params)
        try:
            while self.engine.has_unfinished():
                for update in self._step().updates:
                    for delta in update.deltas:
                        if delta.text:
                            yield delta.text
        finally:
            self._abort_all([request_id])

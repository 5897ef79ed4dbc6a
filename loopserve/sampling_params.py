"""SamplingParams: vLLM-compatible sampling settings, validated at the boundary."""
from __future__ import annotations

from dataclasses import dataclass, replace

from loopserve.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: sampled token's logprob plus the top k
    skip_special_tokens: bool = True
    # The output must match this grammar (JSON schema, regex, choice, EBNF/Lark): constrained decoding.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "an integer in [1, 128]")
        check(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]")
        check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "top_k", "-1, 0 (off) or >= 1")
        check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]")
        check(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
              "repetition_penalty", "in (0, 10]")
        check(is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]")
        check(is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
              "frequency_penalty", "in [-2, 2]")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
              "seed", "an integer or None")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              "max_tokens", "an integer >= 1 or None")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "a list of non-negative token ids")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
              "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.structured_outputs is not None:
            check(isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
                  "a StructuredOutputsParams or a dict of its fields")
            self.structured_outputs.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def for_sample(self, index: int) -> "SamplingParams":
        """Params of the index-th of n parallel samples: n=1, and seed+index so seeded samples differ."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]

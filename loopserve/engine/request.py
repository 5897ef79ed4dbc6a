"""Request: the engine's record of one sequence being generated."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from loopserve.sampling_params import SamplingParams

# Overlap scheduling: the id a sampled token has on the host until its step's results are read back.
# Only ever the last token of a request; the runner fills it in on the device from the step's output.
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestTimings:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


class Request:
    """Token ids, progress and settings of one sequence.

    Invariant: tokens [0, num_computed_tokens) have their KV in the blocks the cache manager holds
    for this request; the scheduler moves num_computed_tokens towards num_tokens every step.
    Speculative decoding: `spec_token_ids` are proposed tokens that follow all_token_ids for one
    step only. They are scheduled and written to the cache like known tokens, but they are not part
    of all_token_ids and num_computed_tokens only counts those the target accepted.
    Overlap scheduling: while the step that samples a request's next token is in flight, that token
    is PENDING_TOKEN at the end of all_token_ids and output_token_ids (counted, not yet known).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = (), cache_salt: str | None = None,
                 generator: torch.Generator | None = None, wait_for: Request | None = None,
                 session_id: str | None = None, retention_s: float = 0.0) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.generator = generator
        # A parallel sample (n > 1) waits for its first sibling's prefill so it can share those blocks.
        self.wait_for = wait_for
        # Agent session: when a turn finishes, its cached blocks stay pinned for retention_s seconds.
        self.session_id = session_id
        self.retention_s = retention_s
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first scheduling; -1 until known
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.timings = RequestTimings()
        self.block_hashes: list[bytes] = []  # hashes of this request's full blocks, in order
        self.spec_token_ids: list[int] = []  # this step's proposal (speculative decoding), else empty
        self.grammar = None  # RequestGrammar when the output is constrained (loopserve/structured)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_output_tokens(self) -> int:
        room = self.max_model_len - self.num_prompt_tokens
        return room if self.params.max_tokens is None else min(self.params.max_tokens, room)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def has_pending_token(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING_TOKEN

    @property
    def certain_to_finish(self) -> bool:
        """A pending token will end the request by length whatever its value: nothing to schedule."""
        return self.has_pending_token and (self.num_output_tokens >= self.max_output_tokens
                                           or self.num_tokens >= self.max_model_len)

    def resolve_pending_token(self, token_id: int) -> None:
        assert self.has_pending_token, "no pending token to resolve"
        self.output_token_ids[-1] = token_id
        self.all_token_ids[-1] = token_id

    def check_stop(self) -> RequestStatus | None:
        """Stop conditions decided by token ids; stop strings are the detokenizer's business."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_output_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.value}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens})")

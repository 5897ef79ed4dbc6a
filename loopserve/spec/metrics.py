"""Speculative decoding counters, exported through EngineStats (and /metrics by the server)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    method: str
    num_drafts: int = 0            # verify passes that carried at least one proposed token
    num_draft_tokens: int = 0      # proposed tokens the target scored
    num_accepted_tokens: int = 0   # of those, accepted
    num_emitted_tokens: int = 0    # tokens those passes produced (accepted + the target's own)
    num_disabled_steps: int = 0    # steps where the batch was too large to speculate
    # accepted_per_position[i]: how often proposed token i was accepted (vLLM's per-position counter)
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.num_emitted_tokens += accepted + 1
        if len(self.accepted_per_position) < accepted:
            self.accepted_per_position.extend([0] * (accepted - len(self.accepted_per_position)))
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target forward for speculating requests (1.0 = no gain)."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict:
        return {"method": self.method, "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "num_emitted_tokens": self.num_emitted_tokens,
                "num_disabled_steps": self.num_disabled_steps, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length,
                "accepted_per_position": list(self.accepted_per_position)}

"""Per-request proposal length that follows the request's acceptance and the batch it runs in.

Acceptance is modelled per token: each proposed token is accepted with probability a, independently,
until the first rejection. A verify pass with k proposals then yields E(k) = (1 - a^(k+1)) / (1 - a)
tokens. Its cost, in one-token decode steps, is 1 + k * c with c the cost of one more token:

* a step costs roughly w + t * (tokens in it): streaming the weights (w) plus per-token compute (t).
  `verify_token_cost` is c at batch 1, t / (w + t); with B requests decoding, every one of them waits
  for a request's extra tokens, and c(B) = B t / (w + B t) grows towards 1 as compute takes over.
* a draft model adds `draft_token_cost` per proposed token (one draft step each).

The controller keeps a as an exponentially weighted ratio of accepted tokens to tried tokens (a pass
that accepts j < k of its proposals tried j + 1; one that accepts all tried k), and picks the k that
maximises E(k) / (1 + k c(B)). When even the best k is not worth `min_gain`, the request stops
speculating for `reprobe_interval` steps and then probes again with one token.
"""
from __future__ import annotations

from dataclasses import dataclass

from loopserve.config import SpeculativeConfig


@dataclass
class AdaptiveState:
    accepted: float  # EWMA numerator: accepted tokens
    tried: float     # EWMA denominator: tokens whose acceptance was tested
    off_steps: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.tried if self.tried > 0 else 0.0


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verify pass yields with k proposals and per-token acceptance `rate`."""
    if rate >= 1.0 - 1e-9:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


class AdaptiveLength:
    def __init__(self, cfg: SpeculativeConfig, draft_token_cost: float = 0.0) -> None:
        self.cfg = cfg
        self.k_max = cfg.num_speculative_tokens
        self.draft_token_cost = draft_token_cost
        c1 = min(cfg.verify_token_cost, 0.99)
        self._t_over_w = c1 / (1.0 - c1)  # per-token compute over weight streaming, from c at batch 1
        self._tables: dict[int, list[tuple[int, float]]] = {}

    def token_cost(self, batch: int) -> float:
        """c(B): one more proposed token, in decode steps of a batch of B."""
        bt = max(1, batch) * self._t_over_w
        return bt / (1.0 + bt) + self.draft_token_cost

    def best(self, rate: float, batch: int = 1) -> tuple[int, float]:
        """(k, expected speedup) maximising tokens per cost, for rates on a 0.01 grid."""
        table = self._tables.get(batch)
        if table is None:
            c = self.token_cost(batch)
            table = self._tables[batch] = [
                max((expected_tokens(i / 100, k) / (1.0 + k * c), k) for k in range(1, self.k_max + 1))[::-1]
                for i in range(101)]
        return table[min(100, max(0, round(rate * 100)))]

    def new_state(self) -> AdaptiveState:
        return AdaptiveState(accepted=self.cfg.initial_acceptance, tried=1.0)

    def length(self, st: AdaptiveState, batch: int = 1) -> int:
        """k for this step (0: not speculating). Called once per step the request could speculate,
        with the number of requests decoding in that step."""
        if not self.cfg.adaptive:
            return self.k_max
        if st.off_steps > 0:
            st.off_steps -= 1
            return 0 if st.off_steps > 0 else 1  # the last off step is a one-token probe
        k, gain = self.best(st.rate, batch)
        if gain < self.cfg.min_gain:
            st.off_steps = self.cfg.reprobe_interval - 1
            return 0
        return k

    def observe(self, st: AdaptiveState, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        w = self.cfg.acceptance_ewma
        tried = accepted + (1 if accepted < proposed else 0)
        st.accepted = (1.0 - w) * st.accepted + w * accepted
        st.tried = (1.0 - w) * st.tried + w * tried

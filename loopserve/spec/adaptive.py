"""Per-request proposal length that follows the request's acceptance and the batch it runs in.

Acceptance is modelled per token: each proposed token is accepted with probability a, independently,
until the first rejection. A verify pass with k proposals then yields E(k) = (1 - a^(k+1)) / (1 - a)
tokens. Its cost, in one-token decode steps, is 1 + k * c with c the cost of one more token:

* a step costs roughly w + t * (tokens in it): streaming the weights (w) plus per-token compute (t).
  `verify_token_cost` is c at batch 1, t / (w + t); with B requests decoding, every one of them waits
  for a request's extra tokens, and c(B) = B t / (w + B t) grows towards 1 as compute takes over.
* a draft model adds `draft_token_cost` per proposed token (one draft step each).

* a speculating step also pays a fixed overhead f that no constant predicts (a verify pass takes the
  extend-attention path, the proposer does its own bookkeeping). `StepCost` measures it: the wall time
  of pure-decode steps that speculated, over the running mean of those that did not at the same batch
  size, minus the modelled 1 + K c(B). Until both kinds of step have been seen, f is 0; so while a
  batch size has no plain baseline and some request's modelled gain is doubtful (< DOUBTFUL_GAIN),
  every PLAIN_PROBE_INTERVAL-th step at that size runs without speculation (SpecDecoder) to measure one.

The controller keeps a as an exponentially weighted ratio of accepted tokens to tried tokens (a pass
that accepts j < k of its proposals tried j + 1; one that accepts all tried k), and picks the k that
maximises E(k) / (1 + f + k c(B)). When even the best k is not worth `min_gain`, the request stops
speculating for `reprobe_interval` steps and then probes again with one token; each probe that fails
doubles the pause (up to 2^MAX_BACKOFF times), so a workload where speculation never pays converges
to plain decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

from loopserve.config import SpeculativeConfig


MAX_BACKOFF = 4
# Weight of the newest step time in StepCost's running means; a few dozen steps make an estimate.
STEP_COST_EWMA = 0.1
STEP_COST_MIN_SAMPLES = 4
PLAIN_PROBE_INTERVAL = 4
OVERHEAD_REBUILD = 0.01  # a measured-overhead change that rebuilds best()'s table
DOUBTFUL_GAIN = 1.5  # only requests whose modelled gain is below this wait for a measured baseline


@dataclass
class AdaptiveState:
    accepted: float  # EWMA numerator: accepted tokens
    tried: float     # EWMA denominator: tokens whose acceptance was tested
    off_steps: int = 0
    backoff: int = 0        # failed probes in a row
    probing: bool = False   # the last k handed out was a probe

    @property
    def rate(self) -> float:
        return self.accepted / self.tried if self.tried > 0 else 0.0


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verify pass yields with k proposals and per-token acceptance `rate`."""
    if rate >= 1.0 - 1e-9:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


class _Mean:
    """Exponentially weighted mean that starts as a plain mean (no bias towards a zero start)."""

    def __init__(self) -> None:
        self.value = 0.0
        self.n = 0

    def add(self, x: float) -> None:
        self.n += 1
        self.value += (x - self.value) * max(STEP_COST_EWMA, 1.0 / self.n)


class StepCost:
    """Measured fixed overhead of a speculating step, in plain decode steps of the same batch."""

    def __init__(self, token_cost) -> None:
        self._token_cost = token_cost  # c(B), the modelled cost of one more token
        self._plain: dict[int, _Mean] = {}  # batch size -> seconds of a step with no proposals
        self._excess: dict[int, _Mean] = {}  # batch size -> measured / plain - (1 + K c(B))

    def record(self, batch: int, spec_tokens: int, seconds: float) -> None:
        """One pure-decode step: `batch` requests, `spec_tokens` proposed tokens among them."""
        if spec_tokens == 0:
            self._plain.setdefault(batch, _Mean()).add(seconds)
            return
        plain = self._plain.get(batch)
        if plain is None or plain.n < STEP_COST_MIN_SAMPLES or plain.value <= 0:
            return
        excess = seconds / plain.value - 1.0 - spec_tokens * self._token_cost(batch)
        self._excess.setdefault(batch, _Mean()).add(excess)

    def needs_plain(self, batch: int) -> bool:
        """No baseline yet at this batch size: the overhead cannot be measured until a few steps run plain."""
        plain = self._plain.get(batch)
        return plain is None or plain.n < STEP_COST_MIN_SAMPLES

    def overhead(self, batch: int) -> float:
        m = self._excess.get(batch)
        return max(0.0, m.value) if m is not None and m.n >= STEP_COST_MIN_SAMPLES else 0.0


class AdaptiveLength:
    def __init__(self, cfg: SpeculativeConfig, draft_token_cost: float = 0.0) -> None:
        self.cfg = cfg
        self.k_max = cfg.num_speculative_tokens
        self.draft_token_cost = draft_token_cost
        c1 = min(cfg.verify_token_cost, 0.99)
        self._t_over_w = c1 / (1.0 - c1)  # per-token compute over weight streaming, from c at batch 1
        self.step_cost = StepCost(self.token_cost)
        # batch size -> (overhead it was built for, best (k, gain) per rate on a 0.01 grid): best() runs for
        # every speculating request every step, so it is a lookup, rebuilt only when the overhead moves.
        self._tables: dict[int, tuple[float, list[tuple[int, float]]]] = {}

    def token_cost(self, batch: int) -> float:
        """c(B): one more proposed token, in decode steps of a batch of B."""
        bt = max(1, batch) * self._t_over_w
        return bt / (1.0 + bt) + self.draft_token_cost

    def best(self, rate: float, batch: int = 1) -> tuple[int, float]:
        """(k, expected speedup) maximising tokens per cost, for rates on a 0.01 grid."""
        overhead = self.step_cost.overhead(batch)
        built = self._tables.get(batch)
        if built is None or abs(built[0] - overhead) > OVERHEAD_REBUILD:
            c, base = self.token_cost(batch), 1.0 + overhead
            built = self._tables[batch] = (overhead, [
                max((expected_tokens(i / 100, k) / (base + k * c), k) for k in range(1, self.k_max + 1))[::-1]
                for i in range(101)])
        return built[1][min(100, max(0, round(rate * 100)))]

    def new_state(self) -> AdaptiveState:
        return AdaptiveState(accepted=self.cfg.initial_acceptance, tried=1.0)

    def length(self, st: AdaptiveState, batch: int = 1) -> int:
        """k for this step (0: not speculating). Called once per step the request could speculate,
        with the number of requests decoding in that step."""
        if not self.cfg.adaptive:
            return self.k_max
        if st.off_steps > 0:
            st.off_steps -= 1
            st.probing = st.off_steps == 0
            return 1 if st.probing else 0  # the last off step is a one-token probe
        k, gain = self.best(st.rate, batch)
        if gain < self.cfg.min_gain:
            st.backoff = min(st.backoff + 1, MAX_BACKOFF) if st.probing else 0
            st.off_steps = self.cfg.reprobe_interval * (1 << st.backoff) - 1
            st.probing = False
            return 0
        st.backoff = 0
        st.probing = False
        return k

    def observe(self, st: AdaptiveState, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        w = self.cfg.acceptance_ewma
        tried = accepted + (1 if accepted < proposed else 0)
        st.accepted = (1.0 - w) * st.accepted + w * accepted
        st.tried = (1.0 - w) * st.tried + w * tried

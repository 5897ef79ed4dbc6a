"""Lookahead decoding (Jacobi iteration with an n-gram pool), no draft model.

Each speculating request keeps a window of Jacobi guesses for the positions after its last token. The
window rides along in the verify pass as the proposal, so the target's argmax at every window
position comes back for free; the predictions past the accepted prefix become the next guesses (one
Jacobi iteration per step: x_i <- argmax p(. | x_<i)).

Trajectories (and the prompt and generated text, where they converged) feed an n-gram pool. The
prediction at a position was made right after the token fed at the position before; when that token
was itself last step's prediction, the two belong to one trajectory. Following trajectories across
steps gives chains of tokens each predicted after the previous one (the diagonals of lookahead
decoding's 2D window); every chain of N tokens goes into the request's pool keyed by its first
token. A proposal is a pool n-gram starting with the request's last token (preferring one that
agrees with the window), followed by the window's guesses. Proposals
are deterministic, so verification is the standard point-mass one and the output stays lossless.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loopserve.config import SpeculativeConfig
from loopserve.engine.request import Request
from loopserve.spec.base import Proposal


@dataclass
class _State:
    guesses: list[int] = field(default_factory=list)
    guess_pos: int = -1  # absolute position of guesses[0]
    chains: dict[int, tuple[int, ...]] = field(default_factory=dict)  # position -> chain ending there
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # first token -> continuations
    num_seen: int = 0  # tokens of the request whose n-grams are in the pool


class LookaheadProposer:
    method = "lookahead"
    wants_predictions = True

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.n = cfg.lookahead_ngram_size
        self.pool_size = cfg.lookahead_pool_size
        self._states: dict[str, _State] = {}

    def _add(self, st: _State, chain: tuple[int, ...]) -> None:
        cont = chain[1:]
        entries = st.pool.setdefault(chain[0], [])
        if cont in entries:
            entries.remove(cont)
        entries.append(cont)  # most recent last
        if len(entries) > self.pool_size:
            del entries[0]

    def propose(self, wants: list[tuple[Request, int]]) -> dict[str, Proposal]:
        out = {}
        for req, k in wants:
            st = self._states.setdefault(req.request_id, _State())
            tokens = req.all_token_ids
            # The prompt and the output (where every trajectory converged) join the pool too: agent
            # outputs copy their inputs, and this keeps the pool growing while the request is not
            # speculating. The prompt is read once, on the request's first proposal.
            for end in range(max(st.num_seen, self.n), req.num_tokens + 1):
                self._add(st, tuple(tokens[end - self.n:end]))
            st.num_seen = req.num_tokens + 1
            guesses = st.guesses if st.guess_pos == req.num_tokens else []
            prop: list[int] = []
            cands = st.pool.get(tokens[-1])
            if cands:
                agree = [c for c in cands if guesses and c[0] == guesses[0]]
                prop = list((agree or cands)[-1][:k])
            prop.extend(guesses[len(prop):k])
            while len(prop) < k:  # chain pool n-grams past the window
                more = st.pool.get(prop[-1] if prop else tokens[-1])
                if not more:
                    break
                prop.extend(more[-1][:k - len(prop)])
            if len(prop) < k:
                # Fresh window: seed the missing guesses with recent context (Jacobi starts anywhere).
                prop.extend(tokens[-(k - len(prop)):])
            out[req.request_id] = Proposal(prop[:k])
        return out

    def observe(self, request: Request, proposed: list[int], emitted: list[int],
                predictions: list[int] | None) -> None:
        if predictions is None:
            return
        st = self._states.setdefault(request.request_id, _State())
        base = request.num_tokens - 1  # position of the last known token, fed first
        fed = [request.all_token_ids[-1]] + list(proposed)
        chains: dict[int, tuple[int, ...]] = {}
        for j, (x, y) in enumerate(zip(fed, predictions)):
            prev = st.chains.get(base + j)
            chain = ((prev if prev is not None and prev[-1] == x else (x,)) + (y,))[-self.n:]
            if len(chain) == self.n:
                self._add(st, chain)
            chains[base + j + 1] = chain
        a = len(emitted) - 1
        st.guess_pos = base + a + 2  # the position after the target's own token
        st.guesses = list(predictions[a + 1:])
        # The next pass feeds the target's token (at guess_pos - 1) first: keep its chain and later ones.
        st.chains = {p: c for p, c in chains.items() if p >= st.guess_pos - 1}

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

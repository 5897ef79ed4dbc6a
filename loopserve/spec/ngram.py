"""Prompt lookup (n-gram) proposer: no model, just the request's own text.

The longest suffix of prompt + output, between prompt_lookup_max and prompt_lookup_min tokens, is
searched for earlier in the text; the tokens that followed its most recent earlier occurrence are
proposed. Copying may run into the suffix itself (as LZ77 does), so a repeating pattern of period p
still yields k tokens, not just p.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from loopserve.config import SpeculativeConfig
from loopserve.engine.request import Request
from loopserve.spec.base import Proposal


class _Tokens:
    """A request's token ids as a growing numpy buffer (tokens are only ever appended)."""

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        m = len(tokens)
        if m < self.n:  # cannot happen for one request; be safe anyway
            self.n = 0
        if m > len(self.buf):
            grown = np.empty(max(m, 2 * len(self.buf)), dtype=np.int64)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        if m > self.n:
            self.buf[self.n:m] = tokens[self.n:m]
            self.n = m
        return self.buf[:m]


def ngram_lookup(arr: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Proposal after the longest matching suffix (n_max down to n_min) of arr; [] if none."""
    length = len(arr)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = arr[length - n:]
        # Windows starting at i = 0 .. length - n - 1: each has at least one token after it.
        windows = sliding_window_view(arr[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits) == 0:
            continue
        src = int(hits[-1]) + n  # first token after the most recent earlier occurrence
        out: list[int] = []
        for j in range(k):
            pos = src + j
            out.append(int(arr[pos]) if pos < length else out[pos - length])
        return out
    return []


class NgramProposer:
    method = "ngram"
    wants_predictions = False

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.n_min, self.n_max = cfg.prompt_lookup_min, cfg.prompt_lookup_max
        self._tokens: dict[str, _Tokens] = {}

    def propose(self, wants: list[tuple[Request, int]]) -> dict[str, Proposal]:
        out = {}
        for req, k in wants:
            arr = self._tokens.setdefault(req.request_id, _Tokens()).sync(req.all_token_ids)
            toks = ngram_lookup(arr, self.n_min, self.n_max, k)
            if toks:
                out[req.request_id] = Proposal(toks)
        return out

    def observe(self, request, proposed, emitted, predictions) -> None:
        pass

    def release(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)

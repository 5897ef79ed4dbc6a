"""The proposer interface and small shared helpers."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from loopserve.engine.request import Request


@dataclass
class Proposal:
    """Tokens proposed to follow a request's known tokens.

    probs: [len(token_ids), V] the distribution each token was drawn from (a draft model sampling),
    so verification can use rejection sampling; None means a deterministic proposal (a point mass).
    """
    token_ids: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    method: str
    # Whether observe() needs the target's argmax prediction at every verified position.
    wants_predictions: bool

    def propose(self, wants: list[tuple[Request, int]]) -> dict[str, Proposal]:
        """At most k tokens for each (request, k); every request has exactly one uncomputed token.
        A request may be left out (nothing worth proposing)."""

    def observe(self, request: Request, proposed: list[int], emitted: list[int],
                predictions: list[int] | None) -> None:
        """After verification, before the emitted tokens are appended: the target emitted `emitted`
        (the accepted prefix of `proposed` plus one token of its own)."""

    def release(self, request_id: str) -> None:
        """The request finished or was preempted: drop its state (and any KV)."""


class TokenView(Sequence):
    """`base + extra` without copying `base` (slicing copies only the slice)."""

    __slots__ = ("base", "extra")

    def __init__(self, base: Sequence[int], extra: Sequence[int]) -> None:
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def __iter__(self):
        yield from self.base
        yield from self.extra

    def __getitem__(self, i):
        n = len(self.base)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return list(self)[i]
            out = list(self.base[start:min(stop, n)])
            if stop > n:
                out.extend(self.extra[max(start - n, 0):stop - n])
            return out
        if i < 0:
            i += len(self)
        return self.base[i] if i < n else self.extra[i - n]

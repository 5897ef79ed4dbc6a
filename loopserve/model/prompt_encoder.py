"""Rendered chat text to token ids, tokenizing only what an earlier prompt did not already hold.

An agent re-sends its whole conversation every turn, and the rendered text of turn k + 1 repeats turn
k's messages. Tokenizing it again cost ~8 ms per 6k tokens on the dev VM (SmolLM2's byte-level BPE),
more than the engine's whole host work for such a turn, and it runs on the API server's event loop.

A fast (Rust) tokenizer splits its input on its added tokens before anything else (normaliser,
pre-tokeniser, model) sees it, and tokenizes the pieces between them independently. So the ids of a
text are the ids of its segments, each segment being an added token and the text up to the next one,
provided that every place where the text is cut is one where the tokenizer itself splits. The tokens
cut at (`cut_tokens`) are chosen so that this holds whatever the text:

- added tokens matched on the raw text (not `normalized`): their split happens before normalisation;
- neither `lstrip` nor `single_word`, and no white space at either end: where they match does not
  depend on the text before them, and no neighbour's strip reaches into them;
- no added token can overlap one of them from the left (a part of any added token after its first
  character that agrees with its start; for an `lstrip` token, from its first character on, since
  its match takes the white space before it): the tokenizer's match could otherwise take a span
  across the cut;
- and none at all if any added token is `single_word`, or if special tokens are encoded as text.

Each segment's ids are cached by its exact text (a dict compares whole keys), least recently used
evicted first, bounded by their token count. A probe conversation is encoded both ways at start-up;
any disagreement turns segmenting off for that tokenizer.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

from loopserve.config import DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS

log = logging.getLogger(__name__)


@dataclass
class PromptEncoderStats:
    reused_tokens: int = 0  # ids taken from the segment cache
    encoded_tokens: int = 0  # ids the tokenizer produced


def cut_tokens(backend) -> list[str]:
    """The added tokens of a `tokenizers.Tokenizer` at which any text may be cut without changing its
    ids (see the module docstring); empty when none may."""
    if getattr(backend, "encode_special_tokens", False):
        return []
    added = list(backend.get_added_tokens_decoder().values())
    if any(t.single_word for t in added):
        return []
    raw = [t for t in added if not t.normalized and t.content]
    candidates = [t.content for t in raw if not t.lstrip and t.content == t.content.strip()]

    def overlapped_from_left(u: str) -> bool:
        for t in raw:
            for j in range(0 if t.lstrip else 1, len(t.content)):
                n = min(len(t.content) - j, len(u))
                if t.content[j:j + n] == u[:n]:
                    return True
        return False

    return sorted({u for u in candidates if not overlapped_from_left(u)}, key=len, reverse=True)


class PromptEncoder:
    """`encode(text)` gives `tokenizer.encode(text, add_special_tokens=False)`, reusing the ids of the
    text's segments seen in earlier prompts. Slow tokenizers, and fast ones with nothing safe to cut
    at, encode whole texts as before."""

    def __init__(self, tokenizer, max_cached_tokens: int = DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_cached_tokens = max_cached_tokens
        self.stats = PromptEncoderStats()
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cached_tokens = 0
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        cuts = cut_tokens(backend) if backend is not None and max_cached_tokens > 0 else []
        self._backend = backend
        self._cut_at = re.compile("|".join(map(re.escape, cuts))) if cuts else None
        if self._cut_at is not None and not self._agrees_on_probe(cuts):
            log.warning("this tokenizer's encode differs from its segments' on a probe text: chat prompts are "
                        "tokenized whole")
            self._cut_at = None
        self._cache.clear()  # of the probe's segments
        self._cached_tokens = 0
        self.stats = PromptEncoderStats()

    @property
    def segmenting(self) -> bool:
        return self._cut_at is not None

    def encode(self, text: str) -> list[int]:
        if self._cut_at is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            self.stats.encoded_tokens += len(ids)
            return ids
        ids: list[int] = []
        start = 0
        for match in self._cut_at.finditer(text):
            if match.start() > start:
                ids.extend(self._segment(text[start:match.start()]))
                start = match.start()
        if start < len(text):
            ids.extend(self._segment(text[start:]))
        return ids

    def _segment(self, segment: str) -> list[int]:
        cached = self._cache.get(segment)
        if cached is not None:
            self._cache.move_to_end(segment)
            self.stats.reused_tokens += len(cached)
            return cached
        ids = self._backend.encode(segment, add_special_tokens=False).ids
        self.stats.encoded_tokens += len(ids)
        if len(ids) <= self.max_cached_tokens:
            self._cache[segment] = ids
            self._cached_tokens += len(ids)
            while self._cached_tokens > self.max_cached_tokens:
                _, evicted = self._cache.popitem(last=False)
                self._cached_tokens -= len(evicted)
        return ids

    def _agrees_on_probe(self, cuts: list[str]) -> bool:
        """Both ways agree on a text that puts every cut token against spaces, digits, newlines and
        each other: a guard against a tokenizer wrapper whose encode does more than its backend's."""
        pieces = ["", " ", "  x", "\n", "12 ", "é ", "a\n\n"]
        probe = "".join(p + c + q for c in cuts for p in pieces for q in pieces[::-1]) + "tail 7"
        return self.encode(probe) == list(self.tokenizer.encode(probe, add_special_tokens=False))

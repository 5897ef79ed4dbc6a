"""Prompt text to token ids, tokenizing only what an earlier prompt did not already hold.

An agent re-sends its whole conversation every turn, and the rendered chat text of turn k + 1 repeats
turn k's messages. Tokenizing it again cost ~8 ms per 6k tokens on the dev VM (SmolLM2's byte-level BPE),
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

With special tokens added (a completions prompt), the ids are those the tokenizer adds before and
after any text (BOS, ...), found on one word, around the segments' ids.

Each segment's ids are cached by its exact text (a dict compares whole keys), least recently used
evicted first, bounded by their token count (and their text's length). At start-up every cut token,
alone in a short text and among the others in a longer one, is encoded both ways: any disagreement
or error (a wrapper whose encode does more than its backend's, such as CodeLlama's infilling split
at `<FILL_ME>`) turns segmenting off for that tokenizer. So does a backend set to truncate, pad or
encode special tokens as text when a prompt comes (the wrapper sets those per call). The probes run
again with special tokens added; a difference there leaves only those prompts tokenized whole.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

from loopserve.config import DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS

log = logging.getLogger(__name__)

# The cache's text is bounded at this many characters per cached token id it may hold.
CACHED_CHARS_PER_TOKEN = 16
# Cut tokens put side by side in the start-up probe's longer text (each is also probed alone).
PROBE_MIXED_TOKENS = 32


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
    by_first: dict[str, list[str]] = {}
    for t in raw:
        if not t.lstrip and t.content == t.content.strip():
            by_first.setdefault(t.content[0], []).append(t.content)
    # u is overlapped from the left when some t has, at an offset j, text that agrees with u's start:
    # then t[j] is u's first character, so only the candidates starting with t[j] need comparing.
    overlapped = set()
    for t in raw:
        text = t.content
        for j in range(0 if t.lstrip else 1, len(text)):
            for u in by_first.get(text[j], ()):
                n = min(len(text) - j, len(u))
                if text[j:j + n] == u[:n]:
                    overlapped.add(u)
    return sorted({u for group in by_first.values() for u in group} - overlapped, key=len, reverse=True)


def trie_pattern(words: list[str]) -> str:
    """A regex matching the longest of `words` at a position, factored by common prefixes: one
    character class test at positions where no word starts, whatever the number of words."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def pattern(node: dict) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy: a longer word is tried before the one ending here, and the text fixes the trie path.
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


class PromptEncoder:
    """`encode(text, add_special_tokens)` gives `tokenizer.encode(text, add_special_tokens=...)`, reusing
    the ids of the text's segments seen in earlier prompts. Slow tokenizers, and fast ones with nothing
    safe to cut at, encode whole texts as before."""

    def __init__(self, tokenizer, max_cached_tokens: int = DEFAULT_PROMPT_SEGMENT_CACHE_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_cached_tokens = max_cached_tokens
        self._max_cached_chars = max_cached_tokens * CACHED_CHARS_PER_TOKEN
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cached_tokens = self._cached_chars = 0
        self.stats = PromptEncoderStats()
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        cuts = cut_tokens(backend) if backend is not None and max_cached_tokens > 0 else []
        self._backend = backend
        self._cut_at = re.compile(trie_pattern(cuts)) if cuts else None
        # The ids the tokenizer adds before and after a text when asked to (BOS, ...): None until found
        # and checked, and then for good if they are not always the same.
        self._added: tuple[list[int], list[int]] | None = None
        if self._cut_at is not None:
            probes = probe_texts(cuts)
            if not self._agrees(probes, add_special_tokens=False):
                log.warning("this tokenizer's encode differs from its segments' on a probe text: prompts are "
                            "tokenized whole")
                self._cut_at = None
            else:
                self._added = self._added_ids()
                if self._added is not None and not self._agrees(probes, add_special_tokens=True):
                    self._added = None
        self._cache.clear()  # the probes' segments and counts
        self._cached_tokens = self._cached_chars = 0
        self.stats = PromptEncoderStats()

    @property
    def segmenting(self) -> bool:
        return self._cut_at is not None

    def _backend_is_plain(self) -> bool:
        b = self._backend
        return b.truncation is None and b.padding is None and not b.encode_special_tokens

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        added = self._added if add_special_tokens else ([], [])
        if self._cut_at is None or added is None or not self._backend_is_plain():
            ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
            self.stats.encoded_tokens += len(ids)
            return ids
        ids = list(added[0])
        start = 0
        for match in self._cut_at.finditer(text):
            if match.start() > start:
                ids.extend(self._segment(text[start:match.start()]))
                start = match.start()
        if start < len(text):
            ids.extend(self._segment(text[start:]))
        ids.extend(added[1])
        return ids

    def _segment(self, segment: str) -> list[int]:
        cached = self._cache.get(segment)
        if cached is not None:
            self._cache.move_to_end(segment)
            self.stats.reused_tokens += len(cached)
            return cached
        ids = self._backend.encode(segment, add_special_tokens=False).ids
        self.stats.encoded_tokens += len(ids)
        if len(ids) <= self.max_cached_tokens and len(segment) <= self._max_cached_chars:
            self._cache[segment] = ids
            self._cached_tokens += len(ids)
            self._cached_chars += len(segment)
            while self._cached_tokens > self.max_cached_tokens or self._cached_chars > self._max_cached_chars:
                evicted_text, evicted = self._cache.popitem(last=False)
                self._cached_tokens -= len(evicted)
                self._cached_chars -= len(evicted_text)
        return ids

    def _added_ids(self) -> tuple[list[int], list[int]] | None:
        """What encoding a word with special tokens adds before and after its plain ids."""
        try:
            plain = list(self.tokenizer.encode("a", add_special_tokens=False))
            full = list(self.tokenizer.encode("a", add_special_tokens=True))
        except Exception:  # noqa: BLE001 - then such prompts are tokenized whole
            return None
        if not plain:  # the word must leave ids of its own to find them among the added ones
            return None
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        return None

    def _agrees(self, probes: list[str], add_special_tokens: bool) -> bool:
        """Both ways give the same ids for every probe; an error either way counts as disagreeing."""
        try:
            return all(self.encode(p, add_special_tokens) == list(self.tokenizer.encode(
                p, add_special_tokens=add_special_tokens)) for p in probes)
        except BaseException as e:  # tokenizers' Rust panics are BaseExceptions
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            log.warning("the prompt encoder's probe failed: %r", e)
            return False


def probe_texts(cuts: list[str]) -> list[str]:
    """Each cut token alone in a short text (one at the very start too), and up to PROBE_MIXED_TOKENS of
    them against spaces, digits, newlines and each other."""
    pieces = ["", " ", "  x", "\n", "12 ", "é ", "a\n\n"]
    mixed = cuts[::max(1, len(cuts) // PROBE_MIXED_TOKENS)]
    probes = [f"a {c}b\n1" for c in cuts] + [cuts[0] + "x 1"]
    probes.append("".join(p + c + q for c in mixed for p in pieces for q in pieces[::-1]) + "tail 7")
    return probes

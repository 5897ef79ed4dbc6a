"""Incremental (streaming) detokenization with stop-string handling.

Decoding follows vLLM's prefix/read-offset scheme: each step decodes only a small window of ids,
``ids[prefix_offset:]``, and compares it with the decode of ``ids[prefix_offset:read_offset]`` (text
already emitted); the difference is the new text. Offsets only advance once the window's text does
not end in U+FFFD, i.e. once no UTF-8 character is left half-decoded, so a character split across
byte-level tokens is held back until its last byte arrives. Both decodes start at the same token,
so start-of-window effects (e.g. SentencePiece's leading-space strip) cancel out, and the window
starts a few prompt tokens back so the first generated token decodes as it would in context.

Stop strings: the emitted text never contains a stop string nor any part of one. After each step
the longest tail of the pending text that is a proper prefix of some stop string is held back;
once a stop string appears, text is cut just before it, ``stop_reason`` is set and nothing more is
emitted. ``flush()`` releases the held text when generation ends for another reason.
"""
from __future__ import annotations

from typing import Sequence

# How many prompt tokens of left context the first decode window gets (as in vLLM).
INITIAL_CONTEXT_TOKENS = 5
# Ids before the window are dropped once this many have piled up (keeps memory per request bounded).
_COMPACT_AFTER = 256
_REPLACEMENT_CHAR = "\ufffd"


def _make_decode_fn(tokenizer, skip_special_tokens: bool):
    """ids -> text, without transformers' clean_up_tokenization_spaces (it is not prefix-stable)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # transformers fast tokenizer
    if backend is None and hasattr(tokenizer, "decode_batch"):  # a bare tokenizers.Tokenizer
        backend = tokenizer
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()):
        self._decode = _make_decode_fn(tokenizer, skip_special_tokens)
        context = [int(t) for t in prompt_token_ids[-INITIAL_CONTEXT_TOKENS:]] if len(prompt_token_ids) else []
        self._ids: list[int] = context
        self._prefix_offset = 0  # window start (into self._ids)
        self._read_offset = len(context)  # ids before this are already turned into text
        # Decode of ids[prefix_offset:read_offset], the text the window already accounted for.
        self._prefix_text = self._decode(context) if context else ""

        self._stops: list[str] = [s for s in (stop or ()) if s]
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""  # decoded text held back because it may start a stop string
        self._emitted: list[str] = []
        self._stop_reason: str | None = None
        self._finished = False

    # ------------------------------------------------------------------ public API

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, once one has."""
        return self._stop_reason

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stops)

    @property
    def text(self) -> str:
        """All text emitted so far (deltas from append() plus what flush() returned)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def finished(self) -> bool:
        """True once a stop string matched or flush() was called."""
        return self._finished

    def append(self, token_ids: Sequence[int]) -> str:
        """Add newly generated tokens; returns the text delta that is safe to emit (may be '')."""
        if self._finished or not token_ids:
            return ""
        self._ids.extend(token_ids)
        return self._release(self._decode_step(force=False), final=False)

    def flush(self) -> str:
        """At finish: decode whatever is still held (incomplete characters included) and release it,
        never past a stop string. Later calls return ''."""
        if self._finished:
            return ""
        out = self._release(self._decode_step(force=True), final=True)
        self._finished = True
        return out

    # ------------------------------------------------------------------ internals

    def _decode_step(self, force: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not force and (len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            # Nothing visible yet (e.g. a skipped special token) or a UTF-8 character still incomplete.
            return ""
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset]) if not force else ""
        if self._prefix_offset >= _COMPACT_AFTER:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _release(self, delta: str, final: bool) -> str:
        if not self._stops:
            out = self._pending + delta
            self._pending = ""
            return self._emit(out)
        buf = self._pending + delta
        if not buf:
            return ""
        hit = self._find_stop(buf)
        if hit is not None:
            pos, stop = hit
            self._stop_reason = stop
            self._pending = ""
            self._finished = True
            return self._emit(buf[:pos])
        hold = 0 if final else self._held_tail_len(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return self._emit(buf[:len(buf) - hold])

    def _emit(self, s: str) -> str:
        if s:
            self._emitted.append(s)
        return s

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        """Earliest stop-string match in buf (first listed stop wins a tie). Matches cannot start in
        text already emitted: any tail that could have started one was held back."""
        best: tuple[int, str] | None = None
        for s in self._stops:
            pos = buf.find(s)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def _held_tail_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            for s in self._stops:
                if len(s) > k and s.startswith(tail):
                    return k
        return 0

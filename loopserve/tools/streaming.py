"""What every format's streamer shares: content gating, call numbering and delta batching."""
from __future__ import annotations

from abc import abstractmethod

from loopserve.tools.base import (
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
    new_call_id,
)

WHITESPACE = " \t\n\r"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (text that must be held
    back because the next piece could complete the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ContentGate:
    """Holds content while it is whitespace only: parse() reports such content as None, so a stream
    must not send it either (e.g. the newline between two tool-call tags). Once anything else has
    been sent, everything passes."""

    def __init__(self) -> None:
        self._held = ""
        self._open = False

    def push(self, text: str) -> str:
        if self._open:
            return text
        if not text.strip(WHITESPACE):
            self._held += text
            return ""
        self._open = True
        text, self._held = self._held + text, ""
        return text


class StreamerBase(ToolCallStreamer):
    """Subclasses implement _consume (process newly fed text) and _flush (end of output), emitting
    through _emit_content and _emit_call; feed/finish batch what was emitted into one StreamDelta."""

    def __init__(self) -> None:
        self._gate = ContentGate()
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._calls: list[ToolCall] = []
        self._incomplete = False
        # Indexes are never reused: a call abandoned after its first delta went out keeps its index.
        self._next_index = 0

    @abstractmethod
    def _consume(self, text: str) -> None: ...

    @abstractmethod
    def _flush(self) -> None: ...

    def feed(self, text: str) -> StreamDelta:
        self._consume(text)
        return self._drain()

    def finish(self) -> StreamDelta:
        self._flush()
        return self._drain()

    @property
    def incomplete(self) -> bool:
        return self._incomplete

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def _start_call(self) -> tuple[int, str]:
        index, self._next_index = self._next_index, self._next_index + 1
        return index, new_call_id()

    def _emit_content(self, text: str) -> None:
        text = self._gate.push(text)
        if text:
            self._content.append(text)

    def _emit_call(self, delta: ToolCallDelta) -> None:
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments
        else:
            self._deltas.append(delta)

    def _drain(self) -> StreamDelta:
        out = StreamDelta("".join(self._content), self._deltas)
        self._content, self._deltas = [], []
        return out

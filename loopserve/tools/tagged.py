"""Tool calls as JSON after an opening marker: `<tool_call>BODY</tool_call>` (Hermes, SmolLM2) or
`[TOOL_CALLS]BODY` (Mistral), any number of times, with content around them.

A region runs from the marker to the closing tag (outside JSON strings) or, without a closing tag,
to the end of the body. A region whose body is not a valid call body is content, all of it, marker
included. A region still open at the end of the output is dropped and marks the output incomplete.
Calls are reported only when their region closes valid; a call whose first delta already went out
when its region turned out invalid stays abandoned on the stream (the deltas cannot be taken back)."""
from __future__ import annotations

from loopserve.tools.callreader import JsonBody
from loopserve.tools.streaming import StreamerBase, partial_tag_len

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class TaggedJsonStreamer(StreamerBase):
    def __init__(self, open_tag: str, close_tag: str | None) -> None:
        super().__init__()
        self._open, self._close = open_tag, close_tag
        # Outside a region: content not sent yet (a possible partial marker). In a region: text not
        # read yet.
        self._pending = ""
        self._body: JsonBody | None = None  # the open region's body
        self._region: list[str] = []  # the open region's text so far, for when it falls back to content

    def _consume(self, text: str) -> None:
        self._pending += text
        while self._pending:
            if self._body is None:
                if not self._read_content():
                    return
            elif not self._body.done:
                self._read_body()
            elif not self._read_gap():
                return

    def _read_content(self) -> bool:
        """Send content up to the next marker and open a region there; False when waiting for more."""
        k = self._pending.find(self._open)
        if k < 0:
            keep = partial_tag_len(self._pending, self._open)
            self._emit_content(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            return False
        self._emit_content(self._pending[:k])
        self._pending = self._pending[k + len(self._open):]
        self._body = JsonBody(self._start_call, self._emit_call)
        self._region = [self._open]
        return True

    def _read_body(self) -> None:
        body, close = self._body, self._close
        for i, ch in enumerate(self._pending):
            if not body.feed(ch):
                self._pending = self._pending[i:]
                break
            self._region.append(ch)
            if body.done:
                self._pending = self._pending[i + 1:]
                break
            # A closing tag outside a string closes the region even though the JSON is unfinished.
            # Tags hold no quotes, so being outside a string after its last character means the
            # whole tag was.
            if close and ch == close[-1] and not body.in_string and "".join(self._region[-len(close):]) == close:
                self._pending = self._pending[i + 1:]
                self._end_region(valid=False)
                return
        else:
            self._pending = ""
        if body.done and close is None:
            self._end_region(valid=True)

    def _read_gap(self) -> bool:
        """After the body: find the closing tag; only whitespace may come between."""
        k = self._pending.find(self._close)
        if k < 0:
            return False
        gap = self._pending[:k]
        self._region += [gap, self._close]
        self._pending = self._pending[k + len(self._close):]
        self._end_region(valid=not gap.strip())
        return True

    def _end_region(self, valid: bool) -> None:
        calls = self._body.calls() if valid else None
        if calls is None:
            self._emit_content("".join(self._region))
        else:
            self._calls += calls
        self._body, self._region = None, []

    def _flush(self) -> None:
        if self._body is None:
            self._emit_content(self._pending)
        else:
            self._incomplete = True
        self._pending = ""

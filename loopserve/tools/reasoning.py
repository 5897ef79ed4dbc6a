"""Splitting a reasoning model's `<think>...</think>` block from its answer, whole or streamed.

Two starts are handled: the output opens the block itself, or the chat template already opened it
in the prompt, so the output starts inside the reasoning (an opening tag written anyway is skipped).
Leading whitespace of the reasoning and of the answer after `</think>` is dropped."""
from __future__ import annotations

from typing import ClassVar

from loopserve.tools.streaming import WHITESPACE, partial_tag_len

THINK_START, THINK_END = "<think>", "</think>"


class _LeadingWhitespaceTrim:
    """Drops whitespace until the first other character, however the text is split."""

    def __init__(self) -> None:
        self._started = False

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip(WHITESPACE)
            self._started = bool(text)
        return text


class ReasoningStreamer:
    def __init__(self, start_tag: str, end_tag: str, starts_in_reasoning: bool) -> None:
        self._start_tag, self._end_tag = start_tag, end_tag
        self._starts_in_reasoning = starts_in_reasoning
        self._state = self._lead
        self._buf = ""  # text not sent yet: the lead, or a possible partial end tag
        self._finished = False  # no more text: a partial tag held back can no longer complete
        self._reasoning_trim = _LeadingWhitespaceTrim()
        self._answer_trim = _LeadingWhitespaceTrim()

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of output."""
        self._buf += text
        reasoning, content = [], []
        while self._state(reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of output: what was held back (a lead or tag that never completed)."""
        self._finished = True
        return self.feed("")

    # Each state handles _buf and returns True when another state should look at what is left.

    def _lead(self, reasoning: list[str], content: list[str]) -> bool:
        start = self._buf.lstrip(WHITESPACE)
        if start.startswith(self._start_tag):
            self._buf = start[len(self._start_tag):]
            self._state = self._reasoning
            return True
        if self._start_tag.startswith(start) and not self._finished:
            return False  # still could be the opening tag
        self._state = self._reasoning if self._starts_in_reasoning else self._plain
        return True

    def _reasoning(self, reasoning: list[str], content: list[str]) -> bool:
        k = self._buf.find(self._end_tag)
        if k < 0:
            keep = 0 if self._finished else partial_tag_len(self._buf, self._end_tag)
            reasoning.append(self._reasoning_trim.push(self._buf[:len(self._buf) - keep]))
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        reasoning.append(self._reasoning_trim.push(self._buf[:k]))
        self._buf = self._buf[k + len(self._end_tag):]
        self._state = self._answer
        return True

    def _answer(self, reasoning: list[str], content: list[str]) -> bool:
        content.append(self._answer_trim.push(self._buf))
        self._buf = ""
        return False

    def _plain(self, reasoning: list[str], content: list[str]) -> bool:
        content.append(self._buf)
        self._buf = ""
        return False


class ReasoningParser:
    start_tag: ClassVar[str] = THINK_START
    end_tag: ClassVar[str] = THINK_END
    # Whether the model's template opens the reasoning block in the prompt.
    default_starts_in_reasoning: ClassVar[bool] = False

    def __init__(self, starts_in_reasoning: bool | None = None) -> None:
        self.starts_in_reasoning = (self.default_starts_in_reasoning if starts_in_reasoning is None
                                    else starts_in_reasoning)

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self.start_tag, self.end_tag, self.starts_in_reasoning)

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content); reasoning is None when there was none."""
        streamer = self.streamer()
        reasoning, content = streamer.feed(text)
        tail_reasoning, tail_content = streamer.finish()
        return (reasoning + tail_reasoning) or None, content + tail_content


class DeepSeekR1ReasoningParser(ReasoningParser):
    # R1's template ends the prompt with "<think>\n": the output starts inside the reasoning and,
    # without a "</think>", is reasoning to the end.
    default_starts_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    # Qwen3 writes the block itself when thinking, and may write none: then it is all content.
    default_starts_in_reasoning = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}

"""The tool-calling boundary types and the two interfaces every output format implements."""
from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One complete call; json.loads(arguments) is a dict."""
    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """OpenAI streaming delta for one call: id and name only in the first delta of an index, and the
    arguments fragments of an index concatenate to exactly its ToolCall.arguments."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedOutput:
    content: str | None  # None when empty or whitespace only
    tool_calls: list[ToolCall]
    incomplete: bool = False  # a call was opened but never closed (output cut short)


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallStreamer(ABC):
    """Reads the decoded output piece by piece (split anywhere) and says what to send now.

    Fed the whole output, then finished, it gives what ToolParser.parse gives: the same content,
    and `calls` with the same names and arguments."""

    @abstractmethod
    def feed(self, text: str) -> StreamDelta: ...

    @abstractmethod
    def finish(self) -> StreamDelta:
        """End of output: flush text held back because it might have started a call."""

    @property
    @abstractmethod
    def incomplete(self) -> bool:
        """After finish(): a call was opened and never closed."""

    @property
    @abstractmethod
    def calls(self) -> list[ToolCall]:
        """The complete, valid calls seen so far."""


class ToolParser(ABC):
    """One model family's tool-call format: reading it from output and writing it into prompts."""
    name: ClassVar[str]

    @abstractmethod
    def streamer(self) -> ToolCallStreamer: ...

    @abstractmethod
    def system_prompt(self, tools: list[dict]) -> str:
        """Instructions to call the (OpenAI-format) tools in this format, for templates that do not
        render tools themselves."""

    @abstractmethod
    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        """An assistant message's OpenAI tool_calls as the text the model would have written."""

    def parse(self, text: str) -> ParsedOutput:
        # One state machine serves both paths, so a whole output and any split of it cannot disagree
        # on what is a call.
        streamer = self.streamer()
        first, last = streamer.feed(text), streamer.finish()
        # Streamers never send whitespace-only content, so empty is the only "no content".
        content = first.content + last.content
        return ParsedOutput(content or None, streamer.calls, streamer.incomplete)

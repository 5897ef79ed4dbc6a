"""Tool calling: reading calls out of model output (whole or streamed) in each model family's
format, and writing tools and earlier calls into prompts. Pure Python; no engine dependency."""
from loopserve.tools.base import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
    ToolParser,
)
from loopserve.tools.registry import (
    PARSERS,
    detect_parser,
    get_parser,
    template_renders_tools,
)

__all__ = [
    "PARSERS",
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamer",
    "ToolParser",
    "detect_parser",
    "get_parser",
    "template_renders_tools",
]

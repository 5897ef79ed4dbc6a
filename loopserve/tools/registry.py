"""The tool parsers by name, and choosing one from a chat template."""
from __future__ import annotations

import functools
import re

import jinja2
import jinja2.meta

from loopserve.tools.base import ToolParser
from loopserve.tools.hermes import HermesParser
from loopserve.tools.llama3 import PYTHON_TAG, Llama3JsonParser
from loopserve.tools.mistral import TOOL_CALLS, MistralParser
from loopserve.tools.pythonic import PythonicParser
from loopserve.tools.smollm2 import SmolLM2Parser
from loopserve.tools.tagged import TOOL_CALL_OPEN

PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser, SmolLM2Parser)
}
# SmolLM2, the project's default model, has a plain ChatML template without tools.
DEFAULT_PARSER = "smollm2"

# Pythonic templates (Llama 3.2, Llama 4) show the call syntax with placeholder names.
_PYTHONIC_EXAMPLE = re.compile(r"\[\s*func_name\d*\s*\(")
# Fallback for templates jinja2 cannot parse alone (custom tags): `tools` inside a {{ }} or {% %}.
_TOOLS_IN_BLOCK = re.compile(r"\{[{%][^}]*\btools\b")


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(sorted(PARSERS))}") from None


def detect_parser(chat_template: str | None) -> str:
    """The tool-call format the template's model writes, judged from the template text."""
    template = chat_template or ""
    if TOOL_CALLS in template:
        return "mistral"
    # Before the Llama 3.1 check: pythonic templates also use the ipython role.
    if _PYTHONIC_EXAMPLE.search(template):
        return "pythonic"
    if TOOL_CALL_OPEN in template:
        return "smollm2" if "SmolLM" in template else "hermes"
    if PYTHON_TAG in template or "ipython" in template:
        return "llama3_json"
    return DEFAULT_PARSER


@functools.lru_cache(maxsize=16)
def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the template reads the `tools` variable (then tools go to the template, and no
    system_prompt is added). Cached: parsing and walking the template cost ~1 ms, on every chat request."""
    if not chat_template:
        return False
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return bool(_TOOLS_IN_BLOCK.search(chat_template))
    return "tools" in jinja2.meta.find_undeclared_variables(tree)

"""Structured outputs: grammar-constrained decoding (JSON schema, regex, EBNF/Lark, choice) via xgrammar."""
from loopserve.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]

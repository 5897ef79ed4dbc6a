"""StructuredOutputsParams: what a request's output must match (vLLM's field names, one kind per request).

Validation here needs no tokenizer: the constraint is parsed into an xgrammar Grammar (schema,
regex and grammar syntax errors surface as ValueError naming the field), which is what the API
process does before a request reaches the engine. Compilation against the tokenizer happens in the
engine (loopserve/structured/manager.py), off its step loop.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "lark")


@dataclass(frozen=True)
class GrammarKey:
    """Canonical form of a constraint: equal keys compile to the same grammar (the cache key)."""
    kind: str  # json | json_object | regex | grammar | lark (choice becomes a regex)
    text: str


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None   # a JSON schema (object or its text)
    json_object: bool = False                  # any JSON object (response_format json_object)
    regex: str | None = None
    choice: list[str] | None = None            # exactly one of these strings
    grammar: str | None = None                 # EBNF (GBNF dialect, root rule `root`)
    lark: str | None = None                    # a Lark grammar

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) if given else 'none'}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar", "lark"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    @property
    def key(self) -> GrammarKey:
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            # Key order is kept: properties are generated in the schema's order.
            return GrammarKey("json", json.dumps(schema, separators=(",", ":")))
        if self.json_object:
            return GrammarKey("json_object", "")
        if self.choice is not None:
            return GrammarKey("regex", "|".join(_regex_escape(c) for c in self.choice))
        if self.regex is not None:
            return GrammarKey("regex", self.regex)
        if self.grammar is not None:
            return GrammarKey("grammar", self.grammar)
        return GrammarKey("lark", self.lark)

    def validate(self) -> None:
        """Parse the constraint without a tokenizer; ValueError with the reason when it is invalid."""
        try:
            key = self.key
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if key.kind == "json":
            _check_schema(json.loads(key.text))
        try:
            to_grammar(key)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError subclasses
            raise ValueError(f"invalid {_FIELD[key.kind]}: {_first_line(e)}") from None


_FIELD = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
          "grammar": "EBNF grammar", "lark": "Lark grammar"}


def to_grammar(key: GrammarKey):
    """The xgrammar Grammar of a key (no tokenizer needed)."""
    import xgrammar as xgr

    if key.kind == "json":
        return xgr.Grammar.from_json_schema(key.text, any_whitespace=False, strict_mode=True)
    if key.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if key.kind == "regex":
        return xgr.Grammar.from_regex(key.text)
    if key.kind == "grammar":
        return xgr.Grammar.from_ebnf(key.text)
    return xgr.Grammar.from_lark(key.text)


def _check_schema(schema: Any) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {path}: {e.message}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    # xgrammar prefixes "[hh:mm:ss] /path/file.cc:123: ": the user needs only the message.
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text.splitlines()[0])[:300]


def _regex_escape(s: str) -> str:
    # xgrammar's regex dialect is ECMAScript-like; escape every metacharacter it knows.
    return "".join("\\" + c if c in r"\^$.|?*+()[]{}/" else c for c in s)

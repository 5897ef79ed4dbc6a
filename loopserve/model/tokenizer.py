"""Tokenizers for HF model folders and GGUF files (via transformers, with GGUF fix-ups)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers
    # SmolLM's original tokenizer splits every digit before byte-level BPE; transformers' GGUF
    # conversion keeps only the ByteLevel part, so "  42" would tokenize differently from training.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


# llama.cpp pre-tokenizer type (GGUF key tokenizer.ggml.pre) -> the pre-tokenizer transformers loses.
_PRE_TOKENIZER_FIXES: dict[str, Callable[[], object]] = {"smollm": _smollm_pre_tokenizer}


def _has_hf_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if _has_hf_tokenizer(path):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{path} holds several .gguf files; pass the path of the one to use")
    return found[0] if found else None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """An HF folder's tokenizer, or the one embedded in a .gguf (a file, or a folder holding one)."""
    from transformers import AutoTokenizer  # heavy import, paid only when a tokenizer is loaded

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    gguf = _gguf_file(p)
    if gguf is None:
        if p.is_file():
            raise ValueError(f"{p} is not a .gguf file; pass an HF model folder or a .gguf file")
        if not _has_hf_tokenizer(p):
            raise FileNotFoundError(f"{p} has no tokenizer files (tokenizer.json / tokenizer_config.json) or .gguf")
        return AutoTokenizer.from_pretrained(str(p))
    return _gguf_tokenizer(gguf)


def _gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from loopserve.model.gguf_loader import open_gguf

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reader = open_gguf(gguf)

    def meta(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    fix = _PRE_TOKENIZER_FIXES.get(meta("tokenizer.ggml.pre"))
    if fix is not None:
        tok.backend_tokenizer.pre_tokenizer = fix()
    template = meta("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    return tok

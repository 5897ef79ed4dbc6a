"""Shared fixtures for unit tests: small tokenizers trained locally (no downloads)."""
from __future__ import annotations

import json

import pytest

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Streaming text generation emits tokens one at a time, hello again.",
    "Stop strings like STOP or ### or <|end|> must never leak into the output.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "日本語のテキストも少し入れておきます。こんにちは。",
    "Emoji time: 😀 🎉 🚀 👍🏽 ❤️ 🇫🇷 and more 🤖🤖🤖.",
    "Accents: café, naïve, jalapeño, Zürich, Ελληνικά, русский текст.",
    "Numbers 12345 67890 and symbols €£¥ © ® ™ … — “quotes”.",
] * 4

SPECIALS = ["<|eos|>", "<|pad|>", "<|user|>"]


def _byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocab: multi-byte characters stay split across several byte-level tokens.
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|user|>"], clean_up_tokenization_spaces=False)


def _metaspace_bpe():
    """SentencePiece-style (Llama-like): '▁' marks spaces and the decoder strips a leading one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Byte-fallback pieces <0x00>..<0xFF> are ordinary vocab entries (as in Llama), not special tokens.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return _byte_level_bpe()


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    return _metaspace_bpe()

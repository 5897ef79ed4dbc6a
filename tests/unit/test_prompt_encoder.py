"""PromptEncoder gives exactly the tokenizer's ids, tokenizing only segments no earlier prompt held."""
from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import re

from loopserve.model.prompt_encoder import PromptEncoder, cut_tokens, trie_pattern
from tests.conftest import CORPUS, build_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<|endoftext|>")


def byte_level(tmp_path) -> PreTrainedTokenizerFast:
    return build_tokenizer(tmp_path)


def metaspace_nfc(extra: list[AddedToken]) -> PreTrainedTokenizerFast:
    """A sentencepiece-like tokenizer: NFC normaliser, Metaspace prepended to the first piece only."""
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    tok.add_special_tokens(extra)
    # Added around every text when asked for special tokens: a BOS before, an end token after.
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", 0), ("<|im_end|>", 2)])
    return _fast(tok)


def digits_byte_level(extra: list[AddedToken]) -> PreTrainedTokenizerFast:
    """SmolLM2's shape: digits split one by one, then byte-level BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(extra)
    return _fast(tok)


FRAGMENTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "im_end|>", "<", "|>", "<|", "<<|im_end|>",
             "<tool>", "<tool_call>", "</tool>", "[X]", "[X][Y]", "[Y]", "ool>", "</t", " [Z]", "[Z]",
             "<|reserved_special_token_7|>", "<|reserved_special_token_77|>", "<|reserved_special_token_", "2|>",
             " ", "  ", "\n", "\n\n", "\t", " \n", "0", "42", " 7", "12345", "é", "e\u0301", "日本語", "🙂", "\u0338",
             "user", "assistant", "hello", " world", "{\"a\": [1, 2]}", "def f(x):", "    return x", "."]


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        texts.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40))))
    return texts


def conversation_turns(tokenizer, turns: int, seed: int = 0) -> list[str]:
    """The rendered text of a growing chat, one per turn, as an agent re-sends it."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You are an agent. Call tools as <tool>{...}</tool>."}]
    texts = []
    for i in range(turns):
        content = " ".join(rng.choice(FRAGMENTS[10:]) for _ in range(rng.randint(5, 60)))
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


TOKENIZERS = {
    "byte-level": lambda tmp_path: byte_level(tmp_path),
    # "ool>" and "</t" lie inside the lstrip "</tool>" (whose match takes the spaces before it): no cuts.
    "metaspace-nfc-rstrip-lstrip": lambda tmp_path: metaspace_nfc([
        AddedToken("<tool>", rstrip=True, normalized=False, special=True),
        AddedToken("</tool>", lstrip=True, normalized=False, special=True),
        AddedToken("ool>", normalized=False), AddedToken("</t", normalized=False), AddedToken(" [Z]", normalized=False)]),
    # "[X]" overlaps "[X][Y]" from the left and "<tool" overlaps "<tool_call>": no cut may fall at them.
    # Llama 3's shape: hundreds of reserved special tokens sharing a long prefix.
    "byte-level-reserved": lambda tmp_path: digits_byte_level([
        AddedToken(f"<|reserved_special_token_{i}|>", normalized=False, special=True) for i in range(300)]),
    "digits-overlapping-added": lambda tmp_path: digits_byte_level([
        AddedToken("[X]", normalized=False), AddedToken("[X][Y]", normalized=False), AddedToken("[Y]", normalized=False),
        AddedToken("<tool>", normalized=False), AddedToken("<tool_call>", normalized=False),
        AddedToken("<|", normalized=True)]),
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_ids_equal_the_tokenizers_on_random_text(name, tmp_path):
    tokenizer = TOKENIZERS[name](tmp_path)
    encoder = PromptEncoder(tokenizer)
    assert encoder.segmenting
    for text in random_texts(seed=len(name), n=400) * 2:  # the second pass reads segments from the cache
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False), text
        assert encoder.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=True), text
    assert encoder.stats.reused_tokens > 0
    assert encoder._added is not None  # completions prompts are segmented too


def test_special_tokens_added_around_a_text_are_found_once():
    tokenizer = TOKENIZERS["metaspace-nfc-rstrip-lstrip"](None)
    encoder = PromptEncoder(tokenizer)
    assert encoder._added == ([0], [2])
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert encoder.encode(text, add_special_tokens=True) == [0, *encoder.encode(text), 2]


def test_cut_tokens_leave_out_those_a_match_could_span():
    tok = digits_byte_level([AddedToken("[X]", normalized=False), AddedToken("[X][Y]", normalized=False),
                             AddedToken("[Y]", normalized=False), AddedToken("<tool>", normalized=False),
                             AddedToken("<tool_call>", normalized=False), AddedToken("<|", normalized=True),
                             AddedToken("</tool>", lstrip=True, normalized=False)])
    cuts = cut_tokens(tok.backend_tokenizer)
    assert "[Y]" not in cuts  # "[X][Y]" reaches across its start
    assert "</tool>" not in cuts  # lstrip: its match would take the whitespace before it
    assert "<|" not in cuts  # matched after normalisation
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "[X]", "[X][Y]", "<tool>", "<tool_call>"} <= set(cuts)
    tok = metaspace_nfc([AddedToken("</tool>", lstrip=True, normalized=False), AddedToken("</t", normalized=False),
                         AddedToken("ool>", normalized=False), AddedToken(" [Z]", normalized=False)])
    cuts = cut_tokens(tok.backend_tokenizer)
    assert not {"</t", "ool>", " [Z]"} & set(cuts)  # inside an lstrip token, from its start; white space
    assert set(SPECIALS) <= set(cuts)


def test_single_word_tokens_or_special_tokens_as_text_turn_segmenting_off(tmp_path):
    single = digits_byte_level([AddedToken("word", single_word=True, normalized=False)])
    assert cut_tokens(single.backend_tokenizer) == []
    as_text = byte_level(tmp_path)
    as_text.backend_tokenizer.encode_special_tokens = True
    assert cut_tokens(as_text.backend_tokenizer) == []
    for tokenizer in (single, as_text):
        encoder = PromptEncoder(tokenizer)
        assert not encoder.segmenting
        text = "<|im_start|>user\n a word<|im_end|>\n"
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)


def test_a_new_turn_tokenizes_only_its_new_message(tmp_path):
    tokenizer = byte_level(tmp_path)
    encoder = PromptEncoder(tokenizer)
    texts = conversation_turns(tokenizer, turns=12)
    for i, text in enumerate(texts):
        before = encoder.stats.encoded_tokens
        ids = encoder.encode(text)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        new = encoder.stats.encoded_tokens - before
        if i > 0:  # the new message and the generation prompt's role line, not the history
            assert 0 < new < len(ids) / 2 or i < 3, (i, new, len(ids))
    last = len(encoder.encode(texts[-1]))
    assert encoder.stats.reused_tokens >= last


def test_the_cache_keeps_to_its_token_bound(tmp_path):
    tokenizer = byte_level(tmp_path)
    encoder = PromptEncoder(tokenizer, max_cached_tokens=64)
    for text in random_texts(seed=3, n=200):
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)
        assert encoder._cached_tokens <= 64
        assert encoder._cached_tokens == sum(map(len, encoder._cache.values()))


def test_a_zero_bound_or_a_slow_tokenizer_encodes_whole_texts(tmp_path):
    tokenizer = byte_level(tmp_path)
    off = PromptEncoder(tokenizer, max_cached_tokens=0)
    assert not off.segmenting

    class Slow:  # what PromptEncoder needs of a tokenizer without a Rust backend
        is_fast = False

        def encode(self, text, add_special_tokens):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    slow = PromptEncoder(Slow())
    assert not slow.segmenting
    text = conversation_turns(tokenizer, turns=3)[-1]
    assert off.encode(text) == slow.encode(text) == tokenizer.encode(text, add_special_tokens=False)


def test_smollm2s_own_tokenizer_agrees_over_a_conversation():
    from loopserve.fetch import FetchError, ensure_model
    from loopserve.model.tokenizer import load_tokenizer

    try:
        path = ensure_model("smollm2")
    except (FetchError, OSError) as e:
        pytest.skip(f"smollm2 is not available: {e}")
    tokenizer = load_tokenizer(path)
    encoder = PromptEncoder(tokenizer)
    assert encoder.segmenting
    for text in conversation_turns(tokenizer, turns=16, seed=1) + random_texts(seed=9, n=200):
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False), text
        assert encoder.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=True), text


def test_a_wrapper_whose_encode_does_more_than_its_backend_tokenizes_whole_texts(tmp_path):
    tokenizer = byte_level(tmp_path)

    class Rewriting:  # a fast tokenizer's wrapper that rewrites the text before its backend sees it
        is_fast = True
        backend_tokenizer = tokenizer.backend_tokenizer

        def encode(self, text, add_special_tokens):
            return tokenizer.encode(text.replace("12", "21"), add_special_tokens=add_special_tokens)

    encoder = PromptEncoder(Rewriting())
    assert not encoder.segmenting  # the start-up probe caught it
    text = "<|im_start|>user\n12 <|im_end|>\n"
    assert encoder.encode(text) == Rewriting().encode(text, add_special_tokens=False)


def test_the_cut_pattern_takes_the_longest_token_at_each_place():
    pattern = re.compile(trie_pattern(["<a>", "<a>b", "<ab>", "<abc>"]))
    assert [m.group() for m in pattern.finditer("x<a>b<ab><a><abc<abc>")] == ["<a>b", "<ab>", "<a>", "<abc>"]


def test_a_wrapper_that_fails_on_the_probe_tokenizes_whole_texts():
    """CodeLlama's fast tokenizer splits its input at <FILL_ME> into exactly two parts (infilling), so
    its encode raises on the probe; the encoder must not take the server down with it."""
    from transformers.models.code_llama.tokenization_code_llama import CodeLlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "▁abcdefghijklmnopqrstuvwxyz<>|_":
        vocab.setdefault(ch, len(vocab))
    tokenizer = CodeLlamaTokenizer(vocab=vocab, merges=[])
    encoder = PromptEncoder(tokenizer)
    assert not encoder.segmenting
    assert encoder.encode("a b <s> c") == tokenizer.encode("a b <s> c", add_special_tokens=False)


def test_a_backend_left_truncating_by_its_wrapper_makes_the_encoder_ask_the_wrapper(tmp_path):
    tokenizer = byte_level(tmp_path)
    encoder = PromptEncoder(tokenizer)
    text = conversation_turns(tokenizer, turns=4)[-1]
    tokenizer.backend_tokenizer.enable_truncation(8)  # what a wrapper call with truncation=True leaves
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert len(encoder.encode(text)) > 8

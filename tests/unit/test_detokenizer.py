"""IncrementalDetokenizer: UTF-8 safety, equivalence with a full decode, stop strings, bounded cost."""
from __future__ import annotations

import random

import pytest

from loopserve.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE_TEXT = "Emoji time: 😀 🎉 🚀 👍🏽 ❤️ 你好，世界！ こんにちは café 🤖🤖 done"


def _stream(detok: IncrementalDetokenizer, ids, chunk_sizes=None) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = 1 if chunk_sizes is None else chunk_sizes[len(deltas) % len(chunk_sizes)]
        deltas.append(detok.append(ids[i:i + n]))
        i += n
    return deltas


def test_fixture_splits_multibyte_characters(bpe_tokenizer):
    # Sanity: the test tokenizer really produces tokens that are partial UTF-8 sequences.
    ids = bpe_tokenizer.encode(MULTIBYTE_TEXT)
    assert any("\ufffd" in bpe_tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("chunks", [None, [2], [3, 1, 4]])
def test_multibyte_never_half_emitted(bpe_tokenizer, chunks):
    prompt = bpe_tokenizer.encode("Say something:")
    ids = bpe_tokenizer.encode(MULTIBYTE_TEXT)
    detok = IncrementalDetokenizer(bpe_tokenizer, prompt)
    deltas = _stream(detok, ids, chunks)
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # a valid str (no lone surrogates)
    assert any(d == "" for d in deltas)  # some tokens had to be held
    assert detok.flush() == ""
    assert "".join(deltas) == MULTIBYTE_TEXT == detok.text
    assert detok.stop_reason is None


@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_match_full_decode(bpe_tokenizer, skip_special, seed):
    rng = random.Random(seed)
    vocab = len(bpe_tokenizer)
    prompt = [] if seed % 3 == 0 else bpe_tokenizer.encode(rng.choice(["Hi.", "Hello world", "你好 "]))
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 120))]
    detok = IncrementalDetokenizer(bpe_tokenizer, prompt, skip_special_tokens=skip_special)
    chunks = [rng.randrange(1, 4) for _ in range(5)]
    out = "".join(_stream(detok, ids, chunks)) + detok.flush()
    assert out == bpe_tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert out == detok.text


def test_random_sequences_of_multibyte_pieces_match(bpe_tokenizer):
    # Token pieces from multibyte text, shuffled: lots of incomplete and invalid byte sequences.
    pieces = bpe_tokenizer.encode(MULTIBYTE_TEXT)
    for seed in range(10):
        rng = random.Random(seed)
        ids = [rng.choice(pieces) for _ in range(60)]
        detok = IncrementalDetokenizer(bpe_tokenizer, bpe_tokenizer.encode("ok "))
        deltas = _stream(detok, ids)
        tail = detok.flush()
        assert "".join(deltas) + tail == bpe_tokenizer.decode(ids)
        # A delta never ends inside a character; an incomplete one can only come out of flush().
        assert not any(d.endswith("\ufffd") for d in deltas)


def test_special_tokens_skipped_or_kept(bpe_tokenizer):
    eos = bpe_tokenizer.convert_tokens_to_ids("<|eos|>")
    ids = bpe_tokenizer.encode("Hello") + [eos] + bpe_tokenizer.encode(" world")
    d1 = IncrementalDetokenizer(bpe_tokenizer, [], skip_special_tokens=True)
    assert "".join(_stream(d1, ids)) + d1.flush() == "Hello world"
    d2 = IncrementalDetokenizer(bpe_tokenizer, [], skip_special_tokens=False)
    assert "".join(_stream(d2, ids)) + d2.flush() == "Hello<|eos|> world"


def test_prompt_context_keeps_leading_space(metaspace_tokenizer):
    tok = metaspace_tokenizer
    prompt = tok.encode("Hello", add_special_tokens=False)
    full = tok.encode("Hello world again", add_special_tokens=False)
    assert full[:len(prompt)] == prompt
    out_ids = full[len(prompt):]
    # Decoding the output alone strips its leading space; with the prompt as context it is kept.
    assert tok.decode(out_ids) == "world again"
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(_stream(detok, out_ids)) + detok.flush()
    assert text == " world again"
    # Without a prompt the output decodes as a plain decode would.
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(_stream(detok, out_ids)) + detok.flush() == "world again"


def test_metaspace_byte_fallback_multibyte(metaspace_tokenizer):
    tok = metaspace_tokenizer
    text = "Hi ☃ ∰ ok"  # not in the training corpus: byte-fallback tokens <0x..>
    ids = tok.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
    detok = IncrementalDetokenizer(tok, tok.encode("Say", add_special_tokens=False))
    deltas = _stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == " " + text


# ---------------------------------------------------------------------------------- stop strings

def _run_stop(tok, text, stop, chunks=None):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Q:"), stop=stop)
    emitted = ""
    history = []
    for d in _stream(detok, ids, chunks):
        emitted += d
        history.append(emitted)
    return detok, emitted, history


@pytest.mark.parametrize("chunks", [None, [2], [5]])
def test_stop_string_truncates_and_never_leaks(bpe_tokenizer, chunks):
    text = "Hello world STOP and then more text"
    detok, emitted, history = _run_stop(bpe_tokenizer, text, ["STOP"], chunks)
    assert detok.stop_reason == "STOP"
    assert emitted == "Hello world " == detok.text
    for h in history:  # every intermediate emission is a prefix of the final text
        assert "Hello world ".startswith(h)
    assert detok.append(bpe_tokenizer.encode(" more")) == ""
    assert detok.flush() == ""
    assert detok.text == "Hello world "


def test_earliest_stop_wins(bpe_tokenizer):
    detok, emitted, _ = _run_stop(bpe_tokenizer, "alpha ### beta <|end|> gamma", ["<|end|>", "###"])
    assert detok.stop_reason == "###"
    assert emitted == "alpha "


def test_stop_at_start_and_inside_one_token(bpe_tokenizer):
    detok, emitted, _ = _run_stop(bpe_tokenizer, "STOP now", ["STOP"])
    assert detok.stop_reason == "STOP" and emitted == ""
    detok, emitted, _ = _run_stop(bpe_tokenizer, "hello", ["ell"])
    assert detok.stop_reason == "ell" and emitted == "h"


def test_hold_back_is_bounded_and_flush_releases(bpe_tokenizer):
    tok = bpe_tokenizer
    text = "the quick brown fox ST"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], stop=["STOP", "xyz"])
    emitted = ""
    for i in range(len(ids)):
        emitted += detok.append(ids[i:i + 1])
        decoded = tok.decode(ids[:i + 1])
        assert decoded.startswith(emitted)
        assert len(decoded) - len(emitted) <= len("STOP") - 1
    assert emitted == "the quick brown fox "  # "ST" could still become "STOP"
    assert detok.flush() == "ST"
    assert detok.text == text and detok.stop_reason is None
    assert detok.flush() == ""


def test_hold_back_only_plausible_prefixes(bpe_tokenizer):
    # Text whose tail cannot start a stop string is not held.
    tok = bpe_tokenizer
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert "".join(_stream(detok, tok.encode("hello world"))) == "hello world"


def test_stop_across_multibyte(bpe_tokenizer):
    detok, emitted, history = _run_stop(bpe_tokenizer, "go 你好世界 🚀 end", ["世界 🚀"])
    assert detok.stop_reason == "世界 🚀"
    assert emitted == "go 你好"
    assert all("\ufffd" not in h for h in history)


def test_stop_random_against_reference(bpe_tokenizer):
    tok = bpe_tokenizer
    for seed in range(20):
        rng = random.Random(seed)
        text = " ".join(rng.choice(["ab", "abc", "cab", "b", "ca", "😀", "你好", "x"]) for _ in range(30))
        stops = rng.sample(["abc", "b c", "😀 x", "好 c", "cab cab"], 2)
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        out = "".join(_stream(detok, ids, [rng.randrange(1, 4)])) + detok.flush()
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            pos, s = min(hits, key=lambda h: h[0])
            assert out == text[:pos] and detok.stop_reason == text[pos:pos + len(s)]
        else:
            assert out == text and detok.stop_reason is None


# ---------------------------------------------------------------------------------- cost

class _SpyTokenizer:
    """A non-fast tokenizer facade that records how many ids each decode call sees."""

    def __init__(self, inner):
        self.inner = inner
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens,
                                 clean_up_tokenization_spaces=clean_up_tokenization_spaces)


def test_decode_window_is_bounded(bpe_tokenizer):
    spy = _SpyTokenizer(bpe_tokenizer)
    prompt = bpe_tokenizer.encode("A fairly long prompt " * 50)
    ids = bpe_tokenizer.encode("Hello world, the quick brown fox. " * 40 + MULTIBYTE_TEXT)
    assert len(ids) > 400
    detok = IncrementalDetokenizer(spy, prompt)
    out = "".join(_stream(detok, ids)) + detok.flush()
    assert out == bpe_tokenizer.decode(ids)
    assert max(spy.sizes) <= 16  # a small window, whatever the prompt / output length
    assert len(spy.sizes) <= 2 * len(ids) + 2
    assert len(detok._ids) < 300  # old ids are dropped

"""xgrammar behind one small interface: compile a GrammarKey against the tokenizer, match tokens, mask logits.

Chosen over llguidance after measuring both on SmolLM2's tokenizer (bench/structured_bench.py and
docs/PERF.md): both give sub-millisecond masks; xgrammar ships a CPU bitmask kernel usable by torch
directly and caches compiled grammars itself.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from loopserve.structured.params import GrammarKey, to_grammar

# Compiled grammars kept per engine (a JSON schema's compiled form is typically 10-500 KB).
GRAMMAR_CACHE_SIZE = 256


class XGrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], max_threads: int = 2) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarKey, object] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, key: GrammarKey):
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def compile(self, key: GrammarKey):
        """The compiled grammar of key (thread-safe; compiled once, LRU-cached)."""
        compiled = self.cached(key)
        if compiled is None:
            compiled = self._compiler.compile_grammar(to_grammar(key))
            with self._lock:
                self._cache[key] = compiled
                while len(self._cache) > GRAMMAR_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """-inf on every logit the bitmask rules out, in the given rows of logits (one operation)."""
        mask = bitmask if bitmask.device == logits.device else bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)

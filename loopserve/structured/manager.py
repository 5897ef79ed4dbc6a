"""Grammar compilation and token masks for the engine, kept off its step loop.

* The backend (tokenizer info for xgrammar) is built on a worker thread when the engine starts.
* A request's grammar compiles on that thread; the request waits in the scheduler's queue
  (`RequestGrammar.ready`) without holding up others. A grammar already in the cache gets its
  matcher at once, on the caller's thread.
* Masks for a step are filled on a second thread while the model's forward runs (xgrammar releases
  the GIL while it fills), then applied to all constrained rows of the logits in one operation.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from loopserve.structured.backend import XGrammarBackend
from loopserve.structured.params import StructuredOutputsParams

log = logging.getLogger(__name__)


class RequestGrammar:
    """One request's matcher, once its grammar has compiled."""

    def __init__(self, future: Future) -> None:
        self._future = future
        self.matcher = None
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        """Compiled (or failed): the request may be scheduled (or must be failed)."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self._future.done():
            return False
        try:
            self.matcher = self._future.result()
        except Exception as e:  # noqa: BLE001 - reported to the request, the engine goes on
            self.error = f"grammar compilation failed: {e}"
        return True

    def accept(self, token_ids: Sequence[int]) -> None:
        for t in token_ids:
            if self.matcher.is_terminated():
                return
            if not self.matcher.accept_token(t):
                # Only a token from outside the mask gets here (a stop string cut, a sampler bug).
                log.warning("grammar rejected token %d; the constraint no longer holds for this request", t)
                return


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._compile_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._backend_future = self._compile_pool.submit(
            lambda: XGrammarBackend(load_tokenizer(), vocab_size, stop_token_ids))
        self._pending: dict[str, RequestGrammar] = {}

    def _backend(self) -> XGrammarBackend:
        return self._backend_future.result()  # raises the start-up error, if any

    def grammar_for(self, request_id: str, params: StructuredOutputsParams) -> RequestGrammar:
        key = params.key
        if self._backend_future.done() and self._backend_future.exception() is None:
            backend = self._backend()
            compiled = backend.cached(key)
            if compiled is not None:
                done: Future = Future()
                done.set_result(backend.matcher(compiled))
                return RequestGrammar(done)
        grammar = RequestGrammar(self._compile_pool.submit(
            lambda: (b := self._backend()).matcher(b.compile(key))))
        self._pending[request_id] = grammar
        return grammar

    def failed(self) -> list[tuple[str, str]]:
        """Requests whose grammar failed since the last call, with the reason; forgets finished ones."""
        out = []
        for rid, g in list(self._pending.items()):
            if g.ready:
                del self._pending[rid]
                if g.error is not None:
                    out.append((rid, g.error))
        return out

    def wait_pending(self, timeout: float) -> None:
        """Block until a pending grammar finishes (or timeout): nothing else can be scheduled."""
        futures = [g._future for g in self._pending.values()]
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def start_masks(self, rows: list[tuple[int, RequestGrammar]], num_rows: int) -> Future:
        """Fill the masks of (logits row, grammar) on the mask thread; pass the future to apply_masks."""
        backend = self._backend()

        def fill() -> torch.Tensor:
            bitmask = backend.allocate_bitmask(num_rows)
            for row, g in rows:
                backend.fill(g.matcher, bitmask, row)
            return bitmask

        return self._mask_pool.submit(fill)

    def apply_masks(self, logits: torch.Tensor, masks: Future, rows: list[int]) -> None:
        self._backend().apply(logits, masks.result(), rows)

    def shutdown(self) -> None:
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)

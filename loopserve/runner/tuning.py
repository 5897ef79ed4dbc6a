"""Startup tuning on the serving GPU: time the candidate ways of running a kernel, keep the fastest.

Which tile shape or code path is fastest depends on the card (SMs, HBM latency, what programmatic
dependent launch overlaps) and on the model's shapes; nothing away from the device can settle it. The
tuners (runner/gemv_tuning.py, runner/extend_tuning.py, runner/decode_tuning.py) build, for each
candidate, a call shaped like the serving work it stands for, and `fastest` times them: each captured
in a CUDA graph, replayed in alternating rounds.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Times a list of zero-argument callables, each run at least once already: milliseconds apiece.
TimeFn = Callable[[Sequence[Callable[[], object]]], list[float]]


@dataclass
class Tuned:
    """The fastest candidate and the ms of every candidate that ran (by its str)."""
    chosen: object
    ms: dict[str, float]


def chosen(timings: dict[str, Tuned]) -> dict[str, object]:
    """Each tuned key's choice (a role's GEMV, a regime's tile)."""
    return {key: t.chosen for key, t in timings.items()}


def described(timings: dict[str, Tuned]) -> dict[str, tuple[str, dict[str, float]]]:
    """Each key's choice and every candidate's ms, for the log."""
    return {key: (str(t.chosen), t.ms) for key, t in timings.items()}


def time_in_graphs(fns: Sequence[Callable[[], object]]) -> list[float]:
    """Each callable captured in a CUDA graph; ms a replay, from alternating rounds."""
    from loopserve.runner.cuda_graphs import capture_graph, replay_ms

    return replay_ms(*(capture_graph(fn) for fn in fns), rounds=3, reps=5)


def agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether a candidate's output matches the first candidate's, up to summation order: loose enough
    for a different tile's rounding, tight enough to catch a miscompiled kernel (garbage, NaN)."""
    tol = 1e-3 if ref.dtype == torch.float32 else 5e-2
    return out.shape == ref.shape and torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)


# Pool blocks filled with random values per copy (a float32 temporary of this many blocks).
_FILL_CHUNK = 1024


def fill_random_blocks_(pools: Sequence[torch.Tensor], start: int, end: int, gen: torch.Generator) -> None:
    """Blocks start..end-1 of each KV pool (blocks outermost) set to random values: the attention
    tuners read them, and candidates can only be compared on keys and values that are not all alike."""
    for first in range(start, end, _FILL_CHUNK):
        last = min(first + _FILL_CHUNK, end)
        for pool in pools:
            pool[first:last].copy_(torch.randn(pool[first:last].shape, generator=gen, device=pool.device))


def run_ahead(candidates: Sequence, run: Callable[[object], object], thread_context: Callable[[], object],
              workers: int) -> None:
    """Each candidate run once on `workers` threads (each inside `thread_context()`), its result and
    any error dropped. A tuner's first run of a candidate is nearly all Triton compile, which spends
    most of its time outside the GIL (MLIR and LLVM passes, ptxas), so on a many-core host these
    overlap; the checked runs that follow find the kernels compiled."""
    def one(candidate) -> None:
        with thread_context():
            try:
                run(candidate)
            except Exception:  # noqa: BLE001 - the checked run meets the same error and reports it
                pass

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, candidates))


def _compile_ahead_on_gpu(candidates: Sequence, run: Callable[[object], object], device: torch.device) -> None:
    """run_ahead on the host's cores, every launch on this thread's device and stream, in inference mode
    as the tuners run (an in-place op on an inference tensor needs it). Then waits for the device: the
    candidates may share output buffers with the checked runs."""
    workers = min(len(candidates), len(os.sched_getaffinity(0)))
    if workers < 2:
        return
    stream = torch.cuda.current_stream(device)

    @contextlib.contextmanager
    def on_this_stream():
        with torch.cuda.device(device), torch.cuda.stream(stream), torch.inference_mode():
            yield

    run_ahead(candidates, run, on_this_stream, workers)
    torch.cuda.synchronize(device)


def fastest(candidates: Sequence, run: Callable[[object], torch.Tensor], time_fn: TimeFn, what: str,
            device: torch.device | None = None) -> Tuned | None:
    """Run each candidate once (compiling it), time those that ran and agree with the first one
    (`agrees`), and return the fastest; None when none ran. A candidate the compiler rejects (out of
    registers or shared memory, say) or whose result differs is left out, so a tile the card
    miscompiles cannot be picked for being fast. On a CUDA `device`, once the first candidate has run
    (its kernels' JIT state set up on this thread), the others compile side by side (run_ahead)."""
    runnable = []
    ref = None
    for i, candidate in enumerate(candidates):
        if i == 1 and device is not None and device.type == "cuda":
            _compile_ahead_on_gpu(candidates[1:], run, device)
        try:
            out = run(candidate)
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the candidate is out
            log.info("%s: %s left out: %s", what, candidate, e)
            continue
        if ref is None:
            ref = out.clone()  # calls may share an output buffer
        elif not agrees(out, ref):
            log.warning("%s: %s left out: its result differs from %s's", what, candidate, runnable[0])
            continue
        runnable.append(candidate)
    if not runnable:
        return None
    ms = time_fn([functools.partial(run, candidate) for candidate in runnable])
    best = min(range(len(runnable)), key=ms.__getitem__)
    return Tuned(runnable[best], {str(c): round(t, 4) for c, t in zip(runnable, ms)})

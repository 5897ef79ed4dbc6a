"""Startup tuning on the serving GPU: time the candidate ways of running a kernel, keep the fastest.

Which tile shape or code path is fastest depends on the card (SMs, HBM latency, what programmatic
dependent launch overlaps) and on the model's shapes; nothing away from the device can settle it. The
tuners (runner/gemv_tuning.py, runner/extend_tuning.py) build, for each candidate, a call shaped like
the serving work it stands for, and `fastest` times them: each captured in a CUDA graph, replayed in
alternating rounds.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Times a list of zero-argument callables, each run at least once already: milliseconds apiece.
TimeFn = Callable[[Sequence[Callable[[], object]]], list[float]]


@dataclass
class Tuned:
    """The fastest candidate and the ms of every candidate that ran (by its str)."""
    chosen: object
    ms: dict[str, float]


def time_in_graphs(fns: Sequence[Callable[[], object]]) -> list[float]:
    """Each callable captured in a CUDA graph; ms a replay, from alternating rounds."""
    from loopserve.runner.cuda_graphs import capture_graph, replay_ms

    return replay_ms(*(capture_graph(fn) for fn in fns), rounds=3, reps=5)


def fastest(candidates: Sequence, run: Callable[[object], object], time_fn: TimeFn, what: str) -> Tuned | None:
    """Run each candidate once (compiling it), time those that ran, and return the fastest; None when
    none ran. A candidate the compiler rejects (out of registers or shared memory, say) is left out."""
    runnable = []
    for candidate in candidates:
        try:
            run(candidate)
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the candidate is out
            log.info("%s: %s left out: %s", what, candidate, e)
            continue
        runnable.append(candidate)
    if not runnable:
        return None
    ms = time_fn([functools.partial(run, candidate) for candidate in runnable])
    best = min(range(len(runnable)), key=ms.__getitem__)
    return Tuned(runnable[best], {str(c): round(t, 4) for c, t in zip(runnable, ms)})

"""The startup tuning mechanism (runner/tuning.py): candidates that fail or disagree never reach the timer;
their first runs (compiles) can go side by side."""
import contextlib
import os
import threading

import pytest
import torch

from loopserve.runner.tuning import agrees, fastest, run_ahead


def test_fastest_times_only_candidates_that_ran_and_agree():
    ref = torch.linspace(-1, 1, 16, dtype=torch.bfloat16)
    outputs = {"default": ref.clone(), "rounded": ref + 0.004, "garbage": ref * 3, "nan": ref * float("nan"),
               "fast": ref.clone()}

    def run(name):
        if name == "rejected":
            raise RuntimeError("out of resources: shared memory")
        return outputs[name]

    timed = []

    def time_fn(fns):
        timed.extend(fn() is not None for fn in fns)
        return [float(len(fns) - i) for i in range(len(fns))]  # the last is the fastest

    tuned = fastest(["default", "rejected", "rounded", "garbage", "nan", "fast"], run, time_fn, "test")
    assert list(tuned.ms) == ["default", "rounded", "fast"] and tuned.chosen == "fast" and len(timed) == 3
    assert fastest(["rejected"], run, time_fn, "test") is None


def test_agreement_is_loose_for_16_bit_and_tight_for_fp32():
    x = torch.randn(64)
    assert agrees(x.bfloat16() + 0.01, x.bfloat16()) and not agrees(x.bfloat16() + 0.2, x.bfloat16())
    assert agrees(x + 1e-5, x) and not agrees(x + 1e-2, x)
    assert not agrees(x[:32], x)


def test_run_ahead_runs_each_candidate_once_on_worker_threads_inside_their_context():
    """The GPU tuners compile their candidates this way (runner/tuning._compile_ahead_on_gpu); a
    candidate that raises is dropped quietly, for the checked run to report."""
    ran, entered = [], []
    both_started = threading.Barrier(2, timeout=10)

    def run(candidate):
        if candidate in ("a", "b"):
            both_started.wait()  # two candidates at once, or this times out
        ran.append((candidate, threading.current_thread() is threading.main_thread()))
        if candidate == "rejected":
            raise RuntimeError("out of resources")

    @contextlib.contextmanager
    def context():
        entered.append(threading.current_thread().name)
        yield

    run_ahead(["a", "b", "rejected", "c"], run, context, workers=2)
    assert sorted(c for c, _ in ran) == ["a", "b", "c", "rejected"]
    assert not any(on_main for _, on_main in ran) and len(entered) == 4


def test_fastest_runs_nothing_ahead_off_a_gpu():
    """Triton's interpreter is not thread-safe: on CPU every candidate runs once, in order, on this thread."""
    order = []

    def run(candidate):
        order.append((candidate, threading.current_thread() is threading.main_thread()))
        return torch.ones(4)

    fastest(["x", "y", "z"], run, lambda fns: [1.0] * len(fns), "test", torch.device("cpu"))
    assert order == [("x", True), ("y", True), ("z", True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fastest_compiles_ahead_on_a_gpu():
    seen = []

    def run(candidate):
        seen.append(threading.current_thread() is threading.main_thread())
        return torch.ones(4, device="cuda") * 0 + torch.tensor(1.0, device="cuda")

    tuned = fastest(list("abcd"), run, lambda fns: [float(i) for i in range(len(fns))], "test", torch.device("cuda"))
    assert tuned.chosen == "a"
    assert seen.count(True) == 4  # each candidate checked once on this thread
    if len(os.sched_getaffinity(0)) >= 2:
        assert seen.count(False) == 3  # and b, c, d compiled ahead on worker threads

"""The startup tuning mechanism (runner/tuning.py): candidates that fail or disagree never reach the timer."""
import torch

from loopserve.runner.tuning import agrees, fastest


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

"""What the accelerator offers the Triton kernels: its SM count (and the launch regimes it sets), and
programmatic dependent launch."""
from __future__ import annotations

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM: the CPU/interpreter path just mirrors the main target


# A launch whose programs fit the SMs at most twice over (batch-1 decode, a short extend over a long
# cached prefix: few programs, each walking a long context, latency-bound) and the rest. The attention
# kernels' startup tuners pick a tile for each (runner/extend_tuning.py, runner/decode_tuning.py).
FEW, MANY = "few", "many"


def launch_regime(programs: int, device: torch.device) -> str:
    return FEW if programs <= 2 * sm_count(device) else MANY


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later, and a Triton that can launch with it).

    A kernel launched with it may start while the kernel before it in the stream is still running, once
    every program of that one has called `gdc_launch_dependents` (or exited). Before its `gdc_wait` it
    may only read what no earlier kernel of the stream writes (weights); the wait returns once the
    previous kernel has finished and its writes are visible. Since every kernel that waits finishes
    after its predecessor, a chain of them stays ordered end to end."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})

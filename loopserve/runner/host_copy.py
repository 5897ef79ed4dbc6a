"""Host data to the device without making the host wait for the device."""
from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list, numpy array or CPU tensor as a `dtype` tensor on `device`.

    A blocking copy from pageable memory synchronises the stream: the host would wait for every
    kernel queued before it (under overlap scheduling, the step it is trying to run ahead of). CUDA
    copies therefore go through pinned memory and are only queued; the caching host allocator keeps
    the pinned buffer alive until the copy has run."""
    if isinstance(values, torch.Tensor):
        t = values.to(dtype)
    elif isinstance(values, np.ndarray):
        t = torch.from_numpy(values).to(dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return host_image(t, device).to(device, non_blocking=True)


def host_image(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor as the source of a copy to `device` that is queued, not waited for: in page-locked
    memory for a GPU (the caching host allocator keeps the buffer until the copy has run), as it is
    otherwise."""
    return t.pin_memory() if device.type == "cuda" else t

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
    return t.pin_memory().to(device, non_blocking=True)

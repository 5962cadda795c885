"""Small helpers used across the package, each written once."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


@contextlib.contextmanager
def timer(seconds: dict[str, float], key: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the wall time of the block to `seconds[key]`. On CUDA the device is synchronised before the clock
    starts and before it stops, so work queued earlier is not counted here and this block's work is."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0

"""Small helpers used across the package, each written once."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


@contextlib.contextmanager
def timer(seconds: dict[str, float], key: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the wall time of the block to `seconds[key]` (waiting for the GPU's work at its end)."""
    t0 = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

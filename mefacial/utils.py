"""Small helpers used across the package, each written once."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import torch


_TIMER_LOCK = threading.Lock()  # `timer`'s sums: a clip's two threads (renderer, mesh tracker) add to one dict


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
    elapsed = time.perf_counter() - t0
    with _TIMER_LOCK:
        seconds[key] = seconds.get(key, 0.0) + elapsed


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy over a C-contiguous, writable array: a copy only where `array` is not (a decoded file's
    read-only buffer, a strided view); torch warns, in the user's terminal, on a tensor over a read-only one."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_cache_dir() -> Path:
    """mefacial's own folder for what it keeps between runs: $MEFACIAL_CACHE, else $XDG_CACHE_HOME/mefacial
    (~/.cache/mefacial)."""
    if os.environ.get("MEFACIAL_CACHE"):
        return Path(os.environ["MEFACIAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mefacial"


def temporary_path(path: str | os.PathLike, pid: int | None = None) -> Path:
    """Where process `pid` (default: this one) writes `path` before renaming it: `.<name>.<pid>.tmp` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success fsync it and rename it over `path` (then fsync
    the folder, so the rename survives a crash); on failure remove it. A reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # folders cannot be opened for fsync on some systems
        pass

"""Where the app's GPU work runs: a ZeroGPU Space, a dedicated GPU, or a CPU.

On a ZeroGPU Space (Hugging Face sets `SPACES_ZERO_GPU=true`) the GPU exists only inside functions
decorated with the `spaces` package's `@spaces.GPU`, each call in a worker process that gets a GPU for
at most the requested duration. There:

- models load on the CPU at start-up (`startup_device` -> "cpu", `preload`), as ZeroGPU expects: no CUDA
  in the main process;
- each GPU handler is wrapped by `gpu_handler`: inside the call the engine and its models move to CUDA
  (`Engine.to`), and `spaces.GPU` gets a duration computed from the request (frames x variants).

Anywhere else (a local GPU, a CPU Space, a laptop) nothing here imports `spaces`, and the handlers are
returned unchanged. Gradio itself is not imported here: the app (app.py) owns the UI.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Callable

log = logging.getLogger("mefacial.hardware")

ZERO_GPU_ENV = "SPACES_ZERO_GPU"  # set to "true" by Hugging Face on ZeroGPU Spaces (read as the spaces package does)
# Seconds asked of ZeroGPU for one request: worker start-up, moving the models, landmark models and CUDA
# kernels' first use, then a per-frame cost per variant (landmarks on the Space's CPU dominate: ~30-60 ms a
# frame with dlib; the networks take a few ms a frame on the GPU). ZeroGPU queues shorter requests first and
# refuses durations above its maximum, hence the cap.
GPU_BASE_S = 15.0
GPU_PER_FRAME_S = 0.08
GPU_MAX_S = 120


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (`SPACES_ZERO_GPU` true, read as `spaces.config` reads it)."""
    value = os.environ.get(ZERO_GPU_ENV)
    return value is not None and value.lower() in ("1", "t", "true")


def import_spaces() -> Any:
    """The `spaces` package; on ZeroGPU it must be imported before anything initialises CUDA."""
    try:
        return importlib.import_module("spaces")
    except ImportError as exc:
        raise RuntimeError(f"{ZERO_GPU_ENV} is set (a ZeroGPU Space) but the `spaces` package cannot be imported "
                           f"({exc}); add `spaces` to requirements.txt of the Space") from exc


def startup_device(requested: str) -> str:
    """The device the engine starts on: the CPU on ZeroGPU (the GPU exists only inside GPU calls), else `requested`."""
    if not on_zero_gpu():
        return requested
    if requested not in ("auto", "cuda", "cpu"):
        log.warning("--device %s ignored on ZeroGPU: models load on the CPU and run on the call's GPU", requested)
    return "cpu"


def gpu_seconds(frames: int, variants: int = 1, *, base_s: float = GPU_BASE_S, per_frame_s: float = GPU_PER_FRAME_S,
                cap_s: int = GPU_MAX_S) -> int:
    """Seconds of GPU to ask for a request of `frames` driving frames through `variants` variants."""
    return int(min(cap_s, base_s + per_frame_s * max(1, frames) * max(1, variants)) + 0.999)


def preload(engine: Any, variants: list[str]) -> dict[str, str]:
    """Load the models of `variants` on the engine's device (the CPU at start-up on ZeroGPU), so that GPU calls
    only move them. Returns variant -> error message for those that could not be loaded (no weights, ...)."""
    failed = {}
    for variant in variants:
        try:
            engine.model(variant)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported when a request asks for it
            failed[variant] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if failed:
        log.info("not preloaded: %s", "; ".join(f"{v}: {why}" for v, why in failed.items()))
    return failed


def gpu_handler(handler: Callable, engine: Any, duration: int | Callable[..., int], device: str = "cuda") -> Callable:
    """`handler` as a ZeroGPU task on a ZeroGPU Space (the engine moves to `device` inside the call, and
    `spaces.GPU(duration=...)` asks for `duration` seconds, or `duration(*args, **kwargs)` for this request);
    `handler` itself anywhere else, with no `spaces` import."""
    if not on_zero_gpu():
        return handler
    spaces = import_spaces()

    @functools.wraps(handler)
    def on_gpu(*args, **kwargs):
        engine.to(device)  # a no-op when this worker already moved it
        return handler(*args, **kwargs)

    return spaces.GPU(duration=duration)(on_gpu)

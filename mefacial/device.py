"""Device and precision: chosen once, in one place (engine, generate, train and bench use these)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU; a named device is checked to exist (an InputError naming the
    remedy otherwise)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but no CUDA GPU is available here; use --device cpu "
                             "(or auto, which picks the GPU when there is one)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return chosen


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of `precision`, or an error naming what the device supports."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise InputError("fp16 needs a GPU; on the CPU use bf16 (fast on CPUs with AVX512-BF16/AMX) or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU has no bf16; use fp16 or fp32")
    return PRECISIONS[precision]


def native_bf16() -> bool | None:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); None where /proc/cpuinfo is absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def inference_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """inference_mode plus autocast to `dtype` (none for fp32)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack

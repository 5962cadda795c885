"""The inference engine: one object shared by the app, the CLI, the benchmarks and the tests.

    engine = Engine(device="auto", precision="fp32")
    result = engine.animate(source, driving, variant="fomm-awp")
    result.frames  # T x H x W x 3 uint8

Device and precision are chosen once; models are cached per (variant, weights).
The source is encoded once per clip and driving frames go through the networks
in batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import prior as prior_lib
from .checkpoints import load_weights, resolve_checkpoint
from .errors import InputError, MefacialError
from .models import build_model
from .variants import Variant, get_variant

log = logging.getLogger("mefacial")

ProgressFn = Callable[[float, str], None]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class AnimationResult:
    """What one animation produced, and what it was made from."""

    frames: np.ndarray  # T x H x W x 3 uint8
    fps: float
    variant: str
    weights: str  # where the weights came from ("none" for warp)
    source_landmarks: np.ndarray | None = None  # 68 x 2, pixels of the model frame
    driving_landmarks: np.ndarray | None = None  # T x 68 x 2
    source_au: np.ndarray | None = None  # 18 x 2
    driving_au: np.ndarray | None = None  # T x 18 x 2
    prior_map: np.ndarray | None = None  # h x w, the source's prior map fed to the network
    model_source: np.ndarray | None = None  # H x W x 3 uint8: the source as the model saw it
    model_driving: np.ndarray | None = None  # T x H x W x 3 uint8: the driving frames as the model saw them
    landmark_backend: str | None = None
    crop_box: tuple | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of `precision`, or an error naming what the device supports."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise InputError("fp16 needs a GPU; on the CPU use bf16 (fast on CPUs with AVX512-BF16/AMX) or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU has no bf16; use fp16 or fp32")
    return PRECISIONS[precision]


def to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """H x W x 3 or T x H x W x 3 uint8 -> T x 3 x H x W float32 in [0, 1]."""
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InputError(f"expected frames of shape (T, H, W, 3) or (H, W, 3), got {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    tensor = tensor.permute(0, 3, 1, 2)  # T x 3 x H x W
    return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """T x 3 x H x W float in [0, 1] -> T x H x W x 3 uint8."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """T x H x W x 3 uint8 -> T x size x size x 3 uint8 (antialiased), no-op at that size."""
    if frames.shape[1:3] == (size, size):
        return frames
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class Engine:
    """Animate faces with any variant; device, precision and the model cache are held here."""

    def __init__(self, device: str | torch.device = "auto", precision: str = "fp32", batch_size: int | None = None,
                 landmarks: str = "auto", checkpoints: dict[str, str | Path] | None = None):
        self.device = pick_device(device)
        self.precision = precision
        self.dtype = check_precision(precision, self.device)
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 8)
        self.landmarks = landmarks
        self.checkpoint_overrides = dict(checkpoints or {})
        self._models: dict[tuple[str, str], tuple[nn.Module, str]] = {}
        self._lock = threading.Lock()

    # ---- models -------------------------------------------------------------------------
    def inference_context(self) -> contextlib.AbstractContextManager:
        """inference_mode plus autocast to the chosen precision (none for fp32)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.dtype))
        return stack

    def model(self, variant: str | Variant, checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
        """The model of `variant` on this engine's device, with its weights loaded; cached."""
        spec = get_variant(variant) if isinstance(variant, str) else variant
        checkpoint = checkpoint or self.checkpoint_overrides.get(spec.id)
        key = (spec.id, str(checkpoint or ""))
        with self._lock:
            if key not in self._models:
                model = build_model(spec.config)
                weights = "none (training-free)"
                if spec.needs_weights:
                    resolved = resolve_checkpoint(spec.id, checkpoint)
                    load_weights(model, resolved.path, spec.backbone)
                    weights = f"{resolved.path} ({resolved.source})"
                self._models[key] = (model.to(self.device).eval(), weights)
            return self._models[key]

    def use_model(self, variant: str, model: nn.Module, weights: str = "in-memory") -> None:
        """Serve `variant` with an already built model (random weights for tests and benchmarks, a training run)."""
        spec = get_variant(variant)
        with self._lock:
            self._models[(spec.id, "")] = (model.to(self.device).eval(), weights)

    # ---- animation ----------------------------------------------------------------------
    def animate(self, source: Any, driving: Any, variant: str = "warp", checkpoint: str | Path | None = None,
                motion: str = "relative", adapt_scale: bool = False, source_landmarks: np.ndarray | None = None,
                driving_landmarks: np.ndarray | None = None, progress: ProgressFn | None = None, *,
                magnify: float = 1.0, fps: float | None = None, batch_size: int | None = None,
                confine_to_prior: bool = False) -> AnimationResult:
        """Animate `source` (H x W x 3 uint8 at the model size) with `driving` (T x H x W x 3 uint8).

        `source_landmarks` (68 x 2, or 18 x 2 AU points) and `driving_landmarks`
        (T x 68 x 2 or T x 18 x 2), in pixels of those frames, feed the prior and
        warp variants. `motion` is one of the variant's motion modes; `magnify`
        multiplies the relative motion (1 = faithful).
        """
        spec = get_variant(variant)
        if motion not in spec.motion_modes:
            raise InputError(f"motion mode {motion!r} is not available for {spec.id}; choose one of {spec.motion_modes}")
        if not 0 < float(magnify) <= 10:
            raise InputError(f"magnify must be in (0, 10], got {magnify}")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        report = progress or (lambda fraction, message: None)
        size = spec.config.image_size
        source = resize_frames(np.asarray(source)[None], size)[0] if np.asarray(source).ndim == 3 else None
        if source is None:
            raise InputError("source must be one image of shape (H, W, 3)")
        driving = np.asarray(driving)
        if driving.ndim != 4 or driving.shape[0] < 1:
            raise InputError(f"driving must be frames of shape (T, H, W, 3) with T >= 1, got {driving.shape}")
        driving = resize_frames(driving, size)

        model, weights = self.model(spec, checkpoint)
        src_points, drv_points = self._landmark_inputs(spec, source_landmarks, driving_landmarks, len(driving))
        src_au, drv_au = self._au_points(spec, src_points, drv_points)

        report(0.0, f"{spec.id}: {len(driving)} frames")
        frames, prior_map = self._run(spec, model, source, driving, src_points, drv_points, src_au, drv_au,
                                      motion, adapt_scale, magnify, batch_size or self.batch_size, confine_to_prior,
                                      report, timings)
        timings["total_s"] = time.perf_counter() - started
        timings["ms_per_frame"] = 1000 * timings["total_s"] / len(driving)
        return AnimationResult(
            frames=frames, fps=float(fps or 25.0), variant=spec.id, weights=weights,
            source_landmarks=None if src_points is None or src_points.shape[-2] != 68 else src_points[0],
            driving_landmarks=None if drv_points is None or drv_points.shape[-2] != 68 else drv_points,
            source_au=None if src_au is None else src_au[0].cpu().numpy(),
            driving_au=None if drv_au is None else drv_au.cpu().numpy(),
            prior_map=prior_map, model_source=source, model_driving=driving, timings=timings,
        )

    def _landmark_inputs(self, spec: Variant, source_landmarks, driving_landmarks, num_frames: int):
        """Validate given landmarks: source 1 x P x 2 and driving T x P x 2 numpy (P = 68 or 18)."""
        if not spec.needs_landmarks:
            return None, None
        if source_landmarks is None or driving_landmarks is None:
            raise InputError(f"{spec.id} needs landmarks of the source and of every driving frame")
        src = np.asarray(source_landmarks, dtype=np.float32).reshape(1, -1, 2)
        drv = np.asarray(driving_landmarks, dtype=np.float32)
        drv = drv.reshape(num_frames, -1, 2) if drv.size == num_frames * drv.shape[-2] * 2 else drv
        if drv.shape[0] != num_frames or src.shape[1] not in (18, 68) or drv.shape[1:] != src.shape[1:]:
            raise InputError(f"landmarks must be (68 or 18) x 2 for the source and T x (68 or 18) x 2 for the clip; "
                             f"got {src.shape[1:]} and {drv.shape} for {num_frames} frames")
        if spec.backbone == "warp" and src.shape[1] != 68:
            raise InputError("the warp variant needs the 68 landmarks, not AU points")
        return src, drv

    def _au_points(self, spec: Variant, src_points, drv_points):
        """AU points (pixels) of source 1 x 18 x 2 and clip T x 18 x 2; fixed to frame 0 for MM 2021 configs."""
        if spec.prior == "none" or src_points is None:
            return None, None
        src, drv = (torch.from_numpy(p).to(self.device) for p in (src_points, drv_points))
        if src.shape[1] == 68:
            src, drv = prior_lib.au_points_from_landmarks(src), prior_lib.au_points_from_landmarks(drv)
        if spec.config.au_points == "first_frame":
            drv = drv[:1].expand_as(drv)
        return src.float(), drv.float()

    def _run(self, spec, model, source, driving, src_points, drv_points, src_au, drv_au, motion, adapt_scale,
             magnify, batch_size, confine_to_prior, report, timings):
        """Run the backbone over the clip in batches; returns (frames uint8, source prior map)."""
        device = self.device
        src_t = to_tensor(source, device)  # 1 x 3 x H x W
        outputs, prior_map = [], None
        total = len(driving)
        with self.inference_context():
            t0 = time.perf_counter()
            if spec.backbone == "warp":
                src_lm = torch.from_numpy(src_points).to(device)  # 1 x 68 x 2
                drv_lm = torch.from_numpy(drv_points).to(device)  # T x 68 x 2
                for start in range(0, total, batch_size):
                    batch = slice(start, min(start + batch_size, total))
                    out = model.animate(src_t, src_lm, drv_lm[batch], drv_lm[:1], magnify=magnify,
                                        confine_to_prior=confine_to_prior)
                    outputs.append(to_uint8(out["prediction"]))
                    report(batch.stop / total, f"frames {batch.stop}/{total}")
            else:
                au = (lambda s: None) if drv_au is None else (lambda s: drv_au[s])
                first = to_tensor(driving[:1], device)
                src = model.detect(src_t, src_au)
                init = model.detect(first, au(slice(0, 1)))
                cache = model.encode_source(src_t)
                if "prior" in src:
                    prior_map = src["prior"][0, 0].float().cpu().numpy()
                for start in range(0, total, batch_size):
                    batch = slice(start, min(start + batch_size, total))
                    frames = to_tensor(driving[batch], device)
                    drv = model.detect(frames, au(batch))
                    new = model.transfer(src, drv, init, mode=motion, adapt_scale=adapt_scale, magnify=magnify)
                    out = model.generate(src_t, cache, src, new)
                    outputs.append(to_uint8(out["prediction"]))
                    report(batch.stop / total, f"frames {batch.stop}/{total}")
            timings["networks_s"] = time.perf_counter() - t0
        return np.concatenate(outputs), prior_map

    def compare(self, source: Any, driving: Any, variants: Sequence[str], **options) -> dict[str, AnimationResult | MefacialError]:
        """Animate with each variant; a variant that cannot run maps to its error instead of a result."""
        results: dict[str, AnimationResult | MefacialError] = {}
        for variant in variants:
            try:
                results[variant] = self.animate(source, driving, variant=variant, **options)
            except MefacialError as exc:
                results[variant] = exc
        return results

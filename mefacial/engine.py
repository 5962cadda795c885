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
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import prior as prior_lib
from . import video
from .checkpoints import load_weights, resolve_checkpoint
from .config import ModelConfig
from .errors import CheckpointError, InputError, InputTooLargeError, MefacialError
from .landmarks import SMOOTH_POLYORDER, SMOOTH_WINDOW, get_detector, smooth_tracks, smoothing_window
from .mesh import detect_mesh
from .models import ClipSettings, au_points, build_model, get_backbone
from .utils import timer
from .models.blocks import fuse_for_inference
from .variants import Variant, get_variant

log = logging.getLogger("mefacial")

ProgressFn = Callable[[float, str], None]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_MAGNIFY = 10.0
DEFAULT_VARIANT = "dense"  # the training-free dense mesh generator: runs offline, needs no weights


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
    meshes: np.ndarray | None = None  # T x V x 2: the output's face mesh (synthesised clips: the moved meshes)
    action_units: dict | None = None  # synthesised clips: the AU specification, intensities and timing

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


def native_bf16() -> bool | None:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); None where /proc/cpuinfo is absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


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


@dataclasses.dataclass
class _Prepared:
    """Inputs at the model size and their landmarks (pixels of those frames)."""

    source: np.ndarray  # H x W x 3 uint8
    driving: np.ndarray  # T x H x W x 3 uint8
    source_points: np.ndarray | None  # 1 x P x 2
    driving_points: np.ndarray | None  # T x P x 2
    source_box: video.FaceBox | None
    driving_box: video.FaceBox | None
    backend: str | None
    mesh_box: tuple | None = None  # the face box (x0, y0, x1, y1, model pixels) the clip's mesh is tracked in


def _points_box(points: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of 68 landmarks (68 x 2): the face box a clip's mesh is tracked in."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    low, high = points.min(0), points.max(0)
    return (float(low[0]), float(low[1]), float(high[0]), float(high[1]))


class ClipAnimator:
    """The networks of one clip, through the backbone's clip runner (`BackboneSpec.clip`): the source and the
    clip's first frame are encoded once, then each batch of driving frames goes through in one call.

    Create and call it inside `engine.inference_context()`. Points are the landmarks the variant needs
    (68 landmarks, or 18 AU points for prior variants) in pixels of the model-size frames: source 1 x P x 2,
    first frame P x 2, each batch B x P x 2. `seconds` adds up the time of the "motion" (keypoints or
    regions and their transfer) and "generator" (dense motion, warp and decoder) steps.
    """

    def __init__(self, engine: "Engine", spec: Variant, model: nn.Module, source: np.ndarray, first_frame: np.ndarray,
                 source_points: np.ndarray | None, first_points: np.ndarray | None, *, motion: str = "relative",
                 adapt_scale: bool = False, magnify: float = 1.0, confine_to_prior: bool = False):
        self.engine, self.model, self.variant = engine, model, spec
        self.seconds = {"motion": 0.0, "generator": 0.0}
        settings = ClipSettings(motion=motion, adapt_scale=adapt_scale, magnify=magnify, confine=confine_to_prior)
        first_points = None if first_points is None else np.asarray(first_points)[None]  # 1 x P x 2
        self.runner = spec.spec.clip(model, self._tensor(source), self._tensor(first_frame),
                                     self._points(source_points), self._points(first_points), settings,
                                     self._tensor, self._stage)

    @property
    def prior_map(self) -> np.ndarray | None:
        """h x w, the source's prior map fed to the network (None without a prior)."""
        return self.runner.prior_map

    def _tensor(self, frames: np.ndarray) -> torch.Tensor:
        return to_tensor(frames, self.engine.device).contiguous(memory_format=self.engine.memory_format)

    def _points(self, points: np.ndarray | None) -> torch.Tensor | None:
        return None if points is None else torch.from_numpy(np.asarray(points)).to(self.engine.device)

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Add the wall time of the block to `seconds[name]` (waiting for the GPU at its end)."""
        with timer(self.seconds, name, self.engine.device):
            yield

    def __call__(self, frames: np.ndarray, points: np.ndarray | None = None) -> torch.Tensor:
        """B x H x W x 3 uint8 driving frames (and their B x P x 2 points) -> B x 3 x H x W predictions in [0, 1].

        A prediction with NaN / inf (broken weights) raises CheckpointError rather than becoming black frames."""
        prediction = self.runner(frames, self._points(points))  # B x 3 x H x W
        if not torch.isfinite(prediction).all():
            raise CheckpointError(
                f"the model of {self.variant.id} produced NaN/inf values: its weights are broken (a diverged "
                "training run or a corrupt checkpoint); use another checkpoint, or resume training from an earlier one")
        return prediction


class StreamingSmoother:
    """`landmarks.smooth_tracks` over a clip that arrives in chunks, frame for frame the same result.

    A Savitzky-Golay output needs half a window of frames after it (and the clip's ends are fitted
    over their first / last full window), so `push` returns the frames whose smoothed tracks are final,
    keeping a window of raw context, and `finish` returns the rest at the end of the clip.
    """

    def __init__(self, window: int = SMOOTH_WINDOW, polyorder: int = SMOOTH_POLYORDER):
        self.window, self.polyorder, self.half = window, polyorder, window // 2
        self.buffer: np.ndarray | None = None  # raw tracks of clip frames offset, offset + 1, ...
        self.offset = 0  # clip index of buffer[0]
        self.emitted = 0  # frames returned so far

    def push(self, tracks: np.ndarray) -> np.ndarray:
        """n x P x 2 raw tracks of the next frames -> m x P x 2 smoothed tracks of the next final frames."""
        tracks = np.asarray(tracks, np.float32)
        self.buffer = tracks if self.buffer is None else np.concatenate([self.buffer, tracks])
        total = self.offset + len(self.buffer)
        if total < self.window:  # the clip's first window (its start's fit) is not complete yet
            return self.buffer[:0]
        ready = total - self.half
        out = self._smoothed(ready)
        keep = max(self.offset, ready - 2 * self.half)  # the raw context the next frames' windows reach back to
        self.buffer, self.offset = self.buffer[keep - self.offset:], keep
        return out

    def finish(self) -> np.ndarray:
        """The smoothed tracks of the frames not returned yet (the clip has ended)."""
        if self.buffer is None:
            return np.zeros((0, 0, 2), np.float32)
        return self._smoothed(self.offset + len(self.buffer))

    def _smoothed(self, stop: int) -> np.ndarray:
        smoothed = smooth_tracks(self.buffer, self.window, self.polyorder)
        out = smoothed[self.emitted - self.offset:stop - self.offset]
        self.emitted = stop
        return out


class Engine:
    """Animate faces with any variant; device, precision and the model cache are held here."""

    def __init__(self, device: str | torch.device = "auto", precision: str = "fp32", batch_size: int | None = None,
                 landmarks: str = "auto", checkpoints: dict[str, str | Path] | None = None,
                 limits: video.Limits = video.DEFAULT_LIMITS, *, channels_last: bool | None = None,
                 fuse: bool = True, compile: bool = False):
        self.device = pick_device(device)
        self.precision = precision
        self.dtype = check_precision(precision, self.device)
        # CPU: 4 frames per batch measured fastest at 256 px (bigger batches leave the caches, FOMM and MRAA).
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 4)
        if precision == "bf16" and self.device.type == "cpu" and native_bf16() is False:
            log.warning("bf16 on a CPU without AVX512-BF16 / AMX is emulated: about 2-3x slower than fp32 here "
                        "(see README, Performance); use fp32 on this machine")
        self.landmarks = landmarks
        self.limits = limits
        self.checkpoint_overrides = dict(checkpoints or {})
        # NHWC convolutions: measured 1.4x faster for FOMM on a 2-core AVX-512 CPU (oneDNN); on CUDA the
        # tensor-core kernels of fp16 / bf16 want it too. Override with channels_last=True / False.
        if channels_last is None:
            channels_last = self.device.type == "cpu" or (self.device.type == "cuda" and self.dtype != torch.float32)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Batch norms folded into convs, upsample + conv as transposed convs (models.blocks.fuse_for_inference):
        # the same function within float32 rounding, about 1.15-1.2x faster end to end on the CPU.
        self.fuse = fuse
        self.compile = compile
        self._models: dict[tuple[str, str], tuple[nn.Module, str]] = {}
        self._lock = threading.Lock()  # guards the two dicts below, never held while loading
        self._loading: dict[tuple[str, str], threading.Lock] = {}  # one lock per model being loaded

    # ---- models -------------------------------------------------------------------------
    def inference_context(self) -> contextlib.AbstractContextManager:
        """inference_mode plus autocast to the chosen precision (none for fp32)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.dtype))
        return stack

    def model(self, variant: str | Variant, checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
        """The model of `variant` on this engine's device, with its weights loaded; cached.

        The cache's lock is held only to look up and to store: weights are resolved (a Hub download
        included) and loaded under a lock of that (variant, weights) key alone, so a first-use download of
        one variant never stalls requests for another, and two requests for the same one load it once."""
        spec = get_variant(variant)
        checkpoint = checkpoint or self.checkpoint_overrides.get(spec.id)
        key = (spec.id, str(checkpoint or ""))
        with self._lock:
            if key in self._models:
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:  # loaded by the request we waited for
                    return self._models[key]
            model = build_model(spec.config)
            weights = "none (training-free)"
            if spec.needs_weights:
                resolved = resolve_checkpoint(spec.id, checkpoint)
                load_weights(model, resolved.path, spec.spec.inference_parts)
                weights = f"{resolved.path} ({resolved.source})"
            served = (self._for_inference(model), weights)
            with self._lock:
                self._models[key] = served
                self._loading.pop(key, None)
            return served

    def use_model(self, variant: str, model: nn.Module, weights: str = "in-memory") -> nn.Module:
        """Serve `variant` with an already built model (random weights for tests and benchmarks, a training run);
        returns the model the engine runs.

        The model is moved to the engine's device and memory format in place (as `nn.Module.to` does) and put
        in evaluation mode; with `fuse` (the default) the engine runs a fused copy of it."""
        spec = get_variant(variant)
        served = self._for_inference(model)
        with self._lock:
            self._models[(spec.id, "")] = (served, weights)
        return served

    def _for_inference(self, model: nn.Module) -> nn.Module:
        """Evaluation mode on the engine's device and memory format, fused (`fuse`), the batched steps compiled
        (`compile`)."""
        model = model.to(self.device, memory_format=self.memory_format).eval()
        if self.fuse:
            model = fuse_for_inference(model).to(memory_format=self.memory_format)  # new weights: contiguous
        if self.compile:
            # Compile the heavy, shape-stable steps; transfer (small 2 x 2 algebra) stays eager.
            for step in ("detect", "generate", "animate"):
                if hasattr(model, step) and not hasattr(getattr(model, step), "_torchdynamo_orig_callable"):
                    # One graph per batch shape (the source's, full batches, the last one): static shapes
                    # keep the convolutions on the fastest kernels.
                    setattr(model, step, torch.compile(getattr(model, step), dynamic=False))
        return model

    # ---- animation ----------------------------------------------------------------------
    def animate(self, source: Any, driving: Any, variant: str = DEFAULT_VARIANT, checkpoint: str | Path | None = None,
                motion: str = "relative", adapt_scale: bool | None = None, source_landmarks: np.ndarray | None = None,
                driving_landmarks: np.ndarray | None = None, progress: ProgressFn | None = None, *,
                magnify: float = 1.0, fps: float | None = None, crop: bool = True, paste_back: bool = False,
                landmarks: str | None = None, smooth: bool = True, margin: float = 0.0,
                batch_size: int | None = None, confine_to_prior: bool = False) -> AnimationResult:
        """Animate the face in `source` with the motion of the face in `driving`.

        `source`: an image path or an H x W x C array of any size; `driving`: a
        video / GIF path, a folder of frames, or a T x H x W x C array. With
        `crop` both are cut to one square face box (the clip's from its first,
        onset frame) and resized to the model size; without it they are resized
        as they are. Optional `source_landmarks` (68 x 2, or 18 x 2 AU points)
        and `driving_landmarks` (T x 68 x 2 / T x 18 x 2), in pixels of the given
        frames, replace detection with the `landmarks` backend ("auto", "dlib",
        "fan"); `smooth` removes landmark jitter over time (over a window set by the clip's frame rate:
        `landmarks.smoothing_window`). `motion` is one of
        the variant's modes; `adapt_scale` scales the motion by the ratio of the
        faces' keypoint hull areas (default: as the original code of the backbone
        does, off for FOMM, on for MRAA); `magnify` multiplies the relative
        motion (1 = faithful). `paste_back` puts the generated face back into the source
        picture. `progress(fraction, message)` is called after each batch.
        """
        spec, adapt_scale = self._check_options(variant, motion, adapt_scale, magnify, crop, paste_back)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        report = progress or (lambda fraction, message: None)
        report(0.0, "reading inputs")
        source_image = video.read_image(source, self.limits)
        clip = video.read_clip(driving, fps=fps, limits=self.limits)
        timings["read_s"] = time.perf_counter() - started

        model, weights = self.model(spec, checkpoint)  # fail on missing weights before any detection
        config = getattr(model, "config", spec.config)  # an injected model may have its own (e.g. tiny) config
        prepared = self._prepare(spec, config.image_size, source_image, clip.frames, source_landmarks, driving_landmarks,
                                 crop, margin, landmarks or self.landmarks,
                                 smoothing_window(clip.fps) if smooth else None, report, timings)
        src_au, drv_au = self._au_points(config, prepared.source_points, prepared.driving_points)

        report(0.05, f"{spec.id}: {clip.num_frames} frames")
        batch_size = batch_size or self.batch_size
        with self._memory_errors(spec, batch_size):
            frames, prior_map = self._run(spec, model, prepared.source, prepared.driving, prepared.source_points,
                                          prepared.driving_points, motion, adapt_scale, magnify, batch_size,
                                          confine_to_prior, report, timings)
        if paste_back:
            frames = video.paste_back(frames, source_image, prepared.source_box)
        timings["total_s"] = time.perf_counter() - started
        timings["ms_per_frame"] = 1000 * timings["total_s"] / clip.num_frames
        points68 = lambda p: None if p is None or p.shape[-2] != prior_lib.NUM_LANDMARKS else p  # noqa: E731
        return AnimationResult(
            frames=frames, fps=clip.fps, variant=spec.id, weights=weights,
            source_landmarks=None if points68(prepared.source_points) is None else prepared.source_points[0],
            driving_landmarks=points68(prepared.driving_points),
            source_au=None if src_au is None else src_au[0].cpu().numpy(),
            driving_au=None if drv_au is None else drv_au.cpu().numpy(),
            prior_map=prior_map, model_source=prepared.source, model_driving=prepared.driving,
            landmark_backend=prepared.backend, crop_box=prepared.source_box, timings=timings,
        )

    def iter_animate(self, source: Any, driving: Any, variant: str = DEFAULT_VARIANT, checkpoint: str | Path | None = None,
                     motion: str = "relative", adapt_scale: bool | None = None,
                     source_landmarks: np.ndarray | None = None, driving_landmarks: np.ndarray | None = None, *,
                     magnify: float = 1.0, fps: float | None = None, crop: bool = True, paste_back: bool = False,
                     landmarks: str | None = None, smooth: bool = True, margin: float = 0.0,
                     batch_size: int | None = None, chunk: int = 64,
                     confine_to_prior: bool = False) -> Iterator[np.ndarray]:
        """`animate` in memory bounded by `chunk` frames, whatever the clip's length: yields the output
        frames (n x H x W x 3 uint8, n <= batch size) in order, as they are made.

        `driving` is a clip path (decoded `chunk` frames at a time), a T x H x W x C array, or an iterable
        of n x H x W x C frame arrays (a live stream); the other arguments are those of `animate`, and the
        frames equal `animate(...).frames`. The face box comes from the first frame; landmarks are found
        chunk by chunk, and their temporal smoothing holds back half its window of frames
        (`StreamingSmoother`), so every frame gets the landmarks it would get from the whole clip.
        """
        spec, adapt_scale = self._check_options(variant, motion, adapt_scale, magnify, crop, paste_back)
        batch_size = batch_size or self.batch_size
        source_image = video.read_image(source, self.limits)
        model, _ = self.model(spec, checkpoint)
        size = getattr(model, "config", spec.config).image_size
        backend = landmarks or self.landmarks
        given = None if driving_landmarks is None else np.asarray(driving_landmarks, np.float32)
        smooth = spec.needs_landmarks and smooth and given is None
        smoother = None  # a StreamingSmoother, made once the clip's frame rate is known
        quiet = lambda fraction, message: None  # noqa: E731
        pending = np.zeros((0, size, size, 3), np.uint8)  # model-size frames whose smoothed landmarks are not final
        animator = prepared = None
        seen = 0

        def frames_out(points: np.ndarray | None) -> Iterator[np.ndarray]:
            """Animate the first len(points) pending frames (all of them when the variant needs no points)."""
            nonlocal pending, animator
            count = len(pending) if points is None else len(points)
            ready, pending = pending[:count], pending[count:]
            for start in range(0, count, batch_size):
                batch = slice(start, min(start + batch_size, count))
                with self._memory_errors(spec, batch_size), self.inference_context():
                    if animator is None:
                        animator = ClipAnimator(self, spec, model, prepared.source, ready[0], prepared.source_points,
                                                None if points is None else points[0], motion=motion,
                                                adapt_scale=adapt_scale, magnify=magnify,
                                                confine_to_prior=confine_to_prior)
                    out = to_uint8(animator(ready[batch], None if points is None else points[batch]))
                yield video.paste_back(out, source_image, prepared.source_box) if paste_back else out

        for frames, clip_fps in self._driving_chunks(driving, chunk, fps):
            if smooth and smoother is None:
                smoother = StreamingSmoother(smoothing_window(clip_fps))
            chunk_given = None if given is None else given[seen:seen + len(frames)]
            if chunk_given is not None and len(chunk_given) != len(frames):
                raise InputError(f"driving_landmarks has {len(given)} frames, but the clip has more")
            seen += len(frames)
            if prepared is None:  # first chunk: face boxes from the source and the clip's first frame
                prepared = self._prepare(spec, size, source_image, frames, source_landmarks, chunk_given, crop,
                                         margin, backend, None, quiet, {})
                model_frames, points = prepared.driving, prepared.driving_points
            else:
                model_frames, points = self._chunk_to_model(spec, prepared, frames, chunk_given, size, backend)
            pending = np.concatenate([pending, model_frames])
            if smoother is not None:
                points = smoother.push(points)
            yield from frames_out(points)
        if prepared is None:
            raise InputError("the driving clip holds no frames")
        if given is not None and seen != len(given):
            raise InputError(f"driving_landmarks has {len(given)} frames for a clip of {seen}")
        if smoother is not None:
            yield from frames_out(smoother.finish())

    @contextlib.contextmanager
    def _memory_errors(self, spec: Variant, batch_size: int) -> Iterator[None]:
        """Out-of-memory while running the networks -> InputTooLargeError saying what to change."""
        try:
            yield
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise InputTooLargeError(
                f"out of {self.device.type.upper()} memory running {spec.id} on batches of {batch_size} frames; "
                "use a smaller batch size (Engine(batch_size=...) / --batch-size), a shorter clip, or bf16 / fp16"
            ) from None

    def _driving_chunks(self, driving: Any, chunk: int, fps: float | None) -> Iterator[tuple[np.ndarray, float]]:
        """(n x H x W x 3 uint8 chunk, the clip's fps) of a clip path, an array or an iterable of frame arrays."""
        if isinstance(driving, (str, Path)):
            for clip in video.iter_clip_chunks(driving, chunk=chunk, fps=fps, limits=self.limits):
                yield clip.frames, clip.fps
        elif isinstance(driving, np.ndarray):
            clip = video.read_clip(driving, fps=fps, limits=self.limits)
            for start in range(0, clip.num_frames, chunk):
                yield clip.frames[start:start + chunk], clip.fps
        else:
            for frames in driving:
                frames = video.as_rgb(np.asarray(frames))
                yield (frames if frames.ndim == 4 else frames[None]), fps or video.DEFAULT_FPS

    def _chunk_to_model(self, spec: Variant, prepared: "_Prepared", frames: np.ndarray, given: np.ndarray | None,
                        size: int, backend: str) -> tuple[np.ndarray, np.ndarray | None]:
        """A later chunk of the clip cut with the first frame's face box (or resized), and its points in model pixels."""
        box = prepared.driving_box
        if box is not None:
            model_frames = video.crop_to_model(frames, box, size)
            to_model = lambda p: box.to_crop(p, size)  # noqa: E731
        else:
            model_frames = video.resize_frames(frames, size, size)
            scale = np.array([size / frames.shape[2], size / frames.shape[1]], np.float32)
            to_model = lambda p: ((p + 0.5) * scale - 0.5).astype(np.float32)  # noqa: E731
        if not spec.needs_landmarks:
            return model_frames, None
        if given is not None:
            points = to_model(given)
        elif spec.spec.points == "mesh":
            points = detect_mesh(model_frames, box=prepared.mesh_box)
        else:
            points = get_detector(backend, self.device).detect(model_frames, role="driving").points
        self._check_points(spec, prepared.source_points, points)
        return model_frames, points

    @staticmethod
    def _check_options(variant: str, motion: str, adapt_scale: bool | None, magnify: float, crop: bool,
                       paste_back: bool) -> tuple[Variant, bool]:
        """The variant and the movement-scale setting, or an InputError naming the bad option."""
        spec = get_variant(variant)
        if motion not in spec.motion_modes:
            raise InputError(f"motion mode {motion!r} is not available for {spec.id}; choose one of {spec.motion_modes}")
        if not 0 < float(magnify) <= MAX_MAGNIFY:
            raise InputError(f"magnify must be in (0, {MAX_MAGNIFY}], got {magnify}")
        if paste_back and not crop:
            raise InputError("paste_back needs crop=True (the face is pasted back into the box it was cut from)")
        return spec, spec.adapt_scale_default if adapt_scale is None else adapt_scale

    def _prepare(self, spec: Variant, size: int, source: np.ndarray, driving: np.ndarray, source_landmarks, driving_landmarks,
                 crop: bool, margin: float, backend: str, smooth_window: int | None, report: ProgressFn,
                 timings: dict[str, float]) -> "_Prepared":
        """Crop / resize both inputs to the model size and find the landmarks the variant needs, in crop pixels."""
        t0 = time.perf_counter()
        detector = None
        if spec.needs_landmarks and (source_landmarks is None or driving_landmarks is None) or (
                crop and (source_landmarks is None or driving_landmarks is None)):
            detector = get_detector(backend, self.device)
        given_src = None if source_landmarks is None else np.asarray(source_landmarks, np.float32).reshape(-1, 2)
        given_drv = None if driving_landmarks is None else np.asarray(driving_landmarks, np.float32)
        if given_drv is not None and (given_drv.ndim != 3 or len(given_drv) != len(driving)):
            raise InputError(f"driving_landmarks must be T x P x 2 for the {len(driving)} frames, got {given_drv.shape}")
        source_box = driving_box = None
        if crop:
            report(0.01, "finding the faces")
            src_face = given_src if given_src is not None and len(given_src) == prior_lib.NUM_LANDMARKS else \
                detector.detect(source, role="source").points[0]
            drv_face = given_drv[0] if given_drv is not None and given_drv.shape[1] == prior_lib.NUM_LANDMARKS else \
                detector.detect(driving[:1], role="driving").points[0]
            source_box = video.face_box(src_face, source.shape, margin=margin)
            driving_box = video.face_box(drv_face, driving.shape[1:], margin=margin)
            model_source = video.crop_to_model(source, source_box, size)
            model_driving = video.crop_to_model(driving, driving_box, size)
            to_model_src = lambda p: source_box.to_crop(p, size)  # noqa: E731
            to_model_drv = lambda p: driving_box.to_crop(p, size)  # noqa: E731
        else:
            model_source = video.resize_frames(source[None], size, size)[0]
            model_driving = video.resize_frames(driving, size, size)
            scale_src = np.array([size / source.shape[1], size / source.shape[0]], np.float32)
            scale_drv = np.array([size / driving.shape[2], size / driving.shape[1]], np.float32)
            to_model_src = lambda p: ((p + 0.5) * scale_src - 0.5).astype(np.float32)  # noqa: E731
            to_model_drv = lambda p: ((p + 0.5) * scale_drv - 0.5).astype(np.float32)  # noqa: E731
        source_points = driving_points = mesh_box = None
        if spec.spec.points == "mesh" and (given_src is None or given_drv is None):
            report(0.02, "face mesh")
            # the clip's mesh is tracked in one face box: the onset frame's (from its 68 landmarks when cropped)
            mesh_box = _points_box(to_model_drv(drv_face)) if crop else None
            source_points = (to_model_src(given_src) if given_src is not None else detect_mesh(
                model_source, box=_points_box(to_model_src(src_face)) if crop else None, role="source"))
            source_points = source_points.reshape(1, -1, 2)  # 1 x 478 x 2
            driving_points = (to_model_drv(given_drv) if given_drv is not None
                              else detect_mesh(model_driving, box=mesh_box))  # T x 478 x 2
            if smooth_window and given_drv is None and len(driving_points) >= 3:
                driving_points = smooth_tracks(driving_points, smooth_window)
            self._check_points(spec, source_points, driving_points)
        elif spec.needs_landmarks:
            report(0.02, "landmarks")
            source_points = (to_model_src(given_src) if given_src is not None
                             else detector.detect(model_source, role="source").points[0])[None]  # 1 x P x 2
            driving_points = (to_model_drv(given_drv) if given_drv is not None
                              else detector.detect(model_driving, role="driving").points)  # T x P x 2
            if smooth_window and given_drv is None and len(driving_points) >= 3:
                driving_points = smooth_tracks(driving_points, smooth_window)
            self._check_points(spec, source_points, driving_points)
        timings["landmarks_s"] = time.perf_counter() - t0
        backend_name = detector.name if detector is not None else ("given" if spec.needs_landmarks else None)
        if spec.spec.points == "mesh" and (given_src is None or given_drv is None):
            backend_name = "mesh (MediaPipe face mesh + iris, LiteRT)"
        return _Prepared(model_source, model_driving, source_points, driving_points, source_box, driving_box,
                         backend_name, mesh_box)

    @staticmethod
    def _check_points(spec: Variant, src: np.ndarray, drv: np.ndarray) -> None:
        """Source 1 x P x 2 and driving T x P x 2 with P = 68 landmarks (or 18 AU points for prior variants)."""
        allowed = spec.spec.points_per_face
        if src.shape[1] not in allowed or drv.shape[1:] != src.shape[1:]:
            raise InputError(f"{spec.id} needs {' or '.join(map(str, allowed))} points per face, source and clip "
                             f"alike; got {src.shape[1]} and {drv.shape[1]}")

    def _au_points(self, config: ModelConfig, src_points, drv_points):
        """AU points (pixels) of source 1 x 18 x 2 and clip T x 18 x 2; fixed to frame 0 for MM 2021 configs;
        (None, None) for a model that takes no AU points."""
        if src_points is None or not get_backbone(config.backbone).points == "au_points":
            return None, None
        src, drv = (torch.from_numpy(p).to(self.device) for p in (src_points, drv_points))
        return au_points(config, src, drv)

    def _run(self, spec, model, source, driving, src_points, drv_points, motion, adapt_scale,
             magnify, batch_size, confine_to_prior, report, timings):
        """Run the backbone over the clip in batches; returns (frames uint8, source prior map)."""
        outputs = []
        total = len(driving)
        with self.inference_context():
            t0 = time.perf_counter()
            animator = ClipAnimator(self, spec, model, source, driving[0], src_points,
                                    None if drv_points is None else drv_points[0], motion=motion,
                                    adapt_scale=adapt_scale, magnify=magnify, confine_to_prior=confine_to_prior)
            for start in range(0, total, batch_size):
                batch = slice(start, min(start + batch_size, total))
                outputs.append(to_uint8(animator(driving[batch], None if drv_points is None else drv_points[batch])))
                report(batch.stop / total, f"frames {batch.stop}/{total}")
            timings["networks_s"] = time.perf_counter() - t0
            timings.update({f"{stage}_s": seconds for stage, seconds in animator.seconds.items()})
        return np.concatenate(outputs), animator.prior_map

    def synthesize(self, source: Any, aus: Any, timing: Any = None, options: Any = None,
                   progress: ProgressFn | None = None, **overrides) -> AnimationResult:
        """A micro-expression of the face in `source` from a FACS specification, with no driving clip.

        `aus`: '4:C,7:B' (AU:intensity A-E; see `mefacial.au.parse_aus`) or a list of `au.AUSpec`; `timing`: an
        `au.Timing` (onset / apex / offset ms, fps, lead-in / lead-out; default a 300 ms event at 200 fps);
        `options`: a `synthesis.SynthesisOptions` (crop, margin, paste_back, magnify, appearance, landmarks; the
        animation options' fields of the same names are taken too), or its fields as keyword arguments. Returns
        the same `AnimationResult` as `animate`, with the moved meshes and the specification (`meshes`,
        `action_units`)."""
        from .synthesis import SynthesisOptions, synthesize

        options = dataclasses.replace(SynthesisOptions.of(options), **overrides)
        return synthesize(self, source, aus, timing, options, progress)

    def compare(self, source: Any, driving: Any, variants: Sequence[str], **options) -> dict[str, AnimationResult | MefacialError]:
        """Animate with each variant; a variant that cannot run maps to its error instead of a result."""
        results: dict[str, AnimationResult | MefacialError] = {}
        progress = options.pop("progress", None)
        for index, variant in enumerate(variants):
            def report(fraction: float, message: str, index: int = index, variant: str = variant) -> None:
                if progress is not None:  # one bar over all variants
                    progress((index + fraction) / len(variants), f"{variant}: {message}")

            try:
                results[variant] = self.animate(source, driving, variant=variant, progress=report, **options)
            except MefacialError as exc:
                results[variant] = exc
        return results

"""Inference benchmark: the engine's batched path against a straightforward per-frame loop, in one run.

    python -m mefacial bench --variants fomm-awp,mraa-awp --frames 16 --precisions fp32,bf16

For each variant, at its published full-size config (`configs/*.yaml`) with random, seeded weights
(nothing is downloaded), on the same frames and the same landmarks:

* the fast path is `engine.ClipAnimator`, the code `Engine.animate` runs: source and the clip's first
  frame encoded once, driving frames in batches, `torch.inference_mode`, channels-last, autocast to
  the chosen precision (optionally `torch.compile`);
* the per-frame loop does what the original demos do (FOMM / FPB-FOMM `animate.py`, MRAA
  `demo.py`): source keypoints / regions and the first frame's once, then for every frame the
  detector on that frame, the motion transfer, and the generator called on the source (which encodes
  it again), in fp32 under `torch.no_grad`, contiguous tensors; with a prior, the original MRAA region
  predictor also runs its hourglass and throws the result away, so the loop does too.

Both get the same landmarks (dlib on the driving frames, smoothed as the engine does), so the
difference between their frames measures the networks. Landmarks are timed apart: the engine's batched
`detect` plus smoothing, and the original's one `detect` per frame. Stage times are medians over
`repeats` runs that alternate fast path and loop, since other processes share the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import video
from .config import ModelConfig
from .device import pick_device
from .engine import (PRECISIONS, ClipAnimator, Engine, check_precision, native_bf16, to_tensor,
                     to_uint8)
from .errors import InputError
from .generate import face_image, find_clips, find_faces
from .landmarks import get_detector, smooth_tracks
from .models import ClipSettings, build_model
from .utils import timer as timed  # wall time of a block, GPU work included
from .variants import Variant, get_variant

STAGES = ("landmarks", "prior", "motion", "generator", "end_to_end")
DEFAULT_VARIANTS = ("fomm-none", "fomm-ewp", "fomm-awp", "fomm-ewp-mm21", "mraa-none", "mraa-ewp", "mraa-awp", "warp")
MOTION = "relative"
# Synthetic driving motion (no real clips): a slow sway of this many pixels of the model frame.
SWAY_PX = 1.5


# ---- inputs ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchInputs:
    """Source and driving frames at the model size and their 68 landmarks (model pixels)."""

    source: np.ndarray  # S x S x 3 uint8
    driving: np.ndarray  # T x S x S x 3 uint8
    source_points: np.ndarray  # 1 x 68 x 2, raw
    driving_points: np.ndarray  # T x 68 x 2, smoothed as the engine smooths them
    origin: str  # where the frames came from


def _data_inputs(data: Path | None) -> tuple[Path | None, Path | None]:
    """The first driving clip and the first face of a data folder laid out as MEFACIAL_DATA is (driving/: videos,
    GIFs or folders of frames; faces/: images, or folders of one), found as `generate` finds them; None for
    a part the folder lacks (an empty one is an error naming it)."""
    if data is None:
        return None, None
    clip = find_clips(data / "driving")[0] if (data / "driving").is_dir() else None
    face = face_image(find_faces(data / "faces")[0]) if (data / "faces").is_dir() else None
    return clip, face


def _sway(image: np.ndarray, frames: int) -> np.ndarray:
    """T x S x S x 3 uint8: `image` shifted and scaled by sub-pixel amounts, a smooth synthetic head motion."""
    size = image.shape[0]
    t = torch.linspace(0, 2 * math.pi, frames)
    shift = SWAY_PX * 2 / size  # pixels -> [-1, 1] units
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 + 0.5 * shift * torch.sin(t)
    theta[:, 0, 2], theta[:, 1, 2] = shift * torch.sin(t), shift * torch.cos(t) - shift
    grid = torch.nn.functional.affine_grid(theta, (frames, 3, size, size), align_corners=False)
    source = to_tensor(image, torch.device("cpu")).expand(frames, -1, -1, -1)
    return np.ascontiguousarray(to_uint8(torch.nn.functional.grid_sample(source, grid, padding_mode="border",
                                                                         align_corners=False)))


SYNTHETIC = "synthetic"  # the landmark choice of speed runs on machines without a detector (no dlib)


def synthetic_landmarks(size: int) -> np.ndarray:
    """68 points in the iBUG layout of a frontal face filling a `size` frame (1 x 68 x 2, pixels): jaw,
    brows, nose, eyes and mouth at textbook proportions. For speed runs only: they follow no real face."""
    u = lambda a, b, n: np.linspace(a, b, n)  # noqa: E731
    t = u(np.pi, 0, 17)
    jaw = np.stack([0.5 + 0.36 * np.cos(t), 0.45 + 0.42 * np.sin(t)], 1)  # 0-16, ear to ear under the chin
    brows = [np.stack([u(x0, x1, 5), 0.33 - 0.03 * np.sin(u(0, np.pi, 5))], 1) for x0, x1 in ((0.22, 0.44), (0.56, 0.78))]
    nose = np.concatenate([np.stack([np.full(4, 0.5), u(0.4, 0.58, 4)], 1),  # 27-30 bridge
                           np.stack([u(0.43, 0.57, 5), 0.63 - 0.015 * np.sin(u(0, np.pi, 5))], 1)])  # 31-35
    angles = np.pi - np.arange(6) * np.pi / 3  # 6 points around each eye, from its outer corner
    eyes = [np.stack([cx + 0.07 * np.cos(angles), 0.41 - 0.025 * np.sin(angles)], 1) for cx in (0.33, 0.67)]
    outer, inner = np.arange(12) * np.pi / 6, np.arange(8) * np.pi / 4
    mouth = np.concatenate([np.stack([0.5 - 0.12 * np.cos(outer), 0.76 - 0.05 * np.sin(outer)], 1),  # 48-59
                            np.stack([0.5 - 0.08 * np.cos(inner), 0.76 - 0.02 * np.sin(inner)], 1)])  # 60-67
    points = np.concatenate([jaw, *brows, nose, *eyes, mouth]) * size  # 68 x 2
    return points[None].astype(np.float32)


def _sway_points(points: np.ndarray, frames: int, size: int) -> np.ndarray:
    """T x 68 x 2: `points` (1 x 68 x 2) carried by the motion `_sway` gives the image."""
    t = np.linspace(0, 2 * math.pi, frames)
    shift = SWAY_PX * 2 / size
    scale = 1 + 0.5 * shift * np.sin(t)  # grid_sample samples the input at scale * p + offset
    offset = np.stack([shift * np.sin(t), shift * np.cos(t) - shift], 1)  # T x 2
    normalized = (2 * points + 1) / size - 1  # 1 x 68 x 2, align_corners=False
    moved = (normalized - offset[:, None]) / scale[:, None, None]  # where each input point lands
    return ((moved + 1) * size - 1) / 2


def _astronaut_face(size: int, detector) -> np.ndarray:
    """size x size x 3 uint8: scikit-image's astronaut cut to her face box, framed as a micro-expression clip is."""
    from skimage.data import astronaut

    picture = astronaut()
    box = video.face_box(detector.detect(picture, role="source").points[0], picture.shape)
    return video.crop_to_model(picture[None], box, size)[0]


def bench_inputs(size: int, frames: int, data: Path | None = None, landmarks: str = "dlib") -> BenchInputs:
    """A real micro-expression clip and face from `data` (MEFACIAL_DATA layout) when there, else a
    synthetic one (scikit-image's astronaut, swaying), cut to `size` and `frames` (a short clip is
    played back and forth), with their landmarks. `landmarks="synthetic"` needs no detector: the synthetic
    clip with `synthetic_landmarks` moved by the same sway (speed runs; the images and points do not match)."""
    if landmarks == SYNTHETIC:
        from skimage.data import astronaut

        source = video.resize_frames(astronaut()[30:230, 125:325][None], size, size)[0]  # around the face
        points = synthetic_landmarks(size)
        return BenchInputs(source, _sway(source, frames), points, _sway_points(points, frames, size).astype(np.float32),
                           f"synthetic: scikit-image astronaut, {size}x{size}, swaying {SWAY_PX} px; synthetic "
                           "landmarks (a fixed 68-point layout moved with the sway, not detected)")
    detector = get_detector(landmarks)
    clip, face = _data_inputs(data)
    if clip is not None and face is not None:
        source = video.resize_frames(video.read_image(face)[None], size, size)[0]
        real = video.read_clip(clip).frames
        order = np.concatenate([np.arange(len(real)), np.arange(len(real) - 2, 0, -1)]) if len(real) > 1 else [0]
        driving = video.resize_frames(real[np.resize(order, frames)], size, size)
        origin = f"{clip.name} and {face.name} ({len(real)} frames, resized to {size}x{size})"
    else:
        source = _astronaut_face(size, detector)
        driving = _sway(source, frames)
        origin = f"synthetic: scikit-image astronaut face, {size}x{size}, swaying {SWAY_PX} px"
    source_points = detector.detect(source, role="source").points  # 1 x 68 x 2
    driving_points = smooth_tracks(detector.detect(driving, role="driving").points)  # T x 68 x 2
    return BenchInputs(source, driving, source_points, driving_points, origin)


# ---- measuring ------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block: CUDA `max_memory_allocated`, else the process's peak resident set
    (Linux VmHWM, reset before the block; elsewhere sampled every few ms). `mib` after the block."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as status:
            return next(float(line.split()[1]) / 1024 for line in status if line.startswith(key))

    def __enter__(self) -> "PeakMemory":
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set
            self._sampler = None
        except OSError:
            import psutil

            process, self.mib = psutil.Process(), 0.0

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.mib = max(self.mib, process.memory_info().rss / 2**20)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._sampler is None:
            self.mib = self._status("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()


@contextlib.contextmanager
def counting(flops: dict[str, float] | None, key: str) -> Iterator[None]:
    """Add the GFLOP of the convolutions and matrix products the block runs to flops[key]
    (torch.utils.flop_counter); nothing when `flops` is None."""
    if flops is None:
        yield
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield
    flops[key] = flops.get(key, 0.0) + counter.get_total_flops() / 1e9


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "device": str(device), "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info["native_bf16"] = native_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- the two paths ----------------------------------------------------------------------------------

def random_model(config: ModelConfig, seed: int) -> nn.Module:
    """The backbone of `config` with seeded random weights, in evaluation mode, on the CPU.

    A freshly initialised model leaves parts of the computation trivial: every batch norm has mean 0,
    variance 1, scale 1 and shift 0 (so folding it into a conv changes nothing), and FOMM's jacobian head
    starts at zero weights (every jacobian exactly I). Those are perturbed, so that the fast path and the
    loop are compared on every step they compute."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.05, generator=generator)
                module.running_var.uniform_(0.8, 1.2, generator=generator)
                module.weight.uniform_(0.8, 1.2, generator=generator)
                module.bias.normal_(0, 0.05, generator=generator)
        for param in model.parameters():
            if not param.any():  # e.g. FOMM's jacobian head: small, so jacobians stay invertible
                param.normal_(0, 1e-3, generator=generator)
    return model


def _points(spec: Variant, inputs: BenchInputs) -> tuple[np.ndarray | None, np.ndarray | None]:
    return (inputs.source_points, inputs.driving_points) if spec.needs_landmarks else (None, None)


def fast_path(engine: Engine, spec: Variant, model: nn.Module, inputs: BenchInputs, batch_size: int,
              adapt_scale: bool, flops: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The engine's batched networks over the clip -> (T x 3 x H x W float predictions, stage seconds).

    With `flops`, its "source" and "batch" (the first batch) entries count the GFLOP of those steps."""
    src_points, drv_points = _points(spec, inputs)
    total, preds = len(inputs.driving), []
    seconds: dict[str, float] = {}
    with timed(seconds, "networks", engine.device), engine.inference_context():
        with counting(flops, "source"):
            animator = ClipAnimator(engine, spec, model, inputs.source, inputs.driving[0], src_points,
                                    None if drv_points is None else drv_points[0], motion=MOTION,
                                    adapt_scale=adapt_scale)
        for start in range(0, total, batch_size):
            batch = slice(start, min(start + batch_size, total))
            with counting(flops if start == 0 else None, "batch"):
                pred = animator(inputs.driving[batch], None if drv_points is None else drv_points[batch])
            to_uint8(pred)  # the frames the engine returns
            preds.append(pred.float())
    seconds.update(animator.seconds)
    return torch.cat(preds), seconds


def per_frame_loop(engine: Engine, spec: Variant, model: nn.Module, inputs: BenchInputs, adapt_scale: bool,
                   frames: int | None = None, flops: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The original demos' loop (see the module docstring, and the backbone's `ClipRunner.original_loop`) over
    the first `frames` frames, in fp32.

    With `flops`, its "source" (once per clip) and "frame" (the first frame) entries count their GFLOP."""
    device = engine.device
    src_points, drv_points = _points(spec, inputs)
    total = len(inputs.driving) if frames is None else frames
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str, t: int) -> Iterator[None]:  # t = -1: the clip's set-up
        with timed(seconds, name, device), counting(flops if t <= 0 else None, "source" if t < 0 else "frame"):
            yield

    as_tensor = lambda p: None if p is None else torch.from_numpy(p).to(device)  # noqa: E731
    settings = ClipSettings(motion=MOTION, adapt_scale=adapt_scale)
    with timed(seconds, "networks", device), torch.no_grad():
        source = to_tensor(inputs.source, device)  # 1 x 3 x H x W
        preds = spec.spec.clip.original_loop(model, source, inputs.driving[:total], as_tensor(src_points),
                                             None if drv_points is None else as_tensor(drv_points[:total]), settings,
                                             lambda f: to_tensor(f, device), stage)
        for pred in preds:
            to_uint8(pred)
    return torch.cat(preds), seconds


def prior_seconds(engine: Engine, model: nn.Module, inputs: BenchInputs, per_frame: bool = False) -> float | None:
    """Time of the prior maps (AU points -> per-AU maps -> fused prior, `model.prior_maps`) of the clip, batched
    or one frame at a time; None without a prior."""
    au = engine._au_points(model.config, inputs.source_points, inputs.driving_points)[1]  # T x 18 x 2
    if au is None:
        return None
    seconds: dict[str, float] = {}
    batches = [au[t:t + 1] for t in range(len(au))] if per_frame else [au]
    with timed(seconds, "prior", engine.device), engine.inference_context():
        for points in batches:
            model.prior_maps(points)
    return seconds["prior"]


def landmark_seconds(inputs: BenchInputs, backend: str = "dlib") -> tuple[float, float]:
    """(engine: one batched detect of the clip and the source, plus smoothing; original: one detect per frame)."""
    detector = get_detector(backend)
    t0 = time.perf_counter()
    detector.detect(inputs.source, role="source")
    smooth_tracks(detector.detect(inputs.driving).points)
    t1 = time.perf_counter()
    detector.detect(inputs.source, role="source")
    for frame in inputs.driving:
        detector.detect(frame)
    return t1 - t0, time.perf_counter() - t1


# ---- the benchmark --------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two clips of frames in [0, 1] (T x 3 x H x W), over all their pixels (`metrics.psnr`)."""
    from .metrics import psnr as frame_psnr

    return float(frame_psnr(a.float().reshape(1, 1, 1, -1), b.float().reshape(1, 1, 1, -1))[0])


def supported_precisions(requested: Sequence[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The requested precisions this device runs, and why the others are left out."""
    kept, skipped = [], {}
    for precision in requested:
        try:
            check_precision(precision, device)
            kept.append(precision)
        except InputError as exc:
            skipped[precision] = str(exc)
    return kept, skipped


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(variants: Sequence[str] = DEFAULT_VARIANTS, frames: int = 16, batch_size: int | None = None,
        precisions: Sequence[str] = ("fp32", "bf16", "fp16"), device: str = "auto", repeats: int = 3,
        seed: int = 0, data: Path | None = None, compile: bool = False, channels_last: bool | None = None,
        fuse: bool = True, configs: dict[str, ModelConfig] | None = None, inputs: BenchInputs | None = None,
        landmarks: str = "dlib", log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Benchmark `variants` (fast path at each precision against the per-frame fp32 loop); a JSON-able report.

    `configs` replaces the published config of a variant (tests use tiny ones); `inputs` replaces the
    frames and landmarks. Rows: one per (variant, path, precision) with ms per frame for each stage.
    """
    if frames < 1 or (batch_size is not None and batch_size < 1) or repeats < 1:
        raise InputError("frames, batch size and repeats must be at least 1")
    device_t = pick_device(device)
    kept, skipped = supported_precisions(precisions, device_t)
    if "fp32" not in kept:
        kept.insert(0, "fp32")  # the reference the others are compared with
    specs = [get_variant(v) for v in variants]
    meshed = [s.id for s in specs if s.spec.points == "mesh"]
    if landmarks == SYNTHETIC and meshed and inputs is None:
        raise InputError(f"{', '.join(meshed)} {'consumes' if len(meshed) == 1 else 'consume'} a 478-point face "
                         "mesh (MediaPipe, with OpenCV) and --landmarks synthetic gives 68 landmarks: leave "
                         f"{'it' if len(meshed) == 1 else 'them'} out here; `python -m mefacial bench --training-free` "
                         "times the training-free generators end to end")
    configs = dict(configs or {})
    size = {configs.get(s.id, s.config).image_size for s in specs}
    if len(size) != 1:
        raise InputError(f"the variants' configs have different image sizes {sorted(size)}; benchmark them separately")
    size = size.pop()
    log(f"inputs: {frames} frames at {size}x{size}")
    inputs = inputs or bench_inputs(size, frames, data, landmarks)
    frames = len(inputs.driving)
    engines = {p: Engine(device=device_t, precision=p, batch_size=batch_size, landmarks="dlib", compile=compile,
                         channels_last=channels_last, fuse=fuse) for p in kept}
    batch_size = engines["fp32"].batch_size  # the engine's default unless given
    loop_engine = Engine(device=device_t, precision="fp32", channels_last=False)

    needs_landmarks = any(s.needs_landmarks for s in specs)
    landmark_times: dict[str, list[float]] = {"fast": [], "loop": []}
    if needs_landmarks and landmarks != SYNTHETIC:  # synthetic: none detected, none timed
        for _ in range(repeats):
            fast_s, loop_s = landmark_seconds(inputs, landmarks)
            landmark_times["fast"].append(fast_s)
            landmark_times["loop"].append(loop_s)
    landmark_ms = {path: 1000 * _median(times) / frames if times else 0.0 for path, times in landmark_times.items()}

    rows: list[dict[str, Any]] = []
    for spec in specs:
        config = configs.get(spec.id, spec.config)
        base = random_model(config, seed).to(device_t)
        loop_model = copy.deepcopy(base)  # contiguous, unfused fp32, as the original runs
        # What each engine runs: channels-last, fused (a copy), compiled, as asked.
        fast_models = {precision: engine.use_model(spec.id, base) for precision, engine in engines.items()}
        adapt_scale = spec.adapt_scale_default  # the originals' defaults
        log(f"{spec.id}: warming up and counting GFLOP")
        first = min(batch_size, frames)
        warm = dataclasses.replace(inputs, driving=inputs.driving[:first], driving_points=inputs.driving_points[:first])
        counts: dict[str, dict[str, float]] = {"fast": {}, "loop": {}}
        for precision, engine in engines.items():
            fast_path(engine, spec, fast_models[precision], warm, batch_size, adapt_scale,
                      flops=counts["fast"] if precision == "fp32" else None)
            if compile:  # compiled graphs are made outside the flop counter's dispatch mode
                fast_path(engine, spec, fast_models[precision], warm, batch_size, adapt_scale)
        per_frame_loop(loop_engine, spec, loop_model, inputs, adapt_scale, frames=1, flops=counts["loop"])
        # GFLOP per frame of this clip: the fast path's source work spread over its frames.
        flops = {"fast": counts["fast"]["batch"] / first + counts["fast"]["source"] / frames,
                 "loop": counts["loop"]["frame"] + counts["loop"].get("source", 0.0) / frames}

        times: dict[str, list[dict[str, float]]] = {p: [] for p in [*kept, "loop"]}
        outputs: dict[str, torch.Tensor] = {}
        memory: dict[str, float] = {}
        for r in range(repeats):  # paired runs in alternating order, so that load drifts cancel in the ratios
            for path in ([*kept, "loop"] if r % 2 == 0 else ["loop", *reversed(kept)]):
                cpu0 = time.process_time()
                with PeakMemory(device_t) as peak:
                    if path == "loop":
                        outputs[path], seconds = per_frame_loop(loop_engine, spec, loop_model, inputs, adapt_scale)
                    else:
                        outputs[path], seconds = fast_path(engines[path], spec, fast_models[path], inputs, batch_size,
                                                           adapt_scale)
                seconds["cpu"] = time.process_time() - cpu0
                memory.setdefault(path, peak.mib)
                seconds["prior"] = prior_seconds(loop_engine if path == "loop" else engines[path],
                                                 loop_model if path == "loop" else fast_models[path], inputs,
                                                 per_frame=path == "loop")
                times[path].append(seconds)
            log(f"{spec.id}: repeat {r + 1}/{repeats}: " + ", ".join(
                f"{k} {1000 * v[-1]['networks'] / frames:.0f} ms/frame" for k, v in times.items()))

        loop_row = _row(spec, "loop", "fp32", times["loop"], frames,
                        landmark_ms["loop"] if spec.needs_landmarks else 0.0, memory["loop"], flops["loop"])
        rows.append(loop_row)
        for precision in kept:
            row = _row(spec, "fast", precision, times[precision], frames,
                       landmark_ms["fast"] if spec.needs_landmarks else 0.0, memory[precision], flops["fast"])
            # Medians of the per-repeat ratios (each repeat times both paths back to back).
            row["speedup_vs_loop"] = _median([
                (1000 * lp["networks"] / frames + loop_row["ms_per_frame"]["landmarks"])
                / (1000 * fp["networks"] / frames + row["ms_per_frame"]["landmarks"])
                for lp, fp in zip(times["loop"], times[precision])])
            row["networks_speedup_vs_loop"] = _median([lp["networks"] / fp["networks"]
                                                       for lp, fp in zip(times["loop"], times[precision])])
            row["cpu_time_speedup_vs_loop"] = _median([lp["cpu"] / fp["cpu"]
                                                       for lp, fp in zip(times["loop"], times[precision])])
            row["max_abs_diff_vs_loop"] = float((outputs[precision] - outputs["loop"]).abs().max())
            row["psnr_vs_fp32_db"] = None if precision == "fp32" else psnr(outputs[precision], outputs["fp32"])
            rows.append(row)
        del base, loop_model, fast_models, outputs
    return {
        "machine": machine(device_t),
        "settings": {"variants": [s.id for s in specs], "frames": frames, "batch_size": batch_size,
                     "precisions": kept, "skipped_precisions": skipped, "repeats": repeats, "seed": seed,
                     "image_size": size, "inputs": inputs.origin, "compile": compile, "fuse": fuse,
                     "channels_last": engines["fp32"].memory_format == torch.channels_last,
                     "motion": MOTION,
                     "landmarks": None if not needs_landmarks else landmarks + (" (not timed)" if landmarks == SYNTHETIC else "")},
        "rows": rows,
        "targets": targets(rows),
    }


def _row(spec: Variant, path: str, precision: str, times: list[dict[str, float]], frames: int, landmark_ms: float,
         memory_mib: float, gflop_per_frame: float) -> dict[str, Any]:
    def per_frame(key: str) -> float | None:
        samples = [t[key] for t in times if t.get(key) is not None]
        return 1000 * _median(samples) / frames if samples else None

    ms = {key: per_frame(key) for key in ("prior", "motion", "generator", "networks")}
    ms["process_cpu"] = per_frame("cpu")  # CPU time of all the process's threads (less sensitive to other processes)
    ms["landmarks"] = landmark_ms
    ms["end_to_end"] = landmark_ms + ms["networks"]
    return {
        "variant": spec.id, "path": path, "precision": precision,
        "ms_per_frame": ms, "fps": 1000 / ms["end_to_end"], "networks_fps": 1000 / ms["networks"],
        "peak_memory_mib": memory_mib, "gflop_per_frame": gflop_per_frame,
        "achieved_gflops": gflop_per_frame / (ms["networks"] / 1000),
        "runs_s": [round(t["networks"], 3) for t in times],
    }


# Targets of issue #8 on a CPU at 256x256 (end-to-end speed-up against the per-frame fp32 loop).
TARGETS = {"fp32": {"speedup": 1.5, "max_abs_diff": 1e-4}, "bf16": {"speedup": 3.0, "psnr_db": 40.0},
           ("mraa-awp", "fp32"): {"speedup": 2.0}}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each fast row checked against the targets that apply to it."""
    checks = []
    for row in rows:
        if row["path"] != "fast":
            continue
        for key in (row["precision"], (row["variant"], row["precision"])):
            for name, bound in TARGETS.get(key, {}).items():
                value = {"speedup": row["speedup_vs_loop"], "max_abs_diff": row["max_abs_diff_vs_loop"],
                         "psnr_db": row["psnr_vs_fp32_db"]}[name]
                met = value <= bound if name == "max_abs_diff" else value >= bound
                checks.append({"variant": row["variant"], "precision": row["precision"], "target": name,
                               "bound": bound, "value": value, "met": bool(met)})
    return checks


# ---- output ---------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table with the machine and settings above it."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"Machine: {m.get('cpu', platform.processor())}, {m['cpu_count']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", native bf16: {m['native_bf16']}" + (f", load average {m['load_average']}" if "load_average" in m else ""),
        f"Inputs: {s['inputs']}; {s['frames']} frames, batch {s['batch_size']}, {s['repeats']} repeats (medians), "
        f"random weights (seed {s['seed']}), channels_last {s['channels_last']}, "
        f"fused {s['fuse']}, compile {s['compile']}, landmarks {s['landmarks']}",
        "",
        "| variant | path | precision | landmarks | prior | motion | generator | end-to-end ms/frame | fps "
        "| peak MiB | GFLOP/frame | GFLOP/s | speed-up | max abs diff vs loop | PSNR vs fp32 dB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["rows"]:
        ms = row["ms_per_frame"]
        fast = row["path"] == "fast"
        diff = f"{row['max_abs_diff_vs_loop']:.1e}" if fast else "-"
        lines.append(
            f"| {row['variant']} | {row['path']} | {row['precision']} | {_fmt(ms['landmarks'])} | {_fmt(ms['prior'], 1)} "
            f"| {_fmt(ms['motion'])} | {_fmt(ms['generator'])} | {_fmt(ms['end_to_end'])} | {_fmt(row['fps'], 2)} "
            f"| {_fmt(row['peak_memory_mib'])} | {_fmt(row['gflop_per_frame'], 1)} | {_fmt(row['achieved_gflops'], 1)} "
            f"| {_fmt(row.get('speedup_vs_loop'), 2) + 'x' if fast else '1x'} "
            f"| {diff} | {_fmt(row.get('psnr_vs_fp32_db'), 1)} |")
    if s["skipped_precisions"]:
        lines += ["", *(f"Not measured: {p}: {why}" for p, why in s["skipped_precisions"].items())]
    if report["targets"]:
        lines += ["", "Targets (end-to-end against the per-frame fp32 loop):"]
        for check in report["targets"]:
            op = "<=" if check["target"] == "max_abs_diff" else ">="
            lines.append(f"- {check['variant']} {check['precision']}: {check['target']} {check['value']:.3g} "
                         f"{op} {check['bound']:g}: {'met' if check['met'] else 'NOT met'}")
    return "\n".join(lines)


# ---- training-free generators, end to end ---------------------------------------------------------------

TRAINING_FREE = ("dense", "dense-geometry", "warp")
TIMING_WINDOW_S = 2.0  # seconds each training-free variant animates the clip for in a repeat (`training_free`)


def training_free(variants: Sequence[str] = TRAINING_FREE, data: Path | None = None, frames: int | None = None,
                  repeats: int = 3, reference: str = "warp", log: Callable[[str], None] = lambda message: None,
                  source: Path | None = None, driving: Path | None = None,
                  window: float = TIMING_WINDOW_S) -> dict[str, Any]:
    """The training-free generators end to end through `Engine.animate` (face crops, landmarks or mesh, motion,
    rendering) on the same face and clip, in one run, alternating their order between repeats (other
    processes share the machine); per variant the medians of its ms per frame, per stage and end to end, and
    the ratio of `reference`'s end-to-end time to its own in each repeat (median). In a repeat each variant
    animates the clip as many times as fill `window` seconds (at least once) and its times are their means: a
    fast variant is timed over as long a stretch as a slow one, on machines whose speed swings from second to
    second. The face and clip: `source` and `driving` where given, else the first of `data`'s faces and clips,
    else a synthetic swaying face."""
    data_clip, data_face = _data_inputs(data)
    clip_path, face = driving or data_clip, source or data_face
    if face is not None:
        picture, name = video.read_image(face), Path(face).name
    else:
        from skimage.data import astronaut

        picture, name = astronaut(), "scikit-image astronaut"
    if clip_path is not None:
        clip = video.read_clip(clip_path)
        clip_frames, fps = clip.frames, clip.fps
        origin = (f"{Path(clip_path).name} ({len(clip_frames)} frames of {clip_frames.shape[2]} x "
                  f"{clip_frames.shape[1]}) driving {name} ({picture.shape[1]} x {picture.shape[0]})")
    else:
        clip_frames, fps = _sway(_astronaut_face(256, get_detector("dlib")), frames or 48), video.DEFAULT_FPS
        origin = f"synthetic: the scikit-image astronaut's face, swaying {SWAY_PX} px, driving {name}"
    if frames is not None:
        clip_frames = clip_frames[:frames]
    variants = list(dict.fromkeys([*variants, reference]))
    engine = Engine(device="cpu", landmarks="dlib")
    log(f"warming up ({', '.join(variants)})")
    for variant in variants:
        engine.animate(picture, clip_frames[:4], variant=variant, fps=fps)
    times: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(repeats):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            runs, start = [], time.perf_counter()
            while not runs or time.perf_counter() - start < window:
                runs.append(engine.animate(picture, clip_frames, variant=variant, fps=fps).timings)
            times[variant].append({key: sum(run.get(key, 0.0) for run in runs) / len(runs) for key in runs[0]})
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{v} {1000 * t[-1]['total_s'] / len(clip_frames):.0f} ms/frame"
                                                     for v, t in times.items()))
    rows = []
    for variant in variants:
        per_frame = {key: 1000 * _median([t.get(f"{key}_s", 0.0) for t in times[variant]]) / len(clip_frames)
                     for key in ("read", "landmarks", "generator", "total")}
        ratios = [ref["total_s"] / own["total_s"] for ref, own in zip(times[reference], times[variant])]
        rows.append({"variant": variant, "ms_per_frame": per_frame, "speedup_vs": {reference: _median(ratios)},
                     "speedup_range": [min(ratios), max(ratios)]})
    return {"machine": machine(torch.device("cpu")), "inputs": origin, "frames": len(clip_frames), "repeats": repeats,
            "window_s": window, "reference": reference, "rows": rows}


def format_training_free(report: dict[str, Any]) -> str:
    m, reference = report["machine"], report["reference"]
    lines = [f"Machine: {m.get('cpu', platform.processor())}, {m['cpu_count']} cores, torch {m['torch']}"
             + (f", load average {m['load_average']}" if "load_average" in m else ""),
             f"Inputs: {report['inputs']}; {report['frames']} frames at 256 x 256, {report['repeats']} repeats "
             f"(medians; in each, every variant animates the clip for at least {report['window_s']:g} s, its runs "
             "averaged), end to end through Engine.animate; speed-up: the median of each repeat's ratio, the two run "
             "side by side", "",
             f"| variant | read | face crops + landmarks / mesh | generator | end-to-end ms/frame | speed-up vs {reference} "
             "| (range over repeats) |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for row in report["rows"]:
        ms = row["ms_per_frame"]
        lines.append(f"| {row['variant']} | {ms['read']:.1f} | {ms['landmarks']:.1f} | {ms['generator']:.1f} "
                     f"| {ms['total']:.1f} | {row['speedup_vs'][reference]:.2f}x "
                     f"| {row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}x |")
    meshed = [row["variant"] for row in report["rows"] if get_variant(row["variant"]).spec.points == "mesh"]
    if meshed:
        lines += ["", f"The face mesh of {', '.join(meshed)} is tracked in a worker thread while the generator renders "
                  "the frames before it: their two stage columns overlap (and add up to more than end to end)."]
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------

def _split(values: Sequence[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `bench` subcommand of `python -m mefacial`."""
    bench = sub.add_parser("bench", help="time the engine's batched path against the per-frame loop of the originals")
    bench.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="variant ids (comma or space separated)")
    bench.add_argument("--frames", type=int, default=None,
                       help="driving frames per clip (default: 16; with --training-free, the whole clip)")
    bench.add_argument("--batch-size", type=int, default=None,
                       help="driving frames per network batch (fast path; default: the engine's, 4 on a CPU, 32 on a GPU)")
    bench.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"],
                       help="fp32, bf16, fp16; those the device lacks are reported as skipped")
    bench.add_argument("--repeats", type=int, default=3, help="runs of each path; stage times are medians")
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    bench.add_argument("--data", type=Path, default=Path(os.environ["MEFACIAL_DATA"]) if os.environ.get("MEFACIAL_DATA") else None,
                       help="folder with driving/ (clips) and faces/ (images), as MEFACIAL_DATA (default: $MEFACIAL_DATA; "
                            "else a synthetic face)")
    bench.add_argument("--compile", action="store_true", help="torch.compile the batched steps")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC tensors on the fast path (default: the engine's choice for the device)")
    bench.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                       help="fold batch norms and upsampling into the convs on the fast path (default: on)")
    bench.add_argument("--landmarks", default="dlib", choices=["dlib", "fan", SYNTHETIC],
                       help="landmark backend of the inputs (timed as a stage); synthetic: a fixed 68-point layout "
                            "on the synthetic clip, nothing detected or timed (speed runs without a detector)")
    bench.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    bench.add_argument("--training-free", action="store_true",
                       help="time the training-free generators (dense, dense-geometry, warp, or --variants) end to end "
                            "through Engine.animate on one real clip, side by side, with their speed-up over warp")
    bench.add_argument("--source", type=Path, default=None,
                       help="with --training-free: the face picture (default: the first of --data's faces)")
    bench.add_argument("--driving", type=Path, default=None,
                       help="with --training-free: the driving clip, any format the engine reads (default: the first "
                            "of --data's clips)")
    bench.add_argument("--window", type=float, default=TIMING_WINDOW_S,
                       help="with --training-free: seconds each variant animates the clip for in a repeat (runs "
                            f"averaged, at least one; default {TIMING_WINDOW_S:g})")
    bench.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; print the table (and write JSON)."""
    variants = _split(args.variants)
    for variant in variants:
        get_variant(variant)  # an unknown one: its error, with the closest known id
    if args.training_free:
        chosen = [v for v in variants if not get_variant(v).needs_weights] if args.variants != list(DEFAULT_VARIANTS) \
            else list(TRAINING_FREE)
        report = training_free(chosen or list(TRAINING_FREE), data=args.data, frames=args.frames, repeats=args.repeats,
                               log=lambda message: print(message, flush=True), source=args.source,
                               driving=args.driving, window=args.window)
        print(format_training_free(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2, default=float))
        return 0
    precisions = _split(args.precisions)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise InputError(f"unknown precision(s) {bad}; use {', '.join(PRECISIONS)}")
    report = run(variants, frames=args.frames or 16, batch_size=args.batch_size, precisions=precisions, device=args.device,
                 repeats=args.repeats, seed=args.seed, data=args.data, compile=args.compile,
                 channels_last=args.channels_last, fuse=args.fuse, landmarks=args.landmarks,
                 log=lambda message: print(message, flush=True))
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0

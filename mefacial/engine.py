"""The inference engine: one object shared by the app, the CLI, the benchmarks and the tests.

    engine = Engine(device="auto", precision="fp32")
    result = engine.animate(source, driving, variant="fomm-awp")          # = prepare + run, collected
    result.frames  # T x H x W x 3 uint8

    clip = engine.prepare(source, driving, AnimateOptions(magnify=2))     # decode, crop, landmarks: once
    for variant in ("warp", "fomm-awp"):
        for frames in engine.run(clip, variant):                          # n x H x W x 3 uint8 batches
            ...

Device and precision are chosen once (`mefacial.device`); models are cached per (variant, weights)
(`mefacial.model_cache`); the source is encoded once per clip and driving frames go through the networks
in batches (`mefacial.pipeline`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import prior as prior_lib
from . import video
from .device import PRECISIONS, check_precision, inference_context, native_bf16, pick_device  # noqa: F401
from .errors import CutInClipError, InputError, InputTooLargeError, MefacialError, NoFaceError, WeightsNotFoundError
from .landmarks import SAME_PERSON, face_descriptor, get_detector, smooth_tracks, smoothing_window
from .mesh import NUM_VERTICES, MeshTracker, detect_mesh
from .metrics import interocular_distance
from .model_cache import ModelCache
from .models import au_points, get_backbone
from .models.blocks import fuse_for_inference
from .options import MAX_MAGNIFY, AnimateOptions, as_options  # noqa: F401 - MAX_MAGNIFY: public constant
from .pipeline import ClipAnimator, PreparedClip, StreamingSmoother, to_tensor, to_uint8  # noqa: F401
from .utils import from_numpy, timer
from .variants import Variant, get_variant, variant_ids

log = logging.getLogger("mefacial")

ProgressFn = Callable[[float, str], None]
PREPARE_OPTIONS = ("crop", "margin", "landmarks", "smooth", "fps")  # what a PreparedClip is made with


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
    options: AnimateOptions | None = None  # as run (adapt_scale resolved)
    meshes: np.ndarray | None = None  # T x V x 2: the output's face mesh (synthesised clips: the moved meshes)
    action_units: dict | None = None  # synthesised clips: the AU specification, intensities and timing
    frame_count: int | None = None  # where the frames went to a sink instead of `frames` (Engine.collect)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0]) if self.frame_count is None else self.frame_count


@dataclasses.dataclass
class PriorView:
    """The facial prior of one face as the models compute it (pixels of the model-size face)."""

    face: np.ndarray  # S x S x 3 uint8
    landmarks: np.ndarray  # 68 x 2
    au_points: np.ndarray  # 18 x 2
    maps: dict[str, dict[str, np.ndarray]]  # variant -> {"prior": h x w (, "per_au": 18 x h x w)}
    unavailable: dict[str, MefacialError]  # variant -> why its maps could not be computed
    landmark_backend: str | None = None


SHOT_ZOOM = 1.15  # a face 15 % larger or smaller than in the frame before, at a sudden change: another shot. The eyes'
# distance read by `find_face` at a head's jump: 1.00-1.005 (0.94 with the face cut by the picture's edge); a cut to a
# 1.35x closer shot reads 1.25 (its output's mouth and chin bent), a 0.85x one 0.85, a 1.15x one 1.12 (passes: the
# output's face then zooms within its bound, and its shading shifts a little)
TRACK_CHUNK = 4  # frames per face-mesh tracking step of an in-memory clip (`Engine._tracked_chunks`)
DEFAULT_VARIANT = "dense"  # the training-free dense face-mesh generator: runs offline, needs no weights
MESH_BACKEND = "mesh (MediaPipe face mesh + iris, LiteRT)"


class Lookahead:
    """A batch's work that needs its points alone (`ClipRunner.plan`), which the mesh tracker's thread does
    ahead while the caller has other batches to go through first (`Engine._tracked_chunks`), and whole batches
    (`finish`), which it makes from the clip's end once the clip is tracked. The caller sets `work` and `finish`
    once it can (its runner is made from the clip's first batch)."""

    def __init__(self) -> None:
        self.work: Callable[[np.ndarray], Any] | None = None
        # a whole batch's output (frames, points, planned -> n x S x S x 3 uint8), for batches at the clip's end
        self.finish: Callable[[np.ndarray, np.ndarray, Any], np.ndarray] | None = None

    def plan(self, points: np.ndarray, queued: int, tracked_all: bool = False) -> Any:
        """The work of a batch that has `queued` batches handed over before it and not yet taken, or None where
        there is no work yet, or none is queued while the clip is still being tracked: the caller would soon wait
        for this batch, so it is handed over at once, the caller does its work, and the tracker's thread tracks on
        (each thread then ends about when the other does: 3-5 % faster end to end than planning whenever the
        caller was not yet waiting). Once the whole clip is tracked (`tracked_all`) the thread has nothing else
        to do and plans every batch left."""
        work = self.work
        return work(points) if work is not None and (queued > 0 or tracked_all) else None


@dataclasses.dataclass
class Finished:
    """A batch's output frames (n x S x S x 3 uint8, not pasted back), made in the mesh tracker's thread."""

    frames: np.ndarray


_TRACKERS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def one_blas_thread() -> None:
    """numpy's and scipy's BLAS (OpenBLAS) kept on one thread for the rest of the process, set once (by the
    first Engine). Their work here is small matrices, where BLAS threads only spin between calls (the mesh
    tracker: 7-12 ms a frame with them, 6.3 without; the warp's spline alike with one or two). And a threaded
    OpenBLAS call hangs for good where another thread starts a subprocess meanwhile (its fork handler stops
    the BLAS threads the call waits for): the app's preview of an upload runs ffmpeg while a Generate builds
    the source's triangulation (scipy's Delaunay: a threaded solve; mefacial's own ffmpeg starts now run no fork
    handlers, `mefacial.video`, but any library's fork would). Changing their number during a run would race the
    same way, so it is set once and left."""
    import scipy.linalg  # noqa: F401 - loads scipy's own OpenBLAS, so that it is limited too
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # (not restored: for the process)


_trackers: dict[str, Any] = {"running": 0, "restore": None}  # the clips being tracked, torch's threads before them


@contextlib.contextmanager
def _core_for_trackers() -> Iterator[None]:
    """While clips' face meshes are tracked in worker threads, the trackers keep a core: torch one thread fewer
    (its threads wait for each other where one lacks a core). Overlapping runs (two requests of the app) share
    the setting; the last to end restores what the first found."""
    with _TRACKERS_LOCK:
        if _trackers["running"] == 0:
            threads = torch.get_num_threads()
            if threads > 1:
                torch.set_num_threads(threads - 1)
            _trackers["restore"] = threads
        _trackers["running"] += 1
    try:
        yield
    finally:
        with _TRACKERS_LOCK:
            _trackers["running"] -= 1
            if _trackers["running"] == 0:
                torch.set_num_threads(_trackers["restore"])


def _uses_mesh(spec: Variant) -> bool:
    """Whether the variant's backbone consumes the 478-point face mesh (mefacial.mesh) rather than 68 landmarks."""
    return spec.spec.points == "mesh"


def _on_mesh(call: Callable[[Any, np.ndarray], Any], image: np.ndarray, missing: Any) -> Any:
    """`call(mesh module, picture as RGB)` for a picture of any image mode, or `missing` where the face mesh's
    runtime (LiteRT, OpenCV) or models are not installed (a box set up for the learned models alone)."""
    try:
        from . import mesh

        return call(mesh, video.as_rgb(image))
    except (WeightsNotFoundError, ImportError):
        return missing


def _mesh_face(image: np.ndarray) -> tuple[bool, np.ndarray | None]:
    """(whether the face mesh searched, `mesh.find_face` of a picture, any image mode: None where it found no face);
    it does not search where its runtime or models are not installed (`_on_mesh`)."""
    return _on_mesh(lambda mesh, rgb: (True, mesh.find_face(rgb)), image, (False, None))


def _takes_weights(spec: Variant, checkpoint: str | Path | None) -> None:
    """A checkpoint given for a training-free variant is refused: it would be ignored without a word."""
    if checkpoint and not spec.needs_weights:
        raise InputError(f"{spec.id} is training-free and loads no weights; leave out its checkpoint (the learned "
                         f"variants take one: {', '.join(v for v in variant_ids() if get_variant(v).needs_weights)})")


def _identity_distance(images: Sequence[np.ndarray], faces: Sequence[np.ndarray]) -> float:
    """How far apart dlib's face descriptors put the faces (68 x 2 landmarks each) of two pictures (H x W x 3
    uint8): over SAME_PERSON, two people. 0 where it cannot tell: a face clipped by a flash or cut by the picture's
    edge (`face_descriptor` refuses it), or dlib's recognition model not installed."""
    try:
        first, second = (face_descriptor(image, face) for image, face in zip(images, faces))
    except NoFaceError:
        return 0.0
    except (ImportError, WeightsNotFoundError) as error:
        log.warning("clip not checked for cuts to another person: %s", error)
        return 0.0
    return float(np.linalg.norm(first - second))


def _given_meshes(prepared: PreparedClip) -> bool:
    """Whether the caller gave face meshes (478 points) for both the source and the clip."""
    from .mesh import NUM_VERTICES

    return (prepared.given_source is not None and prepared.given_driving is not None
            and prepared.given_source.shape[-2] == NUM_VERTICES and prepared.given_driving.shape[-2] == NUM_VERTICES)


def gather_frames(batches: Iterable[np.ndarray], total: int | None, sink: Callable[[np.ndarray], None] | None
              ) -> tuple[np.ndarray, int]:
    """(T x H x W x 3 frames, T) of a run's batches, or each batch given to `sink` and none kept (0 x H x W x 3).
    With `total` known the frames fill one array in place: a list of batches and its concatenation would hold
    every frame twice."""
    kept: list[np.ndarray] = []
    frames, count = None, 0
    for batch in batches:
        if sink is not None:
            sink(batch)
        elif total is None:  # (a stream: its length is known at its end)
            kept.append(batch)
        else:
            if frames is None:
                frames = np.empty((total, *batch.shape[1:]), batch.dtype)
            frames[count:count + len(batch)] = batch
        count += len(batch)
    if kept:
        frames = np.concatenate(kept)
    elif frames is None:  # (all went to the sink)
        frames = np.zeros((0, *batch.shape[1:]), batch.dtype)
    return frames[:count], count


class ClipRun:
    """One variant over a prepared clip: iterate it for n x H x W x 3 uint8 batches of output frames, in order.

    Made by `Engine.run`, which loads the model first (so missing weights fail there). While and after it runs
    it tells `weights`, `prior_map` (the source's prior map fed to the network), `timings`, `landmark_backend`.
    """

    def __init__(self, engine: "Engine", prepared: PreparedClip, spec: Variant, model: nn.Module, weights: str,
                 options: AnimateOptions, progress: ProgressFn | None):
        self.engine, self.prepared, self.spec, self.model, self.weights = engine, prepared, spec, model, weights
        self.options = options
        self.report = progress or (lambda fraction, message: None)
        self.prior_map: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.landmark_backend = engine._backend_name(prepared, spec)
        self._frames = self._generate()

    def __iter__(self) -> "ClipRun":
        return self

    def __next__(self) -> np.ndarray:
        return next(self._frames)

    def _generate(self) -> Iterator[np.ndarray]:
        engine, prepared, spec, options = self.engine, self.prepared, self.spec, self.options
        batch_size = options.batch_size or engine.batch_size_for(spec)
        animator: ClipAnimator | None = None
        done = 0
        t0 = time.perf_counter()

        def ahead(source_points: np.ndarray) -> None:  # while the clip's onset points are being found
            with engine.inference_context():
                spec.spec.clip.prepare_source(self.model, prepared.source, source_points)

        def plan(points: np.ndarray) -> Any:  # in the mesh tracker's thread
            with engine.inference_context():
                return animator.plan(points)

        def finish(frames: np.ndarray, points: np.ndarray, planned: Any) -> np.ndarray:  # in the tracker's thread
            with engine._memory_errors(spec, batch_size), engine.inference_context():
                return to_uint8(animator(frames, points, planned))

        lookahead = Lookahead()
        for frames, points, planned in engine._model_chunks(prepared, spec, batch_size, ahead, lookahead):
            for start in range(0, len(frames), batch_size):
                batch = slice(start, min(start + batch_size, len(frames)))
                with engine._memory_errors(spec, batch_size), engine.inference_context():
                    if animator is None:
                        animator = ClipAnimator(engine, spec, self.model, prepared.source, frames[0],
                                                engine._clip_source_points(prepared, spec),
                                                None if points is None else points[0],
                                                motion=options.motion, adapt_scale=options.adapt_scale,
                                                magnify=options.magnify, confine_to_prior=options.confine)
                        self.prior_map = animator.prior_map
                        lookahead.work, lookahead.finish = plan, finish
                    out = planned.frames if isinstance(planned, Finished) else to_uint8(
                        animator(frames[batch], None if points is None else points[batch],
                                 planned if len(frames) <= batch_size else None))
                done += len(out)
                total = prepared.num_frames
                if total:
                    self.report(done / total, f"frames {done}/{total}")
                if options.paste_back:
                    out = video.paste_back(out, prepared.source_image, prepared.source_box)
                yield out
        if animator is not None:
            self.timings["networks_s"] = time.perf_counter() - t0
            self.timings.update({f"{stage}_s": seconds for stage, seconds in animator.seconds.items()})


class OneShot:
    """Refuses a driving clip that cuts to another shot (CutInClipError): at each sudden change of the picture
    (`video.sudden_changes`: none in a micro-expression clip), a face of another person than the clip's first one
    (dlib's face recognition, `_identity_distance` over SAME_PERSON) or one whose size jumps from the frame before
    (SHOT_ZOOM: a new framing). Every generator measures the motion from the clip's first face as framed there:
    another face, or the same one framed anew, would read as a large expression. A jump of the head or camera, a
    flash, a face leaving the picture pass (the tracker follows the face, or says where it is missing); a cut
    through black frames is caught by the comparison with the first face. `check` a whole clip, or a stream's
    `chunks` one after another."""

    def __init__(self, find_face: Callable[[np.ndarray], np.ndarray]) -> None:
        self.find_face = find_face  # picture -> its face's 68 landmarks (NoFaceError where none)
        self.onset: np.ndarray | None = None  # the clip's first picture
        self.onset_face: np.ndarray | None = None  # and its face, once read (`onset_read`)
        self.onset_read = False
        self.last: np.ndarray | None = None  # the frame before the next chunk
        self.count = 0  # frames checked

    def check(self, frames: np.ndarray, fps: float) -> None:
        """The clip's next frames (T x H x W x 3 uint8; all of them for a clip in memory)."""
        if self.onset is None and len(frames):
            self.onset = frames[0].copy()  # (a copy: a view would hold a stream's whole first chunk)
        for t in video.sudden_changes(frames, self.last):
            self._compare(frames[t - 1] if t else self.last, frames[t], self.count + t, fps)
        if len(frames):
            self.last, self.count = frames[-1].copy(), self.count + len(frames)

    def chunks(self, chunks: Iterator[tuple[np.ndarray, float]]) -> Iterator[tuple[np.ndarray, float]]:
        """A stream's (chunk, fps), each checked before it is passed on."""
        for frames, fps in chunks:
            self.check(frames, fps)
            yield frames, fps

    def _face(self, image: np.ndarray) -> np.ndarray | None:
        try:
            return self.find_face(image)
        except NoFaceError:
            return None

    def _compare(self, before: np.ndarray, after: np.ndarray, index: int, fps: float) -> None:
        face = self._face(after)
        if face is None:  # (nothing to compare: the tracker says where the face is missing)
            return
        if not self.onset_read:
            self.onset_face, self.onset_read = self._face(self.onset), True
        previous = self._face(before)
        distance = 0.0 if self.onset_face is None else _identity_distance((self.onset, after), (self.onset_face, face))
        zoom = 1.0 if previous is None else float(interocular_distance(torch.from_numpy(face))
                                                  / interocular_distance(torch.from_numpy(previous)))
        if distance > SAME_PERSON:
            what = "another person's face"
            why = f"dlib's face descriptors {distance:.2f} from the first face's, one person's within {SAME_PERSON}"
        elif abs(np.log(zoom)) > np.log(SHOT_ZOOM):
            what = "another shot of the face"
            why = f"the face {zoom:.2f}x as large from one frame to the next"
        else:
            return
        seconds = index / fps
        raise CutInClipError(
            f"the driving clip cuts to {what} at frame {index} ({seconds:.2f} s; {why}). Every generator measures "
            "the motion from the clip's first face as framed there, so the face after the cut would read as a "
            f"large expression: trim the clip to one shot (the frames before {index}, or from {index} on).",
            page=f"The driving clip cuts to {what} at {seconds:.2f} s (frame {index})")


class Engine:
    """Animate faces with any variant; device, precision and the model cache are held here."""

    def __init__(self, device: str | torch.device = "auto", precision: str = "fp32", batch_size: int | None = None,
                 landmarks: str = "auto", checkpoints: dict[str, str | Path] | None = None,
                 limits: video.Limits = video.DEFAULT_LIMITS, *, channels_last: bool | None = None,
                 fuse: bool = True, compile: bool = False):
        one_blas_thread()
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
        self.checkpoint_overrides = {get_variant(v).id: path for v, path in (checkpoints or {}).items()}
        for variant, path in self.checkpoint_overrides.items():
            _takes_weights(get_variant(variant), path)
        # NHWC convolutions: measured 1.4x faster for FOMM on a 2-core AVX-512 CPU (oneDNN); on CUDA the
        # tensor-core kernels of fp16 / bf16 want it too. Override with channels_last=True / False.
        if channels_last is None:
            channels_last = self.device.type == "cpu" or (self.device.type == "cuda" and self.dtype != torch.float32)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Batch norms folded into convs, upsample + conv as transposed convs (models.blocks.fuse_for_inference):
        # the same function within float32 rounding, about 1.15-1.2x faster end to end on the CPU.
        self.fuse = fuse
        self.compile = compile
        self._cache = ModelCache(self._for_inference)
        self._device_defaults = (batch_size is None, channels_last is None)  # re-chosen by `to(device)`

    def batch_size_for(self, spec: Variant) -> int:
        """Frames per batch for `spec`: the engine's, or where that is left to its default on the CPU, the
        backbone's own where it has one (`BackboneSpec.cpu_batch_size`)."""
        if self._device_defaults[0] and self.device.type == "cpu" and spec.spec.cpu_batch_size:
            return spec.spec.cpu_batch_size
        return self.batch_size

    # ---- models -------------------------------------------------------------------------
    def inference_context(self) -> contextlib.AbstractContextManager:
        """inference_mode plus autocast to the chosen precision (none for fp32)."""
        return inference_context(self.device, self.dtype)

    def model(self, variant: str | Variant, checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
        """The model of `variant` on this engine's device, with its weights loaded, and where they came from;
        cached (`ModelCache`: no request waits for another variant's download)."""
        spec = get_variant(variant)
        _takes_weights(spec, checkpoint)
        return self._cache.get(spec, checkpoint or self.checkpoint_overrides.get(spec.id))

    def to(self, device: str | torch.device) -> "Engine":
        """Move the engine and every cached model to `device`; returns the engine.

        For hosts where the GPU exists only for a while (a ZeroGPU Space: `mefacial.hardware`): models load
        on the CPU at start-up and move to the GPU inside each GPU call. The precision is checked for the
        new device; the batch size and memory format follow it unless they were given explicitly."""
        device = pick_device(device)
        if device == self.device:
            return self
        dtype = check_precision(self.precision, device)
        default_batch, default_layout = self._device_defaults
        self.device, self.dtype = device, dtype
        if default_batch:
            self.batch_size = 32 if device.type == "cuda" else 4
        if default_layout:
            channels_last = device.type == "cpu" or (device.type == "cuda" and dtype != torch.float32)
            self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._cache.apply(lambda model: model.to(device, memory_format=self.memory_format))
        return self

    def use_model(self, variant: str, model: nn.Module, weights: str = "in-memory") -> nn.Module:
        """Serve `variant` with an already built model (random weights for tests and benchmarks, a training run);
        returns the model the engine runs.

        The model is moved to the engine's device and memory format in place (as `nn.Module.to` does) and put
        in evaluation mode; with `fuse` (the default) the engine runs a fused copy of it."""
        return self._cache.put(get_variant(variant), model, weights)

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

    # ---- stage 1: prepare -----------------------------------------------------------------
    def prepare(self, source: Any, driving: Any, options: AnimateOptions | None = None, *, size: int = 256,
                source_landmarks: np.ndarray | None = None, driving_landmarks: np.ndarray | None = None,
                stream: bool | None = None, chunk: int = 64, progress: ProgressFn | None = None,
                **changes: Any) -> PreparedClip:
        """Read the source and the driving clip, cut both to one square face box each (the clip's from its first,
        onset frame) at `size` px (or resize them, `crop=False`). Landmarks are found once, on first need, and
        smoothed over time; every variant run on the returned clip shares them.

        `source`: an image path or an H x W x C array of any size; `driving`: a video / GIF path, a folder of
        frames, a T x H x W x C array, or an iterable of n x H x W x C frame arrays (a live stream). Optional
        `source_landmarks` (68 x 2, or 18 x 2 AU points) and `driving_landmarks` (T x 68 x 2 / T x 18 x 2), in
        pixels of the given frames, replace detection. With `stream` (default: for iterables) the clip is read
        `chunk` frames at a time while it runs, in memory that does not grow with its length, and can be run once.
        """
        options = as_options(options, **changes)
        report = progress or (lambda fraction, message: None)
        started = time.perf_counter()
        report(0.0, "reading inputs")
        source_image = video.read_image(source, self.limits)
        streamed = stream if stream is not None else not isinstance(driving, (str, Path, np.ndarray, video.Clip))
        given_src = None if source_landmarks is None else np.asarray(source_landmarks, np.float32).reshape(-1, 2)
        given_drv = None if driving_landmarks is None else np.asarray(driving_landmarks, np.float32)
        if streamed:
            chunks = OneShot(self.find_face).chunks(self._driving_chunks(driving, chunk, options.fps))
            first, fps = next(chunks, (None, None))
            if first is None:
                raise InputError("the driving clip holds no frames")
        else:
            clip = video.read_clip(driving, fps=options.fps, limits=self.limits)
            first, fps = clip.frames, clip.fps
            OneShot(self.find_face).check(first, fps)
            if given_drv is not None and (given_drv.ndim != 3 or len(given_drv) != len(first)):
                raise InputError(f"driving_landmarks must be T x P x 2 for the {len(first)} frames, got "
                                 f"{given_drv.shape}")
        timings = {"read_s": time.perf_counter() - started}
        source_box = driving_box = None
        t0 = time.perf_counter()
        if options.crop:
            report(0.01, "finding the faces")
            src_face = given_src if given_src is not None and len(given_src) == prior_lib.NUM_LANDMARKS else None
            drv_face = given_drv[0] if given_drv is not None and given_drv.shape[1] == prior_lib.NUM_LANDMARKS else None
            src_face, drv_face = self._find_faces(options, source_image, first[0], src_face, drv_face)
            source_box = video.face_box(src_face, source_image.shape, margin=options.margin)
            driving_box = video.face_box(drv_face, first.shape[1:], margin=options.margin)
        prepared = PreparedClip(source_image=source_image, source=np.empty(0, np.uint8), size=size, fps=fps,
                                options=options, source_box=source_box, driving_box=driving_box, frames=first,
                                backend=options.landmarks or self.landmarks, timings=timings)
        prepared.source = prepared.to_model_frames(source_image[None], source_box)[0]
        if options.crop:
            prepared.faces = {
                "source": prepared.to_model(np.asarray(src_face, np.float32), source_image.shape, source_box),
                "driving": np.asarray(drv_face, np.float32)}
        if given_src is not None:
            prepared.given_source = prepared.to_model(given_src, source_image.shape, source_box)[None]  # 1 x P x 2
        if given_drv is not None:
            prepared.given_driving = given_drv if streamed else prepared.to_model(given_drv, first.shape[1:], driving_box)
        if streamed:
            prepared.stream = chunks
        timings["landmarks_s"] = time.perf_counter() - t0
        return prepared

    def _find_faces(self, options: AnimateOptions, source: np.ndarray, onset: np.ndarray,
                    source_face: np.ndarray | None, onset_face: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The 68 landmarks (68 x 2) of the face in the source picture and in the clip's onset frame, where not
        given, which place the face boxes: read by the face mesh (`mesh.find_face`: a few ms), else found by the
        landmark detector (dlib's search: 10-25 ms, for faces small in their picture); both at once where both
        are needed (the models wait outside the GIL)."""

        def find(image: np.ndarray, role: str) -> np.ndarray:
            return self.find_face(image, role, options.landmarks)
        if source_face is None and onset_face is None:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1, thread_name_prefix="source-face") as pool:
                source_search = pool.submit(find, source, "source")
                try:
                    onset_face = find(onset, "onset")
                except Exception:
                    source_search.result()  # the source's own error first, where it has one
                    raise
                return source_search.result(), onset_face
        return (find(source, "source") if source_face is None else source_face,
                find(onset, "onset") if onset_face is None else onset_face)

    def find_face(self, image: np.ndarray, role: str = "source", landmarks: str | None = None) -> np.ndarray:
        """The 68 landmarks (68 x 2, pixels) that place the face box of a picture (H x W x C, any mode): read by the
        face mesh (`mesh.find_face`: a few ms), else found by the landmark detector (`landmarks`, default the
        engine's: dlib's search, for faces small in their picture). `role` ("source", or "onset": a driving
        clip's first frame) words the NoFaceError of a picture without a face."""
        searched, face = _mesh_face(image)
        if face is not None:
            return face
        try:
            return self._detector(landmarks).detect(image, role=role).points[0]
        except NoFaceError as error:
            if not searched:
                raise
            raise NoFaceError(f"{error} MediaPipe's face detector, which searched first, found none either.",
                              frame_index=error.frame_index, page=error.page, fix=error.fix) from None

    @staticmethod
    def count_faces(image: np.ndarray) -> int:
        """How many faces a picture (H x W x C, any mode) holds as `find_face` sees them (the largest is used):
        `mesh.count_faces`; 0 where the face mesh's runtime or models are not installed."""
        return _on_mesh(lambda mesh, rgb: mesh.count_faces(rgb), image, 0)

    def _detector(self, landmarks: str | None):
        """The landmark detector named `landmarks` (an option's value), else the engine's."""
        return get_detector(landmarks or self.landmarks, self.device)

    def _backend_name(self, prepared: PreparedClip, spec: Variant) -> str | None:
        """The landmark backend that served a variant on the clip: the detector's name, "given", or None."""
        if _uses_mesh(spec) and not _given_meshes(prepared):
            return MESH_BACKEND
        missing = prepared.given_source is None or prepared.given_driving is None
        if missing and (prepared.options.crop or spec.needs_landmarks):
            return self._detector(prepared.options.landmarks).name
        return "given" if spec.needs_landmarks else None

    def find_landmarks(self, prepared: PreparedClip, spec: Variant | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The source's 1 x P x 2 and the clip's T x P x 2 (smoothed) landmarks of an in-memory prepared clip,
        found on first use (given ones mapped to model pixels); checked against `spec` when given. A mesh-point
        backend (dense) gets the 478-point face meshes instead (`mefacial.mesh`), tracked from the onset frame's
        face on the frames as read (a face drifting out of the onset crop stays whole), in model pixels."""
        if spec is not None and _uses_mesh(spec):
            return self._find_meshes(prepared, spec)
        if prepared.streamed:
            raise InputError("a streamed clip finds its landmarks chunk by chunk while it runs (Engine.run)")
        if prepared.source_points is None:
            prepared.source_points = self._source_points(prepared)
        if prepared.driving_points is None:
            t0 = time.perf_counter()
            if prepared.given_driving is not None:
                points = prepared.given_driving
            else:
                points = self._detector(prepared.options.landmarks).detect(prepared.driving, role="driving").points
                if prepared.options.smooth and len(points) >= 3:
                    points = smooth_tracks(points, smoothing_window(prepared.fps))
            prepared.driving_points = points  # T x P x 2
            prepared.timings["landmarks_s"] = prepared.timings.get("landmarks_s", 0.0) + time.perf_counter() - t0
        if spec is not None:
            self._check_points(spec, prepared.source_points, prepared.driving_points)
        return prepared.source_points, prepared.driving_points

    def _find_meshes(self, prepared: PreparedClip, spec: Variant) -> tuple[np.ndarray, np.ndarray]:
        """The source's 1 x 478 x 2 and the clip's T x 478 x 2 (smoothed) face meshes of an in-memory clip, found
        on first use (or the given points, when they are meshes)."""
        if prepared.streamed:
            raise InputError("a streamed clip finds its landmarks chunk by chunk while it runs (Engine.run)")
        meshes = prepared.meshes
        if "source" not in meshes:
            meshes["source"] = self._source_mesh(prepared)
        if "driving" not in meshes:
            if _given_meshes(prepared):
                meshes["driving"] = prepared.given_driving  # T x 478 x 2
            else:
                for _ in self._tracked_chunks(prepared, spec):  # a run's tracking, with nothing rendered
                    pass
        self._check_points(spec, meshes["source"], meshes["driving"])
        return meshes["source"], meshes["driving"]

    def _source_mesh(self, prepared: PreparedClip) -> np.ndarray:
        if _given_meshes(prepared):
            return prepared.given_source
        found = detect_mesh(prepared.source, landmarks=prepared.faces.get("source"), role="source")
        return found[0][None]  # 1 x 478 x 2

    @staticmethod
    def _driving_tracker(prepared: PreparedClip) -> MeshTracker:
        """The clip's face-mesh tracker: from the face that placed the onset crop, eyes held between their changes,
        frames between still neighbours given their mean (`MeshTracker`'s `skip_still`), the motion of lips, brows,
        nose, cheeks and the skin beside the eye corners read by optical flow as well (`by_flow`)."""
        return MeshTracker(landmarks=prepared.faces.get("driving"), role="driving", hold_eyes=True, skip_still=True,
                           by_flow=True)

    @staticmethod
    def _mesh_in_model(prepared: PreparedClip, meshes: np.ndarray) -> np.ndarray:
        """n x 478 x 2 face meshes tracked on the driving frames as read -> pixels of the model frames (they may
        reach past a model frame's border where the face drifted out of the onset frame's box)."""
        return prepared.to_model(meshes, prepared.frames.shape[1:], prepared.driving_box)

    def _clip_source_points(self, prepared: PreparedClip, spec: Variant) -> np.ndarray | None:
        """The source points a variant's clip runner gets: the mesh for mesh-point backends, else the landmarks."""
        return prepared.meshes.get("source") if _uses_mesh(spec) else prepared.source_points

    def _source_points(self, prepared: PreparedClip) -> np.ndarray:
        if prepared.given_source is not None:
            return prepared.given_source
        return self._detector(prepared.options.landmarks).detect(prepared.source, role="source").points[0][None]  # 1 x 68 x 2

    def _model_chunks(self, prepared: PreparedClip, spec: Variant, batch: int = TRACK_CHUNK,
                      meanwhile: Callable[[np.ndarray], None] | None = None, lookahead: Lookahead | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray | None, Any]]:
        """(n x S x S x 3 model frames, n x P x 2 points or None, planned) of the clip, in order: the whole clip at
        once for an in-memory one (or batches of `batch` frames while its face meshes are tracked), chunk by chunk
        (landmarks found and smoothed across chunk borders) for a stream. `meanwhile(source_points)` is called where
        the first chunk's points are found in the background; `planned` is the `lookahead`'s work done ahead for
        the chunk, or None."""
        if not prepared.streamed:
            if _uses_mesh(spec) and "driving" not in prepared.meshes and not _given_meshes(prepared):
                yield from self._tracked_chunks(prepared, spec, batch, meanwhile=meanwhile, lookahead=lookahead)
                return
            points = self.find_landmarks(prepared, spec)[1] if spec.needs_landmarks else None
            yield prepared.driving, points, None
            return
        if prepared.consumed:
            raise InputError("this streamed clip has been run already: prepare it again to run another variant "
                             "(or prepare it in memory, stream=False, to run several)")
        prepared.consumed = True
        if _uses_mesh(spec):
            prepared.meshes["source"] = self._source_mesh(prepared)
        elif spec.needs_landmarks:
            prepared.source_points = self._source_points(prepared)
        smooth = spec.needs_landmarks and prepared.options.smooth and prepared.given_driving is None
        smoother = StreamingSmoother(smoothing_window(prepared.fps)) if smooth else None
        pending = np.zeros((0, prepared.size, prepared.size, 3), np.uint8)  # frames whose points are not final
        seen = 0
        def model_frames_of_chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield prepared.driving, prepared.frames  # the first chunk, cut when the clip was prepared
            for frames, _ in prepared.stream:
                yield prepared.to_model_frames(frames, prepared.driving_box), frames

        for model_frames, full in model_frames_of_chunks():
            shape = full.shape
            points = None
            if spec.needs_landmarks:
                if prepared.given_driving is not None:
                    given = prepared.given_driving[seen:seen + len(model_frames)]
                    if len(given) != len(model_frames):
                        raise InputError(f"driving_landmarks has {len(prepared.given_driving)} frames, but the clip "
                                         "has more")
                    points = prepared.to_model(given, shape[1:], prepared.driving_box)
                elif _uses_mesh(spec):  # one tracker for the clip: the onset frame's box, carried chunk after chunk
                    tracker = prepared.meshes.setdefault("tracker", self._driving_tracker(prepared))
                    points = self._mesh_in_model(prepared, tracker.track(full, more=True))  # (some may wait)
                else:
                    points = self._detector(prepared.options.landmarks).detect(model_frames, role="driving").points
                self._check_points(spec, self._clip_source_points(prepared, spec), points)
            seen += len(model_frames)
            pending = np.concatenate([pending, model_frames])
            if smoother is not None:
                points = smoother.push(points)
            count = len(pending) if points is None else len(points)
            if count:
                ready, pending = pending[:count], pending[count:]
                yield ready, points, None
        if prepared.given_driving is not None and spec.needs_landmarks and seen != len(prepared.given_driving):
            raise InputError(f"driving_landmarks has {len(prepared.given_driving)} frames for a clip of {seen}")
        points = np.zeros((0, NUM_VERTICES, 2), np.float32)
        if "tracker" in prepared.meshes:  # the frames that waited for a next chunk
            points = self._mesh_in_model(prepared, prepared.meshes["tracker"].finish())
            self._check_points(spec, self._clip_source_points(prepared, spec), points)
        if smoother is not None:
            points = np.concatenate([smoother.push(points), smoother.finish()]) if len(points) else smoother.finish()
        if len(points):
            yield pending[:len(points)], points, None

    def _tracked_chunks(self, prepared: PreparedClip, spec: Variant, batch: int = TRACK_CHUNK,
                        meanwhile: Callable[[np.ndarray], None] | None = None, lookahead: Lookahead | None = None
                        ) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
        """(n x S x S x 3 model frames, n x 478 x 2 smoothed meshes, planned) of an in-memory clip whose meshes are
        not found yet, in batches of n <= `batch` frames. A worker thread tracks the meshes TRACK_CHUNK frames at a
        time (the LiteRT models run outside the GIL), smooths them and hands over each batch whose meshes are
        final, while the caller generates the batches before it: tracking and rendering share the CPU's cores.
        For a batch with others queued before it, the worker also does the `lookahead`'s work (`planned`, else
        None); once the whole clip is tracked, it finishes batches from the clip's end (`Lookahead.finish`:
        `planned` is then a `Finished` batch) while the caller goes through the ones before, so both end together.
        The caller's thread cuts the frames to the model's size while it waits. The meshes and model frames
        are kept on the clip for every later variant (`find_landmarks` finds them here too, rendering nothing;
        `MeshTracker` and `StreamingSmoother` equal the whole-clip calls frame for frame). `meanwhile` is called
        with the source mesh once tracking has started (work that needs no driving mesh)."""
        meshes, count = prepared.meshes, len(prepared.frames)
        tracker = self._driving_tracker(prepared)
        smoother = StreamingSmoother(smoothing_window(prepared.fps)) if prepared.options.smooth and count >= 3 else None
        lookahead = lookahead or Lookahead()
        model_frames = (prepared.driving if prepared.driving_cut  # (cut by an earlier variant's run)
                        else np.empty((count, prepared.size, prepared.size, 3), np.uint8))
        queued: collections.deque = collections.deque()  # (first frame, meshes, planned) handed over, in order
        finished: dict[int, tuple] = {}  # first frame -> (meshes, Finished batch or its error; None while made)
        failed: list[BaseException] = []  # the worker's error
        changed = threading.Condition()
        stop = threading.Event()
        seconds: dict[str, float] = {}
        cut = count if prepared.driving_cut else 0  # frames cut to the model's size, from the start
        tail = count  # the first frame of the batches the worker finishes (they run to the clip's end)

        def hand_over(item: tuple[int, np.ndarray, Any]) -> None:
            with changed:
                queued.append(item)
                changed.notify_all()

        def finish_from_the_end() -> None:  # the clip is tracked: the worker finishes batches from its end
            nonlocal tail
            while not stop.is_set() and lookahead.finish is not None:
                with changed:
                    if len(queued) < 2:  # (the caller is on the first one)
                        return
                    start, points, planned = queued.pop()
                    finished[start], tail = (points, None), start
                try:
                    frames = model_frames[start:start + len(points)]  # (a view: cut here unless the caller has)
                    if start + len(points) > cut:
                        frames[:] = prepared.to_model_frames(prepared.frames[start:start + len(points)],
                                                             prepared.driving_box)
                    result: Any = Finished(lookahead.finish(frames, points, planned))
                except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread, in turn
                    result = error
                with changed:
                    finished[start] = (points, result)
                    changed.notify_all()

        def work() -> None:
            try:
                # the first chunk fills the smoothing window and makes the first batch final (smoothed meshes are
                # final half a window behind the last frame tracked): the caller starts rendering as soon as it can
                first = max(smoother.window, batch + smoother.half) if smoother is not None else TRACK_CHUNK
                starts = [0, *range(first, count, TRACK_CHUNK)]
                final, done = np.zeros((0, NUM_VERTICES, 2), np.float32), 0  # final meshes not handed over yet
                for i, j in zip(starts, [*starts[1:], count]):
                    if stop.is_set():
                        return
                    with timer(seconds, "track"):
                        found = self._mesh_in_model(prepared, tracker.track(prepared.frames[i:j], count,
                                                                            more=j < count, kept=True))
                    if smoother is not None:
                        found = smoother.push(found) if j < count else np.concatenate([smoother.push(found),
                                                                                       smoother.finish()])
                    final = np.concatenate([final, found])
                    while len(final) >= batch or (j == count and len(final)):
                        points, final = final[:batch], final[batch:]
                        hand_over((done, points, lookahead.plan(points, len(queued), tracked_all=j == count)))
                        done += len(points)
                finish_from_the_end()
            except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
                with changed:
                    failed.append(error)
                    changed.notify_all()

        def next_batch() -> tuple[int, np.ndarray, Any] | None:
            """The caller's next batch, once the worker has handed it over or finished it, or None where frames are
            left to cut meanwhile (under `changed`; the worker's error raised)."""
            while True:
                if failed:
                    raise failed[0]
                if queued:  # (the worker takes batches from the end: the first is the caller's next)
                    return queued.popleft()
                points, result = finished.get(done, (None, None))
                if result is not None:
                    del finished[done]
                    return done, points, result
                if cut < min(tail, count):
                    return None
                changed.wait()

        worker = threading.Thread(target=work, name="mesh-tracker", daemon=True)
        found, done = [], 0  # frames handed over

        def cut_until(end: int) -> None:
            nonlocal cut
            end = min(end, tail)
            if end > cut:
                model_frames[cut:end] = prepared.to_model_frames(prepared.frames[cut:end], prepared.driving_box)
                cut = end

        cores = contextlib.ExitStack()  # the core left to the tracker, given back once its thread has ended
        cores.enter_context(_core_for_trackers())
        with cores:
            try:
                worker.start()
                if "source" not in meshes:  # (its own interpreters: alongside the tracker)
                    meshes["source"] = self._source_mesh(prepared)
                if meanwhile is not None:
                    meanwhile(meshes["source"])
                while done < count:
                    with changed:
                        item = next_batch()
                    if item is None:  # no batch ready: cut the next frames meanwhile
                        cut_until(min(cut + TRACK_CHUNK, count))
                        continue
                    start, points, planned = item
                    if not worker.is_alive():  # every batch is tracked and finished: all cores render the rest
                        cores.close()
                    self._check_points(spec, meshes["source"], points)
                    found.append(points)
                    cut_until(start + len(points))
                    if isinstance(planned, BaseException):  # (the worker's, after the checks of its points)
                        raise planned
                    yield model_frames[start:start + len(points)], points, planned
                    done += len(points)
            finally:
                stop.set()
                if worker.is_alive():
                    worker.join()
        meshes["driving"] = np.concatenate(found)  # T x 478 x 2
        prepared.driving = model_frames
        prepared.timings["landmarks_s"] = prepared.timings.get("landmarks_s", 0.0) + seconds.get("track", 0.0)

    # ---- stage 2: run -----------------------------------------------------------------------
    def run(self, prepared: PreparedClip, variant: str | Variant = DEFAULT_VARIANT, options: AnimateOptions | None = None, *,
            checkpoint: str | Path | None = None, progress: ProgressFn | None = None, **changes: Any) -> ClipRun:
        """Animate a prepared clip with one variant: an iterator of n x S x S x 3 uint8 batches of output frames
        (n <= the batch size; pasted back into the source picture with `paste_back`), made as it is iterated, in
        memory bounded by a batch. `options` default to the ones the clip was prepared with; those that shape the
        preparation (crop, margin, landmarks, smooth, fps) must stay as they were. The model is loaded here, so a
        variant that cannot run fails at this call."""
        spec = get_variant(variant)
        options = as_options(options or prepared.options, **changes)
        changed = [name for name in PREPARE_OPTIONS if getattr(options, name) != getattr(prepared.options, name)]
        if changed:
            raise InputError(f"option(s) {changed} differ from the ones the clip was prepared with; prepare it again "
                             "with them (Engine.prepare)")
        options = options.for_variant(spec)
        model, weights = self.model(spec, checkpoint)
        size = model.config.image_size
        if size != prepared.size:
            raise InputError(f"{spec.id} works at {size} px but the clip was prepared at {prepared.size} px; "
                             f"prepare it with size={size}")
        return ClipRun(self, prepared, spec, model, weights, options, progress)

    def animate(self, source: Any, driving: Any, variant: str = DEFAULT_VARIANT, checkpoint: str | Path | None = None,
                options: AnimateOptions | None = None, *, source_landmarks: np.ndarray | None = None,
                driving_landmarks: np.ndarray | None = None, progress: ProgressFn | None = None,
                sink: Callable[[np.ndarray], None] | None = None, **changes: Any) -> AnimationResult:
        """Animate the face in `source` with the motion of the face in `driving`: `prepare` + `run`, collected.

        `options` (an `AnimateOptions` or a dict of its fields, or its fields by keyword: motion, adapt_scale,
        magnify, crop, paste_back, margin, landmarks, smooth, confine, batch_size, fps, ...) say how; see `prepare`
        for the inputs.
        `progress(fraction, message)` is called after each batch. `sink`: see `collect`.
        """
        options = as_options(options, **changes)
        spec = get_variant(variant)
        options.for_variant(spec)  # a bad motion mode fails before any work
        started = time.perf_counter()
        report = progress or (lambda fraction, message: None)
        model, _ = self.model(spec, checkpoint)  # fail on missing weights before any detection
        prepared = self.prepare(source, driving, options, size=model.config.image_size, progress=report,
                                source_landmarks=source_landmarks, driving_landmarks=driving_landmarks)
        return self.collect(prepared, spec, options, checkpoint=checkpoint, progress=report, started=started,
                            sink=sink)

    def collect(self, prepared: PreparedClip, variant: str | Variant, options: AnimateOptions | None = None, *,
                checkpoint: str | Path | None = None, progress: ProgressFn | None = None,
                started: float | None = None, sink: Callable[[np.ndarray], None] | None = None) -> AnimationResult:
        """`run` one variant over an in-memory prepared clip and gather its frames and what they were made from
        into an AnimationResult (timings from `started`, default now). With `sink` (a `video.VideoWriter`'s
        `write`) each batch of frames goes there as it is made and the result keeps none (`frames` is empty,
        `num_frames` counts them): a clip pasted back into a 12-megapixel photo holds 36 MB a frame."""
        spec = get_variant(variant)
        options = options or prepared.options
        report = progress or (lambda fraction, message: None)
        started = time.perf_counter() if started is None else started
        if spec.needs_landmarks and not _uses_mesh(spec):  # face meshes are tracked while the frames are made
            report(0.02, "landmarks")
            self.find_landmarks(prepared, spec)
        report(0.05, f"{spec.id}: {prepared.num_frames} frames")
        clip_run = self.run(prepared, spec, options, checkpoint=checkpoint, progress=report)
        frames, count = gather_frames(clip_run, prepared.num_frames, sink)
        timings = {"read_s": prepared.timings["read_s"], "landmarks_s": prepared.timings["landmarks_s"],
                   **clip_run.timings}
        timings["total_s"] = time.perf_counter() - started
        timings["ms_per_frame"] = 1000 * timings["total_s"] / count
        if _uses_mesh(spec):
            src_points, drv_points = prepared.meshes["source"], prepared.meshes["driving"]
        else:
            src_points = prepared.source_points if spec.needs_landmarks else None
            drv_points = prepared.driving_points if spec.needs_landmarks else None
        src_au, drv_au = self._au_points(clip_run.model.config, src_points, drv_points)
        points68 = lambda p: None if p is None or p.shape[-2] != prior_lib.NUM_LANDMARKS else p  # noqa: E731
        return AnimationResult(
            frames=frames, fps=prepared.fps, variant=spec.id, weights=clip_run.weights,
            source_landmarks=None if points68(src_points) is None else src_points[0],
            driving_landmarks=points68(drv_points),
            source_au=None if src_au is None else src_au[0].cpu().numpy(),
            driving_au=None if drv_au is None else drv_au.cpu().numpy(),
            prior_map=clip_run.prior_map, model_source=prepared.source, model_driving=prepared.driving,
            landmark_backend=clip_run.landmark_backend, crop_box=prepared.source_box, timings=timings,
            options=clip_run.options, frame_count=None if sink is None else count,
        )

    def synthesize(self, source: Any, aus: Any, timing: Any = None, options: Any = None,
                   progress: ProgressFn | None = None, sink: Callable[[np.ndarray], None] | None = None,
                   **overrides) -> AnimationResult:
        """A micro-expression of the face in `source` from a FACS specification, with no driving clip.

        `aus`: '4:C,7:B' (AU:intensity A-E; see `mefacial.au.parse_aus`) or a list of `au.AUSpec`; `timing`: an
        `au.Timing` (onset / apex / offset ms, fps, lead-in / lead-out; default a 300 ms event at 200 fps);
        `options`: a `synthesis.SynthesisOptions` (crop, margin, paste_back, magnify, appearance, landmarks; the
        animation options' fields of the same names are taken too) or a dict of its fields, or its fields as
        keyword arguments. Returns the same `AnimationResult` as `animate`, with the moved meshes and the
        specification (`meshes`, `action_units`). `sink`: as `collect`'s (the frames go there batch by batch,
        the result keeps none)."""
        from .synthesis import SynthesisOptions, synthesize

        options = SynthesisOptions.of(options).replace(**overrides)
        return synthesize(self, source, aus, timing, options, progress, sink)

    def compare(self, source: Any, driving: Any, variants: Sequence[str], options: AnimateOptions | None = None, *,
                source_landmarks: np.ndarray | None = None, driving_landmarks: np.ndarray | None = None,
                progress: ProgressFn | None = None, **changes: Any) -> dict[str, AnimationResult | MefacialError]:
        """Animate with each variant, the inputs prepared once (per model size: `prepare`, whose arguments these
        are); a variant that cannot run maps to its error instead of a result."""
        options = as_options(options, **changes)
        results: dict[str, AnimationResult | MefacialError] = {}
        prepared: dict[int, PreparedClip | MefacialError] = {}
        for index, variant in enumerate(variants):
            def report(fraction: float, message: str, index: int = index, variant: str = variant) -> None:
                if progress is not None:  # one bar over all variants
                    progress((index + fraction) / len(variants), f"{variant}: {message}")

            started = time.perf_counter()
            try:
                report(0.0, "loading the model")
                spec = get_variant(variant)
                options.for_variant(spec)
                size = self.model(spec)[0].config.image_size
                if size not in prepared:
                    try:
                        prepared[size] = self.prepare(source, driving, options, size=size, progress=report,
                                                      source_landmarks=source_landmarks,
                                                      driving_landmarks=driving_landmarks)
                    except MefacialError as exc:
                        prepared[size] = exc
                if isinstance(prepared[size], MefacialError):
                    raise prepared[size]
                results[variant] = self.collect(prepared[size], spec, options, progress=report, started=started)
            except MefacialError as exc:
                results[variant] = exc
        return results

    # ---- the prior as the models compute it ---------------------------------------------------
    def prior_view(self, source: Any, variants: Sequence[str] = ("warp",), driving: Any = None, frame: int = 0,
                   options: AnimateOptions | None = None, *, source_landmarks: np.ndarray | None = None,
                   driving_landmarks: np.ndarray | None = None, **changes: Any) -> list[PriorView]:
        """The landmarks, AU points and prior maps of the source face (and of frame `frame` of `driving`, when
        given) as each variant's own model computes them (`model.prior_maps`), at the model size. A variant whose
        model cannot be loaded here (no weights) is listed in `unavailable` with its error. Optional landmarks
        (68 x 2, and T x 68 x 2 for the clip) replace detection, as in `prepare`."""
        options = as_options(options, **{"smooth": False, **changes})
        still = video.read_image(source, self.limits)[None] if driving is None else \
            video.read_clip(driving, fps=options.fps, limits=self.limits).frames
        frame = min(max(int(frame), 0), len(still) - 1)
        if driving is None and source_landmarks is not None:
            driving_landmarks = np.asarray(source_landmarks, np.float32).reshape(1, -1, 2)  # the face drives itself
        models: dict[str, nn.Module] = {}
        unavailable: dict[str, MefacialError] = {}
        for variant in variants:
            try:
                models[variant] = self.model(variant)[0]
            except MefacialError as exc:
                unavailable[variant] = exc
        size = next(iter(models.values())).config.image_size if models else 256
        for variant, model in list(models.items()):
            if model.config.image_size != size:  # one prepared face per call
                unavailable[variant] = InputError(f"{variant} works at {model.config.image_size} px, the other "
                                                  f"variants at {size} px; ask for it in another call")
                del models[variant]
        prepared = self.prepare(source, still[frame:frame + 1], options, size=size, source_landmarks=source_landmarks,
                                driving_landmarks=None if driving_landmarks is None else
                                np.asarray(driving_landmarks)[frame:frame + 1])
        source_points, driving_points = self.find_landmarks(prepared)
        faces = [(prepared.source, source_points[0])]
        if driving is not None:
            faces.append((prepared.driving[0], driving_points[0]))
        views = []
        for face, landmarks in faces:
            points = from_numpy(landmarks)[None].to(self.device)  # 1 x 68 x 2
            au = prior_lib.au_points_from_landmarks(points).float()  # 1 x 18 x 2
            maps = {}
            with self.inference_context():
                for variant, model in models.items():
                    computed = model.prior_maps(au)
                    if computed:
                        maps[variant] = {k: v[0].float().cpu().numpy().squeeze(0) if k == "prior"
                                         else v[0].float().cpu().numpy() for k, v in computed.items()}
            views.append(PriorView(face, landmarks, au[0].cpu().numpy(), maps, unavailable,
                                   self._detector(options.landmarks).name))
        return views

    # ---- helpers --------------------------------------------------------------------------
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
                "use a smaller batch size (Engine(batch_size=...) / --batch-size), a shorter clip, or bf16 / fp16",
                page=f"The server ran out of memory running {spec.id}", fix="Try a shorter clip",
                title="Out of memory") from None

    def _driving_chunks(self, driving: Any, chunk: int, fps: float | None) -> Iterator[tuple[np.ndarray, float]]:
        """(n x H x W x 3 uint8 chunk, the clip's fps) of a clip path, an array or an iterable of frame arrays."""
        if isinstance(driving, (str, Path)):
            for clip in video.iter_clip_chunks(driving, chunk=chunk, fps=fps, limits=self.limits):
                yield clip.frames, clip.fps
        elif isinstance(driving, (np.ndarray, video.Clip)):
            clip = video.read_clip(driving, fps=fps, limits=self.limits)
            for start in range(0, clip.num_frames, chunk):
                yield clip.frames[start:start + chunk], clip.fps
        else:
            for frames in driving:
                frames = video.as_rgb(np.asarray(frames))
                yield (frames if frames.ndim == 4 else frames[None]), fps or video.DEFAULT_FPS

    @staticmethod
    def _check_points(spec: Variant, src: np.ndarray, drv: np.ndarray) -> None:
        """Source 1 x P x 2 and driving T x P x 2 with P = 68 landmarks (or 18 AU points for prior variants)."""
        allowed = spec.spec.points_per_face
        if src.shape[1] not in allowed or drv.shape[1:] != src.shape[1:]:
            raise InputError(f"{spec.id} needs {' or '.join(map(str, allowed))} points per face, source and clip "
                             f"alike; got {src.shape[1]} and {drv.shape[1]}")

    def _au_points(self, config, src_points, drv_points):
        """AU points (pixels) of source 1 x 18 x 2 and clip T x 18 x 2; fixed to frame 0 for MM 2021 configs;
        (None, None) for a model that takes no AU points."""
        if src_points is None or get_backbone(config.backbone).points != "au_points":
            return None, None
        src, drv = (torch.from_numpy(p).to(self.device) for p in (src_points, drv_points))
        return au_points(config, src, drv)


__all__ = ["AnimateOptions", "AnimationResult", "ClipAnimator", "ClipRun", "Engine", "PreparedClip", "PriorView",
           "StreamingSmoother", "to_tensor", "to_uint8", "timer"]

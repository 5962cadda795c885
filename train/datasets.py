"""Training data: videos, their landmarks (computed once, cached on disk), and random frame pairs.

Layout (the originals'): `DIR/train/<video>` and `DIR/test/<video>`, where a
video is a folder of frames (PNG, JPEG, ... in natural order) or a video file
(mp4, mov, avi, webm, gif, ...); without `train/` every entry of `DIR` is a
training video. Frames should already be face crops (see the README); they
are resized to the model's `image_size`.

A training sample is a pair of frames of one video drawn as FOMM does: two
frame indices uniformly with replacement, sorted, then the augmentations of
the original configs (time flip, horizontal flip, colour jitter shared by the
pair). Every random choice of sample `key` comes from a generator seeded with
`(seed, key)`, and the sampler hands out `key = epoch * len(dataset) + index`,
so a sample depends on nothing but the seed, the epoch and its position:
workers, ranks and resuming change nothing.

Prior variants need the 68 landmarks of every frame. They are detected once
per dataset with a `mefacial.landmarks` backend, in batches, and cached under
`<DIR>/.landmarks/<backend>/` (one `.npz` per video, keyed by the video's
files: relative path, size and mtime, and the backend), so later runs and the
other DDP ranks only read them. Frames where no face is found take the
landmarks of the nearest frame with one; a video without any face is left out
with a warning.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from mefacial import prior
from mefacial.errors import InputError
from mefacial.video import list_frame_files, natural_key, read_clip, read_image
from mefacial.utils import atomic_write

from .config import AugmentationConfig

log = logging.getLogger("train")

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".gif", ".webp", ".apng")
CACHE_DIRNAME = ".landmarks"
CACHE_VERSION = 1

# iBUG 68 index of each landmark's mirror image (left <-> right), for horizontal flips.
_MIRROR_PAIRS = (
    [(i, 16 - i) for i in range(8)]  # jaw
    + [(17 + i, 26 - i) for i in range(5)]  # eyebrows
    + [(31, 35), (32, 34)]  # nose bottom
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    + [(60, 64), (61, 63), (65, 67)]  # inner lips
)


def _mirror_index() -> list[int]:
    index = list(range(prior.NUM_LANDMARKS))
    for a, b in _MIRROR_PAIRS:
        index[a], index[b] = b, a
    return index


MIRROR_INDEX = _mirror_index()


# ---- videos -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One training video: a folder of frames (`frames` lists them) or a video file (`frames` is None)."""

    name: str  # path relative to the split folder
    path: Path
    frames: tuple[Path, ...] | None = None

    @property
    def is_folder(self) -> bool:
        return self.frames is not None

    def files(self) -> list[Path]:
        return list(self.frames) if self.frames is not None else [self.path]


def split_dir(root: str | Path, split: str) -> Path | None:
    """`root/<split>` when the dataset has the train/test layout; `root` itself for "train" otherwise."""
    root = Path(root)
    if (root / "train").is_dir():
        return root / split if (root / split).is_dir() else None
    return root if split == "train" else None


def discover_videos(root: str | Path, split: str = "train") -> list[VideoEntry]:
    """The videos of one split, in natural order of their names."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist; pass --data DIR with DIR/train/<video>/<frames> "
                         "(or video files) as described in the README")
    folder = split_dir(root, split)
    if folder is None:
        return []
    entries = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            frames = list_frame_files(path)
            if frames:
                entries.append(VideoEntry(path.name, path, tuple(frames)))
        elif path.suffix.lower() in VIDEO_EXTENSIONS:
            entries.append(VideoEntry(path.name, path))
    if split == "train" and not entries:
        raise InputError(f"no videos in {folder}: expected folders of frames or video files "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    return entries


def read_video(entry: VideoEntry, indices: list[int] | None = None) -> np.ndarray:
    """Frames of a video (T x H x W x 3 uint8), or only those at `indices` (folders read just those files)."""
    if entry.is_folder:
        files = entry.frames if indices is None else [entry.frames[i] for i in indices]
        return np.stack([read_image(f) for f in files])
    frames = read_clip(entry.path).frames
    return frames if indices is None else frames[indices]


# ---- landmarks, detected once and cached -------------------------------------------------------


def cache_key(entry: VideoEntry, backend: str) -> str:
    """What the cached landmarks of a video depend on: its files (name, size, mtime) and the backend."""
    files = []
    for path in entry.files():
        stat = path.stat()
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "backend": backend, "video": entry.name, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def detect_landmarks(frames: np.ndarray, backend: str, device: str | torch.device | None = None):
    """68 landmarks of every frame (a `mefacial.landmarks.Landmarks68`), missing faces allowed."""
    from mefacial.landmarks import get_detector

    return get_detector(backend, device).detect(frames, allow_missing=True)


def fill_missing(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Give frames without a face (`found` False) the landmarks of the nearest frame with one: T x 68 x 2."""
    valid = np.flatnonzero(found)
    nearest = valid[np.abs(np.arange(len(points))[:, None] - valid[None, :]).argmin(axis=1)]  # T
    return points[nearest]


def _atomic_savez(path: Path, **arrays: Any) -> None:
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def landmark_cache_dir(root: str | Path, backend: str, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir) if cache_dir else Path(root) / CACHE_DIRNAME / backend


def load_landmarks(entries: list[VideoEntry], backend: str, cache_dir: Path, device: str | torch.device | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Landmarks (T x 68 x 2 float32, pixels of the stored frames) per video name, from the cache or detected.

    Videos whose cache entry is missing or stale are read and detected in batches,
    then written to the cache. Videos without any face are left out (warned).
    """
    out: dict[str, np.ndarray] = {}
    detected = 0
    for entry in entries:
        key = cache_key(entry, backend)
        cache_file = cache_dir / f"{entry.name}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as data:
                if str(data["key"]) == key:
                    points, found = data["points"], data["found"]
                    if found.any():
                        out[entry.name] = fill_missing(points, found).astype(np.float32)
                    continue
        frames = read_video(entry)
        result = detect_landmarks(frames, backend, device)
        detected += 1
        if progress is not None:
            progress(entry.name)
        try:
            _atomic_savez(cache_file, points=result.points, found=result.found, key=np.array(key),
                          frame_size=np.array(frames.shape[1:3]), backend=np.array(result.backend))
        except OSError as exc:
            raise InputError(f"cannot write the landmark cache {cache_file} ({exc.strerror or exc}); point "
                             "dataset.landmark_cache at a writable folder, e.g. --set dataset.landmark_cache=DIR") from exc
        if not result.found.any():
            log.warning("no face in any frame of %s: left out of training", entry.path)
            continue
        if not result.found.all():
            log.warning("%s: no face in %d of %d frames; they use the nearest frame's landmarks",
                        entry.path, int((~result.found).sum()), len(frames))
        out[entry.name] = fill_missing(result.points, result.found).astype(np.float32)
    if detected:
        log.info("landmarks: detected %d video(s) with %s, cached in %s", detected, backend, cache_dir)
    return out


# ---- pairs ----------------------------------------------------------------------------------------


def _jitter_params(rng: np.random.Generator, jitter: dict[str, float]) -> list[tuple[str, float]]:
    """Colour jitter factors as the originals draw them, in random order."""
    ops = []
    for name in ("brightness", "contrast", "saturation"):
        amount = float(jitter.get(name, 0))
        if amount > 0:
            ops.append((name, float(rng.uniform(max(0.0, 1 - amount), 1 + amount))))
    hue = float(jitter.get("hue", 0))
    if hue > 0:
        ops.append(("hue", float(rng.uniform(-hue, hue))))
    order = rng.permutation(len(ops))
    return [ops[i] for i in order]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """... x 3 x H x W RGB in [0, 1] -> HSV, hue in [0, 1)."""
    r, g, b = rgb.unbind(-3)
    high, low = rgb.amax(dim=-3), rgb.amin(dim=-3)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(high > 0, chroma / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high))
    return torch.stack([hue, saturation, high], dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(-3)
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype).view(3, 1, 1) + hue.unsqueeze(-3) * 6) % 6  # ... x 3 x H x W
    weight = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return value.unsqueeze(-3) - value.unsqueeze(-3) * saturation.unsqueeze(-3) * weight


def adjust_colour(frames: torch.Tensor, name: str, factor: float) -> torch.Tensor:
    """torchvision's colour adjustments on ... x 3 x H x W frames in [0, 1]. Hue uses its own HSV conversion:
    equal to torchvision's `adjust_hue` within 1.2e-6 and 6x faster on the CPU (measured: 5 x 3 x 64 x 64 frames,
    3.3 ms against 21 ms), which the data loader pays for every sample."""
    import torchvision.transforms.functional as TF

    if name == "hue":
        hsv = _rgb_to_hsv(frames)
        hsv = torch.cat([((hsv[..., :1, :, :] + factor) % 1.0), hsv[..., 1:, :, :]], dim=-3)
        return _hsv_to_rgb(hsv).clamp(0, 1)
    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation}.get(name)
    if adjust is None:
        raise ValueError(f"unknown colour adjustment {name!r}")
    return adjust(frames, factor).clamp(0, 1)


def flip_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """Landmarks (... x 68 x 2 pixels) of the horizontally flipped frame: x -> width - 1 - x, left <-> right."""
    flipped = points[..., MIRROR_INDEX, :].copy()
    flipped[..., 0] = width - 1 - flipped[..., 0]
    return flipped


class PairDataset(Dataset):
    """Random frame pairs of videos (FOMM's FramesDataset + DatasetRepeater), reproducible per sample key.

    Returns per sample: `source`, `driving` (3 x S x S float in [0, 1]) and
    `key`; with landmarks also `source_landmarks`, `driving_landmarks`
    (68 x 2) and `source_au`, `driving_au` (18 x 2), in pixels of the S x S frame.
    With `au_points="first_frame"` (ACM MM 2021) both AU sets and landmarks are those
    of the video's first frame.
    """

    def __init__(self, videos: list[VideoEntry], image_size: int, num_repeats: int = 1, seed: int = 0,
                 augmentation: AugmentationConfig | None = None, landmarks: dict[str, np.ndarray] | None = None,
                 au_points: str = "per_frame", video_cache: int = 8):
        if landmarks is not None:
            videos = [v for v in videos if v.name in landmarks]
        if not videos:
            raise InputError("no usable videos (none found, or no face in any of them)")
        self.videos = videos
        self.image_size = image_size
        self.num_repeats = num_repeats
        self.seed = seed
        self.augmentation = augmentation
        self.landmarks = landmarks
        self.au_points = au_points
        self.video_cache = video_cache
        self._decoded: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.num_repeats * len(self.videos)

    def _clip(self, entry: VideoEntry) -> np.ndarray:
        """A decoded video file (T x H x W x 3 uint8), kept in a small per-worker LRU cache."""
        if entry.name not in self._decoded:
            self._decoded[entry.name] = read_video(entry)
            while len(self._decoded) > max(self.video_cache, 1):
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(entry.name)
        return self._decoded[entry.name]

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(key)])
        entry = self.videos[int(key) % len(self.videos)]
        clip = None if entry.is_folder else self._clip(entry)
        count = len(entry.frames) if clip is None else len(clip)
        indices = sorted(int(i) for i in rng.choice(count, size=2, replace=True))
        pixels = read_video(entry, indices) if clip is None else clip[indices]  # 2 x H x W x 3 uint8
        height, width = pixels.shape[1:3]
        frames = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255  # 2 x 3 x H x W
        size = self.image_size
        if (height, width) != (size, size):
            frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            frames = frames.clamp(0, 1)

        points = None
        if self.landmarks is not None:
            track = self.landmarks[entry.name]
            points = track[[0, 0]] if self.au_points == "first_frame" else track[indices]  # 2 x 68 x 2
            points = points * np.array([size / width, size / height], dtype=np.float32)

        aug = self.augmentation
        if aug is not None:
            if aug.time_flip and rng.random() < 0.5:
                frames = frames.flip(0)
                points = points[::-1] if points is not None and self.au_points != "first_frame" else points
            if aug.horizontal_flip and rng.random() < 0.5:
                frames = frames.flip(-1)
                points = flip_landmarks(points, size) if points is not None else None
            for name, factor in _jitter_params(rng, aug.jitter):
                frames = adjust_colour(frames, name, factor)

        sample = {"source": frames[0].contiguous(), "driving": frames[1].contiguous(), "key": torch.tensor(int(key))}
        if points is not None:
            lm = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))  # 2 x 68 x 2
            au = prior.au_points_from_landmarks(lm)  # 2 x 18 x 2
            sample.update(source_landmarks=lm[0], driving_landmarks=lm[1], source_au=au[0], driving_au=au[1])
        return sample


class EpochSampler(DistributedSampler):
    """`DistributedSampler` that hands out sample keys `epoch * len(dataset) + index` and can resume mid-epoch.

    `set_epoch(epoch, skip=n)` skips this rank's first n indices of the epoch
    (the batches a resumed run already trained on).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        offset = self.epoch * len(self.dataset)
        indices = list(super().__iter__())[self.skip:]
        return iter([offset + i for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip

"""Turn a micro-expression dataset (CASME II, SAMM, SMIC-HS, or any face clips) into training folders.

    python -m train.prepare SRC OUT [--size 256] [--margin 0] [--test-fraction 0.2] [--landmarks dlib]

Every clip under SRC (a folder holding image frames, at any depth, or a video
file) is cropped to one square face box found on its first (onset) frame, as
the engine crops driving clips (`mefacial.video.face_box`, the paper's
preprocessing), resized to `size` and written as PNG frames to
`OUT/train/<clip>/00000.png ...` (or `OUT/test/...`). The clip name is its
path under SRC with "/" replaced by "_". The test split takes whole subjects
(the first folder level under SRC), chosen by a hash of the name, so it is the
same on every machine and a subject never appears in both splits.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

from PIL import Image

from mefacial import video
from mefacial.console import CliParser
from mefacial.errors import MefacialError, NoFaceError

from .datasets import VIDEO_EXTENSIONS

log = logging.getLogger("train.prepare")


def find_clips(src: Path) -> list[Path]:
    """Folders that hold image frames and video files under `src`, in natural order."""
    clips = []
    for path in sorted(src.rglob("*"), key=lambda p: video.natural_key(str(p.relative_to(src)))):
        if any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        if path.is_dir() and video.list_frame_files(path):
            clips.append(path)
        elif path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            clips.append(path)
    return clips


def is_test_subject(subject: str, fraction: float) -> bool:
    """Deterministic subject-level split: a hash of the subject name below `fraction`."""
    digest = hashlib.sha256(subject.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prepare(src: str | Path, out: str | Path, size: int = 256, margin: float = 0.0, test_fraction: float = 0.0,
            landmarks: str = "dlib") -> dict[str, int]:
    """Crop and write every clip of `src`; returns how many clips went to train, test, and were skipped."""
    from mefacial.landmarks import get_detector

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise MefacialError(f"clip folder {src} does not exist (or is not a folder): give the folder of the clips")
    clips = find_clips(src)
    if not clips:
        raise MefacialError(f"no clips under {src}: expected folders of frames or video files")
    detector = get_detector(landmarks)
    counts = {"train": 0, "test": 0, "skipped": 0}
    for clip in clips:
        relative = clip.relative_to(src)
        name = "_".join(relative.with_suffix("").parts) if clip.is_file() else "_".join(relative.parts)
        split = "test" if is_test_subject(relative.parts[0], test_fraction) else "train"
        target = out / split / name
        if target.is_dir() and any(target.iterdir()):
            counts[split] += 1  # done by an earlier run
            continue
        try:
            frames = video.read_clip(clip).frames  # T x H x W x 3
            onset = detector.detect(frames[:1], role="driving").points[0]  # 68 x 2
        except (NoFaceError, MefacialError) as exc:
            log.warning("skipped %s: %s", clip, exc)
            counts["skipped"] += 1
            continue
        box = video.face_box(onset, frames.shape[1:], margin=margin)
        crops = video.crop_to_model(frames, box, size)  # T x size x size x 3
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(crops):
            Image.fromarray(frame).save(tmp / f"{i:05d}.png")
        tmp.rename(target)
        counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="dataset root (e.g. CASME2_RAW_selected, SAMM, SMIC/HS)")
    parser.add_argument("out", type=Path, help="output folder for python -m train --data")
    parser.add_argument("--size", type=int, default=256, help="frame size of the model (default 256)")
    parser.add_argument("--margin", type=float, default=0.0, help="extra margin around the face (fraction of its size)")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="fraction of subjects for OUT/test")
    parser.add_argument("--landmarks", choices=("auto", "fan", "dlib"), default="dlib", help="face detector")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        counts = prepare(args.src, args.out, args.size, args.margin, args.test_fraction, args.landmarks)
    except MefacialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['train']} train clips, {counts['test']} test clips, {counts['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

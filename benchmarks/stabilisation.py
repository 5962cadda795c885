"""Measure temporal landmark stabilisation on real micro-expression clips.

    python benchmarks/stabilisation.py [CLIP_OR_FOLDER ...] [--window 9]

Runs the dlib backend on every frame of each clip (default: the driving GIFs
in $MEFACIAL_DATA/driving, else ../shared/data/microexpression/driving),
smooths the tracks with `smooth_tracks` and prints, per clip, the jitter
(per-frame noise, px) before and after, and the onset->apex displacement
(px, mean over the 68 points) before and after. See
`mefacial.landmarks.measure_stabilisation` for the definitions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mefacial.landmarks import SMOOTH_WINDOW, get_detector, measure_stabilisation, smooth_tracks  # noqa: E402
from mefacial.video import read_clip  # noqa: E402


def default_clips() -> list[Path]:
    data = Path(os.environ.get("MEFACIAL_DATA") or REPO / "../shared/data/microexpression").resolve()
    return sorted((data / "driving").glob("*.gif"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="*", type=Path, help="video files, GIFs or folders of frames")
    parser.add_argument("--window", type=int, default=SMOOTH_WINDOW, help="Savitzky-Golay window (frames)")
    args = parser.parse_args(argv)
    clips = args.clips or default_clips()
    if not clips:
        parser.error("no clips given and none found in $MEFACIAL_DATA/driving")
    detector = get_detector("dlib")
    print("| clip | frames | jitter before (px) | after | ratio | displacement before (px) | after | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for path in clips:
        clip = read_clip(path)
        tracks = detector.detect(clip.frames).points
        r = measure_stabilisation(tracks, smooth_tracks(tracks, window=args.window))
        print(f"| {path.stem} ({clip.frames.shape[2]}x{clip.frames.shape[1]}) | {r.frames} | {r.jitter_before:.3f} | "
              f"{r.jitter_after:.3f} | {r.jitter_ratio:.2f} | {r.displacement_before:.2f} | "
              f"{r.displacement_after:.2f} | {r.displacement_ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

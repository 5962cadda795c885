"""A shared clip enlarged into raw-sized frames, for timing the generators as a dataset's own frames would run.

    python benchmarks/raw_sized_clip.py CLIP OUT.mp4 --preset casme2|samm [--frames N]
    python -m mefacial bench --training-free --data ../shared/data/microexpression --driving OUT.mp4

The shared clips are face crops of 128 x 128; CASME II stores 640 x 480 colour frames holding a face about 280 px
wide, SAMM 2048 x 1088 grey ones holding one about 600 px wide. Each frame is enlarged (bicubic) so that the clip's
width becomes that face's, centred on a flat grey canvas of the preset's size, made grey where the preset is, and
written as H.264 at the clip's frame rate (the README's Speed rows: s3_po_05 as casme2, sub19_EP01_01f as samm).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mefacial.errors import MefacialError  # noqa: E402
from mefacial.video import read_clip, write_video  # noqa: E402

PRESETS = {  # (width, height, face px, grey)
    "casme2": (640, 480, 280, False),
    "samm": (2048, 1088, 600, True),
}
BACKGROUND = 90  # the canvas's grey level


def enlarge(frames: np.ndarray, width: int, height: int, face: int, grey: bool) -> np.ndarray:
    """T x h x w x 3 uint8 -> T x height x width x 3: each frame scaled to `face` px wide, centred (cut where it
    overflows the canvas), greyscale where `grey`."""
    scale = face / frames.shape[2]
    size = (round(frames.shape[2] * scale), round(frames.shape[1] * scale))  # (w, h) scaled
    out = np.full((len(frames), height, width, 3), BACKGROUND, np.uint8)
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    rows = slice(max(top, 0), min(top + size[1], height))
    cols = slice(max(left, 0), min(left + size[0], width))
    for frame, canvas in zip(frames, out):
        big = cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC)
        if grey:
            big = np.repeat(cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)[..., None], 3, -1)
        canvas[rows, cols] = big[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="a driving clip (the shared GIFs)")
    parser.add_argument("out", help="the mp4 to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--frames", type=int, default=None, help="at most this many frames (default: all)")
    args = parser.parse_args()
    try:
        clip = read_clip(args.clip)
    except MefacialError as error:
        sys.exit(f"raw_sized_clip.py: {error}")
    enlarged = enlarge(clip.frames[:args.frames], *PRESETS[args.preset])  # (all of them where None)
    write_video(args.out, enlarged, clip.fps)
    print(f"{args.out}: {len(enlarged)} frames of {enlarged.shape[2]} x {enlarged.shape[1]} at {clip.fps:g} fps")


if __name__ == "__main__":
    main()

"""How far real micro-expressions move the face: per-region landmark motion at apex, in % of the inter-ocular distance.

    python benchmarks/micro_motion.py [CLIPS_DIR]      # default: $MEFACIAL_DATA/driving (the shared real clips)

For each clip: landmarks on every frame (dlib's 68 points, temporally smoothed as the engine smooths driving
tracks, and the dense face mesh of `mefacial.mesh`), head motion removed and regions read by
`mefacial.readout.region_motion` (the readout of the app), then each region's motion at the clip's apex (the
frame of largest total motion) and its largest over the clip. These figures set the scale of the AU templates
(`mefacial.au`: a marked, C-intensity AU moves its region about as far as the most active region of a real clip).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mefacial import readout  # noqa: E402
from mefacial.generate import find_clips  # noqa: E402
from mefacial.landmarks import get_detector, smooth_tracks, smoothing_window  # noqa: E402
from mefacial.mesh import detect_mesh  # noqa: E402
from mefacial.video import read_clip  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(os.environ.get("MEFACIAL_DATA", Path(__file__).resolve().parent.parent / "../shared/data/microexpression")) / "driving"
    rows = []
    for clip_path in find_clips(root):
        clip = read_clip(clip_path)
        dlib = smooth_tracks(get_detector("dlib").detect(clip.frames).points, smoothing_window(clip.fps))
        mesh = smooth_tracks(detect_mesh(clip.frames), smoothing_window(clip.fps))
        for backend, tracks in (("dlib 68", dlib), ("mesh 478", mesh)):
            motion = readout.region_motion(tracks, clip.fps)
            frame, apex = motion.apex()
            peaks = motion.peaks()
            rows.append((clip_path.stem, backend, clip.num_frames, clip.fps, frame, apex, peaks))
    regions = list(readout.COLOURS)
    print("Region motion at apex (% of the inter-ocular distance; largest over the clip in brackets):\n")
    print("| clip | landmarks | apex frame | " + " | ".join(r.replace("_", " ") for r in regions) + " |")
    print("|---|---|--:|" + "--:|" * len(regions))
    for name, backend, count, fps, frame, apex, peaks in rows:
        cells = [f"{apex[r]:.1f} ({peaks[r]:.1f})" if r in apex else "-" for r in regions]
        print(f"| {name} | {backend} | {frame}/{count} | " + " | ".join(cells) + " |")
    tops = [max(apex.values()) for *_, apex, _ in rows]
    print(f"\nmost active region at apex: {min(tops):.1f}-{max(tops):.1f} % IOD "
          f"(median {np.median(tops):.1f}) over {len(rows)} clip x landmark runs")


if __name__ == "__main__":
    main()

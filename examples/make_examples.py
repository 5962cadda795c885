"""Make the bundled demo examples, offline and deterministically (no download, CPU, a few seconds):

    python -m examples.make_examples      # from the repository root

* `astronaut.png`: scikit-image's bundled astronaut portrait (NASA, public domain), cropped
  around the face, 224 x 224 (deliberately not the model size: the app crops and resizes).
* `brow_raise.mp4`: a short synthetic micro-expression, a brow raise with a lip-corner pull
  (AU 1+2 and AU 12), made with the training-free `warp` variant on another rendition of
  the same portrait (mirrored, greyscale, tighter, like the aligned faces of CASME II / SAMM):
  the still face's dlib landmarks are moved along an onset -> apex -> offset curve and the
  engine warps the face to follow them. The motion is a few pixels, as in real clips.

The app lists these as its default example (warp variant, dlib landmarks). Rerun this
script after changing the warp to refresh them; it overwrites both files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

import mefacial
from mefacial.landmarks import get_detector
from mefacial.video import write_video

HERE = Path(__file__).resolve().parent
FACE_BOX = (10, 108, 234, 332)  # rows, cols (top, left, bottom, right) of the astronaut's face, 224 x 224
DRIVING_BOX = (40, 140, 200, 300)  # a tighter square around the same face for the driving clip
NUM_FRAMES = 12
FPS = 25.0
# Displacement at the apex, in pixels of the model frame, per iBUG-68 landmark: (dx, dy).
BROWS = range(17, 27)
BROW_RAISE_PX = 3.0
LIP_CORNERS = {48: -1.0, 54: 1.0}  # left / right corner: outwards
LIP_NEIGHBOURS = {49: -0.5, 59: -0.5, 53: 0.5, 55: 0.5}
LIP_PULL_PX = 2.5


def onset_apex_offset(num_frames: int) -> np.ndarray:
    """Intensity per frame in [0, 1]: still for the first frames, a smooth rise to the apex, a partial release."""
    t = np.linspace(0, 1, num_frames)
    rise = np.clip((t - 0.15) / 0.4, 0, 1)
    release = np.clip((t - 0.7) / 0.3, 0, 1)
    return (np.sin(rise * np.pi / 2) ** 2) * (1 - 0.6 * release)


def expression_track(landmarks: np.ndarray, num_frames: int) -> np.ndarray:
    """68 x 2 still landmarks -> T x 68 x 2 landmarks performing the brow raise and lip-corner pull."""
    apex = np.zeros_like(landmarks)  # 68 x 2 displacement at the apex
    apex[list(BROWS), 1] = -BROW_RAISE_PX
    for index, side in {**LIP_CORNERS, **LIP_NEIGHBOURS}.items():
        weight = abs(side)
        apex[index] = (np.sign(side) * 0.6 * LIP_PULL_PX * weight, -LIP_PULL_PX * weight)  # outwards and up
    intensity = onset_apex_offset(num_frames)[:, None, None]  # T x 1 x 1
    return (landmarks[None] + intensity * apex[None]).astype(np.float32)


def driving_face(portrait: np.ndarray, size: int) -> np.ndarray:
    """The tighter, mirrored, greyscale rendition of the portrait, size x size x 3 uint8."""
    top, left, bottom, right = DRIVING_BOX
    grey = Image.fromarray(portrait[top:bottom, left:right]).convert("L").convert("RGB")
    return np.asarray(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((size, size), Image.Resampling.LANCZOS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: examples/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    portrait = skimage_data.astronaut()  # 512 x 512 x 3 uint8, bundled with scikit-image

    top, left, bottom, right = FACE_BOX
    Image.fromarray(portrait[top:bottom, left:right]).save(args.out / "astronaut.png", optimize=True)

    size = mefacial.get_variant("warp").config.image_size
    face = driving_face(portrait, size)
    still = get_detector("dlib").detect(face, role="source").points[0]  # 68 x 2
    track = expression_track(still, NUM_FRAMES)  # T x 68 x 2
    engine = mefacial.Engine(device="cpu")
    result = engine.animate(face, np.repeat(face[None], NUM_FRAMES, axis=0), variant="warp",
                            source_landmarks=still, driving_landmarks=track, fps=FPS, crop=False, smooth=False)
    write_video(args.out / "brow_raise.mp4", result.frames, result.fps)
    print(f"wrote {args.out / 'astronaut.png'} and {args.out / 'brow_raise.mp4'} ({result.num_frames} frames)")


if __name__ == "__main__":
    main()

"""Quality of the training-free generators on the shared clips, beside the paper's published outputs.

    python benchmarks/dense_quality.py [--data ../shared/data/microexpression] [--strips docs/]

For each driving clip (and the shared target face), with the routine of `python -m mefacial evaluate`
(dlib landmarks re-detected on every output, `mefacial.evaluate` / `mefacial.metrics`):

- cross-identity: the AU-point motion error of the output against the driving clip, as a multiple of the
  still face's (1 = no better than not moving), and the share of the driving motion carried over;
- eye narrowing at the driving clip's eye apex (the frame where its 68-point eye aperture is smallest):
  1 - aperture(apex) / aperture(onset), output / driving (1 = reproduced); printed also as read by the face
  mesh re-detected on output and driving (`narrowing_mesh`, `mefacial.mesh.eye_aperture`);
- background stability: mean |frame t - frame 0| (grey levels, 0-255) outside the face (farther than
  CONFINE_REACH x its size from the hull of its landmarks);
- self-reenactment (each clip's first frame driven by the clip): PSNR, SSIM and landmark-motion error, for
  our generators only (the published outputs are cross-identity).

Rows: dense, dense-geometry (no appearance transfer), warp (68 points), the static face, and the five
published methods (`published-results/<METHOD>/<clip>-normalized_asianFemale.gif`, scored as generated
frames of the same target face). With --strips, writes onset-to-apex image strips (JPEG) of s3_po_05.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

OURS = ("dense", "dense-geometry", "warp")
PUBLISHED = ("FOMM", "FOMM_with_EWP", "FOMM_with_AWP", "MRAA", "MRAA_with_AWP")


def eye_aperture68(points: np.ndarray) -> np.ndarray:
    """Mean lid distance of both eyes from 68 landmarks: T x 68 x 2 -> T."""
    p = np.asarray(points, np.float64)
    pairs = [(37, 41), (38, 40), (43, 47), (44, 46)]
    return np.mean([np.linalg.norm(p[:, a] - p[:, b], axis=-1) for a, b in pairs], axis=0)


def narrowing(points: np.ndarray, apex: int) -> float:
    ap = eye_aperture68(points)
    return float(1 - ap[apex] / ap[0])


def background_change(frames: np.ndarray, points0: np.ndarray) -> float:
    """Mean |frame t - frame 0| (0-255) outside the face of frame 0 (beyond the warp's confinement reach)."""
    from mefacial.models.warp import face_reach

    outside = face_reach(torch.from_numpy(points0), frames.shape[1:3]).numpy() == 0
    if not outside.any():
        return float("nan")
    diff = np.abs(frames.astype(np.float32) - frames[:1].astype(np.float32)).mean(-1)  # T x H x W
    return float(diff[:, outside].mean())


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    from mefacial.video import resize_frames

    return resize_frames(frames, size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MEFACIAL_DATA", "../shared/data/microexpression")))
    parser.add_argument("--strips", type=Path, default=None, help="write onset-to-apex strips (JPEG) here")
    args = parser.parse_args()

    from mefacial import Engine, metrics
    from mefacial import mesh as M
    from mefacial.evaluate import EvalSettings, landmark_finder, score_reenactment
    from mefacial.video import read_clip

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    face = args.data / "faces" / "asian_female.png"
    rows = []
    for clip_path in sorted((args.data / "driving").glob("*.gif")):
        clip = read_clip(clip_path)
        outputs: dict[str, np.ndarray] = {}
        driving = None
        for variant in OURS:
            result = engine.animate(face, clip.frames, variant=variant, options=settings.animate_options())
            outputs[variant] = result.frames
            driving = result.model_driving
        size = driving.shape[1]
        outputs["static"] = np.repeat(outputs["dense"][:1], len(driving), 0)
        for method in PUBLISHED:
            path = args.data / "published-results" / method / f"{clip_path.stem}-normalized_asianFemale.gif"
            if path.is_file():
                frames = resize(read_clip(path).frames, size)
                outputs[method] = frames
        drv_points = landmarks(driving)
        ap = eye_aperture68(drv_points)
        apex = int(np.argmin(ap))
        drv_narrow = narrowing(drv_points, apex)
        drv_mesh = M.eye_aperture(M.detect_mesh(driving, allow_missing=True))
        for name, frames in outputs.items():
            count = min(len(frames), len(driving))
            gen_points = landmarks(frames[:count])
            row = {"clip": clip_path.stem, "method": name, "frames": f"{count}/{len(driving)}"}
            if np.isnan(gen_points).any():
                row["note"] = "no face on some output frames"
            else:
                scored = metrics.score_motion_transfer(torch.from_numpy(gen_points).float(),
                                                       torch.from_numpy(drv_points[:count]).float(),
                                                       min_motion=settings.min_motion)
                row.update(error_ratio=scored.error / scored.static_error, carried=scored.gain,
                           narrowing=narrowing(gen_points, apex) / drv_narrow if apex < count else float("nan"),
                           background=background_change(frames[:count], gen_points[0]))
                if apex < count:  # the same narrowing read by the face mesh (a second detector)
                    gen_mesh = M.eye_aperture(M.detect_mesh(frames[:count], allow_missing=True))
                    row["narrowing_mesh"] = (1 - gen_mesh[apex] / gen_mesh[0]) / (1 - drv_mesh[apex] / drv_mesh[0])
            if name in OURS or name == "static":
                variant = "dense" if name == "static" else name
                result = engine.animate(clip.frames[0], clip.frames, variant=variant, options=settings.animate_options())
                self_scores = score_reenactment(result, landmarks, settings)
                part = self_scores["static" if name == "static" else "generated"]
                row.update(psnr=part["psnr"], ssim=part["ssim"], landmark_error=part["landmark_error"])
            rows.append(row)
            print(row, flush=True)
        if args.strips is not None and clip_path.stem == "s3_po_05":
            write_strips(args.strips, engine, face, clip.frames, driving, outputs, apex, settings)
    print(table(rows))


def fmt(value, digits=2) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| clip | method | cross-identity error / still face | motion carried over | eye narrowing output / "
             "driving | background change (0-255) | self-reenactment PSNR dB | SSIM | landmark-motion error px |",
             "| --- | --- | --: | --: | --: | --: | --: | --: | --: |"]
    for r in rows:
        lines.append(f"| {r['clip']} | {r['method']} | {fmt(r.get('error_ratio'))} | {fmt(r.get('carried'))} "
                     f"| {fmt(r.get('narrowing'))} | {fmt(r.get('background'))} | {fmt(r.get('psnr'))} "
                     f"| {fmt(r.get('ssim'), 4)} | {fmt(r.get('landmark_error'), 3)} |")
    return "\n".join(lines)


def write_strips(folder: Path, engine, face, clip_frames, driving, outputs, apex, settings) -> None:
    """Onset -> apex strips (5 frames) of the driving clip and each method, at magnify 1 and 2 (ours)."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    picks = sorted({int(round(i)) for i in np.linspace(0, apex, 5)})
    tile = 128

    def row(frames):
        return np.concatenate([resize(frames[[i]], tile)[0] for i in picks], axis=1)

    strip = np.concatenate([row(driving)] + [row(outputs[k]) for k in ("dense", "dense-geometry", "warp", "FOMM")
                                             if k in outputs], axis=0)
    iio.imwrite(folder / "s3_po_05-onset-apex.jpg", strip, quality=85)
    doubled = [engine.animate(face, clip_frames, variant=v, options=settings.animate_options(), magnify=2.0).frames
               for v in ("dense", "warp")]
    iio.imwrite(folder / "s3_po_05-onset-apex-magnify2.jpg",
                np.concatenate([row(driving)] + [row(f) for f in doubled], axis=0), quality=85)
    print(f"strips in {folder}: frames {picks}; rows: driving, dense, dense-geometry, warp, published FOMM; "
          "magnify 2: driving, dense, warp")


if __name__ == "__main__":
    main()

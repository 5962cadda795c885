"""Quality of the training-free generators on the shared clips, beside the paper's published outputs.

    python benchmarks/dense_quality.py [--data ../shared/data/microexpression] [--strips docs/]

For each driving clip (and the shared target face), with the routine of `python -m mefacial evaluate`
(dlib landmarks re-detected on every output, `mefacial.evaluate` / `mefacial.metrics`):

- cross-identity: the AU-point motion error of the output against the driving clip, as a multiple of the
  still face's (1 = no better than not moving), and the share of the driving motion carried over;
- eye narrowing at the driving clip's eye apex (the frame where its 68-point eye aperture is smallest):
  1 - aperture(apex) / aperture(onset), output / driving (1 = reproduced);
- the cross-identity scores and the narrowing read again by a second detector, the face mesh re-detected on
  output and driving (its 468 points, the same frames; a second table): each detector favours the generator
  that moves its own points (the warp dlib's, `dense` the mesh's);
- background stability: mean |frame t - frame 0| (grey levels, 0-255) outside the face (farther than
  CONFINE_REACH x its size from the hull of its landmarks);
- self-reenactment (each clip's first frame driven by the clip): PSNR, SSIM and landmark-motion error, for
  our generators only (the published outputs are cross-identity).

Rows: dense, dense-geometry (no appearance transfer), warp (68 points), the static face, and the five
published methods (`published-results/<METHOD>/<clip>-normalized_asianFemale.gif`, scored as generated
frames of the same target face). With --strips, writes onset-to-apex image strips (JPEG) of s3_po_05.

Instead of that table, --cross-faces scores each clip's onset frame as a further target face, driven by the other
clips (cross-identity error, motion carried over and eye narrowing for dense, dense-geometry and warp): faces
besides the shared one; and --transparency measures what the detectors read on a rendered frame that its
geometry does not hold; --synthetic drives each of two faces (the shared one and the bundled
astronaut) by squints synthesised from FACS AUs on the other (`Engine.synthesize`: `SQUINTS`, strong to mild) and reads
the eye narrowing at the driving's apex, output / driving, by dlib and by the face mesh, and with no reader
how much eye both show as drawn (`drawn_opening`); --magnify-grid writes
each clip's apex driving the astronaut at magnify 1, 2, 3 and 5 (docs/dense-magnify.jpg); --lid-readback draws each
face's lids (the two faces, and the clips' onset frames) as `dense` draws an eye read at a share r of its aperture and
reads them back with both detectors (`lid_readback`); --by-direction splits the share of motion carried over into its
horizontal and vertical parts, read by dlib and by the mesh's 68 equivalents (`MESH_68`, the same AU-point score),
with the inner and outer eye-corner distances at the driving's eye apex (`by_direction`); --corner-flow reads how the
skin beside the eye corners moves by optical flow instead, on the driving and the outputs (`corner_flow`). --reader-gain reads
AUs synthesised on the two faces (known geometry) by dlib, the face mesh and optical flow and says how much of the
motion each reads (`reader_gain`); --synthetic-presets drives each face by the emotion presets synthesised on the
other and scores the share carried against each reader's driving and against the known motion
(`synthetic_presets`). With --transparency, the dense renderer draws the driving's apex (of each clip, on the shared face) and
the source unmoved; dlib's 68 points and the face mesh are re-detected on both, and the motion they read is
compared with the motion the target mesh asks for (at dlib's points: their barycentric place in the source
mesh, moved with it), in % of the inter-ocular distance: overall, the eyes' points across (x), and the
forehead (mesh vertex 10, down +).
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


def narrowing_mesh(apertures: np.ndarray, apex: int) -> float:
    """`narrowing` from the face mesh's eye apertures (T, `mesh.eye_aperture`)."""
    return float(1 - apertures[apex] / apertures[0])


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
    parser.add_argument("--cross-faces", action="store_true", help="only drive each clip's onset frame by the others")
    parser.add_argument("--transparency", action="store_true",
                        help="only measure what detectors read on rendered apex frames beyond their geometry")
    parser.add_argument("--synthetic", action="store_true",
                        help="only measure the eye narrowing carried from synthesised squints to another face")
    parser.add_argument("--magnify-grid", type=Path, default=None,
                        help="only write each shared clip's apex driving the bundled astronaut at magnify 1, 2, 3 and 5 "
                             "(JPEG) into this folder")
    parser.add_argument("--lid-readback", action="store_true",
                        help="only draw each face's lids at known apertures and read them back")
    parser.add_argument("--by-direction", action="store_true",
                        help="only split the motion carried over into horizontal and vertical parts, by both readers")
    parser.add_argument("--corner-flow", action="store_true",
                        help="only read the skin beside the eye corners by optical flow, on driving and outputs")
    parser.add_argument("--reader-gain", action="store_true",
                        help="only measure how much of synthesised AU motion (known geometry) each reader reads")
    parser.add_argument("--synthetic-presets", action="store_true",
                        help="only score motion carried over from presets synthesised on one face to another, "
                             "against each reader's driving and against the known motion")
    args = parser.parse_args()
    if args.magnify_grid is not None:
        magnify_grid(args.data, args.magnify_grid)
        return
    for flag, measure in (("reader_gain", reader_gain), ("synthetic_presets", synthetic_presets), ("corner_flow", corner_flow), ("by_direction", by_direction), ("lid_readback", lid_readback),
                          ("synthetic", synthetic_squints), ("transparency", transparency)):
        if getattr(args, flag):  # one of the separate measurements instead of the table
            measure(args.data)
            return

    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.evaluate import EvalSettings, landmark_finder, score_reenactment
    from mefacial.video import read_clip

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    if args.cross_faces:
        cross_faces(args.data, engine, settings, landmarks)
        return
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
        drv_tracks = M.detect_mesh(driving, allow_missing=True)  # T x 478 x 2, every eye of every frame
        drv_mesh = M.eye_aperture(drv_tracks)
        for name, frames in outputs.items():
            count = min(len(frames), len(driving))
            gen_points = landmarks(frames[:count])
            row = {"clip": clip_path.stem, "method": name, "frames": f"{count}/{len(driving)}"}
            if np.isnan(gen_points).any():
                row["note"] = "no face on some output frames"
            else:
                error_ratio, carried, narrowed = cross_identity(gen_points, drv_points[:count], apex, settings)
                row.update(error_ratio=error_ratio, carried=carried, narrowing=narrowed,
                           background=background_change(frames[:count], gen_points[0]))
                gen_tracks = M.detect_mesh(frames[:count], allow_missing=True)
                if not np.isnan(gen_tracks).any():  # the same scores read by the face mesh (a second detector)
                    row["error_ratio_mesh"], row["carried_mesh"] = cross_identity_mesh(
                        gen_tracks, drv_tracks[:count], drv_points[:count], settings)
                if apex < count:
                    gen_mesh = M.eye_aperture(gen_tracks)
                    row["narrowing_mesh"] = narrowing_mesh(gen_mesh, apex) / narrowing_mesh(drv_mesh, apex)
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
    print()
    print(mesh_table(rows))


def cross_identity(generated: np.ndarray, driving: np.ndarray, apex: int, settings) -> tuple[float, float, float]:
    """dlib points of an output and its driving clip (T x 68 x 2) -> (error / still face's, share of the motion
    carried over, eye narrowing output / driving at `apex`; NaN when the output is shorter than that)."""
    from mefacial import metrics

    scored = metrics.score_motion_transfer(torch.from_numpy(generated).float(), torch.from_numpy(driving).float(),
                                           min_motion=settings.min_motion)
    narrowed = narrowing(generated, apex) / narrowing(driving, apex) if apex < len(generated) else float("nan")
    return scored.error / scored.static_error, scored.gain, narrowed


def cross_identity_mesh(generated: np.ndarray, driving: np.ndarray, driving68: np.ndarray, settings
                        ) -> tuple[float, float]:
    """`cross_identity`'s error / still face and share carried over, read by the face mesh instead of dlib: the
    468 points' motion from frame 0 in each face's own axes (`metrics.face_frame_motion`, the outer eye corners'
    axis; both tracks smoothed), on the frames dlib's score takes (`metrics.motion_frames` of the driving's 68
    points)."""
    from mefacial import mesh as M
    from mefacial.landmarks import smooth_tracks
    from mefacial.metrics import face_frame_motion, motion_frames

    mask = motion_frames(torch.from_numpy(driving68).float(), settings.min_motion).numpy()

    def motion(tracks: np.ndarray) -> np.ndarray:  # T x 478 x 2 -> scored frames x 468 x 2, in the face's axes
        points = torch.from_numpy(smooth_tracks(tracks).astype(np.float64)[:, :M.NUM_MESH])
        return face_frame_motion(points, points[0, 263] - points[0, 33]).numpy()[mask]

    gen, drv = motion(generated), motion(driving)
    static = np.linalg.norm(drv, axis=-1).mean()
    return float(np.linalg.norm(gen - drv, axis=-1).mean() / static), float((gen * drv).sum() / (drv ** 2).sum())


def cross_faces(data: Path, engine, settings, landmarks) -> None:
    """Each clip's onset frame as the target face, driven by every other clip: error / still face, carried,
    eye narrowing (dlib), for our generators."""
    from mefacial.video import read_clip

    clips = {path.stem: read_clip(path) for path in sorted((data / "driving").glob("*.gif"))}
    lines = ["| target face (onset frame of) | driving clip | method | cross-identity error / still face | "
             "motion carried over | eye narrowing output / driving |", "| --- | --- | --- | --: | --: | --: |"]
    for face_name, face_clip in clips.items():
        for clip_name, clip in clips.items():
            if clip_name == face_name:
                continue
            for variant in OURS:
                result = engine.animate(face_clip.frames[0], clip.frames, variant=variant,
                                        options=settings.animate_options())
                drv = landmarks(result.model_driving)
                scores = cross_identity(landmarks(result.frames), drv, int(np.argmin(eye_aperture68(drv))), settings)
                lines.append(f"| {face_name} | {clip_name} | {variant} | " + " | ".join(map(fmt, scores)) + " |")
                print(lines[-1], flush=True)
    print("\n".join(lines))


def driven_clips(data: Path, engine, settings, landmarks, variants=("dense", "warp")):
    """Each shared clip driving the shared face: (clip name, {variant: its AnimationResult}, the driving frames as
    cut for the model, their dlib points, the driving's eye apex: the frame of its smallest 68-point aperture)."""
    from mefacial.video import read_clip

    face = data / "faces" / "asian_female.png"
    for clip_path in sorted((data / "driving").glob("*.gif")):
        clip = read_clip(clip_path)
        results = {v: engine.animate(face, clip.frames, variant=v, options=settings.animate_options()) for v in variants}
        driving = results[variants[0]].model_driving
        drv68 = landmarks(driving)
        yield clip_path.stem, results, driving, drv68, int(np.argmin(eye_aperture68(drv68)))


def by_direction(data: Path) -> None:
    """Each clip driving the shared face (dense, warp): the share of the driving's AU-point motion carried over
    (`metrics.score_motion_transfer`'s gain) split into its horizontal (x) and vertical (y) parts, which add up to
    it (horizontal: along each face's eye axis), read by dlib and by the face mesh's 68 equivalents (`MESH_68`, tracks
    smoothed), on dlib's scored frames;
    the horizontal share of the driving's own motion; and the distance between the eyes' inner corners (dlib
    39-42, mesh 133-362) and outer corners (36-45, 33-263) at the driving's eye apex, over the onset's."""
    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.evaluate import EvalSettings, landmark_finder
    from mefacial.landmarks import smooth_tracks
    from mefacial.metrics import au_point_motion, motion_frames

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    corners = {"dlib": ((39, 42), (36, 45)), "mesh": ((133, 362), (33, 263))}

    def motion(points: np.ndarray, mask: torch.Tensor) -> torch.Tensor:  # T x 68 x 2 -> scored frames x 18 x 2
        return au_point_motion(torch.from_numpy(np.asarray(points, np.float64)))[mask]

    print("| clip | reader | driving's horizontal share | method | carried | horizontal part | vertical part | "
          "inner corners at apex | outer corners at apex |\n| --- | --- | --: | --- | --: | --: | --: | --: | --: |")
    for name, results, driving_frames, drv68, apex in driven_clips(data, engine, settings, landmarks):
        mask = motion_frames(torch.from_numpy(drv68).float(), settings.min_motion)
        for reader in ("dlib", "mesh"):
            def read(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (68 points, the reader's own)
                if reader == "dlib":
                    points = landmarks(frames)
                    return points, points
                tracks = smooth_tracks(M.detect_mesh(frames, allow_missing=True))
                return tracks[:, M.MESH_68], tracks

            def spans(own: np.ndarray) -> str:  # the corner distances at the apex over the onset's
                span = lambda a, b: np.linalg.norm(own[:, b] - own[:, a], axis=-1)  # noqa: E731
                return " | ".join(fmt(span(a, b)[apex] / span(a, b)[0]) for a, b in corners[reader])

            points, own = read(driving_frames)
            drv = motion(points, mask)
            total = drv.square().sum()
            horizontal = float(drv[..., 0].square().sum() / total)
            print(f"| {name} | {reader} | {fmt(horizontal)} | driving | | | | {spans(own)} |")
            for variant, result in results.items():
                points, own = read(result.frames)
                gen = motion(points, mask)
                parts = [float((gen[..., k] * drv[..., k]).sum() / total) for k in (0, 1)]
                print(f"| {name} | {reader} | | {variant} | {fmt(sum(parts))} | {fmt(parts[0])} | "
                      f"{fmt(parts[1])} | {spans(own)} |", flush=True)


CORNER_OFFSETS = (0.03, 0.06, 0.09)  # x the inter-ocular distance: where `corner_flow` reads the skin beyond a corner


def corner_flow(data: Path) -> None:
    """Each clip driving the shared face (dense, warp): how far apart the skin beside the eyes' outer corners and
    beside their inner corners moves between the onset and the driving's eye apex, read by dense optical flow
    (OpenCV's DIS, onset -> apex, the median over a window of 0.03 of the inter-ocular distance) at
    `CORNER_OFFSETS` beyond each corner along the eye line (away from the eye), in % of the inter-ocular
    distance (- = closer together), on the driving and on each output; beside it, the corners' own distance as
    the face mesh (33-263, 133-362) and dlib (36-45, 39-42) read it. No landmark detector reads the flow's
    points, so it says which reader's corners follow the skin where the two disagree."""
    import cv2

    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.evaluate import EvalSettings, landmark_finder

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    corners = {"mesh": ((33, 263), (133, 362)), "dlib": ((36, 45), (39, 42))}  # (outer pair, inner pair)

    def by_flow(frames: np.ndarray, apex: int) -> list[float]:  # outer at each offset, then inner
        onset = M.detect_mesh(frames[:1])[0].astype(np.float64)
        iod = M.inter_ocular(onset)
        axis = (onset[263] - onset[33]) / np.linalg.norm(onset[263] - onset[33])  # image-left to image-right
        grey = [cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY) for i in (0, apex)]
        field = flow.calc(grey[0], grey[1], None)  # H x W x 2: onset -> apex
        reach = max(1, round(0.015 * iod))

        def at(point: np.ndarray) -> np.ndarray:
            x, y = np.round(point).astype(int)
            return np.median(field[y - reach:y + reach + 1, x - reach:x + reach + 1].reshape(-1, 2), 0)

        out = []
        for left, right, outward in ((33, 263, 1.0), (133, 362, -1.0)):  # outer corners: beyond them is outward
            for offset in CORNER_OFFSETS:
                beyond = outward * offset * iod * axis
                moved = at(onset[right] + beyond) - at(onset[left] - beyond)
                out.append(100 * float(moved @ axis) / iod)
        return out

    print("| clip | frames | read by | outer: " + " | ".join(f"{o:.2f}" for o in CORNER_OFFSETS) + " | inner: "
          + " | ".join(f"{o:.2f}" for o in CORNER_OFFSETS) + " |\n| --- | --- | --- |" + " --: |" * 6)
    for clip_name, results, driving, drv68, apex in driven_clips(data, engine, settings, landmarks):
        for name, frames in (("driving", driving), *((v, r.frames) for v, r in results.items())):
            print(f"| {clip_name} | {name} | optical flow | "
                  + " | ".join(f"{v:+.1f}" for v in by_flow(frames, apex)) + " |", flush=True)
        tracks = M.detect_mesh(driving, allow_missing=True)
        iod = M.inter_ocular(tracks[0].astype(np.float64))
        for reader, points in (("mesh", tracks), ("dlib", drv68)):
            change = [100 * (np.linalg.norm(points[apex, b] - points[apex, a]) - np.linalg.norm(points[0, b] - points[0, a]))
                      / iod for a, b in corners[reader]]
            print(f"| {clip_name} | driving | {reader}'s corners | {change[0]:+.1f} | | | {change[1]:+.1f} | | |")


# AU specifications of the synthesised driving clips, strong (E) to mild (B, C: as micro-expressions mostly are)
SQUINTS = ("6:E,7:E", "6:C,7:C", "6:B,7:B", "7:E", "7:C", "43:C", "43:B")
READBACK_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # the eye apertures `lid_readback` asks for (1 = open)


# what `reader_gain` synthesises, with the dlib landmarks each AU moves most (the mesh and the flow are read at the
# same places: their `MESH_68` vertices)
GAIN_SPECS = (("1:C,2:C", tuple(range(17, 27))), ("1:E,2:E", tuple(range(17, 27))), ("4:E", (19, 20, 21, 22, 23, 24)),
              ("6:E", (40, 41, 46, 47)), ("9:E", (31, 32, 34, 35)), ("12:C", (48, 54)), ("12:E", (48, 54)),
              ("15:E", (48, 54)), ("43:E", (37, 38, 40, 41, 43, 44, 46, 47)))


def reader_gain(data: Path) -> None:
    """How much of a motion whose geometry is known each reader reads: an AU synthesised on a face
    (`Engine.synthesize`: the synthesis draws its meshes, so every vertex's motion is known) is read at the apex
    by dlib, by the face mesh (tracked, unsmoothed), by the mesh as `dense` tracks a driving clip (`by_flow`: lips,
    brows, nose, cheeks and eye corners' skin read by optical flow as well) and by dense optical flow (OpenCV's
    DIS, onset -> apex, sampled at the onset's points) at the landmarks the AU moves (`GAIN_SPECS`); the gain is
    the read motion projected on the known one (1 = all of it, 0 = none). A reader's gain below 1 on driving and output alike
    cancels in the share of motion carried over only where it is the same on both faces and on both kinds of
    frames."""
    import cv2

    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.evaluate import landmark_finder

    engine = Engine(device="cpu", landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    faces = two_faces(data)
    mesh_68 = np.asarray(M.MESH_68)
    print("| AUs | face | motion at its landmarks (% of the inter-ocular distance) | dlib | face mesh | "
          "`dense`'s tracking | optical flow |\n| --- | --- | --: | --: | --: | --: | --: |")
    for spec, points in GAIN_SPECS:
        for name, face in faces.items():
            synthesised = engine.synthesize(face, spec)
            frames, drawn = synthesised.frames, synthesised.meshes.astype(np.float64)[:, mesh_68[list(points)]]
            iod = M.inter_ocular(synthesised.meshes[0].astype(np.float64))
            apex = int(np.argmax(np.linalg.norm(drawn - drawn[:1], axis=-1).mean(1)))
            known = drawn[apex] - drawn[0]  # n x 2 pixels
            read_dlib = landmarks(frames[[0, apex]]).astype(np.float64)[:, list(points)]
            read_mesh = M.detect_mesh(frames).astype(np.float64)[[0, apex]][:, mesh_68[list(points)]]
            tracker = M.MeshTracker(hold_eyes=True, skip_still=True, by_flow=True)  # (as the engine's driving tracker)
            read_tracked = tracker.track(frames).astype(np.float64)[[0, apex]][:, mesh_68[list(points)]]
            grey = [cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY) for i in (0, apex)]
            field = flow.calc(grey[0], grey[1], None)  # H x W x 2: onset -> apex
            at = drawn[0].astype(np.float32)
            by_flow = cv2.remap(field, at[:, :1], at[:, 1:], cv2.INTER_LINEAR).reshape(-1, 2).astype(np.float64)
            gains = [float((known * moved).sum() / (known * known).sum())
                     for moved in (read_dlib[1] - read_dlib[0], read_mesh[1] - read_mesh[0],
                                   read_tracked[1] - read_tracked[0], by_flow)]
            size = 100 * float(np.linalg.norm(known, axis=-1).mean()) / iod
            print(f"| {spec} | {name} | {size:.1f} | " + " | ".join(fmt(g) for g in gains) + " |", flush=True)


def synthetic_presets(data: Path) -> None:
    """The share of motion carried over when the driving motion is known: each emotion preset (`au.PRESETS`)
    synthesised on one face (the shared one, the bundled astronaut) drives the other with `dense` and `warp`; dlib's
    68 points and the face mesh's (`MESH_68`) are read on driving and output, motion from the onset over each
    face's inter-ocular distance, on the frames where the synthesised motion is at least 30 % of its peak. The
    share carried (output motion projected on the driving's) is scored against the driving as the same reader
    reads it (what the cross-identity routine does) and against the motion the synthesis drew (known: its meshes'
    points at `MESH_68`); beside it, each reader's gain on the driving (its reading projected on the known motion)
    and its noise (the power of the rest, over the known motion's): where that noise is as large as the motion,
    a generator that moves the reader's own points carries the reader's noise over, and the reader counts it."""
    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.au import PRESETS
    from mefacial.evaluate import EvalSettings, landmark_finder
    from mefacial.metrics import eye_axis, face_frame_motion

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    faces = two_faces(data)
    mesh_68 = np.asarray(M.MESH_68)

    def motion(points: np.ndarray) -> np.ndarray:  # T x 68 x 2 -> motion from the onset in the face's own axes
        points = torch.from_numpy(points.astype(np.float64))
        return face_frame_motion(points, eye_axis(points[0])).numpy()

    def share(output: np.ndarray, driving: np.ndarray) -> float:
        return float((output * driving).sum() / (driving * driving).sum())

    readers = {"dlib": landmarks, "mesh": lambda frames: M.detect_mesh(frames)[:, mesh_68]}
    print("| preset | driving face | reader | reader's gain on the driving | its noise / motion | method | carried "
          "(against the reader's driving) | carried (against the known motion) |\n"
          "| --- | --- | --- | --: | --: | --- | --: | --: |")
    for preset, (spec, _) in PRESETS.items():
        for name, face in faces.items():
            synthesised = engine.synthesize(face, spec)
            known = motion(synthesised.meshes[:, mesh_68])
            size = np.linalg.norm(known, axis=-1).mean(1)
            moving = size >= 0.3 * size.max()
            known = known[moving]
            target = next(image for other, image in faces.items() if other != name)
            results = {variant: engine.animate(target, synthesised.frames, variant=variant,
                                               options=settings.animate_options()) for variant in ("dense", "warp")}
            for reader, read in readers.items():
                driving = motion(read(results["dense"].model_driving))[moving]
                gain = share(driving, known)
                noise = float(((driving - gain * known) ** 2).sum() / (known * known).sum())
                for variant, result in results.items():
                    output = motion(read(result.frames))[moving]
                    print(f"| {preset} | {name} | {reader} | {fmt(gain)} | {fmt(noise)} | {variant} | "
                          f"{fmt(share(output, driving))} | {fmt(share(output, known))} |", flush=True)


def lid_readback(data: Path) -> None:
    """The renderer's closed loop on the eyes: each face's lids drawn as `dense` draws an eye read at a share r of
    its aperture (`DenseMeshWarp.motion`'s `cover_lids` and `carry_lash_bands`; no appearance ratios), the upper
    lid alone closing, the lower alone rising, or both, then read back by the face mesh and by dlib (aperture /
    the unmoved face's). Where a reader gives back r, an eye narrowing it reads on a driving clip is read the
    same on the output."""
    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial import video
    from mefacial.config import load_config
    from mefacial.engine import to_tensor, to_uint8
    from mefacial.evaluate import landmark_finder
    from mefacial.models.dense import EYES, DenseMeshWarp, carry_lash_bands, cover_lids
    from mefacial.video import read_clip

    engine = Engine(device="cpu", landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    model = DenseMeshWarp(load_config("dense"))
    faces = two_faces(data)
    faces.update({path.stem: read_clip(path).frames[0] for path in sorted((data / "driving").glob("*.gif"))})
    shares = np.array(READBACK_SHARES)
    print("| face | lid | reader | " + " | ".join(f"r = {r:.1f}" for r in shares[1:]) + " |\n"
          "| --- | --- | --- |" + " --: |" * (len(shares) - 1))
    for name, image in faces.items():
        box = video.face_box(engine.find_face(image, "source", "dlib"), image.shape)
        face = video.crop_to_model(image[None], box, 256)[0]  # cut as `animate` cuts a source
        source = M.detect_mesh(face, role="source")[0].astype(np.float64)
        state = model.prepare(to_tensor(face, "cpu").float(), source)
        for lid, upper_share in (("upper", 1.0), ("lower", 0.0), ("both", 0.5)):
            target = np.repeat(source[None], len(shares), 0)  # T x V x 2: the margins moved to each share
            for upper, lower, _ in EYES:
                up, lo = list(upper[1:-1]), list(lower[1:-1])
                cut = (1 - shares)[:, None, None] * (source[lo] - source[up])  # T x 7 x 2
                target[:, up] += upper_share * cut
                target[:, lo] -= (1 - upper_share) * cut
            drawn = carry_lash_bands(source, cover_lids(source, target, model.lid_margin))
            frames = to_uint8(model.render(state, drawn)["prediction"])
            by_mesh = M.eye_aperture(np.stack([M.detect_mesh(frame, role="source")[0] for frame in frames]))
            by_dlib = eye_aperture68(landmarks(frames))
            for reader, apertures in (("mesh", by_mesh), ("dlib", by_dlib)):
                print(f"| {name} | {lid} | {reader} | " + " | ".join(fmt(v) for v in apertures[1:] / apertures[0]) + " |",
                      flush=True)


def drawn_opening(source: np.ndarray, meshes: np.ndarray) -> np.ndarray:
    """T: the area of each eye's opening as drawn (the polygon of its lid margins, T x 478 x 2 meshes) over the
    source mesh's (478 x 2), mean of both eyes: how much eye a frame shows, read from geometry, no detector."""
    from mefacial.models.dense import EYES, _eye_polygon

    def area(points: np.ndarray) -> np.ndarray:  # ... x n x 2 -> ... (shoelace)
        x, y = points[..., 0], points[..., 1]
        return 0.5 * np.abs((x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1))

    return np.mean([area(_eye_polygon(meshes, upper, lower)) / area(_eye_polygon(source, upper, lower))
                    for upper, lower, _ in EYES], 0)


def synthetic_squints(data: Path) -> None:
    """Eye narrowing at the driving's apex (dlib's smallest aperture), output / driving, read by dlib and by the
    face mesh, when a squint synthesised on one face (`SQUINTS`) drives the other with `dense`; beside it, with no
    reader, how much eye each shows at the apex of what the synthesis drew (`drawn_opening`): the driving's
    drawn meshes (the synthesis draws its lids where its AUs put them) against the output's (`dense`'s drawn
    meshes, from the engine's own tracking of the driving)."""
    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.engine import to_tensor
    from mefacial.evaluate import EvalSettings, landmark_finder
    from mefacial.variants import get_variant

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    model, _ = engine.model("dense")
    faces = two_faces(data)
    lines = ["| AUs | synthesised on (driving) | target face | dlib: output / driving | face mesh: output / driving "
             "| eye shown at the apex, drawn (no reader): driving -> output |", "| --- | --- | --- | --: | --: | --: |"]
    for spec in SQUINTS:
        for name, face in faces.items():
            synthesised = engine.synthesize(face, spec)
            driving = synthesised.frames
            drv68 = landmarks(driving)
            apex = int(np.argmin(eye_aperture68(drv68)))
            drv_mesh = M.eye_aperture(M.detect_mesh(driving, allow_missing=True))
            shown = drawn_opening(synthesised.meshes[0].astype(np.float64), synthesised.meshes.astype(np.float64))
            drawn_apex = int(np.argmin(shown))
            for other, target in faces.items():
                if other == name:
                    continue
                prepared = engine.prepare(target, driving, settings.animate_options())
                result = engine.collect(prepared, "dense")  # (as `animate`: its meshes stay on `prepared`)
                out_mesh = M.eye_aperture(M.detect_mesh(result.frames, allow_missing=True))
                by_dlib = narrowing(landmarks(result.frames), apex) / narrowing(landmarks(result.model_driving), apex)
                by_mesh = narrowing_mesh(out_mesh, apex) / narrowing_mesh(drv_mesh, apex)
                (source,), tracked = engine.find_landmarks(prepared, get_variant("dense"))  # the ones it was made from
                source, tracked = source.astype(np.float64), tracked.astype(np.float64)
                with torch.inference_mode():
                    state = model.prepare(to_tensor(prepared.source, "cpu").float(), source, tracked[0])
                    drawn = model.motion(state, tracked).drawn
                output_shown = drawn_opening(source, drawn)[drawn_apex]
                lines.append(f"| {spec} | {name} | {other} | {fmt(by_dlib)} | {fmt(by_mesh)} "
                             f"| {fmt(shown[drawn_apex])} -> {fmt(output_shown)} |")
                print(lines[-1], flush=True)
    print("\n".join(lines))


def transparency(data: Path) -> None:
    """Detector readings on rendered apex frames against the geometry they were rendered with (module docstring)."""
    from scipy.spatial import Delaunay

    from mefacial import Engine
    from mefacial import mesh as M
    from mefacial.config import load_config
    from mefacial.engine import to_tensor, to_uint8
    from mefacial.evaluate import landmark_finder
    from mefacial.models.dense import EYES, DenseMeshWarp, _barycentric_matrix, cover_lids
    from mefacial.variants import get_variant
    from mefacial.video import read_clip

    engine = Engine(device="cpu", landmarks="dlib")
    landmarks = landmark_finder("dlib", engine.device)
    model = DenseMeshWarp(load_config("dense"))
    lids = sorted({i for upper, lower, iris in EYES for i in (*upper, *lower, *iris)} |
                  {i for contour in M.EYE_CONTOUR_INDICES for i in contour})
    print("| clip | frame drawn | dlib: mean abs % IOD | dlib eyes' points across | mesh: mean abs % IOD | "
          "mesh forehead down |\n| --- | --- | --: | --: | --: | --: |")
    for clip_path in sorted((data / "driving").glob("*.gif")):
        clip = read_clip(clip_path)
        prepared = engine.prepare(data / "faces" / "asian_female.png", clip.frames, fps=clip.fps)
        meshes = engine.find_landmarks(prepared, get_variant("dense"))  # the engine's own, smoothed as it runs them
        source, driving = meshes[0][0].astype(np.float64), meshes[1].astype(np.float64)
        state = model.prepare(to_tensor(prepared.source, "cpu").float(), source, driving[0])
        apex = int(np.argmin(M.eye_aperture(driving)))
        target = model.retarget(state, driving[apex:apex + 1], 1.0)
        still_lids = target.copy()
        still_lids[0, lids] = source[lids] + (target[0, 168] - source[168])  # the lids only follow the nose root
        iod = float(M.inter_ocular(source)) / 100

        def draw(mesh: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return to_uint8(model.render(state, cover_lids(source, mesh, model.lid_margin))["prediction"])[0]

        unmoved = draw(source[None])
        base68 = landmarks(unmoved[None])[0].astype(np.float64)
        base_mesh = M.detect_mesh(unmoved)[0].astype(np.float64)
        at68 = _barycentric_matrix(Delaunay(source[:M.NUM_MESH]), base68)  # 68 x 468: dlib's points in the mesh
        for label, mesh in (("apex", target), ("apex, lids left open", still_lids)):
            frame = draw(mesh)
            asked68 = base68 + at68 @ (mesh[0] - source)[:M.NUM_MESH]
            read68 = (landmarks(frame[None])[0] - asked68) / iod
            read_mesh = ((M.detect_mesh(frame)[0] - base_mesh) - (mesh[0] - source))[:M.NUM_MESH] / iod
            print(f"| {clip_path.stem} (frame {apex}) | {label} | {np.abs(read68).mean():.2f} "
                  f"| {np.abs(read68[36:48, 0]).mean():.2f} | {np.abs(read_mesh).mean():.2f} | {read_mesh[10, 1]:.2f} |",
                  flush=True)


def two_faces(data: Path) -> dict[str, np.ndarray]:
    """The faces the synthesised measurements use: the shared target face and the bundled astronaut."""
    from mefacial.video import read_image

    return {"asian_female": read_image(data / "faces" / "asian_female.png"),
            "astronaut": read_image(Path(__file__).resolve().parents[1] / "examples" / "astronaut.png")}


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


def mesh_table(rows: list[dict]) -> str:
    """The cross-identity scores read by dlib and by the face mesh, side by side."""
    lines = ["| clip | method | error / still face (dlib) | (mesh) | carried over (dlib) | (mesh) | eye narrowing (dlib) "
             "| (mesh) |", "| --- | --- | --: | --: | --: | --: | --: | --: |"]
    for r in rows:
        if r["method"] in ("static", "MRAA", "MRAA_with_AWP", "FOMM_with_EWP"):
            continue
        lines.append(f"| {r['clip']} | {r['method']} | {fmt(r.get('error_ratio'))} | {fmt(r.get('error_ratio_mesh'))} "
                     f"| {fmt(r.get('carried'))} | {fmt(r.get('carried_mesh'))} | {fmt(r.get('narrowing'))} "
                     f"| {fmt(r.get('narrowing_mesh'))} |")
    return "\n".join(lines)


MAGNIFY_LEVELS = (1.0, 2.0, 3.0, 5.0)


def magnify_grid(data: Path, folder: Path) -> None:
    """One row per shared clip: its frame where `dense`'s faithful output changes most, then `dense` driving the
    bundled astronaut there at each of MAGNIFY_LEVELS."""
    import imageio.v3 as iio

    from mefacial import Engine
    from mefacial.video import read_clip, read_image

    engine = Engine(device="cpu")
    face = read_image(Path(__file__).resolve().parents[1] / "examples" / "astronaut.png")
    rows = []
    for clip_path in sorted((data / "driving").glob("*.gif")):
        clip = read_clip(clip_path).frames
        outputs = [engine.animate(face, clip, variant="dense", magnify=m) for m in MAGNIFY_LEVELS]
        frames = outputs[0].frames.astype(np.float32)
        apex = int(np.abs(frames - frames[:1]).mean((1, 2, 3)).argmax())
        tiles = resize(np.stack([outputs[0].model_driving[apex]] + [o.frames[apex] for o in outputs]), 176)
        rows.append(np.concatenate(list(tiles), axis=1))
        print(f"{clip_path.stem}: frame {apex}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    iio.imwrite(folder / "dense-magnify.jpg", np.concatenate(rows, axis=0), quality=85)
    print(f"{folder / 'dense-magnify.jpg'}: rows {[p.stem for p in sorted((data / 'driving').glob('*.gif'))]}; "
          f"columns: driving, magnify {', '.join(f'{m:g}' for m in MAGNIFY_LEVELS)}")


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

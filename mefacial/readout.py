"""AU-region motion readout: what moved in a clip, where and when, as numbers and as a plot.

    from mefacial import readout
    motion = readout.region_motion(meshes, fps)       # T x V x 2 face mesh (or T x 68 x 2 landmarks) per frame
    png = readout.plot(motion, "out.png")            # one curve per region, % of the inter-ocular distance

Each frame's points are first aligned to frame 0 by a similarity transform fitted on points that facial
actions barely move (the upper face oval and the nose bridge; on 68 landmarks the upper jaw line and the nose
bridge), so head motion does not read as expression; then each region's motion is the mean distance of its
points from where they were at frame 0, in % of the inter-ocular distance, and its vertical part (up > 0,
in the face's frame). Regions are those of `mefacial.au.REGIONS` (brows inner / outer, upper / lower lids,
cheeks, nose, upper lip, lip corners, lower lip, chin). Used by the app (next to every video) and by
`python -m mefacial readout`; the micro-expression table of the README comes from the same function
(`benchmarks/micro_motion.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import au
from .errors import InputError
from .mesh import STABLE_MESH, fit_similarity

STABLE_68 = (0, 1, 2, 14, 15, 16, 27, 28, 29, 30)
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
COLOURS = {  # one colour per region, the upper face cool, the lower face warm
    "brow_inner": (31, 119, 180), "brow_outer": (23, 190, 207), "upper_lid": (44, 160, 44), "lower_lid": (148, 103, 189),
    "cheek": (140, 86, 75), "nose": (127, 127, 127), "upper_lip": (255, 127, 14), "lip_corner": (214, 39, 40),
    "lower_lip": (227, 119, 194), "chin": (188, 189, 34),
}


@dataclasses.dataclass
class RegionMotion:
    """Per-region motion of a clip: `magnitude` and `vertical` T x R in % of the IOD (vertical: up > 0)."""

    regions: list[str]
    magnitude: np.ndarray  # T x R
    vertical: np.ndarray  # T x R
    fps: float

    @property
    def times_ms(self) -> np.ndarray:
        return 1000.0 * np.arange(len(self.magnitude)) / self.fps

    def apex(self) -> tuple[int, dict[str, float]]:
        """The frame where the total motion peaks, and each region's motion there (% IOD)."""
        frame = int(np.argmax(self.magnitude.sum(1)))
        return frame, {r: float(self.magnitude[frame, k]) for k, r in enumerate(self.regions)}

    def peaks(self) -> dict[str, float]:
        """Each region's largest motion over the clip (% IOD)."""
        return {r: float(self.magnitude[:, k].max()) for k, r in enumerate(self.regions)}


def align(points: np.ndarray) -> np.ndarray:
    """T x P x 2 tracks with every frame mapped onto frame 0 by the similarity of their stable points."""
    points = np.asarray(points, np.float64)
    stable = list(STABLE_68 if points.shape[1] == 68 else STABLE_MESH)
    out = np.empty_like(points)
    for t, frame in enumerate(points):
        scale, rotation, shift = fit_similarity(frame[stable], points[0, stable])
        out[t] = scale * frame @ rotation.T + shift
    return out


def _iod_and_axes(first: np.ndarray) -> tuple[float, np.ndarray]:
    if len(first) == 68:
        right, left = first[36:42].mean(0), first[42:48].mean(0)
        axis = left - right
        iod = float(np.linalg.norm(axis))
        x = axis / iod
        y = np.array([-x[1], x[0]])
        if np.dot(first[[48, 54]].mean(0) - (left + right) / 2, y) < 0:
            y = -y
        return iod, np.stack([x, y])
    frame = au.FaceFrame.of(first)
    return frame.iod, frame.axes


def region_motion(points: np.ndarray, fps: float, *, stabilise: bool = True) -> RegionMotion:
    """The per-region motion of tracks T x V x 2 (a face mesh, V >= 468, or 68 landmarks), relative to frame 0."""
    points = np.asarray(points, np.float64)
    if points.ndim != 3 or points.shape[-1] != 2 or len(points) == 0:
        raise InputError(f"readout needs T x V x 2 tracks, got shape {points.shape}")
    if points.shape[1] != 68 and points.shape[1] < au.NUM_MESH:
        raise InputError(f"readout needs a face mesh (>= {au.NUM_MESH} points) or 68 landmarks, got {points.shape[1]}")
    if not np.isfinite(points).all():
        raise InputError("readout: some frames have no face (NaN points); trim them or detect with another backend")
    if fps <= 0:
        raise InputError(f"readout: fps must be positive, got {fps}")
    tracks = align(points) if stabilise else points
    iod, axes = _iod_and_axes(tracks[0])
    motion = (tracks - tracks[:1]) @ axes.T / iod * 100.0  # T x V x 2, face frame, % IOD
    regions = au.region_indices(tracks[0])
    names = [r for r in regions if len(regions[r])]
    magnitude = np.stack([np.linalg.norm(motion[:, regions[r]], axis=-1).mean(1) for r in names], 1)
    vertical = np.stack([-motion[:, regions[r], 1].mean(1) for r in names], 1)
    return RegionMotion(names, magnitude, vertical, float(fps))


def clip_motion(frames: np.ndarray, fps: float) -> RegionMotion:
    """The region motion of a clip's frames (T x H x W x 3 uint8): the dense face mesh found on every frame
    (`mefacial.mesh`, tracked in the first frame's box), then `region_motion`."""
    from .mesh import detect_mesh

    return region_motion(detect_mesh(np.asarray(frames), role="driving"), fps)


def write_readouts(out_dir: str | Path, name: str, clips: dict[str, np.ndarray], fps: float) -> dict[str, str]:
    """Plot each of several clips of one scene (label -> T x H x W x 3 frames) to out_dir/<name>/<label>.png, on a
    common scale; returns label -> path (or the error's first line where a clip has no face)."""
    from .errors import MefacialError

    motions, written = {}, {}
    for label, frames in clips.items():
        try:
            motions[label] = clip_motion(frames, fps)
        except MefacialError as exc:
            written[label] = f"error: {str(exc).splitlines()[0]}"
    top = max((float(m.magnitude.max()) for m in motions.values()), default=0.0)
    for label, motion in motions.items():
        path = Path(out_dir) / name / f"{label}.png"
        plot(motion, path, title=f"{name} - {label}: AU-region motion (% IOD)", v_max=1.1 * max(top, 0.5))
        written[label] = str(path)
    return written


def plot(motion: RegionMotion, path: str | Path | None = None, *, title: str = "", size: tuple[int, int] = (640, 360),
         marks: dict[str, float] | None = None, v_max: float | None = None, unit: str = "%") -> np.ndarray:
    """A line plot of each region's motion over time (ms) -> H x W x 3 uint8 (and a PNG at `path`).

    Drawn with Pillow (no plotting library needed). `marks` adds labelled vertical lines (e.g. the
    specification's apex start / end, in ms); `v_max` fixes the vertical scale (% IOD) so plots compare."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 52, 130, 24 if title else 10, 34
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    times = motion.times_ms
    t_max = max(float(times[-1]), 1e-6)
    if v_max is None:
        v_max = _nice(max(1.1 * (float(motion.magnitude.max()) if motion.magnitude.size else 0.0), 0.5))
    else:
        v_max = _nice(max(v_max, 1e-3))

    def px(t: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * t / t_max, y1 - (y1 - y0) * v / v_max

    for k in range(6):  # horizontal grid and y labels (v_max is 1, 2, 2.5 or 5 x 10^k: fifths are round)
        v = v_max * k / 5
        _, y = px(0, v)
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{v:.3g}{unit}", fill=(60, 60, 60), font=font)
    step = _nice(t_max / 5)  # x labels at round times (0, 50, 100 ms ...), at most six
    for t in np.arange(0, t_max + 1e-6, step):
        x, _ = px(float(t), 0)
        draw.line([(x, y1), (x, y1 + 4)], fill=(60, 60, 60))
        draw.text((x - 12, y1 + 6), f"{t:.3g}", fill=(60, 60, 60), font=font)
    draw.text(((x0 + x1) / 2 - 20, height - 14), "time (ms)", fill=(60, 60, 60), font=font)
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    for label, t in (marks or {}).items():
        x, _ = px(t, 0)
        draw.line([(x, y0), (x, y1)], fill=(200, 200, 200), width=1)
        draw.text((x + 2, y0 + 2), label, fill=(120, 120, 120), font=font)
    for k, region in enumerate(motion.regions):
        colour = COLOURS.get(region, PALETTE[k % len(PALETTE)])
        line = [px(float(t), float(v)) for t, v in zip(times, motion.magnitude[:, k])]
        # a curve that a later one covers (two AUs at the same intensity) is drawn wider, so its edges show
        covered = any(np.abs(motion.magnitude[:, k] - motion.magnitude[:, j]).max() < 0.005 * v_max
                      for j in range(k + 1, len(motion.regions)))
        if len(line) > 1:
            draw.line(line, fill=colour, width=6 if covered else 2)
        ly = y0 + 4 + 14 * k
        draw.line([(x1 + 8, ly + 6), (x1 + 24, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 28, ly), region.replace("_", "-"), fill=(30, 30, 30), font=font)  # (the bitmap font's
        # space is a pixel wide: "lip corner" read "lipcorner")
    if title:
        draw.text((x0, 6), title, fill=(0, 0, 0), font=font)
    array = np.asarray(image)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return array


def plot_plan(plan, path: str | Path | None = None) -> np.ndarray:
    """The timing of a synthesis plan (`mefacial.au.plan`) before rendering: each AU's activation over time, in % of
    its maximum (E = 100), with the apex marked -> H x W x 3 uint8 (and a PNG at `path`)."""
    from . import au as au_lib

    curves = RegionMotion([s.notation for s in plan.specs], 100.0 * plan.activations.T, 100.0 * plan.activations.T,
                          plan.fps)
    first = min(a for a, _ in plan.apex_frames)
    last = max(b for _, b in plan.apex_frames)
    return plot(curves, path, title=f"Timing of {au_lib.describe(plan.specs)} ({plan.num_frames} frames at "
                f"{plan.fps:g} fps): each AU's activation, % of its maximum", v_max=100.0,
                marks={"apex": 1000 * first / plan.fps, "apex end": 1000 * last / plan.fps})


def _nice(value: float) -> float:
    """The next 'round' axis limit at or above value (1, 2, 2.5, 5 x 10^k)."""
    exponent = np.floor(np.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * 10 ** exponent >= value:
            return float(step * 10 ** exponent)
    return float(10 ** (exponent + 1))


def table(motion: RegionMotion) -> str:
    """A Markdown row set: region, peak motion and frame (% IOD), its vertical direction at the peak."""
    lines = ["| region | peak % IOD | at ms | vertical at peak |", "|---|--:|--:|---|"]
    for k, region in enumerate(motion.regions):
        frame = int(np.argmax(motion.magnitude[:, k]))
        vertical = motion.vertical[frame, k]
        lines.append(f"| {region.replace('_', ' ')} | {motion.magnitude[frame, k]:.2f} | {motion.times_ms[frame]:.0f} | "
                     f"{'up' if vertical > 0 else 'down'} {abs(vertical):.2f} |")
    return "\n".join(lines)

"""Evaluation of variants on real clips, and comparison figures for papers.

    python -m mefacial evaluate --clips DIR --variants warp,fomm-awp --out DIR [--faces DIR]
    python -m mefacial compare --source S --driving D --variants warp,fomm-awp --out grid.mp4 --strip strip.png

Evaluation (`evaluate`) drives the engine and hands the frames and landmarks to
`mefacial.metrics`, where all metric arithmetic lives:

- self-reenactment: each clip's first frame is animated by the clip itself, so
  the real frames are the ground truth (`metrics.score_self_reenactment`: L1,
  PSNR, SSIM and landmark-motion error over the frames with motion, next to the
  static baseline, the first frame repeated);
- cross-identity motion transfer (with `faces`): each face is animated by each
  clip and the AU-point motion of the output (landmarks re-detected on it) is
  compared with the driving clip's, both in their own face's axes (turned with its
  eye axis, divided by its inter-ocular distance: `metrics.score_motion_transfer`),
  next to the static baseline;
- LPIPS and FID when their packages and weights are already on this machine
  (never downloaded; skipped with a note otherwise).

Scores are written as JSON (per clip and averaged per variant) and as a
Markdown table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, MefacialError
from .grid import BACKGROUND, HEADER, TEXT, TILE, Column, text_tile
from .options import AnimateOptions
from .utils import first_line  # noqa: F401 - used by the CLI and the app


NO_WEIGHTS = "no weights: see checkpoints/README.md"
STRIP_FRAMES = 5  # frames in an image strip, onset to apex, unless chosen


# ---- comparison figures ---------------------------------------------------------------------------


def variant_label(variant: str) -> str:
    """A grid header for the variant: its label from the registry (the one shown everywhere)."""
    from .variants import get_variant

    return get_variant(variant).label


@dataclasses.dataclass
class Comparison:
    """The columns of a comparison grid (driving first) and what each variant gave."""

    columns: list[Column]
    fps: float
    outcomes: dict[str, Any]  # variant -> AnimationResult or the error that stopped it


def compare_columns(engine: Any, source: Any, driving: Any, variants: Sequence[str],
                    options: AnimateOptions | None = None, *, progress: Any = None, **changes: Any) -> Comparison:
    """Animate `source` by `driving` with each variant (the inputs prepared once, `Engine.compare`): a labelled
    column per variant, the driving clip first.

    A variant that cannot run (no weights, ...) gets a placeholder column with the
    reason; when none runs and the inputs are the problem (no face, unreadable
    clip), that error is raised.
    """
    from .errors import WeightsNotFoundError
    from .options import as_options, magnified
    from .video import read_clip

    options = as_options(options, **changes)
    outcomes = engine.compare(source, driving, list(variants), options, progress=progress)
    done = [r for r in outcomes.values() if not isinstance(r, MefacialError)]
    errors = [r for r in outcomes.values() if isinstance(r, MefacialError)]
    if not done and any(not isinstance(e, WeightsNotFoundError) for e in errors):
        raise next(e for e in errors if not isinstance(e, WeightsNotFoundError))
    clip = None if done else read_clip(driving, fps=options.fps, limits=engine.limits)
    columns = [Column("driving", done[0].model_driving if done else clip.frames)]
    for variant in variants:
        outcome = outcomes[variant]
        if isinstance(outcome, MefacialError):
            reason = NO_WEIGHTS if isinstance(outcome, WeightsNotFoundError) else first_line(outcome)[:160]
            columns.append(Column(variant_label(variant), reason=reason))
        else:  # (a magnified column says so: it is not the driving's own motion)
            label = ", ".join(filter(None, (variant_label(variant), magnified(options.magnify))))
            columns.append(Column(label, outcome.frames))
    return Comparison(columns, done[0].fps if done else clip.fps, outcomes)


COMPARE_TIMES = ("times: each variant's wall time and its generator's alone; the first variant that needs the clip's "
                 "landmarks or face mesh finds them, and those after it reuse them")


def compare_time(result: Any) -> str:
    """A compared variant's time (`COMPARE_TIMES` says what it holds): '1.22 s (generator 0.35 s)'."""
    return f"{result.timings.get('total_s', 0):.2f} s (generator {result.timings.get('generator_s', 0):.2f} s)"


def apex_frame(frames: np.ndarray) -> int:
    """The frame that differs most from the first (mean absolute difference): T x H x W x 3 -> index."""
    clip = frames.astype(np.float32)
    return int(np.abs(clip - clip[:1]).mean(axis=(1, 2, 3)).argmax())


def strip_indices(frames: np.ndarray, count: int = STRIP_FRAMES) -> list[int]:
    """`count` frames evenly spaced from the onset (0) to the apex of the clip (distinct, in order)."""
    apex = max(apex_frame(frames), min(count, len(frames)) - 1)
    return sorted({int(round(i)) for i in np.linspace(0, apex, count)})


def frame_strip(grid: np.ndarray, indices: Sequence[int], tile: int = TILE) -> np.ndarray:
    """An image for papers from a grid video: its header, then one row of tiles per chosen frame, each
    labelled with the frame number at the left. grid: T x H x W x 3 -> H' x W' x 3 uint8."""
    num_frames = grid.shape[0]
    bad = [i for i in indices if not 0 <= i < num_frames]
    if bad or not indices:
        raise InputError(f"strip frames {list(bad) or 'none'}: choose frames among the clip's {num_frames} "
                         f"(0..{num_frames - 1})")
    label_width = tile // 3
    rows = [np.concatenate([np.full((HEADER, label_width, 3), BACKGROUND, np.uint8), grid[0, :HEADER]], axis=1)]
    for i in indices:
        label = text_tile(f"#{i}", label_width, grid.shape[1] - HEADER, background=BACKGROUND, color=TEXT, font_size=14)
        rows.append(np.concatenate([label, grid[i, HEADER:]], axis=1))
    return np.concatenate(rows, axis=0)


# ---- evaluation -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings(AnimateOptions):
    """How clips are animated (the AnimateOptions) and measured (recorded in the report)."""

    max_frames: int | None = None  # first frames of each clip only
    min_motion: float = 0.01  # frames scored: landmark motion above this fraction of the inter-ocular distance

    def animate_options(self) -> AnimateOptions:
        """The animation options alone (what Engine.prepare / run take)."""
        return AnimateOptions(**{name: getattr(self, name) for name in AnimateOptions.names()})


def landmark_finder(backend: str, device: Any) -> Callable[[np.ndarray], np.ndarray]:
    """frames (T x H x W x 3 uint8) -> T x 68 x 2 float32 pixels, NaN where no face is found, with one detector."""
    from .landmarks import get_detector

    detector = get_detector(backend, device)
    finder = lambda frames: detector.detect(frames, allow_missing=True).points  # noqa: E731
    finder.name = detector.name
    return finder


def _tensor(frames: np.ndarray):
    from .engine import to_tensor
    import torch

    return to_tensor(frames, torch.device("cpu"))  # T x 3 x H x W in [0, 1]


def _track(points: np.ndarray):
    """T x 68 x 2 with every frame found -> float tensor; None when a frame has no face."""
    import torch

    return None if np.isnan(points).any() else torch.from_numpy(points).float()


def self_reenactment(engine: Any, frames: np.ndarray, variant: str, landmarks: Callable[[np.ndarray], np.ndarray],
                     settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Animate the clip's first frame by the clip (T x H x W x 3) and score it against the real frames."""
    result = engine.animate(frames[0], frames, variant=variant, options=settings.animate_options())
    return score_reenactment(result, landmarks, settings)


def score_reenactment(result: Any, landmarks: Callable[[np.ndarray], np.ndarray],
                      settings: EvalSettings = EvalSettings(), real_landmarks: np.ndarray | None = None) -> dict[str, Any]:
    """Scores of a self-reenactment (an AnimationResult of a clip's first frame driven by the clip).

    Real and generated frames are compared at the model size (the real ones as the
    model saw them: cropped and resized like the source); landmarks are detected on
    both with the same detector (`landmarks`; `real_landmarks` when those of the real frames are known
    already). Returns `metrics.SelfReenactment.as_dict()` and `beats_static`.
    """
    from . import metrics

    real, generated = result.model_driving, result.frames  # T x S x S x 3 each
    real_points = _track(landmarks(real) if real_landmarks is None else real_landmarks)
    if real_points is None:
        raise InputError("the landmark detector misses the face in some real frames: no motion reference")
    generated_points = _track(landmarks(generated))
    scored = metrics.score_self_reenactment(_tensor(generated), _tensor(real), real_points, generated_points,
                                            min_motion=settings.min_motion)
    scores = {**scored.as_dict(), "beats_static": scored.beats_static, "seconds": result.timings.get("total_s")}
    if generated_points is None:
        scores["note"] = "no face found in some generated frames: no landmark score"
    return scores


def motion_transfer(engine: Any, face: Any, frames: np.ndarray, variant: str, landmarks: Callable[[np.ndarray], np.ndarray],
                    settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Animate another face by the clip and compare the AU-point motion of the output with the clip's
    (`metrics.score_motion_transfer`: displacements in each face's own axes, over its inter-ocular distance)."""
    result = engine.animate(face, frames, variant=variant, options=settings.animate_options())
    return score_transfer(result, landmarks, settings)


def score_transfer(result: Any, landmarks: Callable[[np.ndarray], np.ndarray], settings: EvalSettings = EvalSettings(),
                   driving_landmarks: np.ndarray | None = None) -> dict[str, Any]:
    """Scores of a cross-identity motion transfer (an AnimationResult of another face driven by a clip)."""
    from . import metrics

    driving_points = _track(landmarks(result.model_driving) if driving_landmarks is None else driving_landmarks)
    generated_points = _track(landmarks(result.frames))
    if driving_points is None or generated_points is None:
        raise InputError("the landmark detector misses the face in some "
                         f"{'driving' if driving_points is None else 'generated'} frames: no motion score")
    return metrics.score_motion_transfer(generated_points, driving_points, min_motion=settings.min_motion).as_dict()


def _mean(rows: list[dict]) -> dict[str, Any]:
    """Nested fields over rows: floats averaged (clips count equally; None where a row lacks the value),
    counts summed, booleans counted."""
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = _mean([r[key] for r in rows])
        elif isinstance(value, bool):
            out[key] = sum(bool(r[key]) for r in rows)  # how many clips
        elif isinstance(value, int):
            out[key] = sum(r[key] for r in rows)  # frame counts add up
        elif isinstance(value, float) or value is None:
            values = [r.get(key) for r in rows]
            out[key] = None if any(v is None for v in values) else float(np.mean(values))
    return out


# ---- optional learned metrics (LPIPS, FID): only with packages and weights already here ----------


def _hub_file(pattern: str) -> Path | None:
    """A weights file in the torch hub cache (where torchvision / pytorch-fid keep them), or None."""
    import torch

    found = sorted((Path(torch.hub.get_dir()) / "checkpoints").glob(pattern))
    return found[0] if found else None


def optional_metrics(wanted: Sequence[str] = ("lpips", "fid")) -> tuple[dict[str, type], list[str]]:
    """The learned metrics that can run offline here ({name: scorer class}), and a note for each that cannot."""
    import importlib.util

    import torch

    available, notes = {}, []
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in wanted:
        scorer = LEARNED[name]
        if importlib.util.find_spec(scorer.package) is None:
            notes.append(f"{scorer.title} skipped: the package `{scorer.package}` is not installed")
        elif _hub_file(scorer.weights) is None:
            notes.append(f"{scorer.title} skipped: its weights ({scorer.weights}) are not in {cache}; "
                         "nothing is downloaded")
        else:
            available[name] = scorer
    return available, notes


class LPIPSScore:
    """Mean LPIPS (AlexNet) between generated and real frames, per clip, then over clips."""

    package, weights, title = "lpips", "alexnet-owt-*.pth", "LPIPS (AlexNet)"

    def __init__(self):
        import lpips  # the AlexNet weights are in the cache (checked), so nothing is downloaded

        self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        self.values: list[float] = []

    def add(self, generated, real) -> float:
        """generated, real: T x 3 x H x W in [0, 1] -> the clip's mean LPIPS."""
        import torch

        with torch.inference_mode():
            self.values.append(float(self.model(generated * 2 - 1, real * 2 - 1).mean()))
        return self.values[-1]

    def result(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None


class FIDScore:
    """FID (Inception v3 pool features) between all generated and all real frames of a variant."""

    package, weights, title = "pytorch_fid", "pt_inception-2015-12-05-*.pth", "FID (Inception v3)"

    def __init__(self):
        from pytorch_fid.inception import InceptionV3

        self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        self.features: dict[str, list[np.ndarray]] = {"generated": [], "real": []}

    def _features(self, frames) -> np.ndarray:
        import torch

        with torch.inference_mode():  # N x 2048
            return torch.cat([self.model(frames[i:i + 32])[0].flatten(1) for i in range(0, len(frames), 32)]).numpy()

    def add(self, generated, real) -> None:
        self.features["generated"].append(self._features(generated))
        self.features["real"].append(self._features(real))

    def result(self) -> float | None:
        from pytorch_fid.fid_score import calculate_frechet_distance

        if not self.features["real"]:
            return None
        a, b = (np.concatenate(self.features[k]) for k in ("generated", "real"))
        return float(calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


LEARNED = {"lpips": LPIPSScore, "fid": FIDScore}


# ---- the driver -----------------------------------------------------------------------------------


def evaluate(engine: Any, clips: Sequence[str | Path], variants: Sequence[str], faces: Sequence[str | Path] = (),
             settings: EvalSettings = EvalSettings(), learned: Sequence[str] = ("lpips", "fid"),
             readout_dir: str | Path | None = None) -> dict[str, Any]:
    """Self-reenactment scores on every clip and, with `faces`, motion-transfer scores on every face x clip,
    per variant; a clip or pair that fails is reported with its error. Each clip (and face x clip) is prepared
    once (`Engine.prepare`: crops and landmarks) and every variant runs on it. Returns the report (JSON-ready)."""
    from .variants import get_variant
    from .video import read_clip

    variants = [get_variant(v).id for v in variants]
    options = settings.animate_options()
    scorers, notes = optional_metrics(learned)
    landmarks = landmark_finder(settings.landmarks or engine.landmarks, engine.device)
    names = {str(c): n for c, n in _names(clips).items()}
    face_names = {str(f): n for f, n in _names(faces).items()}
    report: dict[str, Any] = {"settings": dataclasses.asdict(settings), "landmarks": landmarks.name,
                              "clips": sorted(names.values()), "faces": sorted(face_names.values()),
                              "variants": {}, "notes": notes}
    frames = {}
    for clip in clips:
        try:
            loaded = read_clip(clip, limits=engine.limits).frames
            frames[str(clip)] = loaded[:settings.max_frames] if settings.max_frames else loaded
        except MefacialError as exc:
            report.setdefault("errors", {})[names[str(clip)]] = first_line(exc)
    entries = {v: {"self_reenactment": {"clips": {}}, "errors": {}} for v in variants}
    learned_scores = {v: {name: make() for name, make in scorers.items()} for v in variants}
    pairs: dict[str, dict[str, Any]] = {v: {} for v in variants}

    def each_variant(source: Any, clip_frames: np.ndarray, name: str, score: Callable[..., Any]) -> dict[str, Any]:
        """Prepare the inputs once (per model size), run every variant on them, score each; errors per variant.
        Returns the variants' results."""
        prepared: dict[int, Any] = {}
        real_points: dict[int, np.ndarray] = {}
        results: dict[str, Any] = {}
        for variant in variants:
            try:
                size = engine.model(variant)[0].config.image_size
                if size not in prepared:
                    try:
                        prepared[size] = engine.prepare(source, clip_frames, options, size=size)
                        real_points[size] = landmarks(prepared[size].driving)  # the real frames' landmarks, once
                    except Exception as exc:  # noqa: BLE001 - reported for every variant of this size
                        prepared[size] = exc
                if isinstance(prepared[size], Exception):
                    raise prepared[size]
                result = results[variant] = engine.collect(prepared[size], variant, options)
                score(variant, name, result, real_points[size])
            except Exception as exc:  # noqa: BLE001 - one failing clip is reported, the evaluation goes on
                entries[variant]["errors"][name] = f"{type(exc).__name__}: {first_line(exc)}"
        return results

    def reenactment(variant: str, name: str, result: Any, real: np.ndarray) -> None:
        scores = score_reenactment(result, landmarks, settings, real_landmarks=real)
        for metric, scorer in learned_scores[variant].items():
            value = scorer.add(_tensor(result.frames), _tensor(result.model_driving))
            if value is not None:
                scores[metric] = value
        entries[variant]["self_reenactment"]["clips"][name] = scores

    def transfer(variant: str, name: str, result: Any, driving: np.ndarray) -> None:
        pairs[variant][name] = score_transfer(result, landmarks, settings, driving_landmarks=driving)

    for clip, clip_frames in frames.items():
        results = each_variant(clip_frames[0], clip_frames, names[clip], reenactment)
        if readout_dir is not None and results:
            from .readout import write_readouts

            first = next(iter(results.values()))
            report.setdefault("readout", {})[names[clip]] = write_readouts(
                readout_dir, names[clip], {"real": first.model_driving, **{v: r.frames for v, r in results.items()}},
                first.fps)
    for clip, clip_frames in frames.items():
        for face in faces:
            each_variant(face, clip_frames, f"{names[clip]}-{face_names[str(face)]}", transfer)
    for variant, entry in entries.items():
        entry["self_reenactment"]["mean"] = _mean(list(entry["self_reenactment"]["clips"].values()))
        for metric, scorer in learned_scores[variant].items():
            entry[metric] = scorer.result()
        if faces:
            entry["motion_transfer"] = {"pairs": pairs[variant], "mean": _mean(list(pairs[variant].values()))}
        report["variants"][variant] = entry
    return report


def _names(paths: Sequence[str | Path]) -> dict[str, str]:
    from .generate import unique_names

    return unique_names(map(str, paths))


# ---- the report -----------------------------------------------------------------------------------

REPORT_JSON = "scores.json"
REPORT_MD = "scores.md"


def _fmt(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: self-reenactment, then motion transfer, then notes and errors."""
    learned = [m for m in ("lpips", "fid") if any(v.get(m) is not None for v in report["variants"].values())]
    clips = len(report["clips"])
    lines = [f"Self-reenactment on {clips} clip{'s' * (clips != 1)} (each clip's first frame animated by the clip; "
             "mean over clips of the frames with motion; generated (static first frame)):", "",
             "| variant | clips | PSNR dB ↑ | SSIM ↑ | L1 ↓ | landmark motion error px ↓ | beats static |"
             + "".join(f" {m.upper()} ↓ |" for m in learned),
             "|---|---|---|---|---|---|---|" + "---|" * len(learned)]
    for variant, entry in report["variants"].items():
        sr = entry["self_reenactment"]
        mean, count = sr["mean"], len(sr["clips"])
        if not count:
            lines.append(f"| `{variant}` | 0 | – | – | – | – | – |" + " – |" * len(learned))
            continue
        cell = lambda key, digits: (f"{_fmt(mean['generated'][key], digits)} "  # noqa: E731
                                    f"({_fmt(mean['static'][key], digits)})")
        lines.append(f"| `{variant}` | {count} | {cell('psnr', 2)} | {cell('ssim', 4)} | {cell('l1', 4)} | "
                     f"{cell('landmark_error', 3)} | {mean['beats_static']}/{count} |"
                     + "".join(f" {_fmt(entry.get(m), 3)} |" for m in learned))
    if any("motion_transfer" in e for e in report["variants"].values()):
        faces = len(report["faces"])
        lines += ["", f"Cross-identity motion transfer on {faces} face{'s' * (faces != 1)} x {clips} "
                  f"clip{'s' * (clips != 1)} "
                  "(AU-point motion of the output against the driving clip's, in each face's own axes, in % of its "
                  "inter-ocular distance):", "",
                  "| variant | pairs | AU motion error ↓ | static | motion carried over (1 = all) | beats static |",
                  "|---|---|---|---|---|---|"]
        for variant, entry in report["variants"].items():
            mt = entry.get("motion_transfer", {"pairs": {}, "mean": {}})
            mean, count = mt["mean"], len(mt["pairs"])
            lines.append(f"| `{variant}` | {count} | {_fmt(mean.get('error'), 2, 100)} | "
                         f"{_fmt(mean.get('static_error'), 2, 100)} | {_fmt(mean.get('gain'), 2)} | "
                         f"{mean.get('beats_static', 0)}/{count} |")
    notes = list(report.get("notes", []))
    notes += [f"{variant}: {name}: {error}" for variant, entry in report["variants"].items()
              for name, error in entry["errors"].items()]
    notes += [f"clip {name}: {error}" for name, error in report.get("errors", {}).items()]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    """JSON has no inf / nan: they become the strings "inf", "-inf", "nan" (a PSNR of identical frames is inf)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write DIR/scores.json and DIR/scores.md; return their paths."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(_finite(report), indent=2) + "\n")
    (out_dir / REPORT_MD).write_text(markdown(report))
    return out_dir / REPORT_JSON, out_dir / REPORT_MD

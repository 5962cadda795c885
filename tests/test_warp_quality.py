"""Quality of the training-free `warp` variant on real micro-expression clips (self-reenactment).

Each shared driving clip's first frame is animated by the clip itself through the
engine, exactly as `python -m mefacial evaluate --variants warp` does (face crop
from the onset frame, resized to the model size of 256 px; dlib landmarks, smoothed
over time), and compared with the real frames (`mefacial.metrics`, via
`mefacial.evaluate`):

- PSNR and SSIM over the frames with motion must beat the static baseline (the
  first frame repeated), and the landmark-motion error (landmarks re-detected on
  the output, against those of the real frames) must be lower than the static
  baseline's;
- a control: at magnify 2 the output moves twice as much as the real face, and the
  same scores must get worse. The gain at magnify 1 therefore comes from moving the
  face by the right amount, not from resampling (bilinear sampling smooths the
  GIFs' palette noise).

Run with `pytest -s` to see the figures.
"""

from __future__ import annotations

import pytest

from conftest import DATA, require

pytestmark = pytest.mark.slow  # self-reenactment of every real clip at 256 px

CLIPS = sorted((DATA / "driving").glob("*.gif")) if (DATA / "driving").is_dir() else []
PSNR_GAIN_DB = 0.5  # mean over clips; every clip must also beat the static baseline
LANDMARK_ERROR_RATIO = 0.8  # mean over clips of generated / static landmark-motion error


@pytest.fixture(scope="module")
def evaluation():
    """(engine, landmark finder, settings): dlib everywhere, so the figures do not depend on
    which FAN weights happen to be cached."""
    require(DATA / "driving", "micro-expression clips")
    from mefacial import Engine
    from mefacial.evaluate import EvalSettings, landmark_finder

    engine = Engine(device="cpu", landmarks="dlib")
    settings = EvalSettings(landmarks="dlib")
    return engine, landmark_finder(settings.landmarks, engine.device), settings


@pytest.fixture(scope="module")
def scores(evaluation):
    """Self-reenactment scores of every clip: {clip name: metrics.SelfReenactment.as_dict() + beats_static}."""
    from mefacial.evaluate import self_reenactment
    from mefacial.video import read_clip

    if not CLIPS:
        require(DATA / "driving" / "*.gif", "driving clips (GIF)")
    engine, landmarks, settings = evaluation
    results = {}
    print("\nwarp self-reenactment, generated (static first frame):")
    for clip in CLIPS:
        frames = read_clip(clip).frames
        s = self_reenactment(engine, frames, "warp", landmarks, settings)
        results[clip.stem] = s
        g, b = s["generated"], s["static"]
        print(f"  {clip.stem:<16} {s['frames_scored']:>3}/{s['frames_total']:<3} frames  PSNR {g['psnr']:.2f} ({b['psnr']:.2f}) dB"
              f"  SSIM {g['ssim']:.4f} ({b['ssim']:.4f})  landmark error {g['landmark_error']:.3f} ({b['landmark_error']:.3f}) px")
    return results


def test_every_clip_beats_the_static_first_frame(scores):
    for name, s in scores.items():
        g, b = s["generated"], s["static"]
        assert g["landmark_error"] is not None, f"{name}: no face found on some generated frames"
        assert g["psnr"] > b["psnr"], f"{name}: PSNR {g['psnr']:.2f} dB, static {b['psnr']:.2f} dB"
        assert g["ssim"] > b["ssim"], f"{name}: SSIM {g['ssim']:.4f}, static {b['ssim']:.4f}"
        assert g["landmark_error"] < b["landmark_error"], (
            f"{name}: landmark-motion error {g['landmark_error']:.3f} px, static {b['landmark_error']:.3f} px")


def test_the_margins_are_not_marginal(scores):
    count = len(scores)
    psnr_gain = sum(s["generated"]["psnr"] - s["static"]["psnr"] for s in scores.values()) / count
    ratio = sum(s["generated"]["landmark_error"] / s["static"]["landmark_error"] for s in scores.values()) / count
    print(f"\nmean over {count} clips: PSNR gain {psnr_gain:.2f} dB, landmark error {ratio:.2f} x static")
    assert psnr_gain > PSNR_GAIN_DB
    assert ratio < LANDMARK_ERROR_RATIO


def test_twice_the_motion_scores_worse(evaluation, scores):
    """Control: the scores respond to the amount of motion (magnify 2 overshoots the real face)."""
    from mefacial.evaluate import score_reenactment
    from mefacial.video import read_clip

    engine, landmarks, settings = evaluation
    clip = min(CLIPS, key=lambda c: len(read_clip(c).frames))  # the shortest clip keeps this fast
    frames = read_clip(clip).frames
    result = engine.animate(frames[0], frames, variant="warp", options=settings.animate_options(), magnify=2.0)
    doubled = score_reenactment(result, landmarks, settings)["generated"]
    faithful = scores[clip.stem]["generated"]
    print(f"\n{clip.stem} at magnify 2: PSNR {doubled['psnr']:.2f} dB, SSIM {doubled['ssim']:.4f}, "
          f"landmark error {doubled['landmark_error']:.3f} px")
    assert doubled["psnr"] < faithful["psnr"]
    assert doubled["ssim"] < faithful["ssim"]
    assert doubled["landmark_error"] > faithful["landmark_error"]

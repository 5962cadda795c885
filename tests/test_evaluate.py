"""Evaluation and comparison from the command line, on short real clips with the training-free `warp` variant."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import DATA, require
from mefacial import evaluate as ev
from mefacial.__main__ import main
from mefacial.grid import HEADER
from mefacial.video import read_clip, write_video

FRAMES = 10  # frames kept of each clip, spread over the whole clip so that the motion is there
CLIPS = 2
UNAVAILABLE = "fomm-awp"  # a variant with no weights on a test machine


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    data = require(DATA, "micro-expression clips")
    root = tmp_path_factory.mktemp("evaluate")
    (root / "clips").mkdir()
    (root / "faces").mkdir()
    for gif in sorted((data / "driving").glob("*.gif"))[:CLIPS]:
        clip = read_clip(gif)
        keep = np.linspace(0, clip.num_frames - 1, FRAMES).round().astype(int)
        write_video(root / "clips" / gif.name, clip.frames[keep], clip.fps)
    face = next((data / "faces").glob("*.png"))
    os.symlink(face, root / "faces" / face.name)
    return {"root": root, "clips": root / "clips", "faces": root / "faces", "face": face}


@pytest.fixture(scope="module")
def report(material) -> tuple[dict, str]:
    """`python -m mefacial evaluate` on the clips and the face, for warp and a variant without weights."""
    out = material["root"] / "scores"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("MEFACIAL_CHECKPOINT_FOMM_AWP", raising=False)
        code = main(["evaluate", "--clips", str(material["clips"]), "--faces", str(material["faces"]),
                     "--variants", f"warp,{UNAVAILABLE}", "--out", str(out), "--landmarks", "dlib", "--device", "cpu"])
    assert code == 0
    text = (out / ev.REPORT_JSON).read_text()
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")), \
        (out / ev.REPORT_MD).read_text()


@pytest.mark.slow
def test_self_reenactment_scores_are_the_metrics_of_the_direct_measurement(report, material):
    """Per clip: the first frame animated by the clip, scored by metrics.score_self_reenactment on the frames
    as the model sees them, landmarks by dlib on real and generated frames: the same figures, and warp beats
    the static first frame."""
    from mefacial import Engine, metrics
    from mefacial.engine import to_tensor
    from mefacial.landmarks import DlibDetector

    scores, _ = report
    clips = scores["variants"]["warp"]["self_reenactment"]["clips"]
    assert sorted(clips) == sorted(p.stem for p in material["clips"].glob("*.gif"))
    engine, detector, cpu = Engine(device="cpu", landmarks="dlib"), DlibDetector(), torch.device("cpu")
    for path in sorted(material["clips"].glob("*.gif"))[:1]:  # one clip measured directly (the time of a test)
        frames = read_clip(path).frames
        result = engine.animate(frames[0], frames, variant="warp")
        real, generated = result.model_driving, result.frames
        expected = metrics.score_self_reenactment(
            to_tensor(generated, cpu), to_tensor(real, cpu),
            torch.from_numpy(detector.detect(real).points), torch.from_numpy(detector.detect(generated).points))
        got = clips[path.stem]
        for side in ("generated", "static"):
            for metric in ("psnr", "ssim", "l1", "landmark_error"):
                assert got[side][metric] == pytest.approx(getattr(getattr(expected, side), metric), rel=1e-5), \
                    f"{path.stem} {side} {metric}"
        assert got["frames_scored"] == expected.frames_scored > 0 and got["frames_total"] == FRAMES
    assert all(c["beats_static"] for c in clips.values()), "warp does not beat the static first frame on every clip"
    mean = scores["variants"]["warp"]["self_reenactment"]["mean"]
    assert mean["generated"]["psnr"] == pytest.approx(np.mean([c["generated"]["psnr"] for c in clips.values()]))
    assert mean["beats_static"] == len(clips)


@pytest.mark.slow
def test_motion_transfer_to_another_face(report):
    scores, markdown = report
    transfer = scores["variants"]["warp"]["motion_transfer"]
    face = scores["faces"][0]
    assert sorted(transfer["pairs"]) == sorted(f"{clip}-{face}" for clip in scores["clips"])
    for name, pair in transfer["pairs"].items():
        assert 0 < pair["error"] < pair["static_error"], name  # the AU points move with the driving clip
        assert 0.3 < pair["gain"] < 1.5, name
    assert "Cross-identity motion transfer" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| `warp` | ") and "%" not in line
               and line.count("|") == 7)
    assert f"{transfer['mean']['error'] * 100:.2f}" in row


@pytest.mark.slow
def test_unavailable_variants_and_metrics_are_reported(report):
    scores, markdown = report
    entry = scores["variants"][UNAVAILABLE]
    assert entry["self_reenactment"]["clips"] == {} and entry["motion_transfer"]["pairs"] == {}
    assert len(entry["errors"]) == 2 * len(scores["clips"])  # every clip, and every clip x face
    assert all(e.startswith("WeightsNotFoundError") for e in entry["errors"].values())
    assert f"| `{UNAVAILABLE}` | 0 |" in markdown
    for package, name in (("lpips", "LPIPS"), ("pytorch_fid", "FID")):
        if importlib.util.find_spec(package) is None:
            assert any(n.startswith(name) and "skipped" in n for n in scores["notes"])
            assert f"{name} (" in markdown


@pytest.mark.slow
def test_compare_renders_a_column_per_variant_and_a_strip(material, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEFACIAL_CHECKPOINT_FOMM_AWP", raising=False)
    clip = sorted(material["clips"].glob("*.gif"))[0]
    tile, strip_frames = 64, [0, 4, FRAMES - 1]
    code = main(["compare", "--source", str(material["face"]), "--driving", str(clip),
                 "--variants", f"warp,{UNAVAILABLE}", "--out", str(tmp_path / "grid.mp4"), "--tile", str(tile),
                 "--strip", str(tmp_path / "strip.png"), "--strip-frames", ",".join(map(str, strip_frames)),
                 "--landmarks", "dlib", "--device", "cpu"])
    assert code == 0
    said = capsys.readouterr().out
    assert re.search(r"^warp: [\d.]+ s \(generator [\d.]+ s\)", said, re.M) and ev.COMPARE_TIMES in said
    grid = read_clip(tmp_path / "grid.mp4").frames
    assert grid.shape == (FRAMES, HEADER + tile, 3 * tile, 3)  # driving, warp, placeholder
    warp_tiles = grid[:, HEADER:, tile:2 * tile].astype(int)
    assert np.abs(warp_tiles[-1] - warp_tiles[0]).mean() > 0.5  # the warp column moves
    placeholder = grid[:, HEADER:, 2 * tile:].astype(int)
    assert np.abs(placeholder - placeholder[:1]).max() < 20  # a still tile (with its reason) for the variant
    strip = np.asarray(Image.open(tmp_path / "strip.png").convert("RGB"))
    assert strip.shape == (HEADER + len(strip_frames) * tile, tile // 3 + 3 * tile, 3)
    rows = [strip[HEADER + i * tile:HEADER + (i + 1) * tile, tile // 3 + tile:tile // 3 + 2 * tile].astype(int)
            for i in range(len(strip_frames))]
    for row, index in zip(rows, strip_frames):  # each strip row is that frame of the grid (mp4 is lossy)
        assert np.abs(row - warp_tiles[index]).mean() < 4


def test_a_magnified_column_says_so_in_its_label(material):
    from mefacial import Engine

    clip = sorted(material["clips"].glob("*.gif"))[0]
    engine = Engine(device="cpu", landmarks="dlib")
    labels = [c.label for c in ev.compare_columns(engine, material["face"], clip, ["warp"], magnify=2).columns]
    assert labels == ["driving", f"{ev.variant_label('warp')}, motion x2"]  # not the driving's own motion
    assert [c.label for c in ev.compare_columns(engine, material["face"], clip, ["warp"]).columns][1] == \
        ev.variant_label("warp")


def test_an_evaluation_that_scores_nothing_is_a_failure(material, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEFACIAL_CHECKPOINT_FOMM_AWP", raising=False)
    (tmp_path / "none").mkdir()
    assert main(["evaluate", "--clips", str(tmp_path / "none"), "--variants", "warp", "--out", str(tmp_path)]) == 2
    assert "no clips under" in capsys.readouterr().err
    assert main(["evaluate", "--clips", str(material["clips"]), "--variants", UNAVAILABLE, "--out", str(tmp_path),
                 "--device", "cpu", "--no-learned"]) == 1  # every clip failed: a script must notice
    assert "nothing was scored: fomm-awp: WeightsNotFoundError" in capsys.readouterr().err


def test_strip_frames_run_from_onset_to_apex():
    clip = np.zeros((30, 8, 8, 3), np.uint8)
    clip[:, :, :, 0] = np.minimum(np.arange(30), 20)[:, None, None] * 10  # motion grows until frame 20
    assert ev.apex_frame(clip) == 20
    assert ev.strip_indices(clip, 5) == [0, 5, 10, 15, 20]
    with pytest.raises(ev.InputError, match="choose frames among"):
        ev.frame_strip(np.zeros((3, HEADER + 64, 64, 3), np.uint8), [0, 3], tile=64)

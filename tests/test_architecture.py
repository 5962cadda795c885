"""The architecture's promises, checked: one place per concept (backbone specs, variant registry, options),
clean command-line errors, and a package that installs with its data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from mefacial.__main__ import main
from mefacial.models import backbones, build_model, tiny_config
from mefacial.variants import get_variant, list_variants

EXAMPLE = ["--source", str(REPO / "examples" / "astronaut.png"), "--driving", str(REPO / "examples" / "brow_raise.mp4")]


@pytest.mark.parametrize("argv, cause", [
    (["compare", *EXAMPLE, "--out", "grid.mp4", "--tile", "100"], "multiple of 16"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--magnify", "-1"], "magnify"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--magnify", "x"], "invalid float"),
    (["animate", *EXAMPLE, "--out", "out.txt"], "unknown type"),
    (["animate", *EXAMPLE, "--out", "/nonexistent-folder/out.mp4"], "does not exist"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--variant", "nope"], "unknown variant"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--variant", "dens"], "unknown variant 'dens' (did you mean dense?)"),
    (["bench", "--training-free", "--variants", "dense,wrap"], "unknown variant 'wrap' (did you mean warp?)"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--variant", "warp", "--motion", "avd"], "not available for warp"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--batch-size", "0"], "batch_size"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--no-crop", "--paste-back"], "crop"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--device", "nonsense"], "unknown device"),
    (["compare", *EXAMPLE, "--out", "grid.mp4", "--strip-frames", "a,b", "--strip", "s.png"], "frame numbers"),
    (["compare", *EXAMPLE, "--out", "grid.mp4", "--variants", "warp,zzz"], "unknown variant"),
    (["animate"], "required"),
    ([], "name a command: variants, animate, "),
    (["checkpoints"], "name a command: list, convert, push"),
    (["nosuch"], "invalid choice"),
])
def test_user_errors_are_one_line_with_status_2(argv, cause, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and cause in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, named", [
    (["synthesize", "--source", "face.png", "--aus", "1:C,2:C"], "--aus 1:C,2:C (did you mean --au?); see "
                                                                  "`python -m mefacial synthesize --help`"),
    (["animate", *EXAMPLE, "--out", "out.mp4", "--magnfy=2", "extra"], "--magnfy=2 extra (did you mean --magnify?); "
                                                                         "see `python -m mefacial animate --help`"),
    (["checkpoints", "list", "--jsn"], "--jsn (did you mean --json?); see `python -m mefacial checkpoints list --help`"),
    (["variants", "--frobnicate"], "--frobnicate; see `python -m mefacial variants --help`"),
    # a misspelt required flag: named as such, not as the required one missing
    (["animate", *EXAMPLE, "--output", "out.mp4"], "--output (did you mean --out?); see "
                                                   "`python -m mefacial animate --help`"),
])
def test_an_unknown_flag_is_named_with_the_closest_one_and_its_commands_help(argv, named, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: unrecognized arguments: {named}\n"


def test_the_app_and_the_training_commands_name_an_unknown_flag_in_one_line_too(capsys):
    from app import main as app
    from train.__main__ import main as train
    from train.prepare import main as prepare

    for command, argv, named in ((app, ["--qeue-size", "3"], "--qeue-size 3 (did you mean --queue-size?); see "
                                  "`python app.py --help`"),
                                 (train, ["--config", "fomm-awp", "--max-stpes", "3"], "--max-stpes 3 (did you mean "
                                  "--max-steps?); see `python -m train --help`"),
                                 (prepare, ["raw", "out", "--sise", "3"], "--sise 3 (did you mean --size?); see "
                                  "`python -m train.prepare --help`")):
        with pytest.raises(SystemExit) as exit:
            command(argv)
        assert exit.value.code == 2 and capsys.readouterr().err == f"error: unrecognized arguments: {named}\n"


def test_missing_weights_read_as_one_line_with_their_lists_kept_apart(capsys, tmp_path, monkeypatch):
    # the message lists where it looked and what to do, one item a line; flattened with its dashes kept, it read
    # "... (none exists) What to do, any one of: - No public weights. ... - copy the weights file ..."
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEFACIAL_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.delenv("MEFACIAL_CHECKPOINT_FOMM_AWP", raising=False)
    assert main(["animate", *EXAMPLE, "--out", "out.mp4", "--variant", "fomm-awp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: No weights for variant 'fomm-awp'"), err
    assert " - " not in err and "(none exists). What to do, any one of: " in err, err
    assert "; set MEFACIAL_CHECKPOINT_FOMM_AWP=PATH." in err, err
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # no video, no part of one


def test_animate_writes_its_video_batch_by_batch(capsys, tmp_path, monkeypatch):
    """`animate` hands each batch of frames to the file as it is made (pasted back into a 12-megapixel photo a
    frame is 36 MB: a gathered 145-frame clip peaked at 11 GB): pasted back, the video has the source picture's
    size and every frame of the clip."""
    from mefacial import video

    batches: list[int] = []
    write = video.VideoWriter.write
    monkeypatch.setattr(video.VideoWriter, "write", lambda writer, frames: batches.append(len(frames)) or
                        write(writer, frames))
    out = tmp_path / "out.mp4"
    assert main(["animate", *EXAMPLE, "--out", str(out), "--paste-back"]) == 0
    clip, picture = video.read_clip(EXAMPLE[3]), video.read_image(EXAMPLE[1])
    written = video.read_clip(out)
    assert written.frames.shape[:3] == (clip.num_frames, *picture.shape[:2]) and written.fps == clip.fps
    assert len(batches) > 1 and sum(batches) == clip.num_frames
    assert capsys.readouterr().out.startswith(f"{out}: {clip.num_frames} frames at {clip.fps:g} fps")


def test_a_still_image_given_as_the_driving_clip_is_pointed_out(capsys, tmp_path):
    """A photo passed for the clip is a one-frame clip: its relative motion is none, and the line says so instead
    of suggesting a slow-down."""
    out = tmp_path / "out.mp4"
    assert main(["animate", "--source", EXAMPLE[1], "--driving", EXAMPLE[1], "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{out}: 1 frame at ") and "is a single frame" in line and "--slowdown" not in line, line


def test_the_commands_time_says_how_much_went_to_reading_a_large_clip():
    """`animate`'s line gives the run's time; where reading the clip took a good part of it (a large raw clip),
    it says so, so that its time a frame is not taken for the generator's."""
    from mefacial.__main__ import _time_taken

    assert _time_taken({"total_s": 3.3, "ms_per_frame": 33.0, "read_s": 2.0}) == (
        "3.3 s (33 ms/frame, 2.0 s of it reading the clip)")
    assert _time_taken({"total_s": 1.3, "ms_per_frame": 28.4, "read_s": 0.05}) == "1.3 s (28 ms/frame)"


def test_a_bad_flag_through_the_real_command_has_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mefacial", "compare", *EXAMPLE, "--out", str(tmp_path / "g.mp4"),
                          "--tile", "100"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr


def test_every_variant_is_declared_once_by_a_registered_backbone():
    specs = backbones()
    declared = [decl.id for spec in specs.values() for decl in spec.variants]
    assert len(declared) == len(set(declared)) == len(list_variants())
    for spec in specs.values():
        for decl in spec.variants:
            variant = get_variant(decl.id)
            assert variant.config.backbone == spec.name and variant.label == decl.label
            assert variant.config.prior in spec.priors
            assert set(variant.motion_modes) == set(spec.motion_modes)
            model = build_model(tiny_config(variant.config))
            assert all(hasattr(model, part) for part in spec.inference_parts), decl.id


def test_no_backbone_names_compared_outside_their_own_module():
    """Backbone knowledge lives in mefacial/models/<backbone>.py: nowhere else compares a backbone's name or sniffs
    a model's attributes to tell backbones apart."""
    names = "|".join(backbones())
    pattern = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|backbone\s+(not\s+)?in\s*[(\[{{]"""
                         r"|hasattr\([^)]*(prior_maps|kp_detector|region_predictor)")
    offenders = []
    for path in [*sorted((REPO / "mefacial").rglob("*.py")), REPO / "app.py"]:
        if path.parent.name == "models" and path.stem in backbones():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_configs_and_registry_are_package_data():
    from importlib import resources

    from mefacial import checkpoints
    from mefacial.config import CONFIG_DIR

    package = Path(str(resources.files("mefacial")))
    assert CONFIG_DIR == package / "configs" and (CONFIG_DIR / "train").is_dir()
    assert checkpoints.DEFAULT_REGISTRY == package / "registry.yaml" and checkpoints.DEFAULT_REGISTRY.is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    for data in ("configs/*.yaml", "configs/train/*.yaml", "registry.yaml"):
        assert data in pyproject
    assert 'mefacial = "mefacial.__main__:cli"' in pyproject

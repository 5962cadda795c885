"""Action units: templates move their FACS region in their FACS direction and leave the rest still, intensities
scale monotonically, timing profiles land on the specified frames, compositions add (rules where they conflict),
invalid specifications are clear errors; synthesis end to end through the engine, the CLI and generate."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from mefacial import au, video
from mefacial.errors import InputError, InputTooLargeError
from mefacial.video import read_image

from conftest import DATA, REPO

EXAMPLE = REPO / "examples" / "astronaut.png"
LEAKAGE_BOUND = 0.10  # a region an AU does not act on moves less than 10 % of the AU's largest displacement
TIMING = au.Timing(onset_ms=20, apex_ms=10, offset_ms=20, fps=100)  # apex at frame 2

# What the FACS manual (Ekman, Friesen & Hager 2002) says each AU does, independently of the templates:
# region -> expected direction in the face's frame (x lateral: away from the midline; y: down > 0).
DIRECTIONS = {
    1: {"brow_inner": "up"},
    2: {"brow_outer": "up"},
    4: {"brow_inner": ("down", "medial")},
    5: {"upper_lid": "up"},
    6: {"cheek": "up", "lower_lid": "up"},
    7: {"lower_lid": "up"},
    9: {"nose": "up", "upper_lip": "up"},
    10: {"upper_lip": "up"},
    12: {"lip_corner": ("up", "lateral")},
    14: {"lip_corner": "lateral"},
    15: {"lip_corner": "down"},
    17: {"chin": "up", "lower_lip": "up"},
    20: {"lip_corner": "lateral"},
    23: {"upper_lip": "down", "lower_lip": "up"},
    24: {"upper_lip": "down", "lower_lip": "up"},
    25: {"lower_lip": "down"},
    26: {"chin": "down", "lower_lip": "down"},
    43: {"upper_lid": "down"},
}


def _rotated_mirrored(image: np.ndarray) -> np.ndarray:
    """The face mirrored, rotated by 12 degrees and shrunk: a second framing of a face, to check that templates
    live in the face's own frame."""
    from PIL import Image

    pil = Image.fromarray(image[:, ::-1]).rotate(12, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
    return np.asarray(pil.resize((int(image.shape[1] * 0.8), int(image.shape[0] * 0.8)), Image.BICUBIC))


@pytest.fixture(scope="module")
def meshes() -> dict[str, np.ndarray]:
    from mefacial.mesh import detect_mesh

    image = read_image(EXAMPLE)
    faces = {"astronaut": image, "astronaut-rotated-mirrored": _rotated_mirrored(image)}
    shared = DATA / "faces" / "asian_female.png"
    if shared.is_file():
        faces["asian_female"] = read_image(shared)
    return {name: detect_mesh(face, role="source")[0].astype(np.float64) for name, face in faces.items()}


def _apex(mesh: np.ndarray, spec: str, **kwargs) -> np.ndarray:
    """V x 2 face-unit displacement of every vertex at the apex of `spec`."""
    plan = au.plan(spec, TIMING)
    frame = au.FaceFrame.of(mesh)
    moved = au.target_meshes(mesh, plan, **kwargs)[plan.apex_frames[0][0]]
    return frame.to_face(moved) - frame.to_face(mesh)


@pytest.mark.parametrize("number", au.SUPPORTED)
def test_single_au_moves_its_region_in_its_direction_and_nothing_else(meshes, number):
    for name, mesh in meshes.items():
        q = au.FaceFrame.of(mesh).to_face(mesh[:au.NUM_MESH])
        moved = _apex(mesh, f"{number}:E")[:au.NUM_MESH]  # V x 2
        size = np.linalg.norm(moved, axis=-1)
        peak = size.max()
        assert 0.01 < peak < 0.2, (name, number, peak)
        regions = au.region_indices(mesh)
        for region, members in regions.items():
            if region not in au.AUS[number].regions:
                leak = size[members].max() if len(members) else 0.0
                assert leak < LEAKAGE_BOUND * peak, f"{name}: AU{number} moves {region} by {leak / peak:.0%} of its peak"
        for region, expected in DIRECTIONS[number].items():
            members = regions[region]
            mean = moved[members].mean(0)
            lateral = (moved[members, 0] * np.sign(q[members, 0])).mean()
            for direction in (expected,) if isinstance(expected, str) else expected:
                value = {"up": -mean[1], "down": mean[1], "lateral": lateral, "medial": -lateral}[direction]
                assert value > 0.2 * size[members].mean(), f"{name}: AU{number} {region} not {direction}: {mean}"


@pytest.mark.parametrize("number", au.SUPPORTED)
def test_intensity_scales_the_apex_displacement_monotonically(meshes, number):
    mesh = meshes["astronaut"]
    peaks = [np.linalg.norm(_apex(mesh, f"{number}:{letter}"), axis=-1).max() for letter in "ABCDE"]
    assert all(a < b for a, b in zip(peaks, peaks[1:])), peaks
    assert peaks[0] > 0
    assert peaks[-1] == pytest.approx(peaks[2] / au.INTENSITY["C"], rel=1e-4)  # linear in the intensity (float32)


@pytest.mark.parametrize("fps", [25, 50, 200])
def test_timing_profile_matches_the_specification(fps):
    timing = au.Timing(onset_ms=80, apex_ms=40, offset_ms=120, fps=fps)  # whole frames at 25, 50 and 200 fps
    plan = au.plan("12:C", timing)
    frame_ms = 1000 / fps
    on, ap, off = (round(ms / frame_ms) for ms in (80, 40, 120))
    w = plan.activations[0] / au.INTENSITY["C"]
    assert plan.num_frames == on + ap + off + 1  # the clip spans exactly the event
    assert plan.duration_ms == pytest.approx(240)
    assert w[0] == 0 and w[-1] == pytest.approx(0)  # neutral first and last frame
    assert plan.apex_frames == [(on, on + ap)]
    assert np.all(w[on:on + ap + 1] == 1) and np.all(w[:on] < 1) and np.all(w[on + ap + 1:] < 1)
    assert np.all(np.diff(w[:on + 1]) > 0) and np.all(np.diff(w[on + ap:]) < 0)  # smooth ease in, ease out
    leads = au.plan("12:C", au.Timing(onset_ms=80, apex_ms=40, offset_ms=120, fps=fps, lead_in_ms=80, lead_out_ms=40))
    assert leads.num_frames == plan.num_frames + round(80 / frame_ms) + round(40 / frame_ms)
    assert leads.apex_frames == [(on + round(80 / frame_ms), on + ap + round(80 / frame_ms))]
    assert leads.event_frames == (round(80 / frame_ms), round(80 / frame_ms) + on + ap + off)


def test_per_au_timing_and_delay():
    timing = au.Timing(onset_ms=40, apex_ms=20, offset_ms=40, fps=100)
    plan = au.plan("6:C,12:C:60/20/40@20", timing)
    assert plan.apex_frames == [(4, 6), (2 + 6, 2 + 6 + 2)]
    assert plan.num_frames == 2 + 6 + 2 + 4 + 1  # the latest AU ends the event


@pytest.mark.parametrize("spec", ["1:C,2:B", "6:C,12:D", "4:B,7:C", "9:C,25:B", "15:C,17:C", "1:C,2:C,5:B",
                                  "10:B,14:C,20:A", "R12:C,R14:B"])
def test_non_conflicting_compositions_equal_the_sum_of_their_parts(meshes, spec):
    for mesh in meshes.values():
        timing = au.Timing(onset_ms=30, apex_ms=20, offset_ms=40, fps=100)
        together = au.displacements(mesh, au.plan(spec, timing))
        parts = sum(au.displacements(mesh, au.plan(item, timing)) for item in spec.split(","))
        np.testing.assert_allclose(together, parts, atol=1e-9)


def test_conflict_rules(meshes):
    mesh = meshes["astronaut"]
    regions = au.region_indices(mesh)
    # AU43 overrides AU5: with the eyes closed, adding AU5 changes nothing
    np.testing.assert_allclose(_apex(mesh, "5:E,43:E"), _apex(mesh, "43:E"), atol=1e-9)
    # lips parted exclude lips pressed: AU24 + AU25 = AU25
    np.testing.assert_allclose(_apex(mesh, "24:E,25:E"), _apex(mesh, "25:E"), atol=1e-9)
    # AU1 + 4: the inner brow goes up (AU1) and is drawn together (AU4), not down
    both = _apex(mesh, "1:E,4:E")[regions["brow_inner"]]
    q = au.FaceFrame.of(mesh).to_face(mesh[:au.NUM_MESH])[regions["brow_inner"]]
    assert both[:, 1].mean() < 0 and (both[:, 0] * np.sign(q[:, 0])).mean() < 0
    # contact rule: lids never cross, whatever is stacked on them
    frame = au.FaceFrame.of(mesh)
    plan = au.plan("6:E,7:E,43:E", TIMING)
    moved = frame.to_face(au.target_meshes(mesh, dataclasses_replace(plan, 3.0))[plan.apex_frames[0][0]])
    upper, lower = zip(*au.LID_PAIRS)
    assert np.all(moved[list(lower), 1] >= moved[list(upper), 1] - 1e-5)  # they meet (float32 meshes)
    assert set(au.CONFLICTS) >= {(5, 43), (24, 25), (24, 26), (1, 4)}


def dataclasses_replace(plan: au.Plan, magnify: float) -> au.Plan:
    import dataclasses

    return dataclasses.replace(plan, activations=plan.activations * magnify)


@pytest.mark.parametrize("spec, message", [
    ("3:C", "AU3 is not in the library"), ("4:F", "not a FACS letter"), ("4:0", "outside (0, 1]"),
    ("4:1.5", "outside (0, 1]"), ("", "no action units"), ("4:C,4:B", "given twice"), ("four", "cannot read"),
])
def test_invalid_specifications_are_clear_errors(spec, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        au.parse_aus(spec)


@pytest.mark.parametrize("field, value", [("onset_ms", 0), ("apex_ms", 0), ("offset_ms", -5), ("fps", 0),
                                          ("onset_ms", float("nan")), ("lead_in_ms", -1)])
def test_invalid_durations_are_clear_errors(field, value):
    with pytest.raises(InputError, match=field.replace("_ms", "").replace("_", "-")):
        au.Timing(**{field: value})


def test_event_limits():
    with pytest.raises(InputError, match="shorter than one frame"):
        au.plan("4:C", au.Timing(onset_ms=10, apex_ms=40, offset_ms=120, fps=25))
    with pytest.raises(InputTooLargeError, match="over the limit"):
        au.plan("4:C", au.Timing(onset_ms=400, apex_ms=400, offset_ms=400, fps=200), max_frames=200)


def test_a_macro_expression_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mefacial"):
        plan = au.plan("12:C", au.Timing(onset_ms=300, apex_ms=200, offset_ms=300, fps=25))
    assert plan.num_frames == 21 and "macro-expression" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mefacial"):
        au.plan("12:C", au.Timing())
    assert "macro" not in caplog.text


def test_presets_parse_and_name_their_source():
    for name, (spec, source) in au.PRESETS.items():
        assert au.parse_aus(spec) and len(source) > 20, name
    assert au.PRESETS["positive"][0] == "6:C,12:C" and "CASME II" in au.PRESETS["positive"][1]
    # a preset is found by its name in any case, or by an everyday emotion word
    assert au.preset_name("Surprise") == "surprise" and au.preset_name("happiness") == "positive"
    assert all(alias_of in au.PRESETS for alias_of in au.PRESET_ALIASES.values())
    with pytest.raises(InputError, match="unknown preset 'smirk'.*positive, surprise"):
        au.preset_name("smirk")


def test_readout_ignores_head_motion_and_finds_the_moved_region(meshes):
    from mefacial import readout

    mesh = meshes["astronaut"]
    plan = au.plan("1:E", TIMING)
    moved = au.target_meshes(mesh, plan)  # T x V x 2
    angle, scale, shift = 0.05, 1.03, np.array([2.0, -1.5])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = mesh.mean(0)
    swayed = np.stack([(m - centre) @ (np.eye(2) + (scale * rotation - np.eye(2)) * t / len(moved)).T + centre
                       + shift * t / len(moved) for t, m in enumerate(moved)])  # head motion on top of the AU
    motion = readout.region_motion(swayed, plan.fps)
    frame, apex = motion.apex()
    first, last = plan.apex_frames[0]
    assert first <= frame <= last  # (the apex holds for these frames)
    assert max(apex, key=apex.get) == "brow_inner" and apex["brow_inner"] > 3.0
    assert apex["lip_corner"] < 0.3 and apex["chin"] < 0.3  # the head motion is taken out
    still = readout.region_motion(np.repeat(mesh[None], 4, 0), 100)
    assert np.abs(still.magnitude).max() < 1e-6
    image = readout.plot(motion)
    assert image.shape == (360, 640, 3) and image.dtype == np.uint8


def test_the_timing_plot_shows_two_aus_of_the_same_intensity():
    """AU1C + AU2C (the surprise preset's brows) have the same activation curve: the first is drawn wider under the
    second, so both colours show on the plot (the second used to hide the first)."""
    from mefacial import readout

    image = readout.plot_plan(au.plan("1:C,2:C,5:B", TIMING))
    inside = image[30:-40, 60:-140].reshape(-1, 3)  # the plot area, without the legend

    def shows(colour) -> int:
        return int((np.abs(inside.astype(int) - colour).sum(1) < 30).sum())

    first, second, third = readout.PALETTE[:3]
    assert shows(first) > 100 and shows(second) > 100 and shows(third) > 100


@pytest.mark.slow
def test_synthesize_end_to_end(tmp_path, dlib_searches, capsys):
    """Engine.synthesize: the clip spans the event, frame 0 is the neutral face, the moved region is what a fresh
    mesh detection on the output reads back (the face found, boxed and read by the face mesh: no dlib search);
    the CLI writes the video and the readout, and says how to slow the 0.22 s clip down to be seen."""
    import mefacial
    from mefacial.__main__ import main
    from mefacial import readout

    engine = mefacial.Engine(device="cpu", landmarks="dlib")
    timing = au.Timing(onset_ms=60, apex_ms=40, offset_ms=120, fps=200)
    result = engine.synthesize(EXAMPLE, "12:D", timing)
    assert not dlib_searches
    assert result.frames.shape[0] == 12 + 8 + 24 + 1 and result.fps == 200
    assert result.action_units["spec"] == "AU12D" and result.action_units["aus"][0]["apex_frames"] == [12, 20]
    assert np.abs(result.frames[0].astype(int) - result.model_source.astype(int)).mean() < 2.0
    detected = readout.clip_motion(result.frames, result.fps)
    _, apex = detected.apex()
    assert max(apex, key=apex.get) in ("lip_corner", "upper_lip", "lower_lip"), apex
    assert apex["lip_corner"] > 3 * max(apex["brow_inner"], apex["brow_outer"], apex["upper_lid"])
    out, plot = tmp_path / "out.mp4", tmp_path / "readout.png"
    assert main(["synthesize", "--source", str(EXAMPLE), "--au", "4:C,7:B", "--onset-ms", "60", "--apex-ms", "40",
                 "--offset-ms", "120", "--fps", "200", "--out", str(out), "--readout", str(plot),
                 "--landmarks", "dlib"]) == 0
    assert out.stat().st_size > 0 and plot.stat().st_size > 0
    # 45 frames at 200 fps: 0.225 s at real time; x9 plays 2.0 s, as the app would start it
    assert "at real time it plays for 0.23 s: --slowdown 9 plays it for 2.0 s" in capsys.readouterr().out
    pasted = tmp_path / "pasted.mp4"  # written batch by batch, each pasted back into the whole picture
    assert main(["synthesize", "--source", str(EXAMPLE), "--au", "4:C,7:B", "--onset-ms", "60", "--apex-ms", "40",
                 "--offset-ms", "120", "--fps", "200", "--out", str(pasted), "--paste-back"]) == 0
    assert video.read_clip(pasted).frames.shape[:3] == (45, *video.read_image(EXAMPLE).shape[:2])
    assert main(["synthesize", "--source", str(EXAMPLE), "--au", "3:C", "--out", str(out)]) == 2  # a clear error


@pytest.mark.slow
def test_generate_from_an_au_csv(tmp_path):
    import mefacial
    from mefacial import generate as gen

    table = tmp_path / "aus.csv"
    table.write_text(f"face,aus,label,onset_ms\n{EXAMPLE},6:C+12:C,positive,\n{EXAMPLE},4:C,negative,40\n"
                     f"{EXAMPLE},99:C,negative,\n")
    rows = gen.read_au_rows(table, au.Timing(onset_ms=20, apex_ms=20, offset_ms=20, fps=100))
    assert [r.error is None for r in rows] == [True, True, False] and "AU99" in rows[2].error
    engine = mefacial.Engine(device="cpu", landmarks="dlib")
    summary = gen.run_aus(rows, tmp_path / "out", lambda device: engine, device="cpu")
    assert (summary.ok, summary.failed) == (2, 1)
    with open(tmp_path / "out" / gen.AU_LABELS, newline="") as f:
        labels = list(csv.DictReader(f))
    assert [r["label"] for r in labels] == ["negative", "positive"]
    negative, positive = labels
    assert float(positive["AU6"]) == au.INTENSITY["C"] and float(positive["AU12"]) == au.INTENSITY["C"]
    assert float(positive["AU4"]) == 0 and float(negative["AU4"]) == au.INTENSITY["C"]
    assert int(negative["frames"]) == 4 + 2 + 2 + 1 and int(negative["apex_first"]) == 4
    assert (tmp_path / "out" / positive["video"]).is_file()
    records = [json.loads(line) for line in (tmp_path / "out" / gen.MANIFEST).read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["error", "ok", "ok"]
    again = gen.run_aus(rows, tmp_path / "out", lambda device: engine, device="cpu")  # resumable
    assert (again.ok, again.skipped) == (0, 2)


@pytest.mark.slow
def test_app_au_text_that_does_not_parse_turns_synthesise_off_and_what_the_choices_cannot_hold_is_named():
    """Synthesise reads the per-AU choices; a typed specification that does not parse leaves them as they were, so
    it must not let Synthesise run them (it silently synthesised the previous preset): it says why and turns it off."""
    import app

    def typed(spec):
        note, button, *choices = app.au_text_changed(spec)
        return note, button["interactive"], choices

    for bad in ("99:C", "4:Z", "12:C:0/0/0", "4:"):
        note, on, choices = typed(bad)
        assert not on and "Not a specification" in note and all(c == {"__type__": "update"} for c in choices)
    assert "AU99 is not in the library" in typed("99:C")[0]
    note, on, choices = typed("4:C,R12:A")
    assert on and note == "" and app.au_spec_from_choices(*choices) == "4:C,R12:A"
    for lossy, used in (("12:0.5", "12:C"), ("12:C:80/40/120@20", "12:C"), ("R12:A,L12:B", "L12:B")):
        note, on, choices = typed(lossy)
        assert on and app.au_spec_from_choices(*choices) == used and f"**{used}** is synthesised" in note
    note, on, choices = typed("  ")
    assert on and note == "" and app.au_spec_from_choices(*choices) == ""  # cleared: nothing chosen
    for name, (spec, source) in au.PRESETS.items():  # a preset's text, however spaced, is named as that preset
        note, on, choices = typed(spec.replace(",", ", "))
        assert on and note.startswith(f"**{name}** = {spec}") and source in note
        assert app.au_spec_from_choices(*choices) == spec and app.au_preset_note(spec) == note


@pytest.mark.slow
def test_app_action_units_handlers(tmp_path):
    """The Action units tab's handlers: radios <-> specification, a synthesis with its readout, a readout of any clip."""
    import app
    import mefacial

    assert app.au_spec_from_choices(*app.au_choices_from_spec("6:C,12:D")) == "6:C,12:D"
    assert app.au_choices_from_spec("4:C")[au.SUPPORTED.index(4)] == "C"
    letters = app.au_choices_from_spec("R12:A,R14:A")
    letters[au.SUPPORTED.index(4)] = "B"  # the user adds AU4B to the contempt preset
    assert app.au_spec_from_choices(*letters) == "4:B,R12:A,R14:A"
    assert all(c in app.AU_CHOICES for c in letters)
    demo = app.Demo(mefacial.Engine(device="cpu", landmarks="dlib"), app.Limits())
    video, plot, download, status = app.synthesize_clip(demo, str(EXAMPLE), "1:C,2:C,5:B", 60, 40, 120, 200,
                                                        progress=lambda *a, **k: None)
    assert "AU1C+AU2C+AU5B" in status and "45 frames" in status and "micro-expression" in status
    assert read_image(plot).shape[-1] == 3 and download == video
    assert read_image(app.readout_clip(demo, video, 10)).shape[-1] == 3
    preview = app.timing_preview(demo, "6:C,12:C:80/40/120@20", 100, 60, 140, 200, 20, 0)
    assert read_image(preview).shape == (360, 640, 3)
    assert app.timing_preview(demo, "6:", 100, 60, 140, 200, 0, 0) is None  # while typing: no preview, no error
    import gradio as gr

    with pytest.raises(gr.Error):
        app.user_errors(app.synthesize_clip)(demo, str(EXAMPLE), "3:C", progress=lambda *a, **k: None)
    endpoint = app.synthesis_endpoint(demo)  # the API: one bounded choice per AU, no free text
    video, plot, download, status = endpoint(str(EXAMPLE), *["-"] * len(au.SUPPORTED[:-1]), "E", 40, 20, 40, 100,
                                             progress=lambda *a, **k: None)
    assert "AU43E" in status and "11 frames" in status
    with pytest.raises(gr.Error):
        endpoint(str(EXAMPLE), "Z", progress=lambda *a, **k: None)


@pytest.mark.slow
def test_evaluate_plots_the_readout_of_real_clips_and_outputs(tmp_path):
    import mefacial
    from mefacial import evaluate as ev
    from mefacial.video import write_video

    engine = mefacial.Engine(device="cpu", landmarks="dlib")
    clip = engine.synthesize(EXAMPLE, "12:D", au.Timing(onset_ms=40, apex_ms=20, offset_ms=40, fps=100))
    path = write_video(tmp_path / "clip.mp4", clip.frames, clip.fps)
    report = ev.evaluate(engine, [path], ["warp"], learned=(), readout_dir=tmp_path / "readout")
    written = report["readout"]["clip"]
    assert set(written) == {"real", "warp"}
    assert all(read_image(p).shape[-1] == 3 for p in written.values())


def test_synthesis_options_from_other_options_objects():
    from mefacial.options import AnimateOptions
    from mefacial.synthesis import SynthesisOptions

    other = AnimateOptions(crop=False, margin=0.2, magnify=2.0, slowdown=4)  # the one options type
    options = SynthesisOptions.of(other)
    assert isinstance(options, AnimateOptions) and options.slowdown == 4
    assert (options.crop, options.margin, options.magnify, options.appearance) == (False, 0.2, 2.0, True)
    assert SynthesisOptions.of(None) == SynthesisOptions()
    assert SynthesisOptions.of({"paste_back": True, "appearance": False}) == SynthesisOptions(paste_back=True,
                                                                                             appearance=False)
    with pytest.raises(InputError, match="unknown animation option"):
        SynthesisOptions.of({"pasteback": True})  # a misspelt name is not dropped silently
    with pytest.raises(InputError, match="got str"):
        SynthesisOptions.of("paste_back")
    with pytest.raises(InputError, match="magnify"):
        SynthesisOptions(magnify=0)

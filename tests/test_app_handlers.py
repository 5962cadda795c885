"""The demo's handlers in-process: variant choices, error wording, and the Prior tab with an AWP model present."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import yaml

import app
import mefacial
from conftest import FIXTURES, fixture_meta, model_fixture_dirs, require
from mefacial import Engine, list_variants
from mefacial.checkpoints import checkpoint_env_var, load_original_checkpoint
from mefacial.config import config_from_reference
from mefacial.errors import NotAnImageError
from mefacial.models import INFERENCE_PARTS, build_model

FACE = app.EXAMPLE_FACE


def test_every_variant_is_one_backbone_and_prior_choice():
    variants = list_variants()
    chosen = [app.variant_id(v["backbone"], v["prior_option"]) for v in variants]
    assert chosen == [v["id"] for v in variants]  # each reachable, none ambiguous
    assert all(v["backbone"] in app.BACKBONES for v in variants)
    assert app.PRIORS["ewp-mm21"] == "EWP (ACM MM 2021)" and mefacial.get_variant("fomm-ewp-mm21").prior == "ewp"
    with pytest.raises(gr.Error, match="valid backbone/prior"):
        app.variant_id("warp", "awp")


def test_errors_name_the_uploaded_file_not_the_server_path(tmp_path):
    upload = {"path": str(tmp_path / "0123abcd" / "selfie.png"), "orig_name": "selfie.png"}

    @app.user_errors
    def handler(source):
        raise NotAnImageError(f"cannot read the source image {source['path']}: not an image. Use a PNG or JPEG photo.")

    with pytest.raises(gr.Error) as caught:
        handler(upload)
    assert "selfie.png" in caught.value.message and str(tmp_path) not in caught.value.message
    with pytest.raises(gr.Error, match="No source face"):
        app.upload_path(None, "source face")


def test_an_empty_webcam_recording_says_to_record_again(tmp_path):
    """A browser that stops recording before its first chunk of video uploads an empty file (Gradio's recorder,
    on a busy machine): the page says so and asks for a longer recording, not for an mp4 re-export."""
    empty = tmp_path / "sample.webm"
    empty.write_bytes(b"")
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    with pytest.raises(gr.Error) as caught:
        app.user_errors(demo.use_recording)({"path": str(empty), "orig_name": "sample.webm"}, "dlib")
    assert caught.value.title == "Empty recording"
    assert "Record again" in caught.value.message and "mp4" not in caught.value.message
    assert demo.use_recording(None) == gr.skip()  # the recording cleared: the driving clip is left as it is


def test_a_picture_of_several_faces_says_the_largest_is_animated(tmp_path, monkeypatch):
    """A group photo uploaded as the source: the page says how many faces it holds and that the largest moves (a
    visitor otherwise sees one face of several animated with no word why that one); a portrait gets no note."""
    from mefacial.video import read_image, resize_frames

    face = read_image(FACE)
    group = np.full((420, 640, 3), 90, np.uint8)
    group[40:200, 40:200] = resize_frames(face[None], 160, 160)[0]
    group[120:400, 340:620] = resize_frames(face[None, :, ::-1], 280, 280)[0]
    path = tmp_path / "group.png"
    import imageio.v3 as iio

    iio.imwrite(path, group)
    notes = []
    monkeypatch.setattr(gr, "Info", lambda message, **kw: notes.append(message))
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    demo.check_source({"path": str(path), "orig_name": "group.png"}, "dlib")
    assert notes == ["2 faces in this picture: the largest is animated. To animate another, crop the picture to "
                     "that face."]
    notes.clear()
    demo.check_source({"path": str(FACE), "orig_name": "astronaut.png"}, "dlib")
    assert notes == []


def awp_fixture():
    for folder in model_fixture_dirs():
        meta = fixture_meta(folder)
        if meta.get("backbone") == "fomm" and meta.get("prior") == "awp":
            return folder, meta
    require(FIXTURES / "a FOMM AWP fixture", "a FOMM AWP model fixture")


def test_prior_tab_draws_the_awp_map_of_an_awp_model(monkeypatch):
    folder, meta = awp_fixture()
    config = config_from_reference(yaml.safe_load((folder / "config.yaml").read_text()), meta, name=folder.name)
    model = build_model(config)
    load_original_checkpoint(model, folder / "checkpoint.pth.tar", INFERENCE_PARTS["fomm"])
    engine = Engine(device="cpu", landmarks="dlib")
    engine.use_model("fomm-awp", model, weights=str(folder))
    monkeypatch.setenv(checkpoint_env_var("fomm-awp"), str(folder / "checkpoint.pth.tar"))  # "weights present"
    demo = app.Demo(engine, app.Limits())

    gallery, status = demo.prior({"path": str(FACE)}, None, 0, "dlib", True)
    captions = [caption for _, caption in gallery]
    assert captions == ["source: 68 landmarks", "source: 18 AU points", "source: EWP map (equal-weighted)",
                        "source: AWP map (adaptive weighted)"]
    ewp, awp = gallery[2][0], gallery[3][0]
    assert awp.shape == ewp.shape and not np.array_equal(awp, ewp)
    assert "AWP map: FOMM + AWP" in status


def test_prior_tab_says_why_there_is_no_awp_map(monkeypatch, tmp_path):
    monkeypatch.setenv("MEFACIAL_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variant in ("fomm-awp", "mraa-awp"):
        monkeypatch.delenv(checkpoint_env_var(variant), raising=False)
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    gallery, status = demo.prior({"path": str(FACE)}, None, 0, "dlib", True)
    assert gallery[-1][1] == "source: AWP map" and "weights of FOMM + AWP" in status


def test_warm_up_loads_the_landmark_models_and_never_raises(monkeypatch, caplog):
    """`python app.py` warms up before serving; a failing warm-up is logged and the app serves anyway."""
    engine = Engine(device="cpu", landmarks="dlib")
    calls = []
    real_animate = engine.animate
    monkeypatch.setattr(engine, "animate", lambda *a, **k: calls.append(k) or real_animate(*a, **k))
    viewed = []
    real_prior = engine.prior_view
    monkeypatch.setattr(engine, "prior_view", lambda *a, **k: viewed.append(a) or real_prior(*a, **k))
    assert app.warm_up(engine) > 0
    assert calls and calls[0]["variant"] == "dense"  # the default generator (its mesh models load too)
    assert viewed  # dlib's landmarks (the warp, Compare and the prior view), which `dense` no longer needs

    def broken(*args, **kwargs):
        raise NotAnImageError("example missing")

    monkeypatch.setattr(engine, "animate", broken)
    with caplog.at_level("WARNING", logger="mefacial.app"):
        assert app.warm_up(engine) is None
    assert "warm-up skipped: example missing" in caplog.text


@pytest.mark.parametrize("given, expected", [(None, None), ("default", None), ("on", True), ("off", False)])
def test_movement_scale_adaptation_defaults_to_the_backbones_own(monkeypatch, given, expected):
    """An API call that leaves adapt_scale out gets the backbone's original behaviour (None: MRAA on, FOMM off),
    not a fixed False."""
    engine = Engine(device="cpu", landmarks="dlib")
    seen = {}

    def animate(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine, "animate", animate)
    demo = app.Demo(engine, app.Limits())
    options = {} if given is None else {"adapt_scale": given}
    with pytest.raises(RuntimeError, match="stop here"):
        demo.generate({"path": str(app.EXAMPLE_FACE)}, {"path": str(app.EXAMPLE_CLIP)}, "mraa", "none", **options)
    assert seen["options"].adapt_scale is expected and seen["variant"] == "mraa-none"
    with pytest.raises(gr.Error, match="movement-scale adaptation must be one of"):
        demo.generate({"path": str(app.EXAMPLE_FACE)}, {"path": str(app.EXAMPLE_CLIP)}, "mraa", "none",
                      adapt_scale="sometimes")


def test_a_large_clip_is_previewed_at_a_bounded_size(tmp_path):
    """The uploaded clip's playable copy (the preview) of a high-resolution clip is written at most PREVIEW_SIDE
    px a side, its aspect and frames kept (a 2048 x 1088 clip's full-size copy took 6 s to encode)."""
    from mefacial.video import read_clip, resize_frames, write_video

    clip = read_clip(require(app.EXAMPLE_CLIP, "bundled example clip"))
    height, width = clip.frames.shape[1:3]
    large = tmp_path / "large.mp4"
    write_video(large, resize_frames(clip.frames[:8], 3 * height, 4 * width), clip.fps)  # wider than tall
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    preview, info, slowdown = demo.preview({"path": str(large), "orig_name": "large.mp4"})
    frames = read_clip(preview).frames
    assert frames.shape[0] == 8 and f"{4 * width}x{3 * height}" in info
    assert max(frames.shape[1:3]) == app.PREVIEW_SIDE
    assert abs(frames.shape[2] / frames.shape[1] - 4 * width / (3 * height)) < 0.02


def test_a_clip_starts_slowed_down_to_be_seen(tmp_path):
    """Results start slowed down to play about PLAYBACK_S (a whole factor, 1-10): a 0.25 s micro-expression
    played at real time is over before a visitor sees it; a clip of several seconds plays at real time."""
    from mefacial import video
    from mefacial.video import read_clip, write_video

    def clip(frames, fps):
        return SimpleNamespace(num_frames=frames, fps=fps)

    assert app.suggested_slowdown(clip(50, 200)) == 8  # CASME II: 0.25 s
    assert app.suggested_slowdown(clip(12, 25)) == 5  # the bundled example: 0.48 s
    assert app.suggested_slowdown(clip(100, 50)) == 1 and app.suggested_slowdown(clip(300, 30)) == 1
    assert app.suggested_slowdown(clip(3, 200)) == 10  # at most 10
    assert video.suggested_slowdown(0.25) == 8 and video.suggested_slowdown(0) == 1  # (what the app and CLI use)
    frames = read_clip(require(app.EXAMPLE_CLIP, "bundled example clip")).frames
    fast = tmp_path / "fast.mp4"
    write_video(fast, frames, fps=100)  # 0.12 s
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    preview, info, slowdown = demo.preview({"path": str(fast), "orig_name": "fast.mp4"})
    assert slowdown == 10 and info.endswith("(0.12 s); the preview plays x10 slower")
    assert read_clip(preview).fps == pytest.approx(10)  # the preview plays as its results start: 1.2 s
    # the Compare tab's preview (its landmark backend given) and the Prior tab's play alike
    compare_preview, compare_info, compare_slowdown = demo.preview({"path": str(fast), "orig_name": "fast.mp4"}, "dlib")
    assert (compare_info, compare_slowdown) == (info, slowdown) and read_clip(compare_preview).fps == pytest.approx(10)
    slider, prior_preview, prior_info = demo.prior_clip({"path": str(fast), "orig_name": "fast.mp4"}, 20, "dlib")
    assert prior_info == info and read_clip(prior_preview).fps == pytest.approx(10)
    assert slider["maximum"] == len(frames) - 1 and slider["value"] == len(frames) - 1  # (frame 20: the last)


def test_the_app_refuses_to_start_with_a_checkpoint_that_is_not_there(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        app.main(["--checkpoint", f"fomm-awp={tmp_path / 'nowhere.pth.tar'}", "--device", "cpu"])
    with pytest.raises(SystemExit, match="training-free"):
        app.main(["--checkpoint", f"dense={__file__}", "--device", "cpu"])


def test_a_taken_port_is_one_line_naming_the_flag_not_a_traceback():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} is taken.*--port"):
            app.main(["--port", str(port), "--device", "cpu"])


def test_bold_text_is_drawn_in_one_font():
    """Gradio's bundled semi-bold faces hold a few glyphs ('A', 'B'), so bold text mixed two fonts: the page's
    theme declares the regular faces only (bold drawn from them), and still no font from the network."""
    css = app.theme()._get_theme_css()
    assert "SourceSansPro-Regular" in css and "IBMPlexMono-Regular" in css
    assert "SemiBold" not in css and "googleapis" not in css


def test_a_slow_first_answer_does_not_stop_the_app(monkeypatch):
    """Gradio probes its own page at launch and stopped the program where the first answer took over 3 s (a busy
    machine) or a proxy caught localhost; app.launch skips that probe: the page serves."""
    import socket

    import httpx
    import gradio.networking

    monkeypatch.setattr(gradio.networking, "url_ok", lambda url: False)  # the probe as a slow machine answers it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = app.build_demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    try:
        app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
        assert httpx.get(demo.local_url, timeout=30).status_code == 200
    finally:
        demo.close()


def test_a_large_photo_is_fitted_before_the_results_are_pasted_back_into_it(tmp_path):
    """Pasted back into a large photo, the results are made in it fitted to PASTE_SIDE (a 12-megapixel photo's 300
    frames held 11 GB and make an mp4 browsers do not play), on the Generate, Compare and Action units tabs, and
    their status or table says so; a picture within PASTE_SIDE, or a result not pasted back, keeps its size."""
    from PIL import Image

    from mefacial.video import read_clip, read_image, resize_frames

    face = read_image(FACE)
    large = tmp_path / "large.jpg"
    Image.fromarray(resize_frames(face[None], 1536, 2048)[0]).save(large)  # wider than tall
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    video, _, _, status = demo.generate({"path": str(large)}, {"path": str(app.EXAMPLE_CLIP)}, paste_back=True,
                                        progress=lambda *a, **k: None)
    width, height = app.PASTE_SIDE, app.PASTE_SIDE * 3 // 4
    assert read_clip(video).frames.shape[1:3] == (height, width)
    assert status.endswith(f"pasted back into the picture fitted to {width}x{height} (from 2048x1536)")
    grid, table = demo.compare({"path": str(large)}, {"path": str(app.EXAMPLE_CLIP)}, ["dense"], paste_back=True,
                               progress=lambda *a, **k: None)
    assert table.endswith(f"Pasted back into the picture fitted to {width}x{height} (from 2048x1536).")
    video, _, _, status = app.synthesize_clip(demo, str(large), "6:C,12:C", 40, 20, 40, 100, paste_back=True,
                                              progress=lambda *a, **k: None)  # the Action units tab
    assert read_clip(video).frames.shape[1:3] == (height, width)
    assert status.endswith(f"pasted back into the picture fitted to {width}x{height} (from 2048x1536)")
    assert demo.paste_target(face, True) == (face, "") and demo.paste_target(read_image(large), False)[1] == ""


def test_a_one_frame_clip_is_pointed_out_in_the_status(tmp_path):
    """A single frame uploaded as the clip (a one-frame GIF) animates, and the status says why the face did not
    move, in the page's words ('1 frame', not '1 frames')."""
    from mefacial.video import read_clip, write_video

    still = write_video(tmp_path / "still.gif", read_clip(app.EXAMPLE_CLIP).frames[:1], 25)
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    _, _, _, status = demo.generate({"path": str(FACE)}, {"path": str(still)}, progress=lambda *a, **k: None)
    assert ": 1 frame in " in status and status.endswith(" · the driving clip is a single frame, so there was no "
                                                         "motion to carry: upload a clip"), status
    _, _, _, status = demo.generate({"path": str(FACE)}, {"path": str(app.EXAMPLE_CLIP)}, progress=lambda *a, **k: None)
    assert "single frame" not in status and " frames in " in status, status

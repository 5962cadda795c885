"""Hostile and unusual inputs through `Engine.animate` (warp variant, dlib landmarks: no weights needed).

Each case is either answered correctly (unusual but valid pictures: the face is
found and animated) or refused with its own typed error from `mefacial.errors`
whose message names the cause and the remedy; never a foreign exception, a hang,
a leaked file descriptor or a leaked temporary file.

Decisions documented here:
- a 1-frame driving clip is valid: its only frame is the onset, so the result is
  one motionless frame (the source face, unchanged);
- a 0-frame clip is an error (nothing to animate);
- a face that leaves the clip midway raises NoFaceError naming that frame.

Covered elsewhere, not repeated: a checkpoint of another architecture and a
pickle with a payload (tests/test_checkpoints.py); reader-level bad files and
limits (tests/test_video.py); image modes at the reader level (tests/test_video.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import DATA, FIXTURES, fixture_meta, left_open, open_files, require
from hostile_files import encode, gif_bomb, png_header_only, png_rgb16
from mefacial import Engine, video
from mefacial.landmarks import get_detector
from mefacial.errors import (CheckpointError, CutInClipError, InputError, InputTooLargeError, MefacialError, NoFaceError,
                             NotAnImageError, UnreadableVideoError, WeightsNotFoundError)
from mefacial.video import Limits

EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", landmarks="dlib")


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A real face (skimage's astronaut), cut to 240 x 240 around the head."""
    from skimage.data import astronaut

    return astronaut()[0:240, 110:350].copy()


@pytest.fixture(scope="module")
def driving_gif() -> Path:
    gifs = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    assert gifs, "no driving GIFs in the shared data"
    return gifs[0]


def assert_message_helps(err: BaseException) -> None:
    """A typed error's message says what is wrong and what to do (a few words of each, not a bare repr)."""
    message = str(err)
    assert isinstance(err, MefacialError), f"foreign exception {type(err).__name__}: {message}"
    assert len(message) > 40 and any(w in message.lower() for w in
                                     ("use ", "pass ", "re-export", "trim", "raise ", "downscale", "choose", "copy"))


# ----------------------------------------------------------------------------- broken and oversized files


def test_broken_files_raise_their_own_errors_without_leaks(engine, face, tmp_path, driving_gif, monkeypatch):
    original = video.read_clip(driving_gif)
    mp4 = video.write_video(tmp_path / "good.mp4", original.frames[:12], original.fps)
    cases: list[tuple[str, Path, type[MefacialError], str]] = []

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases.append(("driving", empty, UnreadableVideoError, "empty"))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    cases.append(("driving", text, UnreadableVideoError, "no decodable video"))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    cases.append(("driving", truncated, UnreadableVideoError, "truncated"))
    bomb = tmp_path / "bomb.gif"
    gif_bomb(bomb)
    cases.append(("driving", bomb, InputTooLargeError, "pixels"))
    cases.append(("source", bomb, InputTooLargeError, "pixels"))
    huge = tmp_path / "huge.png"
    png_header_only(huge, 20000, 20000)
    cases.append(("source", huge, InputTooLargeError, "megapixels"))
    empty_png = tmp_path / "empty.png"
    empty_png.write_bytes(b"")
    cases.append(("source", empty_png, NotAnImageError, "empty"))
    cases.append(("source", mp4, NotAnImageError, "looks like a video"))

    assert bomb.stat().st_size < 100  # the bomb is tiny on disk
    private_tmp = tmp_path / "tmp"  # a temp folder of this test alone (the system one is shared)
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # for ffmpeg and any other subprocess
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    engine.animate(face, face[None], variant="warp")  # warm up: the detector's files are read and closed
    before = open_files()
    for role, path, error, words in cases:
        source, driving = (path, mp4) if role == "source" else (face, path)
        with pytest.raises(error, match=words) as caught:
            engine.animate(source, driving, variant="warp")
        assert_message_helps(caught.value)
    assert not left_open(before, tmp_path), "a refused input left a file open (or its ffmpeg pipe)"
    assert not list(private_tmp.iterdir()), "a refused input left a temporary file"


def test_limits_refuse_a_huge_upload_and_a_long_clip_before_decoding(face, driving_gif):
    size = driving_gif.stat().st_size
    small = Engine(device="cpu", landmarks="dlib", limits=Limits(max_bytes=size - 1))  # a "1 GB upload"
    with pytest.raises(InputTooLargeError, match="MiB") as caught:
        small.animate(face, driving_gif)
    assert_message_helps(caught.value)
    short = Engine(device="cpu", landmarks="dlib", limits=Limits(max_seconds=0.2))  # a "10-minute clip"
    with pytest.raises(InputTooLargeError, match="lasts") as caught:
        short.animate(face, driving_gif)
    assert_message_helps(caught.value)


def test_zero_frame_clips_are_refused(engine, face, tmp_path):
    with pytest.raises(InputError):
        engine.animate(face, np.zeros((0, 64, 64, 3), np.uint8))
    import imageio_ffmpeg

    empty_video = tmp_path / "zero.mp4"  # a container that ffmpeg wrote without a single frame
    writer = imageio_ffmpeg.write_frames(str(empty_video), (64, 64), ffmpeg_log_level="error")
    writer.send(None)
    writer.close()
    with pytest.raises(UnreadableVideoError) as caught:
        engine.animate(face, empty_video)
    assert_message_helps(caught.value)


def test_one_frame_clip_gives_one_motionless_frame(engine, face, tmp_path):
    result = engine.animate(face, face[None], variant="warp")
    assert result.frames.shape[0] == 1
    # the only frame is the onset: no motion, the source face comes back
    assert np.abs(result.frames[0].astype(int) - result.model_source.astype(int)).mean() < 1.0
    for suffix in (".gif", ".mp4"):  # the same as a file
        path = video.write_video(tmp_path / f"one{suffix}", face[None], 25.0)
        assert video.read_clip(path).num_frames == 1
        assert engine.animate(face, path, variant="warp").frames.shape[0] == 1


# ----------------------------------------------------------------------------- unusual but valid pictures


def test_unusual_picture_modes_find_the_face(engine, face, tmp_path):
    """16-bit, CMYK, RGBA and greyscale sources give the same face box as the plain RGB photo."""
    reference = engine.animate(face, face[None], variant="warp").crop_box
    grey = face.mean(axis=-1).astype(np.uint8)
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:, :20, 3] = 0  # a transparent strip
    files = {
        "grey16.png": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "rgb16.png": png_rgb16(face.astype(np.uint16) * 257),
        "cmyk.jpg": encode(Image.fromarray(face).convert("CMYK"), "JPEG", quality=95),
        "rgba.png": encode(Image.fromarray(rgba), "PNG"),
        "grey.png": encode(Image.fromarray(grey), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        pixels = video.read_image(tmp_path / name)
        assert pixels.shape == face.shape and pixels.dtype == np.uint8, name
        box = engine.animate(tmp_path / name, face[None], variant="warp").crop_box
        assert abs(box.x0 - reference.x0) <= 4 and abs(box.y0 - reference.y0) <= 4, name
        assert abs(box.size - reference.size) <= 6, name


def test_exif_rotated_photo_is_turned_upright_before_detection(engine, face, tmp_path):
    # A camera stores the pixels sideways and an orientation tag: 6 = "rotate 90 degrees clockwise to view".
    sideways = np.ascontiguousarray(np.rot90(face, k=1))  # the face lies on its side
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path / "phone.jpg"
    path.write_bytes(encode(Image.fromarray(sideways), "JPEG", quality=95, exif=exif.tobytes()))
    upright = video.read_image(path)
    assert upright.shape == face.shape and np.abs(upright.astype(int) - face).mean() < 6
    result = engine.animate(path, face[None], variant="warp")
    reference = engine.animate(face, face[None], variant="warp")
    assert abs(result.crop_box.x0 - reference.crop_box.x0) <= 4
    assert abs(result.crop_box.y0 - reference.crop_box.y0) <= 4


def test_two_faces_use_the_largest(engine, face):
    small = np.asarray(Image.fromarray(face).resize((160, 160), Image.BILINEAR))
    canvas = np.full((240, 420, 3), 128, np.uint8)
    canvas[40:200, 0:160] = small  # small face on the left
    canvas[:, 180:420] = face  # the larger face on the right
    box = engine.animate(canvas, face[None], variant="warp").crop_box
    assert box.x0 >= 170, f"the crop {box} is not on the larger (right) face"


def test_no_face_raises_no_face_error(engine, face):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, face.shape, dtype=np.uint8)
    with pytest.raises(NoFaceError, match="source") as caught:
        engine.animate(noise, face[None], variant="warp")
    assert caught.value.frame_index is None
    assert len(str(caught.value)) > 40  # says what to do, not just "no face"
    with pytest.raises(NoFaceError, match="source"):  # (both faces are searched at once: the source's error first)
        engine.animate(noise, noise[None], variant="warp")
    with pytest.raises(NoFaceError, match="driving clip's first frame") as caught:  # where its face box goes
        engine.animate(face, np.stack([noise] * 3), variant="warp")
    assert caught.value.frame_index == 0 and "(of 1)" not in str(caught.value)


def test_face_at_the_border_is_padded_and_animated(engine, face):
    shifted = np.full_like(face, 0)
    shifted[:, :150] = face[:, 90:]  # the face's left side is cut by the image border
    result = engine.animate(shifted, face[None], variant="warp")
    assert result.crop_box.x0 < 0, "the box should reach past the left border (padded)"
    points = get_detector("dlib").detect(shifted, role="source").points[0]  # 68 x 2 in the picture
    assert points[:, 0].min() < 0  # dlib places the cut-off jaw past the border ...
    assert result.crop_box.x0 <= points[:, 0].min(), "... and the crop must hold it (padded), not cut it off"
    assert result.frames.shape[0] == 1 and result.frames.dtype == np.uint8


def test_face_leaving_the_clip_names_the_frame(engine, face):
    clip = np.repeat(face[None], 6, axis=0)
    clip[4:] = 0  # the face is gone from frame 4 on
    with pytest.raises(NoFaceError, match="frame 4") as caught:
        engine.animate(face, clip, variant="warp")
    assert caught.value.frame_index == 4


def test_a_clip_that_cuts_to_another_person_is_refused_naming_the_frame(engine):
    """Every generator measures motion from the clip's first face: another person's face after a cut would read
    as a large expression, so the clip is refused, naming the frame, in memory and as a stream (the cut at a chunk
    border, where the check joins the chunk before)."""
    gifs = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    one, other = (video.resize_frames(video.read_clip(path).frames[:16], 160, 160) for path in gifs[:2])
    clip = np.concatenate([one, other])  # two people (the shared clips' subjects), cut at frame 16
    source = DATA / "faces" / "asian_female.png"
    with pytest.raises(CutInClipError, match="frame 16") as caught:
        engine.prepare(source, clip, fps=25)
    assert_message_helps(caught.value)
    assert "0.64 s" in caught.value.page_message and "trim" in caught.value.page_message.lower()
    prepared = engine.prepare(source, clip, fps=25, stream=True, chunk=8)
    with pytest.raises(CutInClipError, match="frame 16"):
        for _ in engine.run(prepared, "warp"):
            pass
    faded = np.concatenate([one, np.zeros_like(one[:2]), other])  # through black frames: no face either side
    with pytest.raises(CutInClipError, match="another person's face at frame 18"):
        engine.prepare(source, faded, fps=25)


def test_without_dlibs_recognition_model_a_cut_is_not_judged_by_who(engine, monkeypatch, caplog):
    """Where face-recognition-models lacks the network, the check says so in the log and compares sizes only."""
    import mefacial.engine as engine_module

    def missing(image, points):
        raise WeightsNotFoundError("dlib's dlib_face_recognition_resnet_model_v1.dat was not found")

    monkeypatch.setattr(engine_module, "face_descriptor", missing)
    gifs = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    one, other = (video.resize_frames(video.read_clip(path).frames[:4], 160, 160) for path in gifs[:2])
    with caplog.at_level("WARNING", logger="mefacial"):
        try:
            engine.prepare(one[0], np.concatenate([one, other]), fps=25)
        except CutInClipError as error:  # (where the two faces' sizes differ by over SHOT_ZOOM)
            assert "another person" not in str(error)
    assert "not checked for cuts to another person" in caplog.text


def test_a_cut_to_a_closer_shot_of_the_face_is_refused(engine, face):
    """The same person framed anew (here 1.4x closer) would read as a large expression too."""
    import cv2

    closer = cv2.resize(face, None, fx=1.4, fy=1.4, interpolation=cv2.INTER_CUBIC)[48:288, 48:288]
    clip = np.stack([face] * 3 + [closer] * 3)
    with pytest.raises(CutInClipError, match="another shot of the face at frame 3") as caught:
        engine.prepare(face, clip, fps=25)
    assert_message_helps(caught.value)
    engine.prepare(face, np.stack([face] * 3 + [cv2.resize(face, None, fx=1.05, fy=1.05)[6:246, 6:246]] * 3),
                   fps=25)  # (a head moving closer by 5 % in a frame passes)


def test_one_person_jumping_or_flashed_is_no_cut(engine, face):
    """A sudden change of the picture with one person in it (the head or camera jumping, a flash) passes."""
    canvas = np.full((6, 240, 400, 3), 128, np.uint8)
    canvas[:3, :, 0:240] = face
    canvas[3:, :, 150:390] = face  # the head jumps by 150 px at frame 3
    canvas[5] = np.clip(canvas[5].astype(np.int16) * 2, 0, 255)  # and a flash at frame 5 (the face 94 % clipped)
    assert sorted(video.sudden_changes(canvas)) == [3, 5]
    engine.prepare(face, canvas, fps=25)  # (no error)


# ----------------------------------------------------------------------------- broken weights


def test_nan_producing_weights_raise_checkpoint_error():
    """Weights with a NaN would turn every frame black (NaN -> 0 in uint8): the engine refuses instead."""
    from mefacial.config import config_from_reference
    from mefacial.models import build_model

    folder = require(FIXTURES / "fomm_none", "FOMM reference fixture")
    config = config_from_reference(yaml.safe_load((folder / "config.yaml").read_text()), fixture_meta(folder),
                                   name="fomm_none")
    model = build_model(config)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    engine = Engine(device="cpu")
    engine.use_model("fomm-none", model)
    size = config.image_size
    grey = np.full((size, size, 3), 120, np.uint8)
    with pytest.raises(CheckpointError, match="NaN") as caught:
        engine.animate(grey, np.repeat(grey[None], 2, axis=0), variant="fomm-none", crop=False)
    assert_message_helps(caught.value)
    with pytest.raises(CheckpointError, match="NaN"):  # the streamed path too
        list(engine.run(engine.prepare(grey, np.repeat(grey[None], 2, axis=0), size=size, stream=True, crop=False),
                        "fomm-none"))


def test_face_box_reaches_past_only_the_border_that_landmarks_cross():
    """Unit check of the border rule: landmarks past the top edge pull the box past it; the other sides stay in."""
    ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 68)), np.sin(np.linspace(0, 2 * np.pi, 68))], axis=1)
    points = 60 + 40 * ring  # a 80 px "face" centred at (60, 60)
    inside = video.face_box(points, (300, 300))
    assert inside.x0 >= 0 and inside.y0 >= 0
    cut = video.face_box(points - [0, 50], (300, 300))  # its top lies 30 px above the picture
    assert cut.y0 <= (points[:, 1] - 50).min() < 0 and cut.y1 > (points[:, 1] - 50).max()
    assert cut.x0 >= 0


def test_tiny_pictures_raise_no_face_error(engine, face):
    for tiny in (np.zeros((1, 1, 3), np.uint8), np.zeros((8, 5), np.uint8)):
        with pytest.raises(NoFaceError):
            engine.animate(tiny, face[None], variant="warp")
        with pytest.raises(NoFaceError):
            engine.animate(face, tiny[None] if tiny.ndim == 3 else tiny[None, ..., None], variant="warp")

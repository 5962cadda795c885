"""Hostile and unusual uploads through the demo's API (`gradio_client` against `python app.py`).

The same inputs as tests/test_hostile_inputs.py (the engine level), now as a user of the public
Space sends them: each answer is either a correct result (unusual but valid files) or an error
whose title is the engine's error type and whose message names the cause and the remedy. After
all of them the app still serves, holds no more open files than before, and has written no
output for a refused request. Plus attacks that are not uploads: paths and URLs smuggled into
the request instead of an upload, a 1 GB upload, absurd option values.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_server import APPS, MAX_UPLOAD_MB, REPO, files_under
from conftest import DATA, require
from hostile_files import encode, gif_bomb, png_header_only, png_rgb16
from mefacial import get_variant
from mefacial.errors import (CutInClipError, InputTooLargeError, NoFaceError, NotAnImageError, UnreadableVideoError,
                             is_cli_free)
from mefacial.video import read_clip, write_video

pytestmark = pytest.mark.slow

EXAMPLE_CLIP = REPO / "examples" / "brow_raise.mp4"
EXIF_ORIENTATION = 0x0112



@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A real face (skimage's astronaut), 240 x 240 around the head."""
    from skimage.data import astronaut

    return astronaut()[0:240, 110:350].copy()


@pytest.fixture(scope="module")
def files(tmp_path_factory, face) -> dict[str, Path]:
    """Every file the tests upload, by name."""
    folder = tmp_path_factory.mktemp("uploads")
    made: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        made[name] = folder / name
        made[name].write_bytes(data)

    clip = read_clip(EXAMPLE_CLIP)
    made["clip.mp4"] = write_video(folder / "clip.mp4", clip.frames[:6], clip.fps)
    put("face.png", encode(Image.fromarray(face), "PNG"))
    grey = face.mean(axis=-1).astype(np.uint8)
    put("rgb16.png", png_rgb16(face.astype(np.uint16) * 257))
    put("grey16.png", encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"))
    put("cmyk.jpg", encode(Image.fromarray(face).convert("CMYK"), "JPEG", quality=95))
    put("rgba.png", encode(Image.fromarray(np.dstack([face, np.full(face.shape[:2], 200, np.uint8)])), "PNG"))
    put("grey.jpg", encode(Image.fromarray(grey), "JPEG", quality=95))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to view": the pixels lie on their side
    put("phone.jpg", encode(Image.fromarray(np.ascontiguousarray(np.rot90(face))), "JPEG", exif=exif.tobytes()))
    two = np.full((240, 420, 3), 128, np.uint8)
    two[40:200, 0:160] = np.asarray(Image.fromarray(face).resize((160, 160)))
    two[:, 180:] = face
    put("two_faces.png", encode(Image.fromarray(two), "PNG"))
    border = np.zeros_like(face)
    border[:, :150] = face[:, 90:]
    put("border.png", encode(Image.fromarray(border), "PNG"))
    put("noise.png", encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, face.shape, np.uint8)), "PNG"))
    put("empty.png", b"")
    put("empty.mp4", b"")
    put("text.mp4", b"this is not a video\n" * 100)
    put("truncated.mp4", made["clip.mp4"].read_bytes()[: made["clip.mp4"].stat().st_size // 2])
    put("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="40"/></svg>')
    gif_bomb(folder / "bomb.gif")
    made["bomb.gif"] = folder / "bomb.gif"
    png_header_only(folder / "huge.png", 20000, 20000)
    made["huge.png"] = folder / "huge.png"
    made["one_frame.mp4"] = write_video(folder / "one_frame.mp4", face[None], 25.0)
    leaving = np.repeat(face[None], 6, axis=0)
    leaving[4:] = 0
    made["leaving.mp4"] = write_video(folder / "leaving.mp4", leaving, 25.0)
    writer = imageio_ffmpeg.write_frames(str(folder / "zero.mp4"), (64, 64), ffmpeg_log_level="error")
    writer.send(None)
    writer.close()
    made["zero.mp4"] = folder / "zero.mp4"
    made["ten_minutes.mp4"] = folder / "ten_minutes.mp4"  # a real 10-minute clip: 600 frames at 1 fps
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=gray:s=32x32:r=1",
                    "-t", "600", "-pix_fmt", "yuv420p", str(made["ten_minutes.mp4"])], check=True)
    return made


VALID = [  # (source, driving, frames expected): unusual but valid uploads animate normally
    ("rgb16.png", "clip.mp4", 6), ("grey16.png", "clip.mp4", 6), ("cmyk.jpg", "clip.mp4", 6),
    ("rgba.png", "clip.mp4", 6), ("grey.jpg", "clip.mp4", 6), ("phone.jpg", "clip.mp4", 6),
    ("two_faces.png", "clip.mp4", 6), ("border.png", "clip.mp4", 6), ("face.png", "one_frame.mp4", 1),
]

REFUSED = [  # (source, driving, error type whose short title is shown, words of its message)
    ("empty.png", "clip.mp4", NotAnImageError, "empty"),
    ("drawing.svg", "clip.mp4", NotAnImageError, "not an image"),
    ("clip.mp4", "clip.mp4", NotAnImageError, "looks like a video"),
    ("huge.png", "clip.mp4", InputTooLargeError, "megapixels"),
    ("bomb.gif", "clip.mp4", InputTooLargeError, "pixels"),
    ("noise.png", "clip.mp4", NoFaceError, "face"),
    ("face.png", "empty.mp4", UnreadableVideoError, "empty"),
    ("face.png", "text.mp4", UnreadableVideoError, "no decodable video"),
    ("face.png", "truncated.mp4", UnreadableVideoError, "truncated"),
    ("face.png", "zero.mp4", UnreadableVideoError, "no decodable video"),
    ("face.png", "bomb.gif", InputTooLargeError, "pixels"),
    ("face.png", "leaving.mp4", NoFaceError, "frame 4"),
    ("face.png", "ten_minutes.mp4", InputTooLargeError, "600"),
]


def assert_page_wording(title: str, message: str) -> None:
    """A page error: the short title in bold, then at most three plain sentences, no flags or variables."""
    head, _, text = message.partition("<br>")
    assert head == f"<strong>{title}</strong>", message
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text) if s]
    assert 1 <= len(sentences) <= 3, sentences
    assert text.endswith(".") and not re.search(r"[,;:]\.$|\.\.$| \.$", text), text
    assert is_cli_free(text), text


def request_dirs(app_url: str) -> set[Path]:
    """The per-request output folders the app has written."""
    return set(APPS[app_url].tmp.glob("mefacial-app-*/req-*"))


def test_unusual_but_valid_uploads_are_animated(client, files):
    for source, driving, frames in VALID:
        video, _, _, status = client.predict(source=handle_file(files[source]), driving=handle_file(files[driving]),
                                             api_name="/generate")
        assert iio.imread(video).shape[0] == frames, source
        assert f": {frames} frame{'s' * (frames != 1)} in " in status, status
        assert ("the driving clip is a single frame" in status) == (frames == 1), status  # (nothing moved: said)


def test_refused_uploads_name_their_cause_and_leave_nothing_behind(app_url, client, files):
    app = APPS[app_url]
    good = dict(source=handle_file(files["face.png"]), driving=handle_file(files["clip.mp4"]), api_name="/generate")
    client.predict(**good)  # warm-up: models, detector and ffmpeg loaded, connections open
    held, outputs = app.open_files(), request_dirs(app_url)
    for source, driving, error, words in REFUSED:
        with pytest.raises(AppError) as caught:
            client.predict(source=handle_file(files[source]), driving=handle_file(files[driving]), api_name="/generate")
        message, title = str(caught.value), error.title
        assert caught.value.title == title, f"{source} + {driving}: {title} expected, got {caught.value.title}: {message}"
        assert words in message and len(message) > 40, f"{source} + {driving}: {message}"
        assert_page_wording(title, message)
        assert str(app.gradio_tmp) not in message, "the message shows a server path instead of the uploaded name"
    assert request_dirs(app_url) == outputs, "a refused request wrote outputs"
    client.predict(**good)  # still serving
    assert app.open_files() <= held, f"refused requests left files open in the app: {app.open_files() - held}"


def test_a_clip_cutting_to_another_person_is_refused_on_the_page(client, files, tmp_path):
    clip = read_clip(EXAMPLE_CLIP)  # the astronaut's brow raise, then a shared clip's subject from frame 6
    other = read_clip(sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))[0]).frames[:4]
    other = np.stack([np.asarray(Image.fromarray(frame).resize(clip.frames.shape[2:0:-1])) for frame in other])
    cut = write_video(tmp_path / "cut.mp4", np.concatenate([clip.frames[:6], other]), 25.0)
    with pytest.raises(AppError) as caught:
        client.predict(source=handle_file(files["face.png"]), driving=handle_file(cut), api_name="/generate")
    assert caught.value.title == CutInClipError.title and "frame 6" in str(caught.value) and "0.24 s" in str(caught.value)
    assert_page_wording(CutInClipError.title, str(caught.value))


def test_a_1_gb_upload_is_refused_without_filling_the_disk(app_url):
    """Streamed, never held in memory here; the server answers 413 and keeps no part of it."""
    sent = 0
    boundary = "mefacialboundary"

    def body():
        nonlocal sent
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.mp4\"\r\n"
               "Content-Type: video/mp4\r\n\r\n").encode()
        chunk = bytes(2**20)
        for _ in range(1024):
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before = sum(f.stat().st_size for f in files_under(APPS[app_url].gradio_tmp))
    try:
        answer = httpx.post(app_url + "gradio_api/upload", content=body(), timeout=120,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        status = answer.status_code
    except httpx.TransportError:  # the server may close the connection before reading the rest
        status = None
    after = sum(f.stat().st_size for f in files_under(APPS[app_url].gradio_tmp))
    print(f"1 GB upload: status {status}, {sent / 2**20:.0f} MiB sent before the answer, "
          f"upload folder grew by {(after - before) / 2**20:.1f} MiB")
    assert status in (413, None)
    assert after - before <= (MAX_UPLOAD_MB + 1) * 2**20, "the refused upload was kept on disk"


def call_raw(app_url: str, api_name: str, data: list) -> tuple[str, str]:
    """Call an endpoint over plain HTTP with a hand-made payload -> (last event name, its data)."""
    with httpx.Client(base_url=app_url + "gradio_api/", timeout=120) as http:
        event_id = http.post(f"call/{api_name}", json={"data": data}).raise_for_status().json()["event_id"]
        text = http.get(f"call/{api_name}/{event_id}").text
    events = [block for block in text.strip().split("\n\n") if block]
    name, payload = events[-1].split("\n", 1)
    return name.removeprefix("event: "), payload.removeprefix("data: ")


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_paths_and_urls_instead_of_uploads_are_refused(app_url, files, tmp_path):
    """Only files uploaded through the upload route reach the engine: not a server path, not a loopback URL."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(files["face.png"].read_bytes())  # a readable image the user did not upload
    for smuggled in (str(secret), "/etc/passwd", str(files["clip.mp4"]), "../../etc/passwd",
                     app_url + "gradio_api/info", "http://127.0.0.1:1/x.png", "file:///etc/passwd"):
        event, payload = call_raw(app_url, "preview_driving", [file_data(smuggled)])
        assert event == "error", f"{smuggled} was accepted: {payload}"
        assert "root:" not in payload
    event, payload = call_raw(app_url, "generate", [file_data(str(secret)), file_data(str(files["clip.mp4"])),
                                                    "warp"])
    assert event == "error", payload


@pytest.mark.parametrize("options, words", [
    ({"backbone": "../../etc/passwd"}, "backbone must be one of"),
    ({"backbone": "fomm", "prior": "__import__('os')"}, "valid backbone/prior pairs"),
    ({"magnify": "nan"}, "magnification"),  # NaN is no JSON number: sent as text
    ({"magnify": 1e308}, "magnification"),
    ({"slowdown": -3}, "slow-down"),
    ({"landmarks": "/tmp/model.dat"}, "landmark backend"),
    ({"format": "exe"}, "output format"),
    ({"motion": "sideways", "backbone": "mraa"}, "[Mm]otion.*'sideways'"),
])
def test_absurd_options_are_refused_by_name(client, files, options, words):
    with pytest.raises(AppError, match=words):
        client.predict(source=handle_file(files["face.png"]), driving=handle_file(files["clip.mp4"]), **options,
                       api_name="/generate")


def test_prior_and_compare_refuse_absurd_options(client, files):
    with pytest.raises(AppError, match="driving frame"):
        client.predict(source=handle_file(files["face.png"]), driving=handle_file(files["clip.mp4"]), frame=-1,
                       api_name="/prior")
    with pytest.raises(AppError, match="unknown"):
        client.predict(source=handle_file(files["face.png"]), driving=handle_file(files["clip.mp4"]),
                       variants=["warp", "../../x"], api_name="/compare")
    grid, table = client.predict(source=handle_file(files["face.png"]), driving=handle_file(files["clip.mp4"]),
                                 variants=["warp"] * 500, api_name="/compare")  # repeated: one column
    assert table.count(f"| {get_variant('warp').label} |") == 1
    assert iio.imread(grid).shape[0] == 6

"""Clip and image I/O, limits and typed errors, face crop and paste-back (mefacial.video).

Real inputs: the shared micro-expression GIFs and skimage's astronaut (512x512 colour).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, require
from mefacial import video
from mefacial.errors import InputTooLargeError, NotAnImageError, UnreadableVideoError
from mefacial.video import Limits


@pytest.fixture(scope="module")
def driving_gifs() -> list[Path]:
    clips = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    assert clips, "no driving GIFs in the shared data"
    return clips


@pytest.fixture(scope="module")
def clip(driving_gifs) -> video.Clip:
    return video.read_clip(driving_gifs[0])


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage.data import astronaut

    return astronaut()


# ----------------------------------------------------------------------------- reading clips


def test_driving_gifs_read_with_their_frame_rate(driving_gifs):
    for path in driving_gifs:
        with Image.open(path) as gif:
            count, delay = gif.n_frames, gif.info["duration"]
        clip = video.read_clip(path)
        assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 4 and clip.frames.shape[-1] == 3
        # consecutive identical frames may be stored merged; they come back as separate frames
        assert clip.num_frames >= count
        assert clip.fps == pytest.approx(1000.0 / delay) and clip.fps_source == "gif"


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
@pytest.mark.parametrize("fps, slowdown", [(50.0, 1.0), (200.0, 8.0), (30.0, 1.0)])
def test_written_clip_reads_back_with_frame_count_and_fps(tmp_path, clip, suffix, fps, slowdown):
    path = video.write_video(tmp_path / f"out{suffix}", clip.frames, fps, slowdown=slowdown)
    back = video.read_clip(path)
    assert back.num_frames == clip.num_frames
    # mp4 stores the rate as a rational; GIF delays are whole centiseconds
    assert back.fps == pytest.approx(fps / slowdown, rel=0.01 if suffix == ".gif" else 1e-3)
    error = np.abs(back.frames.astype(int) - clip.frames).mean()
    assert error < (0.5 if suffix == ".gif" else 3.0), f"{suffix} frames changed by {error:.2f} on average"


@pytest.mark.parametrize("suffix, codec", [(".webm", "libvpx-vp9"), (".avi", "mpeg4"), (".mov", "libx264")])
def test_other_containers_read_with_their_frame_rate(tmp_path, clip, suffix, codec):
    import imageio_ffmpeg

    path = tmp_path / f"clip{suffix}"
    frames = clip.frames[:12]
    writer = imageio_ffmpeg.write_frames(str(path), frames.shape[2:0:-1], fps=30, codec=codec, macro_block_size=1,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    back = video.read_clip(path)
    assert back.num_frames == len(frames) and back.fps == pytest.approx(30) and back.fps_source == "container"
    assert np.abs(back.frames.astype(int) - frames).mean() < 8


def test_fast_gif_drops_frames_to_the_browser_minimum_delay(tmp_path, clip):
    kept, delays = video.gif_schedule(100, 200.0)
    assert list(kept[:3]) == [0, 4, 8] and set(delays) == {20}
    kept, delays = video.gif_schedule(90, 30.0)
    assert len(kept) == 90 and set(delays) <= {30, 40} and delays.sum() == 3000
    back = video.read_clip(video.write_video(tmp_path / "fast.gif", clip.frames, 200.0))
    assert back.num_frames == len(range(0, clip.num_frames, 4)) and back.fps == pytest.approx(50.0)


def test_mp4_is_h264_yuv420p_with_even_size(tmp_path):
    import imageio_ffmpeg

    frames = np.random.default_rng(0).integers(0, 256, (5, 37, 51, 3), dtype=np.uint8)
    path = video.write_video(tmp_path / "odd.mp4", frames, 25.0)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (52, 38)  # padded by one edge column / row
    assert video.read_clip(path).num_frames == 5


def test_a_video_written_batch_by_batch_is_the_file_written_at_once(tmp_path, clip):
    """VideoWriter (what the CLI streams its output through) writes write_video's file: mp4 and GIF, batches of
    3 frames, an odd size padded, a 200 fps GIF's kept frames and delays across batch borders."""
    import imageio_ffmpeg

    frames = clip.frames[:11, :-1]  # an odd height
    for suffix, fps in ((".mp4", 25.0), (".gif", 200.0), (".gif", 25.0)):
        whole = video.write_video(tmp_path / f"whole{suffix}", frames, fps)
        with video.VideoWriter(tmp_path / f"batches{suffix}", fps) as writer:
            for start in range(0, len(frames), 3):
                writer.write(frames[start:start + 3])
        assert writer.count == len(frames)
        a, b = video.read_clip(whole), video.read_clip(writer.path)
        assert a.fps == b.fps and np.array_equal(a.frames, b.frames), suffix
        if suffix == ".gif":
            assert a.num_frames == len(video.gif_schedule(len(frames), fps)[0])
            with Image.open(whole) as x, Image.open(writer.path) as y:
                assert [x.seek(i) or x.info["duration"] for i in range(x.n_frames)] == \
                       [y.seek(i) or y.info["duration"] for i in range(y.n_frames)]
    meta = next(imageio_ffmpeg.read_frames(str(tmp_path / "batches.mp4")))
    assert meta["size"] == (frames.shape[2], frames.shape[1] + 1)
    with pytest.raises(video.InputError, match="no frames"):
        with video.VideoWriter(tmp_path / "empty.mp4", 25.0):
            pass
    existing = tmp_path / "kept.mp4"  # a run that fails half-way leaves the file that was there, and no part
    existing.write_bytes(b"an earlier result")
    with pytest.raises(RuntimeError, match="the run failed"):
        with video.VideoWriter(existing, 25.0) as writer:
            writer.write(frames[:3])
            raise RuntimeError("the run failed")
    assert existing.read_bytes() == b"an earlier result"
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name or p.name == "empty.mp4"]
    with pytest.raises(video.InputError, match="unknown video type"):
        video.VideoWriter(tmp_path / "clip.avi", 25.0)


def test_ffmpeg_is_started_with_no_python_code_between_fork_and_exec(tmp_path, clip):
    """imageio-ffmpeg's default runs os.setpgrp in the forked child (unsafe with threads: a child stuck before exec
    hangs the caller); mefacial turns it off, so the encoder stays in this process's group."""
    import os

    def children() -> set[int]:
        return {int(pid) for task in Path("/proc/self/task").iterdir()
                for pid in (task / "children").read_text().split()}

    if not Path(f"/proc/self/task/{os.getpid()}/children").exists():
        pytest.skip("no /proc/PID/task/TID/children here (a Linux kernel option)")
    before = children()
    with video.VideoWriter(tmp_path / "out.mp4", 25.0) as writer:
        writer.write(clip.frames[:2])  # (ffmpeg runs from the first frame until the writer closes)
        encoders = children() - before
        assert len(encoders) == 1
        assert os.getpgid(encoders.pop()) == os.getpgrp()
    assert video.read_clip(writer.path).num_frames == 2


def test_folder_of_frames_is_sorted_naturally(tmp_path):
    for index in (10, 2, 1, 33):
        Image.fromarray(np.full((8, 10), index, np.uint8)).save(tmp_path / f"frame{index}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"")
    clip = video.read_clip(tmp_path)
    assert [int(f[0, 0, 0]) for f in clip.frames] == [1, 2, 10, 33]
    assert clip.fps == video.DEFAULT_FPS and clip.fps_source == "default"
    assert video.read_clip(tmp_path, fps=200).fps == 200.0
    assert sorted(["img_b10", "IMG_b9", "img_a100"], key=video.natural_key) == ["img_a100", "IMG_b9", "img_b10"]


def test_a_stream_that_declares_no_duration_reads_whole(tmp_path, clip):
    """A WebM written to a pipe (as browsers' recorders do) declares no duration, so no frame count: its frames
    are read all the same, whole or in chunks (the chunk's array grows as frames come)."""
    import subprocess

    import imageio_ffmpeg

    gif = tmp_path / "clip.gif"
    video.write_video(gif, clip.frames, clip.fps)
    piped = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(gif), "-pix_fmt", "yuv420p",
                            "-c:v", "libvpx", "-f", "webm", "-"], capture_output=True, check=True).stdout
    path = tmp_path / "recording.webm"
    path.write_bytes(piped)
    with video._FfmpegStream(path, Limits()) as stream:
        assert stream.expected_frames == 0
    whole = video.read_clip(path)
    assert whole.num_frames == clip.num_frames and np.abs(whole.frames.astype(int) - clip.frames).mean() < 8
    chunks = [c.frames for c in video.iter_clip_chunks(path, chunk=16)]
    assert [len(c) for c in chunks[:-1]] == [16] * (len(chunks) - 1)
    assert np.array_equal(np.concatenate(chunks), whole.frames)


def test_chunks_stream_the_same_frames(clip, driving_gifs):
    chunks = list(video.iter_clip_chunks(driving_gifs[0], chunk=16))
    assert all(len(c.frames) <= 16 for c in chunks) and all(c.fps == clip.fps for c in chunks)
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), clip.frames)
    frame_bytes = clip.frames[0].nbytes
    with pytest.raises(InputTooLargeError, match="iter_clip_chunks"):
        video.read_clip(driving_gifs[0], limits=Limits(max_clip_bytes=frame_bytes * 10))
    streamed = video.iter_clip_chunks(driving_gifs[0], chunk=8, limits=Limits(max_clip_bytes=frame_bytes * 10))
    assert sum(len(c.frames) for c in streamed) == clip.num_frames


def test_array_input_and_fps_override(clip):
    grey = clip.frames[..., 0]
    out = video.read_clip(grey[..., None], fps=200)
    assert out.frames.shape == clip.frames.shape and out.fps == 200 and out.fps_source == "user"
    assert video.read_clip(out, fps=100).fps == 100


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def mp4_file(tmp_path, clip) -> Path:
    return video.write_video(tmp_path / "good.mp4", clip.frames, 50.0)


def test_bad_video_files_raise_unreadable(tmp_path, mp4_file):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 200)
    data = mp4_file.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    garbage_gif = tmp_path / "broken.gif"
    garbage_gif.write_bytes(b"GIF89a" + bytes(40))
    for path, words in [(empty, "empty"), (text, "no decodable video"), (truncated, "truncated"),
                        (garbage_gif, "animation"), (tmp_path / "missing.mp4", "does not exist"),
                        (tmp_path, "no image files")]:
        with pytest.raises(UnreadableVideoError, match=words):
            video.read_clip(path)


def test_folder_with_frames_of_different_sizes(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "1.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "2.png")
    with pytest.raises(UnreadableVideoError, match="one size"):
        video.read_clip(tmp_path)


def test_clip_limits(tmp_path, driving_gifs, mp4_file, clip):
    for path in (driving_gifs[0], mp4_file):
        with pytest.raises(InputTooLargeError, match="frames"):
            video.read_clip(path, limits=Limits(max_frames=10))
        with pytest.raises(InputTooLargeError, match="megapixels"):
            video.read_clip(path, limits=Limits(max_pixels=100 * 100))
        with pytest.raises(InputTooLargeError, match="MiB"):
            video.read_clip(path, limits=Limits(max_bytes=1000))
        with pytest.raises(InputTooLargeError, match="lasts"):
            video.read_clip(path, limits=Limits(max_seconds=0.5))
    for i in range(4):
        Image.fromarray(clip.frames[i]).save(tmp_path / f"{i}.png")
    with pytest.raises(InputTooLargeError, match="frames"):
        video.read_clip(tmp_path, limits=Limits(max_frames=3))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but which holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_bad_images(tmp_path, mp4_file):
    text = tmp_path / "face.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, words in [(text, "not an image"), (empty, "empty"), (mp4_file, "looks like a video"),
                        (tmp_path / "missing.png", "does not exist"), (tmp_path, "folder")]:
        with pytest.raises(NotAnImageError, match=words):
            video.read_image(path)
    # the pixel count comes from the header: a huge image is refused before any decoding
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 9000, 9000)
    with pytest.raises(InputTooLargeError, match="megapixels"):
        video.read_image(huge)
    _png_header_only(huge, 30000, 30000)  # beyond Pillow's own decompression-bomb guard
    with pytest.raises(InputTooLargeError):
        video.read_image(huge)
    with pytest.raises(InputTooLargeError):
        video.read_image(np.zeros((200, 200, 3), np.uint8), limits=Limits(max_pixels=1000))


# ----------------------------------------------------------------------------- image modes


def test_image_modes_become_rgb(tmp_path, astronaut):
    grey = astronaut.mean(axis=-1).astype(np.uint8)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    cases = {
        "grey.png": (Image.fromarray(grey), np.dstack([grey] * 3)),
        "rgba.png": (Image.fromarray(rgba), None),
        "grey16.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.dstack([grey] * 3)),
        "palette.gif": (Image.fromarray(grey).convert("P"), np.dstack([grey] * 3)),
        "cmyk.jpg": (Image.fromarray(astronaut).convert("CMYK"), None),
    }
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        out = video.read_image(tmp_path / name)
        assert out.shape == astronaut.shape and out.dtype == np.uint8, name
        if expected is not None:
            assert np.array_equal(out, expected), name
    out = video.read_image(tmp_path / "rgba.png")
    assert (out[:10, :10] == 255).all() and np.array_equal(out[20:, 20:], astronaut[20:, 20:])
    assert np.abs(video.read_image(tmp_path / "cmyk.jpg").astype(int) - astronaut).mean() < 10


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = video.read_image(tmp_path / "phone.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_arrays_of_any_type_become_rgb_uint8(astronaut):
    assert np.array_equal(video.as_rgb(astronaut / 255.0), astronaut)
    assert np.array_equal(video.as_rgb(astronaut.astype(np.uint16) * 257), astronaut)
    assert video.as_rgb(astronaut[..., 0]).shape == astronaut.shape
    assert np.array_equal(video.read_image(Image.fromarray(astronaut)), astronaut)


def test_read_only_pictures_are_resized_and_converted_without_a_torch_warning(astronaut, monkeypatch):
    """Pictures may come read-only (a decoded file's buffer); torch warns, once per process, on a tensor made over
    one ("not writable ... undefined behavior"), which a terminal user saw on shrinking a large face. Every
    tensor made from frames is made over a writable array: a copy where the picture is read-only."""
    import torch

    from mefacial.pipeline import to_tensor

    made_from = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda array: made_from.append(array.flags.writeable) or real(array))
    frames = np.stack([astronaut, astronaut])
    frames.setflags(write=False)
    assert video.resize_frames(frames, 128, 128).shape == (2, 128, 128, 3)  # shrinking: torch's kernel
    assert video.resize_frames(frames[:1], 300, 300).shape == (1, 300, 300, 3)
    assert to_tensor(frames, torch.device("cpu")).shape == (2, 3, 512, 512)
    assert made_from and all(made_from)


# ----------------------------------------------------------------------------- face crop and paste-back


def _inside(points: np.ndarray, box: video.FaceBox) -> bool:
    x, y = np.asarray(points).T
    return bool(((x >= box.x0) & (x < box.x1) & (y >= box.y0) & (y < box.y1)).all())


def test_face_box_is_square_inside_the_image_and_holds_the_face():
    points = np.array([[100.0, 120.0], [180.0, 120.0], [140.0, 200.0], [100.0, 190.0]])  # face size 80
    box = video.face_box(points, (400, 300))
    assert _inside(points, box) and 80 < box.size <= 80 * 1.2
    assert box.y0 <= 120 - 8 and box.y1 <= 200 + 4  # room above the brows for the forehead
    wide = video.face_box(points, (400, 300), margin=0.25)
    assert _inside(points, wide) and wide.x0 <= 100 - 20 and wide.x1 >= 180 + 20
    near_edge = points - [98, 0]
    box = video.face_box(near_edge, (400, 300))
    assert box.x0 == 0 and _inside(near_edge, box)  # shifted inside rather than padded
    tight = video.face_box(points - [0, 111], (90, 300), margin=0.5)  # no room for the margins
    assert tight.size == 90 and tight.y0 == 0 and _inside(points - [0, 111], tight)  # shrunk to fit, not padded
    huge = video.face_box(points * 2, (90, 400))  # the face itself is larger than the picture
    assert huge.size > 90 and huge.y0 < 0 and huge.y1 > 90  # centred, to be padded


def test_crop_and_paste_back_round_trip(astronaut):
    points = np.array([[180.0, 90.0], [265.0, 95.0], [225.0, 170.0]])  # around the astronaut's face
    box = video.face_box(points, astronaut.shape)
    crop = video.crop_to_model(astronaut, box, 256)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    mapped = box.to_crop(points, 256)
    assert np.allclose(box.from_crop(mapped, 256), points, atol=1e-3)
    assert ((mapped >= 0) & (mapped < 256)).all()
    pasted = video.paste_back(crop, astronaut, box)
    outside = np.ones(astronaut.shape[:2], bool)
    outside[box.y0:box.y1, box.x0:box.x1] = False
    assert np.array_equal(pasted[outside], astronaut[outside])
    inside = (slice(box.y0, box.y1), slice(box.x0, box.x1))
    assert np.abs(pasted[inside].astype(int) - astronaut[inside]).mean() < 3  # resize there and back
    grey_face = np.full((2, 64, 64), 128, np.uint8)  # greyscale generated frames, a stack of two
    out = video.paste_back(grey_face[..., None], astronaut, box)
    centre = (box.y0 + box.size // 2, box.x0 + box.size // 2)
    assert out.shape == (2,) + astronaut.shape and (out[:, centre[0], centre[1]] == 128).all()
    edge = out[0, box.y0, box.x0 + box.size // 2].astype(int)
    assert np.abs(edge - astronaut[box.y0, box.x0 + box.size // 2]).max() <= 2  # feathered to the original


def test_a_repeated_frame_is_cut_as_the_one_before(clip, monkeypatch):
    """Frames whose box holds what the one before's held are cut once, and come out as cutting each would give
    them (a frame that differs only outside the box, too)."""
    distinct = clip.frames[:1].repeat(4, 0)
    distinct[1:, 10, 10] = [[0, 0, 0], [255, 255, 255], [9, 9, 9]]
    frames = np.repeat(distinct, [1, 3, 1, 2], axis=0)  # 7 frames, 4 distinct
    frames[2, 0, 0] = 255 - frames[1, 0, 0]  # outside the box below (its rows start at 3)
    box = video.FaceBox(-6, 3, clip.frames.shape[1] + 4)
    each = np.concatenate([video.crop_to_model(frame, box, 64)[None] for frame in frames])
    cut = video._cut
    seen = []
    monkeypatch.setattr(video, "_cut", lambda batch, *args: (seen.append(len(batch)), cut(batch, *args))[1])
    assert np.array_equal(video.crop_to_model(frames, box, 64), each)
    assert seen == [4]


def test_crop_pads_a_box_past_the_border(clip):
    box = video.FaceBox(-10, -10, clip.frames.shape[1] + 20)
    crops = video.crop_to_model(clip.frames[:3], box, 64)
    assert crops.shape == (3, 64, 64, 3)
    rgba = np.dstack([clip.frames[0], np.full(clip.frames.shape[1:3], 255, np.uint8)])
    assert np.array_equal(video.crop_to_model(rgba, box, 64), crops[0])


@pytest.mark.parametrize("pad", [(1, 0, 1, 0), (0, 5, 2, 0), (3, 3, 3, 3), (0, 0, 0, 40), (40, 2, 0, 7),
                                 (200, 0, 0, 150)])
def test_soft_pad_blends_the_blur_of_the_whole_frame(pad):
    """The pad blends the mirrored picture with its blur: blurred in bands along the padded sides only (or their
    bounding box) for speed, yet every pad pixel gets the value of the whole padded frame's blur, and the picture
    itself is left as it is."""
    import cv2

    rng = np.random.default_rng(1)
    frames = cv2.GaussianBlur(rng.integers(0, 256, (60, 90, 3), np.uint8), (0, 0), 2)[None].repeat(2, 0)
    frames[1] = 255 - frames[1]
    top, bottom, left, right = pad
    out = video.soft_pad(frames, ((0, 0), (top, bottom), (left, right), (0, 0)))
    height, width = frames.shape[1:3]
    mirrored = np.pad(frames, ((0, 0), (min(top, height - 1), min(bottom, height - 1)),
                               (min(left, width - 1), min(right, width - 1)), (0, 0)), mode="reflect")
    mirrored = np.pad(mirrored, ((0, 0), (top - min(top, height - 1), bottom - min(bottom, height - 1)),
                                 (left - min(left, width - 1), right - min(right, width - 1)), (0, 0)), mode="edge")
    ys, xs = np.arange(out.shape[1]), np.arange(out.shape[2])
    outside = np.maximum(np.maximum(top - ys, ys - (top + height - 1)), 0)[:, None]
    outside = np.maximum(outside, np.maximum(np.maximum(left - xs, xs - (left + width - 1)), 0)[None])  # px past
    weight = np.clip(outside / max(4.0, 0.05 * max(height, width)), 0, 1)[..., None]
    for got, mirror in zip(out, mirrored):
        sigma = max(2.0, 0.04 * max(height, width))
        size = int(round(6 * sigma + 1)) | 1  # (the kernel cut at 3 sigma, as OpenCV chooses it for 8-bit images)
        blurred = cv2.GaussianBlur(mirror.astype(np.float32), (size, size), sigma, borderType=cv2.BORDER_REFLECT)
        blurred = np.rint(blurred)  # (the blur is rounded before it is blended)
        expected = np.rint(mirror * (1 - weight) + blurred * weight).astype(np.uint8)
        assert np.array_equal(got, expected)
    assert np.array_equal(out[:, top:top + height, left:left + width], frames)


@pytest.mark.parametrize("box", [video.FaceBox(-150, -200, 1300), video.FaceBox(300, -40, 300),
                                 video.FaceBox(-50, 100, 420)])
def test_a_box_larger_than_the_model_is_padded_at_the_models_size(astronaut, box):
    """A padded box larger than the model's size is shrunk before its pad fades into the blur: the same picture as
    fading at the picture's own size (where the blur of a large picture's pad cost ~20x more), a few grey levels
    apart at most where a sharp mirrored edge meets the fade's ramp (blending and averaging in the other order)."""
    picture = np.asarray(Image.fromarray(astronaut).resize((1024, 1024))) if box.size > 1000 else astronaut
    height, width = picture.shape[:2]
    ys, xs = slice(max(box.y0, 0), min(box.y1, height)), slice(max(box.x0, 0), min(box.x1, width))
    pad = ((0, 0), (ys.start - box.y0, box.y1 - ys.stop), (xs.start - box.x0, box.x1 - xs.stop), (0, 0))
    assert any(p != (0, 0) for p in pad)
    at_own_size = video.resize_frames(video.soft_pad(picture[None, ys, xs], pad), 256, 256)[0]
    got = video.crop_to_model(picture, box, 256)
    difference = np.abs(got.astype(int) - at_own_size)
    assert difference.max() <= 6 and difference.mean() < 0.1, (difference.max(), difference.mean())


@pytest.mark.parametrize("shape, size", [((3, 128, 128, 3), (256, 256)), ((2, 100, 77, 3), (256, 256)),
                                         ((2, 300, 260, 3), (256, 256)), ((2, 64, 64, 3), (64, 64))])
def test_resize_gives_torch_bilinear_values(shape, size):
    """Frames are enlarged through OpenCV and shrunk through torch's uint8 kernel (both fast): the values of
    torch's float bilinear resize, anti-aliased when shrinking, rounded to uint8 (shrunk: within 1 grey level)."""
    import torch
    import torch.nn.functional as F

    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    expected = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    expected = expected.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = video.resize_frames(frames, *size)
    if shape[1] > size[0] or shape[2] > size[1]:
        assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1
    else:
        assert np.array_equal(got, expected)


def test_to_uint8_rounds_half_to_even_and_saturates_as_torch_does(monkeypatch):
    """The CPU fast path (OpenCV) gives torch's values: rounded half to even, negatives, NaN and values past the
    peak saturated, for frames in [0, 1] or [0, 255], strided or not; other channel counts, and a machine without
    OpenCV, take torch's path."""
    import torch

    frames = torch.rand(3, 3, 21, 17, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    frames[0, 0, 0, :9] = torch.tensor([0.5, 1.5, 2.5, 254.5, -0.5, 255.5, 0, 255, float("nan")]) / 255
    before = frames.clone()

    def reference(x: torch.Tensor, peak: float = 1.0) -> np.ndarray:
        return (x.permute(0, 2, 3, 1) * (255 / peak)).round().clamp(0, 255).nan_to_num(0).to(torch.uint8).numpy()

    out = video.to_uint8(frames)
    assert out.shape == (3, 21, 17, 3) and out.dtype == np.uint8
    assert list(out[0, 0, :9, 0]) == [0, 2, 2, 254, 0, 255, 0, 255, 0]
    assert np.array_equal(out, reference(frames))
    assert torch.equal(frames.nan_to_num(-1), before.nan_to_num(-1)), "the frames are left as they were"
    strided = frames.transpose(2, 3)
    assert np.array_equal(video.to_uint8(strided), reference(strided))
    assert np.array_equal(video.to_uint8(frames * 255, peak=255), reference(frames * 255, 255))
    assert np.array_equal(video.to_uint8(frames[:, :1]), reference(frames[:, :1]))
    monkeypatch.setattr(video, "_opencv", lambda: None)
    assert np.array_equal(video.to_uint8(frames), out)


def test_sudden_changes_find_a_cut_and_pass_motion_and_flicker(driving_gifs):
    frames = video.read_clip(driving_gifs[0]).frames  # a real micro-expression clip: no sudden change
    assert video.sudden_changes(frames) == []
    rng = np.random.default_rng(0)
    flicker = np.clip(frames * rng.uniform(0.85, 1.15, (len(frames), 1, 1, 1)), 0, 255).astype(np.uint8)
    assert video.sudden_changes(flicker) == []  # a light flickering by 15 % a frame changes every frame alike
    cut = np.concatenate([frames[:10], frames[::-1][:10, ::-1]])  # another shot from frame 10
    assert video.sudden_changes(cut) == [10]
    assert video.sudden_changes(frames[:1]) == []
    assert video.sudden_changes(cut[9:11]) == [1] and video.sudden_changes(cut[10:11], before=cut[9]) == [0]
    assert video.sudden_changes(cut[10:], before=cut[9]) == [0] and video.sudden_changes(cut[11:], cut[10]) == []


def test_same_frame_is_exact_whichever_row_differs():
    frame = np.random.default_rng(0).integers(0, 256, (33, 20, 3), np.uint8)
    assert video.same_frame(frame, frame.copy())
    for row in (0, 16, 5):  # every 8th row, the middle row, a row neither reads first
        other = frame.copy()
        other[row, 7, 1] ^= 1
        assert not video.same_frame(frame, other)
    assert not video.same_frame(frame, frame[:32])

"""Landmark backends, backend choice offline, NoFaceError, face crops from real landmarks, and temporal smoothing.

dlib must reproduce the reference landmarks exactly on the fixture frames; the
FAN backend is exercised end to end through face-alignment's real API with
randomly initialised weights placed in a temporary torch hub cache (the real
weights are never downloaded here).
"""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
import torch

from conftest import DATA, FIXTURES, require
from mefacial import landmarks as lm
from mefacial import video
from mefacial.errors import InputError, NoFaceError, WeightsNotFoundError


@pytest.fixture(scope="module")
def landmarks_fixture():
    folder = require(FIXTURES / "landmarks", "landmarks fixture")
    from safetensors.numpy import load_file

    meta = json.loads((folder / "meta.json").read_text())
    tensors = load_file(str(folder / "landmarks.safetensors"))
    clips = sorted(meta.get("clips") or {k.split(".")[0] for k in tensors if k.endswith(".landmarks68")})
    assert clips, "the landmarks fixture lists no clips"
    return clips, tensors


@pytest.fixture(scope="module")
def dlib_detector() -> lm.LandmarkDetector:
    return lm.get_detector("dlib")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage.data import astronaut

    return astronaut()


@pytest.fixture(scope="module")
def driving_tracks(dlib_detector) -> dict[str, np.ndarray]:
    """dlib landmark tracks (T x 68 x 2) of every shared driving clip."""
    clips = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    assert clips, "no driving GIFs in the shared data"
    return {path.stem: dlib_detector.detect(video.read_clip(path).frames).points for path in clips}


# ----------------------------------------------------------------------------- dlib


def test_dlib_reproduces_reference_landmarks_exactly(landmarks_fixture, dlib_detector):
    clips, tensors = landmarks_fixture
    for clip in clips:
        frames, expected = tensors[f"{clip}.frames_uint8"], tensors[f"{clip}.landmarks68"]
        result = dlib_detector.detect(frames)
        assert result.backend == "dlib" and result.found.all()
        assert result.points.shape == expected.shape and result.points.dtype == np.float32
        mismatched = np.flatnonzero((result.points != expected).any(axis=(1, 2)))
        assert len(mismatched) == 0, f"{clip}: frames {mismatched.tolist()} differ from the reference"


def test_dlib_detector_is_exact_when_callers_share_it(landmarks_fixture, dlib_detector):
    """Frames are searched on worker threads, each with its own dlib detector (a shared one returned wrong
    boxes); two callers at once (the app serves several users) still get the reference's landmarks."""
    from concurrent.futures import ThreadPoolExecutor

    clips, tensors = landmarks_fixture
    clip = clips[0]
    frames, expected = tensors[f"{clip}.frames_uint8"][:12].copy(), tensors[f"{clip}.landmarks68"][:12].copy()
    frames[5], expected[5] = 0, np.nan  # a frame without a face among them
    with ThreadPoolExecutor(2) as callers:
        results = list(callers.map(lambda _: dlib_detector.detect(frames, allow_missing=True).points, range(8)))
    for points in results:
        np.testing.assert_array_equal(points, expected)


def _detect_in_child(detector, frames, queue) -> None:
    queue.put(detector.detect(frames).points)


def test_dlib_detector_works_in_a_forked_child(dlib_detector, astronaut):
    """A DataLoader worker forked after the parent detected faces has none of its worker threads."""
    import multiprocessing

    frames = np.stack([astronaut, astronaut[:, ::-1]])
    expected = dlib_detector.detect(frames).points  # the parent's pool is running now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_detect_in_child, args=(dlib_detector, frames, queue))
    child.start()
    got = queue.get(timeout=60)  # a child reusing the parent's dead pool would hang here
    child.join(10)
    np.testing.assert_array_equal(got, expected)


def test_dlib_predictor_found_without_importing_the_package():
    import sys

    path = lm.dlib_model_path()
    assert path.is_file() and path.name == lm.DLIB_PREDICTOR_FILE
    assert "face_recognition_models" not in sys.modules  # its __init__ needs pkg_resources


def test_largest_face_is_used(dlib_detector, astronaut):
    face = astronaut[40:240, 120:320]  # 200 x 200 around the face
    small = video.resize_frames(face[None], 120, 120)[0]
    canvas = np.full((200, 340, 3), 90, np.uint8)
    canvas[40:160, 5:125] = small
    canvas[:, 140:] = face
    candidates = dlib_detector._find_faces(canvas[None])[0]
    assert len(candidates) == 2, "the test image should hold two detectable faces"
    box = dlib_detector.detect(canvas, role="source").boxes[0]
    assert box[0] >= 140, f"took the small face {box}, not the large one"
    assert np.array_equal(lm._largest(np.array([[0, 0, 10, 10], [5, 5, 15, 15.0]])), [5, 5, 15, 15])


def test_large_frames_are_downscaled_only_to_find_the_face(dlib_detector, astronaut):
    native = dlib_detector.detect(astronaut, role="source")
    big = np.kron(astronaut, np.ones((2, 2, 1), np.uint8))  # 1024 x 1024, above DETECT_MAX_SIDE
    upscaled = dlib_detector.detect(big, role="source")
    face = native.boxes[0, 2] - native.boxes[0, 0]
    assert np.abs(upscaled.boxes / 2 - native.boxes).max() < 0.1 * face  # HOG boxes shift a little with scale
    assert np.abs(upscaled.points / 2 - native.points).max() < 4  # fitted at full size: same face


def test_large_frames_are_searched_small_first(dlib_detector, astronaut, monkeypatch):
    """dlib searches a frame larger than the reference's 256 px ones at 256 px first, further (at its own size,
    DETECT_MAX_SIDE at most) only where no face was found there; frames up to 256 px get the reference's
    search alone."""
    sizes = []
    find_faces = dlib_detector._find_faces
    monkeypatch.setattr(dlib_detector, "_find_faces", lambda frames: sizes.append(frames.shape[1:3]) or find_faces(frames))
    big = np.kron(astronaut, np.ones((2, 2, 1), np.uint8))  # 1024 x 1024: a large face
    full = lm.DlibDetector()
    full.search_sides = ()  # the one search at 640 px
    expected = full.detect(big, role="source")
    got = dlib_detector.detect(big, role="source")
    assert sizes == [(256, 256)]
    inter_ocular = np.linalg.norm(expected.points[0, 36:42].mean(0) - expected.points[0, 42:48].mean(0))
    assert np.linalg.norm(got.points - expected.points, axis=-1).mean() < 0.03 * inter_ocular  # the same face
    sizes.clear()
    canvas = np.full((900, 900, 3), 90, np.uint8)  # a 112 px face in 900 px: too small for the first search
    canvas[400:512, 500:612] = video.resize_frames(astronaut[None, 40:240, 120:320], 112, 112)[0]
    box = dlib_detector.detect(canvas, role="source").boxes[0]
    assert sizes == [(256, 256), (640, 640)] and 480 < (box[0] + box[2]) / 2 < 640
    sizes.clear()
    canvas = np.full((500, 300, 3), 90, np.uint8)  # 300 x 500: the small face found at its own size
    canvas[200:272, 100:172] = video.resize_frames(astronaut[None, 40:240, 120:320], 72, 72)[0]
    dlib_detector.detect(canvas, role="source")
    assert sizes == [(256, 154), (500, 300)]
    sizes.clear()
    dlib_detector.detect(astronaut[:256, 100:356], role="source")
    assert sizes == [(256, 256)]  # searched once, as it is


def test_any_image_mode_works(dlib_detector, astronaut):
    grey = astronaut.mean(axis=-1).astype(np.uint8)
    rgba = np.dstack([astronaut, np.full(grey.shape, 255, np.uint8)])
    for image in (grey, rgba, astronaut / 255.0):
        assert dlib_detector.detect(image, role="source").found.all()


def test_no_face_raises_naming_the_frame(dlib_detector, landmarks_fixture):
    clips, tensors = landmarks_fixture
    frames = tensors[f"{clips[0]}.frames_uint8"][:3].copy()
    frames[1] = 0
    with pytest.raises(NoFaceError, match="no face in driving frame 1 ") as error:
        dlib_detector.detect(frames)
    assert error.value.frame_index == 1 and "frontal" in str(error.value)
    with pytest.raises(NoFaceError, match="no face found in the source image"):
        dlib_detector.detect(frames[1], role="source")
    partial = dlib_detector.detect(frames, allow_missing=True)
    assert partial.found.tolist() == [True, False, True]
    assert np.isnan(partial.points[1]).all() and np.isfinite(partial.points[[0, 2]]).all()


def test_a_picture_too_small_for_a_face_is_called_too_small_not_sent_to_be_cropped(dlib_detector):
    from mefacial import mesh as M

    tiny = np.full((16, 16, 3), 128, np.uint8)
    for detect in (lambda: dlib_detector.detect(tiny, role="source"), lambda: M.detect_mesh(tiny, role="source")):
        with pytest.raises(NoFaceError, match="16x16 picture is too small to hold a face") as error:
            detect()
        assert "crop closer" not in str(error.value)
        assert "Use a larger picture of the face" in error.value.page_message


def test_crop_around_real_landmarks_holds_the_face(dlib_detector, astronaut, driving_tracks):
    points = dlib_detector.detect(astronaut, role="source").points[0]
    box = video.face_box(points, astronaut.shape)
    extent = (points.max(0) - points.min(0)).max()
    x, y = points.T
    assert ((x >= box.x0) & (x < box.x1) & (y >= box.y0) & (y < box.y1)).all()
    assert extent < box.size < 1.5 * extent
    size = 256
    crop = video.crop_to_model(astronaut, box, size)
    again = dlib_detector.detect(crop, role="source").points[0]  # the face is found in the crop, where mapped
    assert np.abs(again - box.to_crop(points, size)).mean() < 3
    for name, tracks in driving_tracks.items():  # clips already cropped tightly: the box reaches the borders
        box = video.face_box(tracks[0], (128, 128))
        assert box.size >= (tracks[0].max(0) - tracks[0].min(0)).max(), name


# ----------------------------------------------------------------------------- backend choice, FAN


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Record and refuse every attempt to open a connection or download a file."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    fa_utils = pytest.importorskip("face_alignment.utils")
    monkeypatch.setattr(fa_utils, "download_url_to_file", refuse)
    lm._build_detector.cache_clear()
    yield attempts
    lm._build_detector.cache_clear()


def test_auto_picks_dlib_offline_without_network(tmp_path, monkeypatch, no_network, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with caplog.at_level(logging.INFO, logger="mefacial"):
        detector = lm.get_detector("auto", device="cpu")
    assert isinstance(detector, lm.DlibDetector)
    assert lm.get_detector("auto", device="cpu") is detector  # built once per process
    # the very instance "dlib" names (one copy of the models, one thread pool), whatever the device asked
    assert lm.get_detector("dlib") is detector and lm.get_detector("dlib", device="meta") is detector
    assert any("dlib" in r.message and "not cached" in r.message for r in caplog.records)
    with pytest.raises(WeightsNotFoundError, match="landmarks='dlib'") as error:
        lm.get_detector("fan", device="cpu")
    assert str(tmp_path) in str(error.value)
    assert no_network == []
    with pytest.raises(InputError, match="unknown landmark backend"):
        lm.get_detector("mediapipe")


def test_auto_falls_back_to_dlib_when_cached_fan_weights_are_broken(tmp_path, monkeypatch, no_network, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for path in lm.fan_weight_files():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"an interrupted download")
    assert lm.fan_missing_weights() == []
    with caplog.at_level(logging.INFO, logger="mefacial"):
        assert isinstance(lm.get_detector("auto", device="cpu"), lm.DlibDetector)
    assert any("failed to load" in r.message for r in caplog.records)
    assert no_network == []


@pytest.fixture(scope="module")
def fake_fan_home(tmp_path_factory):
    """A torch hub cache holding randomly initialised FAN (one hourglass) and S3FD weights under the real names."""
    pytest.importorskip("face_alignment")
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        fan_file, detector_file = lm.fan_weight_files("sfd")
    fan_file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(1).state_dict(), fan_file)
    torch.save(s3fd().state_dict(), detector_file)
    return home


def test_fan_backend_runs_through_face_alignment(fake_fan_home, monkeypatch, no_network, dlib_detector, astronaut):
    import face_alignment.api
    import face_alignment.utils
    from face_alignment.models import FAN

    monkeypatch.setenv("TORCH_HOME", str(fake_fan_home))
    monkeypatch.setattr(face_alignment.api, "FAN", lambda size: FAN(1))  # small stand-in for the 4-hourglass net
    for name in ("_get_preds_fromhm", "transform_np"):  # skip numba's one-off compilation (a minute on 2 cores)
        jitted = getattr(face_alignment.utils, name)
        monkeypatch.setattr(face_alignment.utils, name, getattr(jitted, "py_func", jitted))
    assert lm.fan_missing_weights() == []
    detector = lm.get_detector("auto", device="cpu")
    assert isinstance(detector, lm.FanDetector)
    small = video.resize_frames(astronaut[None], 128, 128)
    assert len(detector._find_faces(small)) == 1  # the real S3FD runs (random weights: any boxes)

    # Put the face where dlib finds it, then fit FAN's landmarks through the library's batch API.
    box = dlib_detector.detect(astronaut, role="source").boxes[0]
    monkeypatch.setattr(detector._model.face_detector, "detect_from_batch",
                        lambda batch: [np.array([[*box, 0.99]])] * len(batch))
    detector._model.flip_input = False  # one FAN pass per frame is enough here
    result = detector.detect(np.stack([astronaut, astronaut]))
    assert result.backend == "fan" and result.points.shape == (2, 68, 2) and result.found.all()
    assert np.isfinite(result.points).all()
    width = box[2] - box[0]
    assert (result.points >= box[:2] - width).all() and (result.points <= box[2:] + width).all()
    assert no_network == []


# ----------------------------------------------------------------------------- temporal smoothing


JITTER_KEPT_AT_MOST = 0.35  # measured 0.17-0.18 on the shared clips with the default window
DISPLACEMENT_TOLERANCE = 0.05  # measured within 1.1%; a Gaussian of 3 frames loses about 20%


def test_smoothing_removes_jitter_and_keeps_expression_on_real_clips(driving_tracks):
    for name, tracks in driving_tracks.items():
        report = lm.measure_stabilisation(tracks)
        assert report.jitter_before > 0.1, f"{name}: raw dlib tracks should jitter"
        assert report.jitter_ratio < JITTER_KEPT_AT_MOST, f"{name}: {report}"
        assert abs(report.displacement_ratio - 1) < DISPLACEMENT_TOLERANCE, f"{name}: {report}"


def test_displacement_check_catches_over_smoothing(driving_tracks):
    from scipy.ndimage import gaussian_filter1d

    ratios = [lm.measure_stabilisation(t, gaussian_filter1d(t, 3.0, axis=0, mode="nearest")).displacement_ratio
              for t in driving_tracks.values()]
    assert min(ratios) < 1 - DISPLACEMENT_TOLERANCE, ratios


def test_smoothing_recovers_a_known_micro_expression():
    """A 1.5 px onset-apex-offset on every point (rise over 4 frames) + 0.3 px noise, rounded like dlib's output."""
    rng = np.random.default_rng(0)
    frames, onset, rise = 60, 10, 4
    t = np.arange(frames, dtype=np.float64)
    profile = np.interp(t, [onset, onset + rise, onset + rise + 6, onset + 3 * rise + 6], [0, 1, 1, 0])
    direction = rng.normal(size=(68, 2))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    truth = rng.uniform(20, 100, (68, 2)) + 1.5 * profile[:, None, None] * direction  # T x 68 x 2
    observed = np.round(truth + rng.normal(0, 0.3, truth.shape)).astype(np.float32)
    smoothed = lm.smooth_tracks(observed)

    def motion_error(track):  # error of the displacement from frame 0, as relative motion transfer uses it
        return np.sqrt(np.mean(((track - track[:1]) - (truth - truth[:1])) ** 2))

    assert motion_error(smoothed) < 0.75 * motion_error(observed)
    apex = onset + rise + 3  # middle of the apex plateau
    kept = np.mean(np.sum((smoothed[apex] - smoothed[0]) * direction, axis=-1)) / 1.5  # along the true motion
    assert abs(kept - 1) < 0.1, f"kept {kept:.2f} of the apex displacement"


def test_smoothing_keeps_a_jump_whole():
    """A face that jumps between two frames (a cut, a jerk of the head) keeps the jump whole: the frames around it
    are smoothed on their own side (0.7 px from the truth at most, under 0.3 px of noise), not read part way (a plain
    Savitzky-Golay filter put them up to 9.9 px, 0.39 of the jump, off). Without a jump the filter is scipy's."""
    from scipy.signal import savgol_filter

    rng = np.random.default_rng(2)
    shape = rng.uniform(20, 100, (68, 2))
    truth = np.repeat(shape[None], 30, 0)
    truth[15:] += [25.0, 5.0]  # the jump: 0.8 of the points' spread (rms distance from their centre)
    observed = (truth + rng.normal(0, 0.3, truth.shape)).astype(np.float32)
    plain = savgol_filter(observed, lm.SMOOTH_WINDOW, lm.SMOOTH_POLYORDER, axis=0, mode="interp")
    assert np.abs(plain - truth).max() > 5  # (what the plain filter does there)
    assert np.abs(lm.smooth_tracks(observed) - truth).max() < 1.5  # (the noise: 0.3 px)
    still = (np.repeat(shape[None], 30, 0) + rng.normal(0, 0.3, truth.shape)).astype(np.float32)
    np.testing.assert_allclose(lm.smooth_tracks(still), savgol_filter(
        still, lm.SMOOTH_WINDOW, lm.SMOOTH_POLYORDER, axis=0, mode="interp"), atol=1e-4)


def test_smoothing_edge_cases():
    tracks = np.random.default_rng(1).normal(size=(4, 68, 2)).astype(np.float32)
    assert np.allclose(lm.smooth_tracks(tracks), tracks, atol=1e-5)  # 3-frame quadratic: interpolates
    assert np.array_equal(lm.smooth_tracks(tracks[:1]), tracks[:1])
    assert lm.smooth_tracks(np.zeros((30, 18, 2))).shape == (30, 18, 2)  # AU points too
    line = np.linspace(0, 10, 20)[:, None, None] * np.ones((1, 68, 2))
    assert np.allclose(lm.smooth_tracks(line), line, atol=1e-4)  # steady motion passes unchanged
    tracks[2, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        lm.smooth_tracks(tracks)
    with pytest.raises(InputError, match="T x P x 2"):
        lm.smooth_tracks(np.zeros((5, 68)))


def test_smoothing_window_follows_the_frame_rate():
    assert [lm.smoothing_window(fps) for fps in (None, 25, 30, 40, 50, 100, 200)] == [9, 5, 5, 7, 9, 9, 9]


def test_engine_smooths_over_the_window_of_the_clips_frame_rate(dlib_detector):
    from mefacial import Engine

    data = require(DATA, "micro-expression clips")
    face = sorted((data / "faces").iterdir())[0]
    frames = video.read_clip(sorted((data / "driving").glob("*.gif"))[0]).frames[:12]
    engine = Engine(device="cpu", landmarks="dlib")
    smoothed = {}
    for fps in (25.0, 50.0):
        result = engine.animate(face, frames, variant="warp", fps=fps)
        raw = dlib_detector.detect(result.model_driving, role="driving").points  # T x 68 x 2
        smoothed[fps] = result.driving_landmarks
        np.testing.assert_allclose(result.driving_landmarks, lm.smooth_tracks(raw, lm.smoothing_window(fps)), atol=1e-4)
    assert np.abs(smoothed[25.0] - smoothed[50.0]).max() > 1e-3  # the two windows really differ

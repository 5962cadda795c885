"""The demo's API through gradio_client, against `python app.py` running in a subprocess.

CPU, dlib landmarks, offline, no weights (every learned variant must say so),
the training-free warp variant on the bundled examples (16 frames).
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import imageio.v3 as iio
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app_server import APPS, MAX_FRAMES, MAX_UPLOAD_MB, REPO
from mefacial import get_variant, list_variants
from mefacial.grid import HEADER, TILE
from mefacial.video import read_clip, write_video

pytestmark = pytest.mark.slow

FACE = REPO / "examples" / "astronaut.png"
CLIP = REPO / "examples" / "brow_raise.mp4"



@pytest.fixture(scope="module")
def clip():
    return read_clip(CLIP)


def frames_of(path: str) -> np.ndarray:
    return iio.imread(path)  # T x H x W x 3


def test_generate_returns_a_playable_video_of_every_frame(client, clip):
    video, grid, download, status = client.predict(source=handle_file(FACE), driving=handle_file(CLIP),
                                                   backbone="warp", landmarks="dlib", api_name="/generate")
    result = frames_of(video)
    assert result.shape[0] == clip.num_frames and result.shape[-1] == 3
    assert iio.immeta(video)["fps"] == pytest.approx(clip.fps, rel=0.01)
    assert np.abs(result[-1].astype(int) - result[0].astype(int)).mean() > 0.05  # the face moved
    side_by_side = frames_of(grid)
    assert side_by_side.shape[0] == clip.num_frames
    assert side_by_side.shape[1:3] == (HEADER + TILE, 3 * TILE)  # source | driving | result
    assert Path(download).suffix == ".mp4"
    assert "warp" in status and "dlib" in status and f"{clip.num_frames} frames" in status


def test_gif_download_slowed_down_and_pasted_back(client, clip):
    video, _, download, status = client.predict(source=handle_file(FACE), driving=handle_file(CLIP), slowdown=4,
                                                format="gif", paste_back=True, api_name="/generate")
    assert Path(download).suffix == ".gif"
    gif = frames_of(download)
    assert gif.shape[0] == clip.num_frames  # 25 / 4 fps: no frame dropped
    assert gif.shape[1:3] == iio.imread(FACE).shape[:2]  # the face pasted back into the whole picture
    assert iio.immeta(video)["fps"] == pytest.approx(clip.fps / 4, rel=0.01)
    assert "slowed down x4" in status and "motion x" not in status  # faithful motion needs no mark


def test_a_magnified_result_says_so_in_its_status(client):
    *_, status = client.predict(source=handle_file(FACE), driving=handle_file(CLIP), magnify=2, api_name="/generate")
    assert "motion x2" in status  # an exaggerated clip must not pass for the driving's own motion


def test_compare_by_default_runs_only_the_variants_ready_here(client, clip):
    """No weights on this server: the default Compare is the driving clip and the training-free variants (dense,
    dense geometry-only, warp), no placeholder columns."""
    ready = [v["id"] for v in list_variants() if not v["needs_weights"]]
    grid, table = client.predict(source=handle_file(FACE), driving=handle_file(CLIP), api_name="/compare")
    frames = frames_of(grid)
    assert frames.shape[0] == clip.num_frames
    assert frames.shape[1:3] == (HEADER + TILE, (1 + len(ready)) * TILE)  # driving | dense | dense-geometry | warp
    assert table.count("\n|") == 1 + len(ready) and "not run" not in table
    assert all(get_variant(v).label in table for v in ready)
    # each time with its generator's alone, and what the first variant's time also holds (the clip's face mesh)
    assert table.count("(generator ") == len(ready) and "those after it reuse them" in table


def test_compare_of_every_variant_shows_each_with_its_label_or_reason(client, clip):
    variants = [v["id"] for v in list_variants()]
    grid, table = client.predict(source=handle_file(FACE), driving=handle_file(CLIP), variants=variants,
                                 api_name="/compare")
    frames = frames_of(grid)
    assert frames.shape[1:3] == (HEADER + TILE, (1 + len(variants)) * TILE)  # the driving clip first
    for variant in variants:
        assert f"| {get_variant(variant).label} |" in table  # the registry's label, as in the checkboxes
    learned = [v for v in variants if get_variant(v).needs_weights]
    assert table.count("has no weights on this server") == len(learned)  # every learned variant, none hidden
    tiles = frames[:, HEADER:].reshape(len(frames), TILE, 1 + len(variants), TILE, 3)
    change = np.abs(tiles.astype(int) - tiles[:1].astype(int)).mean(axis=(0, 1, 3, 4))  # per column
    warp_column = 1 + variants.index("warp")
    assert change[warp_column] > 5 * change[warp_column + 1]  # results move, placeholders stand still


def test_compare_of_unavailable_variants_still_shows_them_with_heatmaps(client, clip):
    grid, table = client.predict(source=handle_file(FACE), driving=handle_file(CLIP),
                                 variants=["fomm-awp", "mraa-none"], heatmaps=True, api_name="/compare")
    frames = frames_of(grid)
    assert frames.shape == (clip.num_frames, HEADER + 2 * TILE, 3 * TILE, 3)  # driving + 2 placeholders, 2 rows
    assert table.count("no weights") == 2
    with pytest.raises(AppError, match="unknown"):
        client.predict(source=handle_file(FACE), driving=handle_file(CLIP), variants=["nope"], api_name="/compare")


def test_bad_uploads_are_answered_with_their_cause_and_the_server_keeps_serving(client, tmp_path, clip):
    text = tmp_path / "face.png"
    text.write_text("this is not an image")
    with pytest.raises(AppError, match="not an image"):
        client.predict(source=handle_file(text), driving=handle_file(CLIP), api_name="/generate")
    fake_clip = tmp_path / "clip.mp4"
    fake_clip.write_text("this is not a video")
    with pytest.raises(AppError, match="clip"):
        client.predict(source=handle_file(FACE), driving=handle_file(fake_clip), api_name="/generate")
    preview, info, slowdown = client.predict(driving=handle_file(CLIP), api_name="/preview_driving")
    assert frames_of(preview).shape[0] == clip.num_frames and f"{clip.num_frames} frames" in info
    assert 1 <= slowdown <= 10 and read_clip(preview).fps == pytest.approx(clip.fps / slowdown)


def test_uploads_over_the_size_limit_are_refused_by_the_server(app_url, tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes(np.random.default_rng(0).bytes(MAX_UPLOAD_MB * 2**20 + 1))
    with big.open("rb") as stream:
        answer = httpx.post(app_url + "gradio_api/upload", files={"files": ("big.mp4", stream)}, timeout=60)
    assert answer.status_code == 413
    with pytest.raises(ValueError, match="maximum file size"):  # gradio_client checks it before sending
        Client(app_url, verbose=False).predict(driving=handle_file(big), api_name="/preview_driving")


def test_clip_longer_than_the_limit_is_refused(client, tmp_path):
    long_clip = tmp_path / "long.gif"
    frames = np.random.default_rng(0).integers(0, 255, (MAX_FRAMES + 1, 32, 32, 3), dtype=np.uint8)  # all distinct
    write_video(long_clip, frames, fps=25)
    with pytest.raises(AppError, match=f"more than the {MAX_FRAMES} this server takes"):
        client.predict(source=handle_file(FACE), driving=handle_file(long_clip), api_name="/generate")


def test_missing_weights_say_what_to_do_from_the_page(client):
    with pytest.raises(AppError) as caught:
        client.predict(source=handle_file(FACE), driving=handle_file(CLIP), backbone="fomm", prior="awp",
                       api_name="/generate")
    assert caught.value.title == "Weights missing"
    message = caught.value.message
    assert "FOMM + AWP has no weights on this server" in message and "warp" in message
    assert 'see "Weights" in the README' in message
    assert "--" not in message and "MEFACIAL_" not in message and "HF_HUB" not in message


def test_prior_draws_landmarks_au_points_and_maps(client):
    gallery, status = client.predict(source=handle_file(FACE), driving=handle_file(CLIP), frame=5, api_name="/prior")
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == 8  # source and driving frame: landmarks, AU points, EWP, AWP (or why not)
    assert any("driving frame 5" in c for c in captions) and any("EWP" in c for c in captions)
    assert "weights" in status  # no AWP model here: the reason is given
    assert iio.imread(gallery[0]["image"]).ndim == 3


def test_concurrent_users_get_their_own_results(app_url, tmp_path, clip):
    short = tmp_path / "short.mp4"
    write_video(short, clip.frames[: clip.num_frames // 2], clip.fps)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {n: pool.submit(Client(app_url, verbose=False).predict, source=handle_file(FACE),
                               driving=handle_file(path), api_name="/generate")
                for n, path in ((clip.num_frames, CLIP), (clip.num_frames // 2, short))}
        for expected, job in jobs.items():
            assert frames_of(job.result(timeout=300)[0]).shape[0] == expected


def test_sigusr1_writes_the_threads_stacks_to_the_log_and_the_app_serves_on(app_url, client, clip):
    app = APPS[app_url]
    before = app.log.read_text(errors="replace")
    app.process.send_signal(signal.SIGUSR1)
    for _ in range(50):  # (written by the app's signal handler, at once; read back within 5 s)
        dump = app.log.read_text(errors="replace")[len(before):]
        if "(most recent call first)" in dump and "in block_thread" in dump:
            break
        time.sleep(0.1)
    assert "(most recent call first)" in dump, dump  # faulthandler's format, one block per thread
    assert "in block_thread" in dump and "warm_up" not in dump  # the main thread serving; the warm-up is done
    video, *_ = client.predict(source=handle_file(FACE), driving=handle_file(CLIP), api_name="/generate")
    assert frames_of(video).shape[0] == clip.num_frames


def test_synthesis_pasted_back_through_the_api_is_the_pictures_size(client):
    from mefacial.video import read_image

    video, _, _, status = client.predict(source=handle_file(FACE), au12="C", onset_ms=40, apex_ms=20, offset_ms=40,
                                         fps=100, paste_back=True, api_name="/synthesize")
    assert frames_of(video).shape[1:3] == read_image(FACE).shape[:2] and "AU12C" in status


def test_synthesis_with_no_action_unit_chosen_is_a_titled_error(client):
    with pytest.raises(AppError) as caught:  # every AU left at '-'
        client.predict(source=handle_file(FACE), api_name="/synthesize")
    assert caught.value.title == "No action unit chosen" and "Choose at least one" in caught.value.message

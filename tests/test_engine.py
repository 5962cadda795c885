"""The engine drives every backbone as the reference fixtures' models do, on arrays and on files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_checkpoints import hub, isolated  # noqa: F401 - fixtures (local Hub, isolated caches)
from conftest import fixture_meta, model_fixture_dirs, require
import mefacial
from mefacial import Engine, InputError, WeightsNotFoundError
from mefacial.checkpoints import load_original_checkpoint
from mefacial.config import config_from_reference
from mefacial.engine import to_tensor, to_uint8
from mefacial.models import CHECKPOINT_PARTS, build_model


def fixture_variant(config) -> str:
    """The engine's variant id for a fixture's config."""
    if config.backbone == "fomm" and config.prior == "ewp" and config.au_points == "first_frame":
        return "fomm-ewp-mm21"
    return f"{config.backbone}-{config.prior}"


def load_fixture(folder: Path):
    from safetensors.torch import load_file

    meta = fixture_meta(folder)
    config = config_from_reference(yaml.safe_load((folder / "config.yaml").read_text()), meta, name=folder.name)
    model = build_model(config, for_training=True)
    load_original_checkpoint(model, folder / "checkpoint.pth.tar", CHECKPOINT_PARTS[config.backbone])
    return config, model.eval(), load_file(str(folder / "tensors.safetensors")), meta


def au_inputs(tensors, num_frames: int):
    """Source 18 x 2 and driving T x 18 x 2 AU points of a prior fixture (None without prior)."""
    points = tensors.get("au_points_pixels")
    if points is None:
        return None, None
    if points.shape[0] == num_frames + 2:  # source, initial, each driving frame
        return points[0].numpy(), points[2:].numpy()
    return points[0].numpy(), points[1:2].expand(num_frames, -1, -1).numpy()  # fixed per clip


@pytest.mark.parametrize("folder", [pytest.param(d, id=d.name) for d in model_fixture_dirs()] or
                         [pytest.param(None, id="no-fixtures")])
def test_engine_matches_direct_model_calls(folder):
    """Engine.animate (batched, source encoded once) == one direct pass of the model over the whole clip."""
    if folder is None:
        require(Path("/nonexistent-fixtures"), "reference fixtures")
    config, model, tensors, meta = load_fixture(folder)
    if meta["driving_frame_indices_in_clip"][0] != 0:
        pytest.skip("the engine takes the clip's first frame as the initial frame")
    source = to_uint8(tensors["inputs.source"])[0]  # H x W x 3
    driving = to_uint8(tensors["inputs.driving"])  # T x H x W x 3
    au_source, au_driving = au_inputs(tensors, len(driving))
    mode = "relative"

    engine = Engine(device="cpu", batch_size=1)  # batch 1: every frame in its own batch
    variant = fixture_variant(config)
    engine.use_model(variant, model)
    result = engine.animate(source, driving, variant=variant, motion=mode, crop=False,
                            source_landmarks=au_source, driving_landmarks=au_driving)

    with torch.inference_mode():
        src_t, drv_t = to_tensor(source, torch.device("cpu")), to_tensor(driving, torch.device("cpu"))
        as_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a)).float()  # noqa: E731
        au_src = None if au_source is None else as_t(au_source)[None]
        au_drv = as_t(au_driving)
        src = model.detect(src_t, au_src)
        init = model.detect(drv_t[:1], None if au_drv is None else au_drv[:1])
        drv = model.detect(drv_t, au_drv)
        new = model.transfer(src, drv, init, mode=mode, adapt_scale=config.backbone == "mraa")
        expected = to_uint8(model.generate(src_t, model.encode_source(src_t), src, new)["prediction"])
    assert result.frames.shape == driving.shape
    assert np.abs(result.frames.astype(int) - expected.astype(int)).max() <= 1
    # and, on inputs quantised to uint8, still close to what the original code produced from float inputs
    reference = to_uint8(tensors[f"{mode}.prediction"])
    assert np.abs(result.frames.astype(float) - reference).mean() < 2.0
    if au_source is not None:
        assert result.source_au.shape == (18, 2) and result.prior_map is not None


def tiny_fomm():
    folder = next((d for d in model_fixture_dirs() if fixture_meta(d)["backbone"] == "fomm"
                   and fixture_meta(d)["prior"] == "none"), None)
    if folder is None:
        require(Path("/nonexistent-fixtures"), "a FOMM reference fixture")
    return load_fixture(folder)[1]


def test_engine_on_files_crops_faces_and_keeps_fps(data_dir, tmp_path):
    from mefacial.video import read_clip, write_video

    original = read_clip(sorted((data_dir / "driving").glob("*.gif"))[0])
    clip = write_video(tmp_path / "clip.mp4", original.frames[:10], original.fps)  # a short real clip, as a file
    face = next((data_dir / "faces").glob("*.png"))
    engine = Engine(device="cpu", landmarks="dlib")
    engine.use_model("fomm-none", tiny_fomm())
    fractions = []
    result = engine.animate(face, clip, variant="fomm-none", progress=lambda f, m: fractions.append(f))
    assert result.frames.shape == (10, 256, 256, 3)
    assert result.fps == pytest.approx(original.fps, rel=1e-3)
    assert result.crop_box is not None and result.landmark_backend == "dlib"
    assert fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions)
    pasted = engine.animate(face, clip, variant="fomm-none", paste_back=True)
    assert pasted.frames.shape[1:3] == original.frames.shape[1:3]  # the source picture's size


def test_engine_errors_name_the_problem(tmp_path, monkeypatch):
    engine = Engine(device="cpu")
    face = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InputError, match="motion mode"):
        engine.animate(face, face[None], variant="fomm-none", motion="avd")
    with pytest.raises(InputError, match="magnify"):
        engine.animate(face, face[None], variant="fomm-none", magnify=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEFACIAL_CHECKPOINT_MRAA_AWP", raising=False)
    with pytest.raises(WeightsNotFoundError):
        engine.animate(face, face[None], variant="mraa-awp")


@pytest.mark.parametrize("entry", ["animate", "run"])
def test_out_of_memory_becomes_a_clear_error(monkeypatch, entry):
    engine = Engine(device="cpu", batch_size=4)
    engine.use_model("fomm-none", tiny_fomm())

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mefacial.engine.ClipAnimator, "__call__", exhausted)
    face = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(mefacial.InputTooLargeError, match="batch size"):
        run = engine.animate if entry == "animate" else \
            lambda face, clip, variant, **k: list(engine.run(engine.prepare(face, clip, stream=True, **k), variant))
        run(face, face[None], variant="fomm-none", crop=False)


def test_compare_reports_one_progress_over_all_variants(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEFACIAL_CHECKPOINT_MRAA_AWP", raising=False)
    engine = Engine(device="cpu", batch_size=2)
    engine.use_model("fomm-none", tiny_fomm())
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    seen = []
    results = engine.compare(frames[0], frames, ["fomm-none", "mraa-awp"], crop=False,
                             progress=lambda f, m: seen.append((f, m)))
    assert results["fomm-none"].frames.shape == (4, 256, 256, 3)
    assert isinstance(results["mraa-awp"], WeightsNotFoundError)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and max(fractions) <= 0.5 + 1e-9  # fomm-none's half, then mraa-awp fails
    assert {m.split(":")[0] for _, m in seen} == {"fomm-none", "mraa-awp"}


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    from mefacial import engine as engine_module

    monkeypatch.setattr(engine_module, "native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="mefacial"):
        engine_module.Engine(device="cpu", precision="bf16")
    assert "emulated" in caplog.text and "fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(engine_module, "native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="mefacial"):
        engine_module.Engine(device="cpu", precision="bf16")
    assert "emulated" not in caplog.text


def test_a_download_in_progress_does_not_stall_other_variants(hub, tmp_path, monkeypatch):
    """The model cache's lock is not held across a Hub download: while fomm-none's weights are stuck mid-download,
    a warp request completes; the stuck request then fails cleanly when the download breaks."""
    import threading

    from test_checkpoints import REPO as HUB_REPO
    from test_checkpoints import checkpoint_bytes, hub_entry, use_registry

    data = checkpoint_bytes(tmp_path, 0)
    hub.add_file(HUB_REPO, "weights/tiny.pth.tar", data)
    hub.cut("weights/tiny.pth.tar", after=100, times=1, hold=True)
    use_registry(tmp_path, monkeypatch, {"fomm-none": hub_entry()})
    engine = Engine(device="cpu")
    outcome: list = []
    loader = threading.Thread(target=lambda: outcome.append(_try(lambda: engine.model("fomm-none"))), daemon=True)
    loader.start()
    try:
        assert hub.stalled.wait(timeout=60), "the download never started"
        face = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        points = np.tile(np.linspace(10, 50, 68, dtype=np.float32)[:, None], (1, 2)) + np.arange(2, dtype=np.float32)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (engine.animate(face, face[None], variant="warp", crop=False,
                                                                 source_landmarks=points, driving_landmarks=points[None]),
                                                  done.set()), daemon=True)
        worker.start()
        assert done.wait(timeout=60), "a warp request waited for another variant's download"
        assert loader.is_alive()  # still downloading
    finally:
        hub.release()
        loader.join(timeout=60)
    assert outcome and not loader.is_alive()


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at what came out
        return exc


def test_stage_timings_added_from_two_threads_all_count(monkeypatch):
    """`utils.timer` sums a stage's time into one dict from the renderer's and the mesh tracker's threads: a
    thread switch between reading a sum and writing it back (made certain here by a dict that yields there) must
    not drop the other thread's time."""
    import threading
    import time

    from mefacial.utils import timer

    class Yielding(dict):
        def get(self, *args):
            value = super().get(*args)
            time.sleep(0.001)  # the other thread runs between this read and the write after it
            return value

    seconds = Yielding()

    def add(n: int) -> None:
        for _ in range(n):
            with timer(seconds, "generator"):
                pass

    threads = [threading.Thread(target=add, args=(30,)) for _ in range(2)]
    local = threading.local()

    def ticks() -> float:  # each thread's own clock, a tick a call: each block takes exactly one tick
        local.now = getattr(local, "now", 0.0) + 1.0
        return local.now

    monkeypatch.setattr(time, "perf_counter", ticks)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seconds["generator"] == 60


def test_the_cpu_batch_is_the_backbones_own_unless_given():
    """On the CPU the dense generator renders 8 frames a batch (measured faster than the engine's 4; its frames
    are the same whatever the batch), the learned backbones the engine's 4; a batch size given to the engine or
    to one run wins, and on a GPU the engine's default holds."""
    from mefacial.variants import get_variant

    dense, fomm = get_variant("dense"), get_variant("fomm-none")
    engine = Engine(device="cpu")
    assert (engine.batch_size_for(dense), engine.batch_size_for(fomm)) == (8, 4)
    assert Engine(device="cpu", batch_size=2).batch_size_for(dense) == 2
    engine.device, engine.batch_size = torch.device("cuda"), 32  # (what `to("cuda")` sets; no GPU needed to ask)
    assert engine.batch_size_for(dense) == 32


def test_a_checkpoint_for_a_training_free_variant_is_refused_not_ignored(tmp_path):
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"x")
    with pytest.raises(InputError, match="dense is training-free and loads no weights"):
        Engine(device="cpu", checkpoints={"dense": str(weights)})
    with pytest.raises(InputError, match="warp is training-free"):
        Engine(device="cpu").model("warp", checkpoint=weights)
    assert Engine(device="cpu", checkpoints={"fomm-awp": str(weights)}).checkpoint_overrides == {
        "fomm-awp": str(weights)}  # (a learned variant's: loaded, and checked, when it runs)


SUBPROCESS_DURING_BLAS = """
import subprocess, sys, threading, time
import numpy as np
from scipy.spatial import Delaunay
from threadpoolctl import threadpool_info
if sys.argv[1] == "engine":
    from mefacial import Engine
    Engine(device="cpu")
print([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"], flush=True)
points = np.random.default_rng(0).random((468, 2)) * 256  # (the dense generator's triangulation: a threaded solve)
done, gaps, end = [0], [0.0], time.time() + 8
def triangulate():
    last = time.time()
    while time.time() < end:
        Delaunay(points + np.random.default_rng(done[0]).random((468, 2))).transform
        done[0] += 1
        gaps.append(time.time() - last)
        last = time.time()
def start_processes():  # (the app's preview of an upload runs ffmpeg meanwhile)
    while time.time() < end:
        subprocess.run(["true"])
threads = [threading.Thread(target=f, daemon=True) for f in (triangulate, start_processes)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=30)
print("hung" if any(t.is_alive() for t in threads) else f"done {done[0]} {max(gaps):.3f}", flush=True)
"""


def test_a_subprocess_started_during_a_blas_call_does_not_hang_the_engines_process():
    """Once an Engine is made, numpy's and scipy's BLAS run on one thread (`one_blas_thread`): a threaded OpenBLAS
    call waits for good where another thread starts a subprocess meanwhile (found in the app: a Generate hung
    building the source's triangulation while the upload's preview ran ffmpeg). Without the Engine, the same
    loops stall the triangulations for seconds on a 2-core machine (in every run measured)."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SUBPROCESS_DURING_BLAS, "engine"], capture_output=True, text=True,
                            timeout=120)
    threads, outcome = result.stdout.split("\n")[:2]
    assert set(json.loads(threads)) == {1}, result.stdout  # every BLAS the process loaded
    assert outcome.startswith("done"), result.stdout + result.stderr
    count, longest = outcome.split()[1:]
    # measured: 2500-3100 triangulations, none waiting over 13 ms (without the Engine: 2-41, one waiting 6-7.5 s)
    assert int(count) > 100 and float(longest) < 1.0, outcome

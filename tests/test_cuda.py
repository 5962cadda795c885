"""The engine on a CUDA GPU: skipped where there is none (CI, this project's machines); run by
scripts/gpu_check.sh on a lent GPU. Nothing here imports gradio or needs landmarks from dlib."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mefacial import Engine
from mefacial.bench import random_model
from mefacial.variants import get_variant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_engine_to_moves_cached_models_and_rechooses_device_defaults():
    engine = Engine(device="cpu")
    engine.use_model("fomm-awp", random_model(get_variant("fomm-awp").config, seed=0))
    assert engine.batch_size == 4 and engine.memory_format == torch.channels_last
    assert engine.to("cuda") is engine
    model, _ = engine.model("fomm-awp")
    assert engine.device.type == "cuda" and engine.batch_size == 32 and engine.memory_format == torch.contiguous_format
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert engine.to("cuda") is engine  # a second move (a reused ZeroGPU worker) is a no-op


def test_warp_on_cuda_matches_the_cpu():
    """The training-free warp with given landmarks (no detector): the same frames on both devices."""
    rng = np.random.default_rng(0)
    face = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
    grid = np.stack(np.meshgrid(np.linspace(60, 196, 17), np.linspace(70, 200, 4)), -1).reshape(-1, 2)[:68]
    points = grid.astype(np.float32)  # 68 x 2, spread over the face area
    motion = np.zeros((6, 68, 2), np.float32)
    motion[:, 36:48, 1] = np.linspace(0, -2, 6)[:, None]  # the eyes move up by up to 2 px
    frames = np.repeat(face[None], 6, 0)
    out = {device: Engine(device=device).animate(face, frames, "warp", source_landmarks=points,
                                                   driving_landmarks=points + motion, crop=False, smooth=False).frames
           for device in ("cpu", "cuda")}
    assert np.abs(out["cpu"].astype(int) - out["cuda"].astype(int)).max() <= 1


def test_dense_on_cuda_matches_the_cpu():
    """The dense generator on given face meshes (nothing tracked, no detector): the same frames on both devices
    (the GPU blurs by shifted copies where the CPU calls OpenCV, and samples in its own order), at magnify 2."""
    pytest.importorskip("ai_edge_litert")
    from conftest import DATA, require

    from mefacial.mesh import detect_mesh
    from mefacial.video import read_clip, read_image, resize_frames

    face = resize_frames(read_image(require(DATA / "faces" / "asian_female.png", "shared face"))[None], 256, 256)[0]
    clip = resize_frames(read_clip(require(DATA / "driving" / "s3_po_05.gif", "shared clip")).frames[:16], 256, 256)
    meshes = {"source_landmarks": detect_mesh(face)[0], "driving_landmarks": detect_mesh(clip)}
    out = {device: Engine(device=device).animate(face, clip, "dense", crop=False, magnify=2.0, **meshes).frames
           for device in ("cpu", "cuda")}
    diff = np.abs(out["cpu"].astype(int) - out["cuda"].astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())

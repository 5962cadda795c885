"""Training runs on the shared real clips with the tiny configs (CPU, 64 px, dlib landmarks, no VGG download).

One dataset folder is built per session from the shared GIFs (all three under
train/, one also under test/ for the validation metric) and its landmarks are
detected once with dlib; every run below reads them from the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from mefacial.checkpoints import load_weights
from mefacial.models import build_model
from train import datasets
from train.config import load_train_config
from train.monitor import read_jsonl

from conftest import DATA, REPO, require

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # training runs


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    clips = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    assert len(clips) >= 2
    root = tmp_path_factory.mktemp("microexpressions")
    (root / "train").mkdir()
    (root / "test").mkdir()
    for clip in clips:
        (root / "train" / clip.name).symlink_to(clip)
    (root / "test" / clips[0].name).symlink_to(clips[0])
    entries = datasets.discover_videos(root, "train") + datasets.discover_videos(root, "test")
    marks = datasets.load_landmarks(entries, "dlib", datasets.landmark_cache_dir(root, "dlib"))
    assert set(marks) == {c.name for c in clips}  # a face in every clip
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and the runs must not fight over 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(config: str, data: Path, out: Path, *extra: str) -> dict:
    code = train.main(["--config", config, "--data", str(data), "--out", str(out), *extra])
    assert code == 0
    return json.loads(((out / "avd") if "avd" in extra else out).joinpath("summary.json").read_text())


def _decreases(values: list[float], k: int) -> tuple[float, float]:
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def test_landmark_cache_is_reused(dataset_dir, monkeypatch):
    """A second dataset build reads the cache: no detection at all."""
    monkeypatch.setattr(datasets, "detect_landmarks", lambda *a, **k: pytest.fail("detected landmarks again"))
    entries = datasets.discover_videos(dataset_dir, "train")
    marks = datasets.load_landmarks(entries, "dlib", datasets.landmark_cache_dir(dataset_dir, "dlib"))
    assert all(m.shape[1:] == (68, 2) and np.isfinite(m).all() for m in marks.values())


def test_tiny_fomm_awp_learns(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "detect_landmarks", lambda *a, **k: pytest.fail("detected landmarks again"))
    out = tmp_path / "fomm"
    summary = _train("tiny-fomm-awp", dataset_dir, out, "--max-steps", "30")
    log = read_jsonl(out / "losses.jsonl")
    assert [e["step"] for e in log] == list(range(1, 31))
    assert {"reconstruction", "gen_gan", "feature_matching", "disc_gan", "equivariance_value",
            "equivariance_jacobian", "l1"} <= set(log[0])
    first, last = _decreases([e["l1"] for e in log], 8)
    assert last < 0.8 * first, f"reconstruction L1 did not go down: first steps {first:.4f}, last steps {last:.4f}"
    assert log[-1]["epoch"] == 4 and summary["step"] == 30  # 6 steps per epoch
    # what a run leaves behind: checkpoints the engine loads, a picture, TensorBoard events
    cfg = load_train_config("tiny-fomm-awp")
    model = build_model(cfg.model)
    meta = load_weights(model, out / "last.pth.tar", "fomm")
    assert meta["step"] == 30 and meta["variant"] == "fomm-awp" and meta["format"] == "mefacial-train"
    load_weights(build_model(cfg.model), out / "best.pth.tar", "fomm")
    assert list((out / "vis").glob("step-*.png")) and list((out / "tb").glob("events.*"))
    assert summary["best_metric"] is not None


def test_tiny_mraa_awp_learns_then_avd(dataset_dir, tmp_path):
    out = tmp_path / "mraa"
    _train("tiny-mraa-awp", dataset_dir, out, "--max-steps", "30")
    log = read_jsonl(out / "losses.jsonl")
    assert {"reconstruction", "equivariance_shift", "equivariance_affine", "l1"} <= set(log[0])
    first, last = _decreases([e["l1"] for e in log], 8)
    assert last < 0.8 * first, f"reconstruction L1 did not go down: first steps {first:.4f}, last steps {last:.4f}"

    before = torch.load(out / "last.pth.tar", weights_only=True)
    summary = _train("tiny-mraa-awp", dataset_dir, out, "--stage", "avd", "--max-steps", "12")
    avd_log = read_jsonl(out / "avd" / "losses.jsonl")
    first, last = _decreases([e["l1"] for e in avd_log], 3)
    assert last < first and summary["stage"] == "avd"
    after = torch.load(out / "avd" / "last.pth.tar", weights_only=True)
    for part in ("generator", "region_predictor", "bg_predictor"):  # frozen in the AVD stage
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part])
    assert any(not torch.equal(before["avd_network"][k], after["avd_network"][k]) for k in before["avd_network"])
    model = build_model(load_train_config("tiny-mraa-awp").model)
    assert load_weights(model, out / "avd" / "last.pth.tar", "mraa")["stage"] == "avd"


def test_resume_continues_exactly(dataset_dir, tmp_path):
    """4 steps, a checkpoint, 4 more from it == 8 steps in one go, loss by loss (across an epoch boundary)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train("tiny-fomm-awp", dataset_dir, whole, "--max-steps", "8")
    _train("tiny-fomm-awp", dataset_dir, split, "--max-steps", "4")
    checkpoint = torch.load(split / "last.pth.tar", weights_only=True)
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]) == (4, 0, 4)
    assert {"python", "numpy", "torch"} <= set(checkpoint["rng"]) and set(checkpoint["optimizers"]) == {
        "generator", "kp_detector", "discriminator"}
    # a new run into a folder holding one would replace it: refused, naming --resume (and nothing is touched)
    before = (split / "last.pth.tar").read_bytes()
    assert train.main(["--config", "tiny-fomm-awp", "--data", str(dataset_dir), "--out", str(split)]) == 2
    assert (split / "last.pth.tar").read_bytes() == before
    # DataLoader workers change nothing either: every sample is seeded by its key
    _train("tiny-fomm-awp", dataset_dir, split, "--max-steps", "8", "--resume", str(split / "last.pth.tar"),
           "--num-workers", "2")
    a, b = read_jsonl(whole / "losses.jsonl"), read_jsonl(split / "losses.jsonl")
    assert [e["step"] for e in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x == y, f"step {x['step']} differs after resuming: {x} vs {y}"
    final_a = torch.load(whole / "last.pth.tar", weights_only=True)
    final_b = torch.load(split / "last.pth.tar", weights_only=True)
    for part in ("generator", "kp_detector", "discriminator"):
        assert all(torch.equal(final_a[part][k], final_b[part][k]) for k in final_a[part])


def test_ddp_two_processes_keep_identical_weights(dataset_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): after a few steps both ranks hold the same parameters."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "train", "--config", "tiny-fomm-awp", "--data", str(dataset_dir), "--out", str(out),
           "--max-steps", "3"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    digests = summary["parameter_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    # the replicas trained: their parameters are not the initial ones
    cfg = load_train_config("tiny-fomm-awp")
    torch.manual_seed(cfg.runtime.seed)
    from train.trainer import parameter_digest

    assert parameter_digest(build_model(cfg.model, for_training=True)) != digests[0]
    assert len(read_jsonl(out / "losses.jsonl")) == 3  # rank 0 alone logs


def test_perceptual_loss_path_with_a_stand_in_network(dataset_dir, tmp_path, monkeypatch):
    """Perceptual weight > 0 goes through the VGG feature pyramid (here a tiny stand-in: no download)."""
    from torch import nn

    from train import losses, trainer

    def tiny_vgg(download: bool = True) -> losses.VGG19Features:
        layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(4, 4, 3, padding=1) if i % 2 == 0 else nn.ReLU() for i in range(28)]
        return losses.VGG19Features(nn.Sequential(*layers))

    monkeypatch.setattr(trainer, "ensure_vgg19_weights", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "load_vgg19", tiny_vgg)
    out = tmp_path / "perceptual"
    _train("tiny-mraa-awp", dataset_dir, out, "--max-steps", "2", "--set", "train.loss_weights.perceptual=[1,1,1,1,1]")
    log = read_jsonl(out / "losses.jsonl")
    assert all(e["perceptual"] > 0 and np.isfinite(e["perceptual"]) for e in log)


def test_bf16_mixed_precision_on_the_cpu(dataset_dir, tmp_path):
    out = tmp_path / "bf16"
    _train("tiny-fomm-awp", dataset_dir, out, "--max-steps", "2", "--precision", "bf16")
    log = read_jsonl(out / "losses.jsonl")
    assert len(log) == 2 and all(np.isfinite(v) for e in log for v in e.values())
    checkpoint = torch.load(out / "last.pth.tar", weights_only=True)
    assert all(t.dtype == torch.float32 for t in checkpoint["generator"].values() if t.is_floating_point())

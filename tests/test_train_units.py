"""Unit tests of the training package: configs, data, losses, checkpoints (no training loop; fast)."""

from __future__ import annotations

import shutil
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from mefacial.errors import CheckpointError, ConfigError, MefacialError, WeightsNotFoundError
from mefacial.prior import NUM_LANDMARKS
from train import checkpointing, datasets, losses
from train.config import TRAIN_CONFIG_DIR, load_train_config

from conftest import DATA, require

LEARNED_VARIANTS = ("fomm-none", "fomm-ewp", "fomm-awp", "fomm-ewp-mm21", "mraa-none", "mraa-ewp", "mraa-awp")


# ---- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LEARNED_VARIANTS)
def test_paper_config_per_variant(name):
    """One training config per learned variant, pointing at that variant's architecture config."""
    from mefacial.variants import get_variant

    cfg = load_train_config(name)
    assert cfg.variant == name
    assert cfg.model.to_dict() == get_variant(name).config.to_dict()  # the engine builds the same architecture
    assert cfg.perceptual_weight > 0 and cfg.train.epoch_milestones == [60, 90]
    assert cfg.train.betas == [0.5, 0.999]
    assert cfg.dataset.augmentation.horizontal_flip and cfg.dataset.augmentation.time_flip
    if cfg.model.backbone == "fomm":
        assert cfg.train.lr_generator == cfg.train.lr_kp_detector == cfg.train.lr_discriminator == 2e-4
        assert cfg.train.loss_weights["equivariance_jacobian"] == 10
    else:
        assert cfg.train.lr == 2e-4 and cfg.avd.batch_size == 256 and cfg.avd.lr == 1e-3


def test_tiny_configs_need_no_download():
    for name in ("tiny-fomm-awp", "tiny-mraa-awp"):
        cfg = load_train_config(name)
        assert cfg.perceptual_weight == 0 and cfg.model.image_size == 64 and cfg.model.prior == "awp"


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((TRAIN_CONFIG_DIR / "tiny-fomm-awp.yaml").read_text().replace("batch_size: 4", "batchsize: 4"))
    with pytest.raises(ConfigError, match="batchsize"):
        load_train_config(path)
    with pytest.raises(ConfigError, match="equivariance_shift"):
        load_train_config("tiny-fomm-awp", ["train.loss_weights.equivariance_shift=1"])
    with pytest.raises(ConfigError, match="AVD stage exists for MRAA only"):
        load_train_config("tiny-fomm-awp", ["stage=avd"])
    with pytest.raises(ConfigError, match="'mraa-awp' is not a fomm variant"):  # weights that would load nowhere
        load_train_config("tiny-fomm-awp", ["variant=mraa-awp"])
    with pytest.raises(KeyError, match="unknown variant 'fomm-awq'"):
        load_train_config("tiny-fomm-awp", ["variant=fomm-awq"])
    with pytest.raises(ConfigError, match="train: .*'abc'.*any --set"):  # a value of the wrong kind
        load_train_config("tiny-fomm-awp", ["train.batch_size=abc"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n  model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML: .*line 2"):
        load_train_config(broken)


@pytest.mark.parametrize("name", ["fomm-awp", "mraa-awp"])
def test_the_offline_advice_leaves_a_reconstruction_loss(name):
    """The published configs' reconstruction loss is the perceptual one alone: setting it to 0 (no VGG-19 weights
    offline) left the GAN terms alone (FOMM) or nothing with a gradient (MRAA crashed); it is refused, naming the
    L1 to set instead, and the advice given (README, the VGG error) trains."""
    with pytest.raises(ConfigError, match="no reconstruction loss is left.*reconstruction=10"):
        load_train_config(name, ["train.loss_weights.perceptual=0"])
    cfg = load_train_config(name, ["train.loss_weights.perceptual=0", "train.loss_weights.reconstruction=10"])
    assert cfg.perceptual_weight == 0 and cfg.train.loss_weights["reconstruction"] == 10


def test_set_overrides():
    cfg = load_train_config("tiny-mraa-awp", ["train.batch_size=2", "runtime.precision=bf16", "model_overrides.image_size=32"])
    assert cfg.train.batch_size == 2 and cfg.runtime.precision == "bf16" and cfg.model.image_size == 32


# ---- losses -------------------------------------------------------------------------------------


def test_tps_jacobian_matches_autograd_and_inverse_warp_inverts():
    tps = losses.RandomTPS(3, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    points = (torch.rand(3, 18, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    points.requires_grad_(True)
    warped = tps.warp_coordinates(points)
    rows = [torch.autograd.grad(warped[..., i].sum(), points, retain_graph=True)[0] for i in range(2)]
    assert torch.allclose(tps.jacobian(points), torch.stack(rows, dim=-2), atol=1e-12)
    assert (tps.jacobian(points) - torch.eye(2, dtype=torch.float64)).abs().max() > 1e-3  # not the identity
    target = warped.detach()
    assert torch.allclose(tps.inverse_warp(target), points.detach(), atol=1e-10)


def test_tps_is_reproducible_from_its_generator():
    a = losses.RandomTPS(2, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(7))
    b = losses.RandomTPS(2, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(7))
    c = losses.RandomTPS(2, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.theta, b.theta) and torch.equal(a.control_params, b.control_params)
    assert not torch.equal(a.theta, c.theta)


def test_equivariance_losses_vanish_for_consistent_keypoints():
    """Keypoints that move with the warp (and jacobians that compose with it) give zero loss."""
    tps = losses.RandomTPS(2, 0.05, 0.005, 5, generator=torch.Generator().manual_seed(3))
    transformed = torch.rand(2, 10, 2) * 1.6 - 0.8
    driving = tps.warp_coordinates(transformed)
    assert losses.equivariance_value_loss(driving, transformed, tps) < 1e-7
    jac_t = torch.eye(2).expand(2, 10, 2, 2)
    jac_d = tps.jacobian(transformed) @ jac_t
    assert losses.equivariance_matrix_loss(jac_d, transformed, jac_t, tps) < 1e-6
    assert losses.equivariance_value_loss(driving + 0.1, transformed, tps) > 0.09


def test_gan_losses_on_known_maps():
    maps_real = {"prediction_map_1": torch.ones(2, 1, 4, 4), "feature_maps_1": [torch.zeros(2, 3, 4, 4)]}
    maps_fake = {"prediction_map_1": torch.zeros(2, 1, 4, 4), "feature_maps_1": [torch.ones(2, 3, 4, 4)]}
    assert losses.discriminator_gan_loss(maps_real, maps_fake, [1], 1.0) == 0  # a perfect discriminator
    assert losses.generator_gan_loss(maps_fake, [1], 2.0) == 2.0
    assert losses.feature_matching_loss(maps_real, maps_fake, [1], [10.0]) == 10.0


def test_vgg_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("MEFACIAL_OFFLINE", raising=False)
    calls = []

    def blocked(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    with pytest.raises(WeightsNotFoundError) as info:
        losses.ensure_vgg19_weights()
    message = str(info.value)
    assert calls and str(tmp_path / "torch-home") in message and "vgg19" in message
    assert "perceptual" in message and "TORCH_HOME" in message


def test_vgg_offline_stops_training_at_start(tmp_path, monkeypatch, capsys):
    """Perceptual weight > 0 and no VGG weights: the CLI exits 2 with the message, before reading any data."""
    import train

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("MEFACIAL_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    code = train.main(["--config", "tiny-fomm-awp", "--data", str(tmp_path / "no-such-data"),
                       "--out", str(tmp_path / "run"), "--set", "train.loss_weights.perceptual=[1,1,1,1,1]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "VGG19" in err and "train.loss_weights.perceptual" in err
    assert not (tmp_path / "run").exists()


def test_vgg_loads_from_the_cache_file(tmp_path, monkeypatch):
    """A weight file in $TORCH_HOME/hub/checkpoints is used as it is (no network)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = losses.vgg19_weights_path()
    path.parent.mkdir(parents=True)
    features = torchvision.models.vgg19().features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    vgg = losses.load_vgg19()
    out = vgg(torch.rand(1, 3, 32, 32))
    assert [o.shape[1] for o in out] == [64, 128, 256, 512, 512]
    assert torch.equal(vgg.slices[0][0].weight, features[0].weight)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_vgg_loads_a_local_file_of_any_float_dtype(tmp_path):
    """`train.vgg19_weights`: a local VGG19 file (safetensors, float16 here) loads without the network; a file
    lacking a layer is a clear error."""
    import torchvision
    from safetensors.torch import save_file

    features = torchvision.models.vgg19().features
    state = {f"features.{k}": v.half() for k, v in features.state_dict().items() if int(k.split(".")[0]) < 30}
    save_file(state, str(tmp_path / "vgg.safetensors"))
    vgg = losses.load_vgg19(path=tmp_path / "vgg.safetensors")
    assert vgg.slices[4][-1].__class__.__name__ == "ReLU" and vgg.slices[0][0].weight.dtype == torch.float32
    assert torch.equal(vgg.slices[0][0].weight, features[0].weight.half().float())
    del state["features.28.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsNotFoundError, match="features.28.weight"):
        losses.load_vgg19(path=tmp_path / "bad.safetensors")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        losses.load_vgg19(path=tmp_path / "missing.pth")


def test_config_from_original_reads_the_original_yaml():
    """An original config.yaml (train_params / train_avd_params) becomes a TrainConfig; unknown keys are errors."""
    from mefacial.config import ModelConfig
    from train.config import config_from_original

    model = ModelConfig(name="m", backbone="mraa", model_params={"num_regions": 10})
    block = {"train_params": {"num_epochs": 3, "num_repeats": 7, "lr": 1e-3, "batch_size": 5, "use_sync_bn": True,
                              "dataloader_workers": 2, "checkpoint_freq": 1,
                              "loss_weights": {"perceptual": [1, 1, 1, 1, 1], "equivariance_shift": 2}},
             "train_avd_params": {"num_epochs": 4, "num_repeats": 9, "batch_size": 6, "lr": 1e-2, "random_scale": 0.1,
                                  "checkpoint_freq": 1, "dataloader_workers": 3}}
    cfg = config_from_original(block, model, stage="avd")
    assert (cfg.train.num_epochs, cfg.train.lr, cfg.dataset.num_repeats, cfg.stage) == (3, 1e-3, 7, "avd")
    assert cfg.train.loss_weights["equivariance_shift"] == 2 and cfg.train.loss_weights["equivariance_affine"] == 10
    assert (cfg.avd.num_repeats, cfg.avd.batch_size, cfg.avd.random_scale) == (9, 6, 0.1)
    with pytest.raises(ConfigError, match="lr_typo"):
        config_from_original({"train_params": {"lr_typo": 1}}, model)


# ---- data ---------------------------------------------------------------------------------------------


def test_colour_jitter_matches_torchvision():
    import torchvision.transforms.v2.functional as TF

    frames = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name, factor, reference in (("brightness", 1.1, TF.adjust_brightness), ("contrast", 0.9, TF.adjust_contrast),
                                    ("saturation", 1.07, TF.adjust_saturation), ("hue", 0.08, TF.adjust_hue),
                                    ("hue", -0.1, TF.adjust_hue)):
        assert torch.allclose(datasets.adjust_colour(frames, name, factor), reference(frames, factor), atol=1e-5), name


def test_flip_landmarks_mirrors_the_face():
    index = np.array(datasets.MIRROR_INDEX)
    assert sorted(index) == list(range(NUM_LANDMARKS)) and (index[index] == np.arange(NUM_LANDMARKS)).all()
    points = np.random.default_rng(0).uniform(0, 63, size=(NUM_LANDMARKS, 2)).astype(np.float32)
    flipped = datasets.flip_landmarks(points, 64)
    assert np.allclose(datasets.flip_landmarks(flipped, 64), points)
    assert flipped[36, 0] == 63 - points[45, 0] and flipped[36, 1] == points[45, 1]  # eye corners swap sides


def _fake_videos(root: Path, count: int = 2, frames: int = 5, size: int = 24) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for v in range(count):
        folder = root / "train" / f"video{v}"
        folder.mkdir(parents=True)
        for t in range(frames):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{t}.png")


def _fake_detector(calls: list):
    from mefacial.landmarks import Landmarks68

    def detect(frames, backend, device=None):
        calls.append(len(frames))
        n = len(frames)
        base = np.linspace(2, frames.shape[2] - 3, NUM_LANDMARKS, dtype=np.float32)
        points = np.stack([np.stack([base, base[::-1]], -1)] * n)
        found = np.ones(n, bool)
        found[0] = False  # one frame without a face: filled from its neighbour
        points[0] = np.nan
        return Landmarks68(points, found, np.zeros((n, 4), np.float32), backend)

    return detect


def test_landmark_cache_is_reused_and_refreshed(tmp_path, monkeypatch):
    _fake_videos(tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(datasets, "detect_landmarks", _fake_detector(calls))
    entries = datasets.discover_videos(tmp_path)
    cache = datasets.landmark_cache_dir(tmp_path, "dlib")
    first = datasets.load_landmarks(entries, "dlib", cache)
    assert calls == [5, 5] and cache.parent.name == ".landmarks" and cache.parent.parent == tmp_path
    assert np.isfinite(first["video0"]).all() and np.array_equal(first["video0"][0], first["video0"][1])
    second = datasets.load_landmarks(datasets.discover_videos(tmp_path), "dlib", cache)
    assert calls == [5, 5]  # nothing detected again
    assert all(np.array_equal(first[k], second[k]) for k in first)
    frame = tmp_path / "train" / "video1" / "3.png"
    frame.write_bytes(frame.read_bytes())  # same bytes, new mtime: the key changes
    stat = frame.stat()
    import os

    os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    datasets.load_landmarks(datasets.discover_videos(tmp_path), "dlib", cache)
    assert calls == [5, 5, 5]  # only the changed video
    datasets.load_landmarks(datasets.discover_videos(tmp_path), "dlib", datasets.landmark_cache_dir(tmp_path, "fan"))
    assert calls == [5, 5, 5, 5, 5]  # another backend has its own cache


def test_pairs_are_reproducible_per_key(tmp_path, monkeypatch):
    _fake_videos(tmp_path)
    monkeypatch.setattr(datasets, "detect_landmarks", _fake_detector([]))
    entries = datasets.discover_videos(tmp_path)
    marks = datasets.load_landmarks(entries, "dlib", datasets.landmark_cache_dir(tmp_path, "dlib"))
    cfg = load_train_config("tiny-fomm-awp")
    make = lambda: datasets.PairDataset(entries, 16, num_repeats=3, seed=5, augmentation=cfg.dataset.augmentation,
                                        landmarks=marks)
    a, b = make(), make()
    assert len(a) == 6
    sample = a[17]
    assert set(sample) == {"source", "driving", "key", "source_landmarks", "driving_landmarks", "source_au", "driving_au"}
    assert sample["source"].shape == (3, 16, 16) and sample["driving_au"].shape == (18, 2)
    for key in (0, 5, 17):
        assert all(torch.equal(a[key][k], b[key][k]) for k in sample)
    assert any(not torch.equal(a[k]["driving"], a[k + 6]["driving"]) for k in range(6))  # epochs differ
    first = datasets.PairDataset(entries, 16, seed=5, landmarks=marks, au_points="first_frame")[3]
    assert torch.equal(first["source_au"], first["driving_au"])


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    data = list(range(10))
    full = list(iter(_sampler(data, 1, 0, epoch=2)))
    assert sorted(k - 2 * 10 for k in full) == data  # keys carry the epoch
    assert list(iter(_sampler(data, 1, 0, epoch=2, skip=4))) == full[4:]
    ranks = [set(_sampler(data, 2, r, epoch=1)) for r in range(2)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == 10
    assert list(iter(_sampler(data, 1, 0, epoch=3))) != [k + 10 for k in full]  # reshuffled every epoch


def _sampler(data, replicas, rank, epoch, skip=0):
    sampler = datasets.EpochSampler(data, replicas, rank, seed=0)
    sampler.set_epoch(epoch, skip=skip)
    return sampler


def test_loader_workers_fit_the_machines_cpus(monkeypatch, caplog):
    """More DataLoader workers than CPUs only compete for them (PyTorch warns): capped, said once, per rank."""
    from mefacial.distributed import Ranks
    from train.trainer import DistContext, _loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    with caplog.at_level("INFO", logger="train"):
        assert _loader_workers(8, DistContext()) == 4
    assert "runtime.num_workers 8 -> 4" in caplog.text
    assert _loader_workers(8, DistContext(Ranks(rank=1, world=2, local_rank=1, local_world=2))) == 2
    assert _loader_workers(0, DistContext()) == 0 and _loader_workers(3, DistContext()) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert _loader_workers(4, DistContext(Ranks(local_world=4))) == 1  # at least one


def test_progress_in_a_log_file_is_plain_lines(tmp_path, monkeypatch, caplog):
    """Off a terminal (a log file, a batch job) the run prints a line every log_every steps, no bar's \\r."""
    import io

    from train.monitor import Monitor

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    with caplog.at_level("INFO", logger="train"):
        monitor = Monitor(tmp_path / "run", True, start_step=0, total_steps=7, log_every=3)
        for step in range(1, 8):
            monitor.log_step(step, 0, {"l1": 0.5 / step, "reconstruction": 1.0, "gen_gan": 0.1}, {})
        monitor.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["step 1/7", "step 3/7", "step 6/7", "step 7/7"]
    assert lines[1] == "step 3/7, epoch 0: l1 0.1667, reconstruction 1.0000"
    assert "\r" not in sys.stderr.getvalue() and monitor.bar is None
    assert len((tmp_path / "run" / "losses.jsonl").read_text().splitlines()) == 7  # every step, as before


def test_discover_reads_frame_folders_and_video_files(tmp_path):
    clips = require(DATA / "driving", "micro-expression clips")
    _fake_videos(tmp_path, count=1)
    gif = sorted(clips.glob("*.gif"))[0]
    shutil.copy(gif, tmp_path / "train" / gif.name)
    (tmp_path / "test").mkdir()
    shutil.copy(gif, tmp_path / "test" / gif.name)
    train = datasets.discover_videos(tmp_path, "train")
    assert [(e.name, e.is_folder) for e in train] == [(gif.name, False), ("video0", True)]
    assert [e.name for e in datasets.discover_videos(tmp_path, "test")] == [gif.name]
    sample = datasets.PairDataset(train, 32, seed=0)[0]
    assert sample["source"].shape == (3, 32, 32) and 0 <= float(sample["source"].min()) <= float(sample["source"].max()) <= 1


# ---- checkpoints ----------------------------------------------------------------------------------------


def test_atomic_save_keeps_the_old_file_when_killed(tmp_path, monkeypatch):
    path = tmp_path / "last.pth.tar"
    checkpointing.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpointing.read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]  # no temporary file left


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    import random

    state = checkpointing.capture_rng()
    checkpointing.atomic_save({"rng": state}, tmp_path / "rng.pth.tar")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = checkpointing.read_checkpoint(tmp_path / "rng.pth.tar")["rng"]
    checkpointing.restore_rng(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_refuses_another_architecture(tmp_path):
    cfg = load_train_config("tiny-fomm-awp")
    other = load_train_config("tiny-fomm-awp", ["model_overrides.model_params.common_params.estimate_jacobian=false"])
    checkpoint = {"format": checkpointing.FORMAT, "stage": "reconstruction", "config": cfg.to_dict()}
    checkpointing.check_resumable(checkpoint, "x", cfg.model.to_dict(), "reconstruction")
    with pytest.raises(CheckpointError, match="model_params"):
        checkpointing.check_resumable(checkpoint, "x", other.model.to_dict(), "reconstruction")
    with pytest.raises(CheckpointError, match="--init"):
        checkpointing.check_resumable({"generator": {}}, "x", cfg.model.to_dict(), "reconstruction")


def test_prepare_crops_clips_into_the_training_layout(tmp_path):
    from PIL import Image

    from mefacial.video import read_clip
    from train import prepare

    clips = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    src = tmp_path / "src"
    (src / "sub01").mkdir(parents=True)
    (src / "sub01" / clips[0].name).symlink_to(clips[0])
    frames = read_clip(clips[1]).frames[:4]
    folder = src / "sub02" / "EP01"
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"img{i + 1}.png")
    with pytest.raises(MefacialError, match="does not exist"):  # a mistyped folder is named as missing
        prepare.prepare(tmp_path / "srcc", tmp_path / "out", size=48)
    counts = prepare.prepare(src, tmp_path / "out", size=48)
    assert counts == {"train": 2, "test": 0, "skipped": 0}
    entries = datasets.discover_videos(tmp_path / "out")
    assert [e.name for e in entries] == ["sub01_" + clips[0].stem, "sub02_EP01"]
    assert len(entries[1].frames) == 4 and np.asarray(Image.open(entries[1].frames[0])).shape == (48, 48, 3)
    assert prepare.is_test_subject("sub07", 1.0) and not prepare.is_test_subject("sub07", 0.0)
    assert prepare.prepare(src, tmp_path / "out", size=48) == counts  # a second run keeps what is done


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from train import checkpointing

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.pth.tar.{dead_pid}.tmp"
    live = tmp_path / f".last.pth.tar.{os.getpid()}.tmp"  # a save in progress (this process is alive)
    other = tmp_path / "notes.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert checkpointing.remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_init_takes_the_projects_safetensors_too(tmp_path):
    """`--init` from a converted or downloaded .safetensors (it said the file held none of the parts, listing all
    its 161 keys): read as {part: state dict}, loaded part by part."""
    from safetensors.torch import save_file

    from mefacial.models import build_model

    cfg = load_train_config("tiny-fomm-awp")
    torch.manual_seed(0)
    source = build_model(cfg.model, for_training=True)
    save_file({f"{part}.{k}": v.contiguous() for part in ("generator", "kp_detector")
               for k, v in getattr(source, part).state_dict().items()}, str(tmp_path / "w.safetensors"))
    target = build_model(cfg.model, for_training=True)
    loaded = checkpointing.load_parts(target, checkpointing.read_checkpoint(tmp_path / "w.safetensors"))
    assert loaded == ["generator", "kp_detector"]
    assert all(torch.equal(a, b) for a, b in zip(source.generator.state_dict().values(),
                                                 target.generator.state_dict().values()))

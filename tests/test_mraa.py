"""MRAA on tiny random models: batching, broadcasting of the source, motion transfer and loading rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import FIXTURES, fixture_meta, fixture_params, require
from mefacial.checkpoints import load_original_checkpoint
from mefacial.config import ModelConfig, config_from_reference
from mefacial.errors import CheckpointError, ConfigError, InputError
from mefacial.models import CHECKPOINT_PARTS, build_model
from mefacial.models.mraa import MRAA, BGMotionPredictor, shared_grid_sample
from mefacial.prior import NUM_AU_POINTS

SIZE = 64  # frame side of the tiny models
ATOL = 1e-5  # region params: batched and single-frame convolutions round differently in float32
IMAGE_ATOL = 1e-4  # warped noise images amplify that rounding (the reference fixtures' image tolerance)


def tiny_config(prior: str = "none", pca_based: bool = True, num_regions: int = 5) -> ModelConfig:
    """A small MRAA of the published architecture (fewer channels and blocks) for 64 x 64 frames."""
    hourglass = {"block_expansion": 4, "max_features": 16, "num_blocks": 3, "scale_factor": 0.25}
    params = {
        "num_regions": NUM_AU_POINTS if prior != "none" else num_regions,
        "num_channels": 3,
        "estimate_affine": True,
        "revert_axis_swap": True,
        "bg_predictor_params": {"block_expansion": 4, "max_features": 16, "num_blocks": 3, "bg_type": "affine"},
        "region_predictor_params": dict(hourglass, temperature=0.1, pca_based=pca_based, fast_svd=False),
        "generator_params": {
            "block_expansion": 4, "max_features": 16, "num_down_blocks": 2, "num_bottleneck_blocks": 1, "skips": True,
            "pixelwise_flow_predictor_params": dict(hourglass, use_deformed_source=True, use_covar_heatmap=True,
                                                    estimate_occlusion_map=True),
        },
        "avd_network_params": {"id_bottle_size": 8, "pose_bottle_size": 8},
    }
    return ModelConfig(name=f"tiny-mraa-{prior}", backbone="mraa", prior=prior, model_params=params, image_size=SIZE)


def tiny_model(prior: str = "none", pca_based: bool = True, seed: int = 0) -> MRAA:
    """A tiny MRAA in eval mode whose BatchNorm statistics are not the identity."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(prior, pca_based))
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    if model.region_predictor.jacobian is not None:  # the original starts it at the identity, whatever the frame
        model.region_predictor.jacobian.weight.data.normal_(0, 0.05)
    return model.eval()


def inputs(num_frames: int, seed: int = 1):
    """source 1 x 3 x S x S, driving T x 3 x S x S, AU points of source 1 x 18 x 2 and driving T x 18 x 2 (pixels)."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    driving = torch.rand(num_frames, 3, SIZE, SIZE, generator=generator)
    au = 8 + (SIZE - 16) * torch.rand(num_frames + 1, NUM_AU_POINTS, 2, generator=generator)
    return source, driving, au[:1], au[1:]


def _batch(regions: dict, index: slice) -> dict:
    return {k: v[index] for k, v in regions.items()}


FLAVOURS = [("none", True), ("none", False), ("awp", True), ("ewp", True), ("awp", False)]


@pytest.mark.parametrize("prior,pca_based", FLAVOURS)
@torch.no_grad()
def test_a_batch_of_frames_equals_frame_by_frame(prior, pca_based):
    model = tiny_model(prior, pca_based)
    source, driving, au_source, au_driving = inputs(3)
    pick = (lambda s: None) if prior == "none" else (lambda s: au_driving[s])
    src = model.detect(source, None if prior == "none" else au_source)
    init = model.detect(driving[:1], pick(slice(0, 1)))
    cache = model.encode_source(source)
    drv = model.detect(driving, pick(slice(None)))
    outputs = {}
    for mode in MRAA.MOTION_MODES:
        new = model.transfer(src, drv, init, mode=mode, adapt_scale=True)
        outputs[mode] = (new, model.generate(source, cache, src, new, bg_params=model.background_motion(source, driving)))
    for i in range(driving.shape[0]):
        one = slice(i, i + 1)
        drv_i = model.detect(driving[one], pick(one))
        for field in ("shift", "affine", "covar", "heatmap"):
            torch.testing.assert_close(drv_i[field], drv[field][one], atol=ATOL, rtol=1e-5)
        for mode, (new, out) in outputs.items():
            new_i = model.transfer(src, drv_i, init, mode=mode, adapt_scale=True)
            torch.testing.assert_close(new_i["shift"], new["shift"][one], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(new_i["affine"], new["affine"][one], atol=ATOL, rtol=1e-5)
            out_i = model.generate(source, cache, src, new_i, bg_params=model.background_motion(source, driving[one]))
            for field in ("prediction", "deformed", "occlusion_map"):
                torch.testing.assert_close(out_i[field], out[field][one], atol=IMAGE_ATOL, rtol=0, msg=f"{mode} {field}")


@torch.no_grad()
def test_shared_source_encoding_equals_the_original_call_on_copies():
    """generate() with a batch-1 source cache equals Generator.forward on a source repeated per frame."""
    model = tiny_model()
    source, driving, _, _ = inputs(3)
    src, drv = model.detect(source), model.detect(driving)
    shared = model.generate(source, model.encode_source(source), src, drv)
    repeated = {k: v.expand(3, *v.shape[1:]) for k, v in src.items()}
    copies = model.generator(source.repeat(3, 1, 1, 1), driving_region_params=drv, source_region_params=repeated)
    for field in ("prediction", "deformed", "occlusion_map", "deformation"):
        torch.testing.assert_close(shared[field], copies[field], atol=1e-6, rtol=0)


def test_shared_grid_sample_is_grid_sample_of_copies():
    torch.manual_seed(0)
    inp = torch.rand(2, 3, 8, 8)
    grid = torch.rand(4, 5, 6, 7, 2) * 2 - 1  # 4 batches of 5 grids; batches 0, 1 use input 0, batches 2, 3 input 1
    got = shared_grid_sample(inp, grid, align_corners=False)  # 4 x 5 x 3 x 6 x 7
    copies = inp.repeat_interleave(2, dim=0).repeat_interleave(5, dim=0)  # 20 x 3 x 8 x 8
    expected = F.grid_sample(copies, grid.reshape(20, 6, 7, 2), align_corners=False).view(4, 5, 3, 6, 7)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("adapt_scale", [False, True])
@torch.no_grad()
def test_relative_mode_on_the_initial_frame_returns_the_source_regions(adapt_scale):
    model = tiny_model()
    source, driving, _, _ = inputs(1)
    src, init = model.detect(source), model.detect(driving)
    new = model.transfer(src, init, init, mode="relative", adapt_scale=adapt_scale)
    assert torch.equal(new["shift"], src["shift"])
    torch.testing.assert_close(new["affine"], src["affine"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_magnify_one_is_the_original_relative_transfer_and_magnify_scales_the_motion():
    model = tiny_model()
    source, driving, _, _ = inputs(3)
    src, init, drv = model.detect(source), model.detect(driving[:1]), model.detect(driving)
    # The original get_animation_region_params (relative), written out, without the movement scale.
    relative = drv["affine"] @ torch.inverse(init["affine"])
    original_shift = (drv["shift"] - init["shift"]) + src["shift"]
    original_affine = relative @ src["affine"]
    plain = model.transfer(src, drv, init, mode="relative")
    once = model.transfer(src, drv, init, mode="relative", magnify=1.0)
    for new in (plain, once):
        assert torch.equal(new["shift"], original_shift) and torch.equal(new["affine"], original_affine)
        assert torch.equal(new["covar"], drv["covar"])  # the driving covariance is kept, as in the original
    twice = model.transfer(src, drv, init, mode="relative", magnify=2.0)
    torch.testing.assert_close(twice["shift"] - src["shift"], 2 * (plain["shift"] - src["shift"]), atol=1e-6, rtol=0)
    eye = torch.eye(2)
    torch.testing.assert_close(twice["affine"], (eye + 2 * (relative - eye)) @ src["affine"], atol=1e-6, rtol=0)
    assert not torch.allclose(twice["shift"], plain["shift"])
    for mode in ("standard", "avd"):
        with pytest.raises(InputError):
            model.transfer(src, drv, init, mode=mode, magnify=2.0)
    with pytest.raises(InputError):
        model.transfer(src, drv, init, mode="absolute")


@torch.no_grad()
def test_avd_broadcasts_a_batch_one_identity():
    model = tiny_model()
    source, driving, _, _ = inputs(3)
    src, drv = model.detect(source), model.detect(driving)
    shared = model.transfer(src, drv, None, mode="avd")
    copies = model.avd_network({k: v.expand(3, *v.shape[1:]) for k, v in src.items()}, drv)
    for field in ("shift", "affine", "covar"):
        torch.testing.assert_close(shared[field], copies[field], atol=1e-6, rtol=0)
    torch.testing.assert_close(shared["covar"], shared["affine"] @ shared["affine"].transpose(-1, -2))


@torch.no_grad()
def test_prior_regions_come_from_the_au_points():
    """With a prior and PCA affines the regions depend on the AU points only; shift = AU point in [-1, 1]."""
    model = tiny_model("awp")
    source, driving, au_source, _ = inputs(1)
    a, b = model.detect(source, au_source), model.detect(driving, au_source)
    for field in ("shift", "affine", "covar", "heatmap", "prior"):
        assert torch.equal(a[field], b[field])
    torch.testing.assert_close(a["shift"], au_source * 2 / SIZE - 1)
    assert a["prior"].shape == (1, 1, SIZE // 4, SIZE // 4)
    with pytest.raises(InputError, match="AU points"):
        model.detect(source, None)
    regression = tiny_model("awp", pca_based=False)
    # A regressed affine reads the frame (through the hourglass), and its covariance is A A^T.
    c, d = regression.detect(source, au_source), regression.detect(driving, au_source)
    assert not torch.allclose(c["affine"], d["affine"])
    torch.testing.assert_close(c["covar"], c["affine"] @ c["affine"].transpose(-1, -2))


@pytest.mark.parametrize("bg_type", BGMotionPredictor.BG_TYPES)
@torch.no_grad()
def test_background_motion_starts_as_the_identity(bg_type):
    torch.manual_seed(0)
    predictor = BGMotionPredictor(block_expansion=4, num_channels=3, max_features=16, num_blocks=3, bg_type=bg_type).eval()
    source, driving, _, _ = inputs(2)
    assert torch.equal(predictor(source, driving), torch.eye(3).repeat(2, 1, 1))
    if bg_type == "zero":
        return
    predictor.fc.bias.data.add_(0.5)
    moved = predictor(source, driving)
    assert moved[:, 2, 2].eq(1).all()
    assert moved[:, 2, :2].eq(0).all() == (bg_type != "perspective")


def test_config_errors_name_the_field():
    config = tiny_config()
    bad = copy.deepcopy(config.model_params)
    bad["region_predictor_params"]["temprature"] = 0.1
    with pytest.raises(ConfigError, match="temprature"):
        MRAA(ModelConfig(name="bad", backbone="mraa", model_params=bad, image_size=SIZE))
    bad = copy.deepcopy(config.model_params)
    del bad["avd_network_params"]
    with pytest.raises(ConfigError, match="avd_network_params"):
        MRAA(ModelConfig(name="bad", backbone="mraa", model_params=bad, image_size=SIZE))
    with pytest.raises(ConfigError, match="num_regions"):
        MRAA(ModelConfig(name="bad", backbone="mraa", prior="awp", model_params=config.model_params, image_size=SIZE))


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    none, awp = tiny_model("none"), tiny_model("awp")
    path = tmp_path / "mraa-none.pth.tar"
    parts = CHECKPOINT_PARTS["mraa"]
    torch.save({part: getattr(none, part).state_dict() for part in parts} | {"epoch": 1}, path)
    load_original_checkpoint(tiny_model("none", seed=5), path, parts)  # the right architecture loads
    with pytest.raises(CheckpointError, match="region_predictor"):
        load_original_checkpoint(awp, path, parts)
    fomm_like = tmp_path / "fomm-like.pth.tar"
    torch.save({"generator": none.generator.state_dict(), "kp_detector": {}, "discriminator": {}}, fomm_like)
    with pytest.raises(CheckpointError, match="region_predictor"):
        load_original_checkpoint(none, fomm_like, parts)


@pytest.mark.parametrize("folder", fixture_params("fomm"))
def test_a_fomm_fixture_checkpoint_is_refused(folder):
    if folder is None:
        require(FIXTURES / "<a FOMM fixture>", "FOMM reference fixtures")
    mraa_dirs = [p.values[0] for p in fixture_params("mraa") if p.values[0] is not None]
    if not mraa_dirs:
        require(folder / "<an MRAA fixture>", "MRAA reference fixtures")
    mraa_dir = mraa_dirs[0]
    config = config_from_reference(yaml.safe_load((mraa_dir / "config.yaml").read_text()), fixture_meta(mraa_dir))
    with pytest.raises(CheckpointError):
        load_original_checkpoint(MRAA(config), folder / "checkpoint.pth.tar", CHECKPOINT_PARTS["mraa"])


@torch.no_grad()
def test_region_geometry_stays_float32_under_autocast():
    """bf16 autocast runs the networks in bf16, but regions, inverses and SVDs in float32 (all modes work)."""
    model = tiny_model("awp")
    source, driving, au_source, au_driving = inputs(2)
    src, init, drv = model.detect(source, au_source), model.detect(driving[:1], au_driving[:1]), model.detect(driving, au_driving)
    exact = {mode: model.generate(source, None, src, model.transfer(src, drv, init, mode))["prediction"]
             for mode in MRAA.MOTION_MODES}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        src, init, drv = model.detect(source, au_source), model.detect(driving[:1], au_driving[:1]), model.detect(driving, au_driving)
        cache = model.encode_source(source)
        for mode in MRAA.MOTION_MODES:
            new = model.transfer(src, drv, init, mode)
            assert all(new[k].dtype == torch.float32 for k in ("shift", "affine", "covar")), mode
            prediction = model.generate(source, cache, src, new)["prediction"]
            torch.testing.assert_close(prediction.float(), exact[mode], atol=0.05, rtol=0)

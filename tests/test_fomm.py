"""FOMM on tiny random models: batching, the source cache, motion transfer, magnification, loading errors."""

from __future__ import annotations

import copy

import pytest
import torch

from mefacial import motion, prior
from mefacial.checkpoints import load_original_checkpoint
from mefacial.config import ModelConfig
from mefacial.errors import CheckpointError, ConfigError, InputError
from mefacial.models import CHECKPOINT_PARTS
from mefacial.models.fomm import FOMM

SIZE = 64


def tiny_config(prior_kind: str = "none", align_corners: bool = False, num_kp: int = 5) -> ModelConfig:
    num_kp = prior.NUM_AU_POINTS if prior_kind != "none" else num_kp
    hourglass = {"block_expansion": 4, "max_features": 16, "num_blocks": 3, "scale_factor": 0.25}
    return ModelConfig(
        name=f"tiny-{prior_kind}",
        backbone="fomm",
        prior=prior_kind,
        prior_distance="l1" if prior_kind == "ewp" else "l2",
        grid_sample_align_corners=align_corners,
        image_size=SIZE,
        model_params={
            "common_params": {"num_kp": num_kp, "num_channels": 3, "estimate_jacobian": True},
            "kp_detector_params": dict(hourglass, temperature=0.1),
            "generator_params": {
                "block_expansion": 4, "max_features": 16, "num_down_blocks": 2, "num_bottleneck_blocks": 1,
                "estimate_occlusion_map": True, "dense_motion_params": dict(hourglass),
            },
            "discriminator_params": {"scales": [1], "block_expansion": 4, "max_features": 16, "num_blocks": 2},
        },
    )


def tiny_model(prior_kind: str = "none", **kwargs) -> FOMM:
    torch.manual_seed(0)
    model = FOMM(tiny_config(prior_kind, **kwargs))
    # Non-trivial jacobians and batch-norm statistics, so that the checks below can fail.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.kp_detector.jacobian.weight.normal_(0, 0.01)
    return model.eval()


def clip(num_frames: int, prior_kind: str):
    torch.manual_seed(1)
    frames = torch.rand(num_frames + 1, 3, SIZE, SIZE)
    au = None
    if prior_kind != "none":
        au = SIZE / 4 + torch.rand(num_frames + 1, prior.NUM_AU_POINTS, 2) * SIZE / 2
    source, driving = frames[:1], frames[1:]
    return source, driving, (au[:1] if au is not None else None), (au[1:] if au is not None else None)


@pytest.mark.parametrize("prior_kind", ["none", "ewp", "awp"])
def test_a_batch_equals_frame_by_frame(prior_kind):
    model = tiny_model(prior_kind)
    source, driving, au_source, au_driving = clip(3, prior_kind)
    pick = (lambda i: None) if au_driving is None else (lambda i: au_driving[i])
    with torch.no_grad():
        src = model.detect(source, au_source)
        init = model.detect(driving[:1], pick(slice(0, 1)))
        cache = model.encode_source(source)
        drv = model.detect(driving, pick(slice(None)))
        batched = model.generate(source, cache, src, model.transfer(src, drv, init, adapt_scale=True))
        for i in range(driving.shape[0]):
            one = model.detect(driving[i : i + 1], pick(slice(i, i + 1)))
            for key in ("value", "jacobian"):
                assert torch.allclose(one[key], drv[key][i : i + 1], atol=1e-6)
            single = model.generate(source, cache, src, model.transfer(src, one, init, adapt_scale=True))
            for key, value in single.items():
                assert torch.allclose(value, batched[key][i : i + 1], atol=1e-4), key  # float noise x image gradients
        # The cached source encoding gives what the original one-call generator gives.
        kp_new = model.transfer(src, drv, init)
        direct = model.generator(source.expand_as(driving), kp_new, src)
        cached = model.generate(source, cache, src, kp_new)
    assert batched["prediction"].shape == driving.shape
    assert torch.allclose(direct["prediction"], cached["prediction"], atol=1e-5)
    if prior_kind != "none":
        assert src["prior"].shape == (1, 1, SIZE // 4, SIZE // 4)
        assert ("per_au" in src) == (prior_kind == "awp")


@pytest.mark.parametrize("prior_kind", ["none", "awp"])
def test_relative_motion_of_the_first_frame_is_the_source(prior_kind):
    model = tiny_model(prior_kind)
    source, driving, au_source, au_driving = clip(2, prior_kind)
    with torch.no_grad():
        src = model.detect(source, au_source)
        init = model.detect(driving[:1], None if au_driving is None else au_driving[:1])
        new = model.transfer(src, init, init, mode="relative", adapt_scale=True)
        absolute = model.transfer(src, init, init, mode="absolute")
    assert torch.equal(new["value"], src["value"])
    assert torch.allclose(new["jacobian"], src["jacobian"], atol=1e-5)
    assert torch.equal(absolute["value"], init["value"])
    assert not torch.allclose(absolute["value"], src["value"])


def _random_kp(batch: int, num_kp: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    value = torch.rand(batch, num_kp, 2, generator=generator) * 2 - 1
    jacobian = torch.eye(2) + 0.2 * torch.randn(batch, num_kp, 2, 2, generator=generator)
    return {"value": value, "jacobian": jacobian}


def test_magnify_one_is_the_original_and_magnify_scales_the_relative_motion():
    src, init, drv = _random_kp(1, seed=0), _random_kp(1, seed=1), _random_kp(4, seed=2)
    flags = {"use_relative_movement": True, "use_relative_jacobian": True, "adapt_movement_scale": True}
    plain = motion.normalize_kp(src, drv, init, **flags)
    one = motion.normalize_kp(src, drv, init, magnify=1.0, **flags)
    assert torch.equal(plain["value"], one["value"]) and torch.equal(plain["jacobian"], one["jacobian"])
    # The original: value = source + scale * (driving - initial), jacobian = J_d J_init^-1 J_s.
    scale = motion.movement_scale(src, init)
    assert torch.allclose(plain["value"], src["value"] + scale * (drv["value"] - init["value"]))
    expected_jacobian = drv["jacobian"] @ torch.inverse(init["jacobian"]) @ src["jacobian"]
    assert torch.allclose(plain["jacobian"], expected_jacobian, atol=1e-6)
    three = motion.normalize_kp(src, drv, init, magnify=3.0, **flags)
    assert torch.allclose(three["value"] - src["value"], 3 * (plain["value"] - src["value"]), atol=1e-6)
    relative = drv["jacobian"] @ torch.inverse(init["jacobian"])
    assert torch.allclose(three["jacobian"], (torch.eye(2) + 3 * (relative - torch.eye(2))) @ src["jacobian"], atol=1e-5)
    zero = motion.normalize_kp(src, drv, init, magnify=0.0, **flags)
    assert torch.allclose(zero["value"], src["value"].expand_as(zero["value"]))
    assert torch.allclose(zero["jacobian"], src["jacobian"].expand_as(zero["jacobian"]))
    with pytest.raises(InputError, match="relative"):
        motion.normalize_kp(src, drv, init, magnify=2.0)


def test_movement_scale_is_the_ratio_of_hull_areas():
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.0]]])
    assert torch.allclose(motion.convex_hull_area(square), torch.tensor([1.0], dtype=torch.float64))
    big = {"value": square * 3 - 1}
    small = {"value": square}
    assert torch.allclose(motion.movement_scale(big, small), torch.tensor(3.0))
    collinear = {"value": torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]])}
    assert torch.equal(motion.movement_scale(big, collinear), torch.ones(1, 1, 1))
    scipy_spatial = pytest.importorskip("scipy.spatial")
    points = torch.rand(8, 10, 2, generator=torch.Generator().manual_seed(3))
    areas = torch.tensor([scipy_spatial.ConvexHull(p.numpy()).volume for p in points], dtype=torch.float64)
    assert torch.allclose(motion.convex_hull_area(points), areas, atol=1e-12)


def test_align_corners_setting_changes_the_warp():
    source, driving, _, _ = clip(1, "none")
    outputs = []
    for align in (False, True):
        model = tiny_model("none", align_corners=align)
        with torch.no_grad():
            src = model.detect(source)
            out = model.generate(source, model.encode_source(source), src, model.detect(driving))
        outputs.append(out["deformed"])
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)


def test_prior_models_need_au_points_and_plain_models_ignore_them():
    source, _, au_source, _ = clip(1, "awp")
    with pytest.raises(InputError, match="AU points"):
        tiny_model("awp").detect(source, None)
    with pytest.raises(InputError, match="shape"):
        tiny_model("ewp").detect(source, au_source[:, :5])
    plain = tiny_model("none")
    with torch.no_grad():
        assert torch.equal(plain.detect(source, au_source)["value"], plain.detect(source)["value"])
    with pytest.raises(InputError, match="mode"):
        plain.transfer({}, {}, {}, mode="sideways")


def test_a_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    donor = FOMM(tiny_config("none", num_kp=prior.NUM_AU_POINTS), with_discriminator=True)
    parts = {part: getattr(donor, part).state_dict() for part in CHECKPOINT_PARTS["fomm"]}
    path = tmp_path / "plain.pth.tar"
    torch.save(dict(parts, epoch=3), path)
    same = FOMM(tiny_config("none", num_kp=prior.NUM_AU_POINTS), with_discriminator=True)
    assert load_original_checkpoint(same, path, CHECKPOINT_PARTS["fomm"]) == {"epoch": 3}
    wrong = FOMM(tiny_config("awp"), with_discriminator=True)
    with pytest.raises(CheckpointError) as info:
        load_original_checkpoint(wrong, path, CHECKPOINT_PARTS["fomm"])
    message = str(info.value)
    assert "kp_detector.learn.weight" in message
    assert "kp_detector.predictor.encoder.down_blocks.0.conv.weight" in message  # 3 vs 4 input channels


def test_config_errors_name_the_key():
    config = tiny_config()
    params = copy.deepcopy(config.model_params)
    params["kp_detector_params"]["temprature"] = 0.1
    with pytest.raises(ConfigError, match="temprature"):
        FOMM(ModelConfig(name="typo", backbone="fomm", model_params=params))
    with pytest.raises(ConfigError, match="num_kp"):
        FOMM(ModelConfig(name="awp-10", backbone="fomm", prior="awp", model_params=config.model_params))


@pytest.mark.parametrize("sn", [False, True])
def test_discriminator_scales_and_spectral_norm(sn):
    from mefacial.models.discriminator import MultiScaleDiscriminator

    disc = MultiScaleDiscriminator(scales=(1, 0.5), block_expansion=4, max_features=16, num_blocks=3, sn=sn,
                                   use_kp=True, num_kp=5).eval()
    assert sorted(disc.discs) == ["0-5", "1"]
    assert ("discs.1.conv.weight_orig" in disc.state_dict()) == sn
    torch.manual_seed(0)
    pyramid = {"prediction_1": torch.rand(2, 3, 64, 64), "prediction_0.5": torch.rand(2, 3, 32, 32)}
    out = disc(pyramid, kp=_random_kp(2, num_kp=5))
    assert out["prediction_map_1"].shape[:2] == (2, 1) and len(out["feature_maps_0.5"]) == 3
    assert out["prediction_map_0.5"].shape[-1] < out["prediction_map_1"].shape[-1]

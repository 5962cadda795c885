"""Configs and the variant registry."""

import pytest

from mefacial.config import CONFIG_DIR, ModelConfig, load_config
from mefacial.errors import ConfigError, UnknownVariantError
from mefacial.variants import get_variant, list_variants, variant_ids


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_loads(path):
    config = load_config(path)
    assert config.name == path.stem
    if config.prior != "none" and config.backbone != "warp":
        assert config.num_points == 18  # the AU points are the keypoints / region centres


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="prior"):
        ModelConfig(name="x", backbone="fomm", prior="gaussian")
    with pytest.raises(ConfigError, match="backbone"):
        ModelConfig.from_dict({"prior": "none"}, name="x")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"backbone": "fomm", "num_kp": 10}, name="x")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no-such-architecture")


def test_variants_list_what_they_need():
    variants = {v["id"]: v for v in list_variants()}
    assert set(variants) == set(variant_ids())
    training_free = ("dense", "dense-geometry", "warp")
    assert all(variants[k]["needs_weights"] is False and variants[k]["needs_landmarks"] for k in training_free)
    assert all(v["needs_weights"] for k, v in variants.items() if k not in training_free)
    assert variants["fomm-none"]["needs_landmarks"] is False
    assert variants["mraa-awp"]["needs_landmarks"] is True
    assert "avd" in variants["mraa-awp"]["motion_modes"]
    assert "absolute" in variants["fomm-awp"]["motion_modes"]
    # the MM 2021 flavour is a config option of the same FOMM code, not a copy
    mm21 = get_variant("fomm-ewp-mm21").config
    assert (mm21.prior_distance, mm21.au_points) == ("l1", "first_frame")
    assert get_variant("fomm-none").config.grid_sample_align_corners is True


def test_unknown_variant_lists_known_ones():
    with pytest.raises(UnknownVariantError, match="fomm-awp"):
        get_variant("fomm-gaussian")

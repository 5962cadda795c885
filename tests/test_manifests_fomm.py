"""Published FOMM-family checkpoints load: our configs build exactly the original state-dict keys and shapes.

Each manifest (fixtures/manifests/*.json) lists the original model's
`model_params` and every state-dict key with its shape. The matching project
config is found by content: the same `model_params`, and the prior the key set
implies (AWP fusion convs => awp; one more keypoint-hourglass input channel
than image channels => a prior map, ewp; neither => none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, require
from mefacial.checkpoints import flatten_parts, load_state_dict_strict
from mefacial.config import CONFIG_DIR, load_config
from mefacial.errors import CheckpointError
from mefacial.models.fomm import FOMM

FIRST_KP_CONV = "predictor.encoder.down_blocks.0.conv.weight"


def _fomm_manifests() -> list:
    folder = FIXTURES / "manifests"
    paths = sorted(folder.glob("*.json")) if folder.exists() else []
    manifests = [p for p in paths if "common_params" in json.loads(p.read_text()).get("model_params", {})]
    return [pytest.param(p, id=p.stem) for p in manifests] or [pytest.param(None, id="no-fomm-manifests")]


def implied_prior(shapes: dict[str, dict[str, list[int]]], model_params: dict) -> str:
    """The prior a FOMM state dict was built with, read from its keys and shapes."""
    kp_detector = shapes["kp_detector"]
    if "learn.weight" in kp_detector:
        return "awp"
    channels = model_params["common_params"]["num_channels"]
    return "ewp" if kp_detector[FIRST_KP_CONV][1] == channels + 1 else "none"


def _matching_configs(model_params: dict, prior: str) -> list:
    configs = [load_config(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    return [c for c in configs if c.backbone == "fomm" and c.prior == prior and c.model_params == model_params]


def _random_state(shapes: dict[str, dict[str, list[int]]]) -> dict:
    """A checkpoint in the original layout with random tensors of the manifest's shapes."""
    torch.manual_seed(0)
    state = {}
    for part, keys in shapes.items():
        state[part] = {}
        for key, shape in keys.items():
            if key.endswith("num_batches_tracked"):
                state[part][key] = torch.tensor(7)
            else:
                state[part][key] = torch.rand(shape) + 0.5  # positive: valid variances
    return state


@pytest.fixture(scope="module", params=_fomm_manifests())
def manifest(request) -> dict:
    if request.param is None:
        require(FIXTURES / "manifests" / "<a FOMM manifest>.json", "FOMM state-dict manifests")
    data = json.loads(Path(request.param).read_text())
    data["random_checkpoint"] = _random_state(data["state_dict_shapes"])
    return data


def test_a_config_builds_the_published_state_dict(manifest):
    shapes = manifest["state_dict_shapes"]
    prior = implied_prior(shapes, manifest["model_params"])
    configs = _matching_configs(manifest["model_params"], prior)
    assert configs, f"no FOMM config in {CONFIG_DIR} with these model_params and prior {prior!r}"
    expected = {f"{part}.{key}": tuple(shape) for part, keys in shapes.items() for key, shape in keys.items()}
    checkpoint = manifest["random_checkpoint"]
    for config in configs:
        model = FOMM(config, with_discriminator=True)
        got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert sorted(set(expected) - set(got)) == [], f"{config.name}: keys missing from the model"
        assert sorted(set(got) - set(expected)) == [], f"{config.name}: keys the published model does not have"
        assert {k: v for k, v in got.items() if expected[k] != v} == {}, f"{config.name}: shapes differ"
        load_state_dict_strict(model, flatten_parts(checkpoint, tuple(shapes)), source=config.name)
        loaded = model.state_dict()
        some_key = next(k for k in expected if not k.endswith("num_batches_tracked"))
        part, key = some_key.split(".", 1)
        assert torch.equal(loaded[some_key], checkpoint[part][key])


def test_a_published_checkpoint_is_refused_by_another_architecture(manifest):
    """Loading into the wrong FOMM flavour fails with an error that names the offending keys."""
    shapes = manifest["state_dict_shapes"]
    prior = implied_prior(shapes, manifest["model_params"])
    configs = [load_config(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    other = next((c for c in configs if c.backbone == "fomm" and c.prior != prior), None)
    if other is None:
        pytest.skip("no FOMM config of another prior flavour")
    model = FOMM(other, with_discriminator=True)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, flatten_parts(manifest["random_checkpoint"], tuple(shapes)), source="published")
    message = str(info.value)
    assert "kp_detector." in message and ("missing" in message or "unexpected" in message or "mis-shaped" in message)

"""Published MRAA-family checkpoints load: our configs build exactly the original state-dict keys and shapes.

Each manifest (fixtures/manifests/*.json) with MRAA-style `model_params` (they
have `num_regions`) lists every state-dict key of the original model with its
shape. The matching project config is found by content: the same
`model_params`, and the prior the key set implies (AWP fusion convs `region1`
/ `region2` => awp; one more region-hourglass input channel than image
channels without them => ewp; neither => none).
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
from mefacial.models import CHECKPOINT_PARTS
from mefacial.models.mraa import MRAA

FIRST_REGION_CONV = "predictor.encoder.down_blocks.0.conv.weight"


def _mraa_manifests() -> list:
    folder = FIXTURES / "manifests"
    paths = sorted(folder.glob("*.json")) if folder.exists() else []
    manifests = [p for p in paths if "num_regions" in json.loads(p.read_text()).get("model_params", {})]
    return [pytest.param(p, id=p.stem) for p in manifests] or [pytest.param(None, id="no-mraa-manifests")]


def implied_prior(shapes: dict[str, dict[str, list[int]]], model_params: dict) -> str:
    """The prior an MRAA state dict was built with, read from its keys and shapes."""
    region_predictor = shapes["region_predictor"]
    if "region1.weight" in region_predictor:
        return "awp"
    channels = model_params["num_channels"]
    return "ewp" if region_predictor[FIRST_REGION_CONV][1] == channels + 1 else "none"


def _configs() -> list:
    return [load_config(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))]


def _random_checkpoint(shapes: dict[str, dict[str, list[int]]]) -> dict:
    """A checkpoint in the original layout with random tensors of the manifest's shapes."""
    generator = torch.Generator().manual_seed(0)
    checkpoint: dict = {"epoch": 3}
    for part, keys in shapes.items():
        checkpoint[part] = {
            key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.rand(shape, generator=generator) + 0.5
            for key, shape in keys.items()
        }
    return checkpoint


@pytest.fixture(scope="module", params=_mraa_manifests())
def manifest(request) -> dict:
    if request.param is None:
        require(FIXTURES / "manifests" / "<an MRAA manifest>.json", "MRAA state-dict manifests")
    data = json.loads(Path(request.param).read_text())
    data["prior"] = implied_prior(data["state_dict_shapes"], data["model_params"])
    data["random_checkpoint"] = _random_checkpoint(data["state_dict_shapes"])
    return data


def test_a_config_builds_the_published_state_dict(manifest):
    shapes = manifest["state_dict_shapes"]
    assert sorted(shapes) == sorted(CHECKPOINT_PARTS["mraa"]), "the manifest's parts are not MRAA's"
    configs = [c for c in _configs()
               if c.backbone == "mraa" and c.prior == manifest["prior"] and c.model_params == manifest["model_params"]]
    assert configs, f"no MRAA config in {CONFIG_DIR} with these model_params and prior {manifest['prior']!r}"
    expected = {f"{part}.{key}": tuple(shape) for part, keys in shapes.items() for key, shape in keys.items()}
    checkpoint = manifest["random_checkpoint"]
    for config in configs:
        model = MRAA(config)
        got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert sorted(set(expected) - set(got)) == [], f"{config.name}: keys missing from the model"
        assert sorted(set(got) - set(expected)) == [], f"{config.name}: keys the published model does not have"
        assert {k: v for k, v in got.items() if expected[k] != v} == {}, f"{config.name}: shapes differ"
        load_state_dict_strict(model, flatten_parts(checkpoint, CHECKPOINT_PARTS["mraa"]), source=config.name)
        loaded = model.state_dict()
        for key in ("region_predictor.regions.weight", "generator.final.weight", "avd_network.decoder.9.bias"):
            part, name = key.split(".", 1)
            assert torch.equal(loaded[key], checkpoint[part][name]), f"{config.name}: {key} was not loaded"


def test_a_published_checkpoint_is_refused_by_another_flavour(manifest):
    """Loading into an MRAA of another prior flavour fails with an error that names the region predictor keys."""
    other = next((c for c in _configs() if c.backbone == "mraa" and c.prior != manifest["prior"]), None)
    if other is None:
        pytest.skip("no MRAA config of another prior flavour")
    model = MRAA(other)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, flatten_parts(manifest["random_checkpoint"], CHECKPOINT_PARTS["mraa"]),
                               source="published")
    message = str(info.value)
    assert "region_predictor." in message and ("missing" in message or "unexpected" in message or "mis-shaped" in message)

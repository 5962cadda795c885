"""Our FOMM is the FOMM: every FOMM-family reference fixture is reproduced within its tolerances.

Each fixture folder (discovered from files) holds an original checkpoint, the
original config block, inputs and what the original code computed from them.
The model is built from that config, loads the checkpoint strictly (all parts,
the discriminator included) and must reproduce every tensor the fixture holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import FIXTURES, device_under_test, fixture_meta, fixture_params, require
from mefacial import motion
from mefacial.checkpoints import load_original_checkpoint
from mefacial.config import config_from_reference
from mefacial.models import CHECKPOINT_PARTS
from mefacial.models.blocks import fuse_for_inference
from mefacial.models.fomm import FOMM, MODE_FLAGS

INPUT_KEYS = ("inputs.source", "inputs.driving", "au_points_pixels")
GENERATED = ("deformation", "deformed", "occlusion_map", "prediction")


class Reference:
    """One fixture folder: the loaded model, the expected tensors, and what our model computed from the inputs."""

    def __init__(self, folder: Path, fused: bool = False):
        from safetensors.torch import load_file

        self.folder = folder
        self.meta = fixture_meta(folder)
        config_block = yaml.safe_load((folder / "config.yaml").read_text())
        self.config = config_from_reference(config_block, self.meta, name=folder.name)
        self.model = FOMM(self.config, with_discriminator=True)
        load_original_checkpoint(self.model, folder / "checkpoint.pth.tar", CHECKPOINT_PARTS["fomm"])
        self.model.eval()
        if fused:  # what the engine runs: batch norms and upsampling folded into the convs
            self.model = fuse_for_inference(self.model)
        device = device_under_test()  # MEFACIAL_TEST_DEVICE, default cpu
        self.model.to(device)
        self.expected = {k: v.to(device) for k, v in load_file(str(folder / "tensors.safetensors")).items()}
        self.tolerance = self.meta["tolerance"]
        self.compared: set[str] = set()
        with torch.no_grad():
            self._run()

    def _au_points(self, num_frames: int):
        """(source, initial, driving) AU points in the fixture's call order (see its meta.json)."""
        points = self.expected.get("au_points_pixels")
        if self.config.prior == "none":
            return None, None, None
        assert points is not None, f"{self.folder.name}: a prior fixture without au_points_pixels"
        if points.shape[0] == num_frames + 2:  # source, driving frame 0 (initial), each driving frame
            return points[:1], points[1:2], points[2:]
        if points.shape[0] == 2:  # [source, driving]: fixed for the whole clip (ACM MM 2021)
            return points[:1], points[1:2], points[1:2].expand(num_frames, -1, -1)
        raise AssertionError(f"{self.folder.name}: cannot read {points.shape[0]} AU point sets for {num_frames} frames")

    def _run(self) -> None:
        source, driving = self.expected["inputs.source"], self.expected["inputs.driving"]
        au_source, au_initial, au_driving = self._au_points(driving.shape[0])
        model = self.model
        self.kp_source = model.detect(source, au_source)
        self.kp_initial = model.detect(driving[:1], au_initial)
        self.kp_driving = model.detect(driving, au_driving)
        cache = model.encode_source(source)
        self.modes = {}
        for mode, flags in self.meta["modes"].items():
            kp_norm = motion.normalize_kp(self.kp_source, self.kp_driving, self.kp_initial, **flags)
            self.modes[mode] = (flags, kp_norm, model.generate(source, cache, self.kp_source, kp_norm))

    def check(self, key: str, got: torch.Tensor, tolerance_key: str) -> None:
        expected = self.expected[key]
        assert got.numel() == expected.numel(), f"{key}: got shape {tuple(got.shape)}, reference {tuple(expected.shape)}"
        err = (got.reshape(expected.shape).float() - expected).abs().max().item()
        tolerance = self.tolerance[tolerance_key]
        assert err <= tolerance, f"{self.folder.name}: {key} differs from the reference by {err:.3g} > {tolerance}"
        self.compared.add(key)


@pytest.fixture(scope="module", params=fixture_params("fomm"))
def folder(request) -> Path:
    return request.param


@pytest.fixture(scope="module", params=[False, True], ids=["as-trained", "fused"])
def reference(folder, request) -> Reference:
    """Module-scoped so that pytest runs all tests of one fixture folder together, building its model once."""
    if folder is None:
        require(FIXTURES / "<a folder whose meta.json says backbone fomm>", "FOMM reference fixtures")
    return Reference(folder, fused=request.param)


def test_keypoints(reference):
    for name, kp in (("kp_source", reference.kp_source), ("kp_driving", reference.kp_driving)):
        for field in ("value", "jacobian"):
            reference.check(f"{name}.{field}", kp[field], "kp_max_abs")


def test_prior_maps(reference):
    expected = {k for k in reference.expected if k.startswith("prior.")}
    if reference.config.prior == "none":
        assert not expected, "a fixture without prior holds prior maps"
        assert "prior" not in reference.kp_source
        return
    assert "prior.source.map" in expected
    reference.check("prior.source.map", reference.kp_source["prior"], "prior_max_abs")
    if reference.config.prior == "awp":
        reference.check("prior.source.per_au", reference.kp_source["per_au"], "prior_max_abs")
        reference.check("prior.source.awp", reference.kp_source["prior"], "prior_max_abs")


def test_every_mode(reference):
    assert reference.modes, "meta.json lists no motion modes"
    for mode, (_, kp_norm, out) in reference.modes.items():
        for field in ("value", "jacobian"):
            reference.check(f"{mode}.kp_norm.{field}", kp_norm[field], "kp_max_abs")
        for field in GENERATED:
            reference.check(f"{mode}.{field}", out[field], "prediction_max_abs")


def test_model_transfer_is_the_reference_normalisation(reference):
    """`model.transfer(mode=...)` gives the reference's keypoints for each mode whose flags it names."""
    for mode, (flags, kp_norm, _) in reference.modes.items():
        if mode not in MODE_FLAGS or any(flags.get(k) != v for k, v in MODE_FLAGS[mode].items()):
            continue
        new = reference.model.transfer(reference.kp_source, reference.kp_driving, reference.kp_initial, mode=mode,
                                       adapt_scale=bool(flags.get("adapt_movement_scale", False)))
        for field in ("value", "jacobian"):
            assert torch.equal(new[field], kp_norm[field]), f"{mode}: transfer() differs from normalize_kp on {field}"


def test_every_reference_tensor_is_compared(reference):
    test_keypoints(reference)
    test_prior_maps(reference)
    test_every_mode(reference)
    left = sorted(set(reference.expected) - set(INPUT_KEYS) - reference.compared)
    assert not left, f"{reference.folder.name}: reference tensors not compared: {left}"


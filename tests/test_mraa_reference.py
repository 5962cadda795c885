"""Our MRAA is the MRAA: every MRAA-family reference fixture is reproduced within its tolerances.

Each fixture folder (discovered from files) holds an original checkpoint
(generator, region_predictor, bg_predictor, avd_network), the original config
block, inputs, and what the original code computed from them. The model is
built from that config, loads the checkpoint strictly, and is checked stage by
stage, each stage fed with the reference's own inputs to that stage:

1. frames (+ AU points) -> regions of the source and of each driving frame,
   and the background motion of the reconstruction;
2. regions -> the new region params of each motion mode;
3. region params -> deformed source, occlusion map and prediction.

Stage 3 starts from the reference's region params rather than ours because
dense motion is ill-conditioned in near-singular region affines (the tiny
random fixture models produce some): a float32 rounding difference of 4e-8 in
an AVD output moves pixels by 3e-4, so only the stages themselves, not their
chain, can be held to the tolerances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import device_under_test, fixture_meta, fixture_params, require
from mefacial.checkpoints import load_original_checkpoint
from mefacial.config import config_from_reference
from mefacial.models import CHECKPOINT_PARTS
from mefacial.models.blocks import fuse_for_inference
from mefacial.models.mraa import MRAA

INPUT_KEYS = ("inputs.source", "inputs.driving", "au_points_pixels")
REGION_FIELDS = ("shift", "affine", "covar", "heatmap")
GENERATED = ("deformation", "deformed", "occlusion_map", "prediction")
RECONSTRUCTION = "reconstruction"
# The original `get_animation_region_params` always adapts the movement scale in relative mode
# (its adapt_movement_scale argument is unused).
ADAPT_SCALE = {"relative": True}


class Reference:
    """One fixture folder: the loaded model, the expected tensors, and the checks made so far."""

    def __init__(self, folder: Path, fused: bool = False):
        from safetensors.torch import load_file

        self.folder = folder
        self.meta = fixture_meta(folder)
        config_block = yaml.safe_load((folder / "config.yaml").read_text())
        self.config = config_from_reference(config_block, self.meta, name=folder.name)
        self.model = MRAA(self.config)
        load_original_checkpoint(self.model, folder / "checkpoint.pth.tar", CHECKPOINT_PARTS["mraa"])
        self.model.eval()
        if fused:  # what the engine runs: batch norms and upsampling folded into the convs
            self.model = fuse_for_inference(self.model)
        device = device_under_test()  # MEFACIAL_TEST_DEVICE, default cpu
        self.model.to(device)
        self.expected = {k: v.to(device) for k, v in load_file(str(folder / "tensors.safetensors")).items()}
        self.tolerance = self.meta["tolerance"]
        self.compared: set[str] = set()
        self.source = self.expected["inputs.source"]  # 1 x 3 x H x W
        self.driving = self.expected["inputs.driving"]  # T x 3 x H x W
        indices = self.meta.get("driving_frame_indices_in_clip", [0])
        assert indices[0] == 0, f"{folder.name}: the first driving frame must be the clip's first (initial) frame"
        self.au_source, self.au_initial, self.au_driving = self._au_points(self.driving.shape[0])
        self.modes = [m for m in self.meta["modes"] if m != RECONSTRUCTION]
        with torch.no_grad():
            self.ours = self._run_chain()
            self.generated = self._run_generation()

    def _run_chain(self) -> dict:
        """Stages 1 and 2 from the frames: our regions, each mode's new params, the background motion."""
        model = self.model
        ours = {
            "source": model.detect(self.source, self.au_source),
            "initial": model.detect(self.driving[:1], self.au_initial),
            "driving": model.detect(self.driving, self.au_driving),
        }
        for mode in self.modes:
            ours[mode] = model.transfer(ours["source"], ours["driving"], ours["initial"], mode=mode,
                                        adapt_scale=ADAPT_SCALE.get(mode, False))
        if RECONSTRUCTION in self.meta["modes"]:
            ours[RECONSTRUCTION] = model.background_motion(self.driving[:1], self.driving)  # T x 3 x 3
        return ours

    def _run_generation(self) -> dict:
        """Stage 3 from the reference's region params.

        The reference's new params carry shift and affine; the covariance is what
        the original pairs with them: the driving frame's for standard and
        relative modes (kept by `get_animation_region_params`), A A^T for AVD.
        The reconstruction animates driving frame 0 (whose regions are the
        first driving regions) with the reference's background motion.
        """
        model = self.model
        source, driving = self.regions("region_source"), self.regions("region_driving")
        initial = {k: v[:1] for k, v in driving.items()}
        cache = model.encode_source(self.source)
        generated = {}
        for mode in self.modes:
            new = model.transfer(source, driving, initial, mode=mode, adapt_scale=ADAPT_SCALE.get(mode, False))
            shift, affine = self.expected[f"{mode}.new_params.shift"], self.expected[f"{mode}.new_params.affine"]
            new.update(shift=shift, affine=affine)
            if mode == "avd":
                new["covar"] = affine @ affine.transpose(-1, -2)
            generated[mode] = model.generate(self.source, cache, source, new)
        if RECONSTRUCTION in self.meta["modes"]:
            bg_params = self.expected[f"{RECONSTRUCTION}.bg_params"]
            generated[RECONSTRUCTION] = model.generate(self.driving[:1], None, initial, driving, bg_params=bg_params)
        return generated

    def _au_points(self, num_frames: int):
        """(source, initial, driving) AU points in the fixture's call order (see its meta.json)."""
        if self.config.prior == "none":
            return None, None, None
        points = self.expected.get("au_points_pixels")
        assert points is not None, f"{self.folder.name}: a prior fixture without au_points_pixels"
        assert points.shape[0] == num_frames + 2, (
            f"{self.folder.name}: expected AU points of source, initial frame and {num_frames} driving frames, "
            f"got {points.shape[0]}")
        return points[:1], points[1:2], points[2:]

    def regions(self, name: str) -> dict[str, torch.Tensor]:
        """The reference's region params `region_source` / `region_driving` with a batch dimension."""
        out = {}
        for field in ("shift", "affine", "covar"):
            value = self.expected[f"{name}.{field}"]
            out[field] = value[None] if value.dim() == (2 if field == "shift" else 3) else value
        return out

    def check(self, key: str, got: torch.Tensor, tolerance_key: str) -> None:
        expected = self.expected[key]
        assert got.numel() == expected.numel(), f"{key}: got shape {tuple(got.shape)}, reference {tuple(expected.shape)}"
        err = (got.reshape(expected.shape).float() - expected).abs().max().item()
        assert tolerance_key in self.tolerance, f"{self.folder.name}: meta.json has no tolerance {tolerance_key!r}"
        tolerance = self.tolerance[tolerance_key]
        assert err <= tolerance, f"{self.folder.name}: {key} differs from the reference by {err:.3g} > {tolerance}"
        self.compared.add(key)

    def check_generated(self, prefix: str, out: dict[str, torch.Tensor]) -> None:
        for field in GENERATED:
            key = f"{prefix}.{field}"
            if key in self.expected:
                self.check(key, out[field], "prediction_max_abs")


@pytest.fixture(scope="module", params=fixture_params("mraa"))
def folder(request) -> Path:
    return request.param


@pytest.fixture(scope="module", params=[False, True], ids=["as-trained", "fused"])
def reference(folder, request) -> Reference:
    """Module scope: pytest groups the tests by fixture folder, so each model is built and run once."""
    if folder is None:
        require(Path("/nonexistent-mraa-fixtures"), "MRAA reference fixtures")
    return Reference(folder, fused=request.param)


def test_regions(reference):
    """Stage 1: region params of the source and of every driving frame, from the frames (and AU points)."""
    for name, regions in (("region_source", reference.ours["source"]), ("region_driving", reference.ours["driving"])):
        for field in REGION_FIELDS:
            reference.check(f"{name}.{field}", regions[field], "params_max_abs")
    tolerance = "prior_max_abs" if "prior_max_abs" in reference.tolerance else "params_max_abs"
    if "prior.source.per_au" in reference.expected:
        reference.check("prior.source.per_au", reference.ours["source"]["heatmap"], tolerance)
    for key in ("prior.source.awp", "prior.source.map"):
        if key in reference.expected:
            reference.check(key, reference.ours["source"]["prior"], tolerance)


def test_new_region_params(reference):
    """Stage 2: each motion mode's region params, from our regions of the source, initial and driving frames."""
    assert reference.modes, "meta.json lists no motion modes"
    for mode in reference.modes:
        for field in ("shift", "affine"):
            reference.check(f"{mode}.new_params.{field}", reference.ours[mode][field], "params_max_abs")


def test_generation(reference):
    """Stage 3: deformed source, occlusion and prediction of each mode, from the reference's region params."""
    for mode in reference.modes:
        reference.check_generated(mode, reference.generated[mode])


def test_reconstruction(reference):
    """Driving frame 0 animated by each driving frame with background motion (the original reconstruction.py)."""
    if RECONSTRUCTION not in reference.meta["modes"]:
        pytest.skip(f"{reference.folder.name} has no reconstruction")
    reference.check(f"{RECONSTRUCTION}.bg_params", reference.ours[RECONSTRUCTION], "params_max_abs")
    reference.check_generated(RECONSTRUCTION, reference.generated[RECONSTRUCTION])


def test_every_reference_tensor_is_compared(reference):
    test_regions(reference)
    test_new_region_params(reference)
    test_generation(reference)
    if RECONSTRUCTION in reference.meta["modes"]:
        test_reconstruction(reference)
    left = sorted(set(reference.expected) - set(INPUT_KEYS) - reference.compared)
    assert not left, f"{reference.folder.name}: reference tensors not compared: {left}"

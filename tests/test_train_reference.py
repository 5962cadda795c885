"""Our training step is the originals': one iteration of each reference training fixture, reproduced.

Every folder under `$MEFACIAL_FIXTURES/train/` (discovered from files) holds
one training iteration of an original implementation: checkpoint, config.yaml
(model_params + train_params), inputs, the random draws of that step and the
AU points its dlib found, and what the original computed (losses, forward
tensors, gradients; see that folder's README). Each fixture is run through
the project's own code path: `train.config.config_from_original` ->
`train.trainer.perceptual_network` (the VGG19 file of the fixture, through the
trainer's loader) -> `train.trainer.build_recipe` (model + checkpoint +
recipe) -> the recipe's `step` (and the AVD recipe's `step_on_regions`), with
the recorded draws fed through `train.draws.RecordedDraws`. Every tensor of
the fixture is then compared within its meta.json tolerance, in float32
(tensors.safetensors) and in float64 (tensors_float64.safetensors; model built
in float32, loaded, then cast, as the fixture was made).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FIXTURES, require

pytestmark = pytest.mark.slow  # one training step of a small model (and VGG19) per fixture and dtype

TRAIN_FIXTURES = FIXTURES / "train"

# Keys the fixture gives (fed to the step, not computed by it): see the fixture README's "Feed, do not draw".
# avd.id / avd.pose_gt are the AVD step's inputs (region predictor on AVD images that are not stored).
FED_PREFIXES = ("inputs.", "transform.", "au_points.", "avd.au_points.", "landmarks68.", "avd.random_scale.uniform",
                "avd.id.", "avd.pose_gt.")
# torch's BatchNorm counts its calls in num_batches_tracked; the originals' sync_batchnorm never does (stays 0).
# With momentum 0.1 the counter enters no computation; the running statistics themselves are compared.
NOT_COMPARED_SUFFIXES = (".num_batches_tracked",)


def train_fixture_dirs() -> list[Path]:
    if not TRAIN_FIXTURES.exists():
        return []
    return sorted(p.parent for p in TRAIN_FIXTURES.glob("*/meta.json") if (p.parent / "checkpoint.pth.tar").exists())


def _params() -> list:
    dirs = train_fixture_dirs()
    if not dirs:
        return [pytest.param(None, id="no-train-fixtures")]
    return [pytest.param(d, id=d.name) for d in dirs]


def _abs_sums(grads: dict[str, torch.Tensor], prefix: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """grad_abs_sum keys of a step's gradients: `<prefix>.param.<name>` and `<prefix>.module.<part>`; parameters
    in `names` without a gradient count as 0."""
    out: dict[str, torch.Tensor] = {}
    for name in names or list(grads):
        grad = grads.get(name)
        value = grad.abs().sum() if grad is not None else torch.zeros((), dtype=torch.float64)
        out[f"{prefix}.param.{name}"] = value
        module = f"{prefix}.module.{name.split('.')[0]}"
        out[module] = out.get(module, 0) + value
    return out


class TrainReference:
    """One fixture folder run through the project's training step in one dtype; `ours` maps fixture keys to
    what our step computed."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        from safetensors.torch import load_file

        from mefacial.config import config_from_reference
        from train.config import config_from_original
        from train.draws import RecordedDraws
        from train.trainer import build_recipe, perceptual_network

        self.folder, self.dtype = folder, dtype
        self.meta = json.loads((folder / "meta.json").read_text())
        block = yaml.safe_load((folder / "config.yaml").read_text())
        self.given = load_file(str(folder / "tensors.safetensors"))  # float32: the inputs live here
        precision = "float32" if dtype == torch.float32 else "float64"
        tolerance = self.meta["tolerance"][precision]
        self.expected = load_file(str(folder / tolerance["file"].split()[0]))
        self.rtol, self.param_rtol = tolerance["rtol_per_tensor"], tolerance["grad_abs_sum_param_rtol"]

        model_config = config_from_reference(block, self.meta, name=folder.name)
        vgg_file = (folder / self.meta["vgg19_weights"]).resolve()
        cfg = config_from_original(block, model_config, name=folder.name,
                                   train={"vgg19_weights": str(vgg_file)}, runtime={"device": "cpu"})
        checkpoint = folder / "checkpoint.pth.tar"
        recipe = build_recipe(cfg, "cpu", vgg=perceptual_network(cfg, torch.device("cpu")), init=checkpoint)
        recipe.to(dtype)
        recipe.train()

        def fed(key: str) -> torch.Tensor | None:
            """A given tensor; the AVD step's region inputs from the run of this dtype (its region predictor's)."""
            value = self.expected.get(key) if key.startswith(("avd.id.", "avd.pose_gt.")) else None
            value = self.given.get(key) if value is None else value
            return None if value is None else value.to(dtype)

        recipe.draws = RecordedDraws(theta=fed("transform.theta"), control_params=fed("transform.control_params"),
                                     control_points=fed("transform.control_points"),
                                     au_transformed=fed("au_points.transformed"))
        recipe.trace = {}
        batch = {"source": fed("inputs.source"), "driving": fed("inputs.driving")}
        if model_config.prior != "none":
            batch.update(source_au=fed("au_points.source"), driving_au=fed("au_points.driving"))
        self.values = recipe.step(batch, torch.Generator().manual_seed(0))
        self.recipe, self.trace = recipe, recipe.trace
        self.ours: dict[str, torch.Tensor] = {}
        self._collect_reconstruction()

        self.avd_recipe = None
        if any(k.startswith("avd.") for k in self.expected):
            avd_cfg = config_from_original(block, model_config, name=folder.name, stage="avd",
                                           runtime={"device": "cpu"})
            avd = build_recipe(avd_cfg, "cpu", init=checkpoint)  # the fixture's AVD step starts from the checkpoint
            avd.to(dtype)
            avd.train()
            avd.draws = RecordedDraws(scale_uniform_values=fed("avd.random_scale.uniform"))
            avd.trace = {}
            identity = {k: fed(f"avd.id.{k}") for k in ("shift", "affine")}
            pose_gt = {k: fed(f"avd.pose_gt.{k}") for k in ("shift", "affine")}
            self.avd_values = avd.step_on_regions(identity, pose_gt, torch.Generator().manual_seed(0))
            self.avd_recipe = avd
            self._collect_avd(avd.trace)
        self._collect_batch_norms()

    # ---- what our step computed, under the fixture's names ----

    def _collect_reconstruction(self) -> None:
        trace, ours = self.trace, self.ours
        out = trace["out"]
        for name, value in trace["losses_generator"].items():
            ours[f"loss.{name}"] = value
        ours["loss.generator_total" if "kp_source" in out else "loss.total"] = trace["generator_total"]
        if "disc_gan" in trace:
            ours["loss.disc_gan"] = trace["disc_gan"]
        ours["loss_terms.perceptual_l1"] = trace["perceptual_l1"]
        if "feature_matching_l1" in trace:
            ours["loss_terms.feature_matching_l1"] = trace["feature_matching_l1"]
        for which in ("generated", "real"):
            maps = trace.get(f"disc_maps_{which}")
            if maps:
                first = next(k for k in maps if k.startswith("prediction_map_"))
                ours[f"loss_terms.disc_prediction_map_{which}"] = maps[first]
        ours["transformed_frame"] = trace["transformed_frame"]
        for frame in ("source", "driving", "transformed"):
            for family, prefix in (("kp", "kp"), ("regions", "region")):
                params = out.get(f"{family}_{frame}")
                for field, value in (params or {}).items():
                    ours[f"{prefix}_{frame}.{field}"] = value
            kp = out.get(f"kp_{frame}") or {}
            if "prior" in kp:
                ours[f"prior.{frame}.map"] = kp["prior"]
        ours["generated.prediction"] = out["prediction"]
        ours["generated.occlusion_map"] = out.get("occlusion_map")
        ours["generated.deformation" if "kp_source" in out else "generated.optical_flow"] = out["deformation"]
        if "bg_params" in out:
            ours["generated.bg_params"] = out["bg_params"]
        grads = trace["grad_generator_step"]
        disc = {k: v for k, v in grads.items() if k.startswith("discriminator.")}
        rest = {k: v for k, v in grads.items() if not k.startswith("discriminator.")}
        ours.update({f"grad.{k}": v for k, v in rest.items()})
        names = [n for n, _ in self.recipe.model.named_parameters() if not n.startswith(("discriminator.", "avd_network."))]
        ours.update(_abs_sums(rest, "grad_abs_sum", names))
        ours.update({f"grad_in_generator_step.{k}": v for k, v in disc.items()})
        ours.update(_abs_sums(disc, "grad_abs_sum_in_generator_step"))
        if "grad_disc_step" in trace:
            disc_step = {f"discriminator.{k}": v for k, v in trace["grad_disc_step"].items()}
            ours.update({f"grad_disc_step.{k}": v for k, v in disc_step.items()})
            ours.update(_abs_sums(disc_step, "grad_abs_sum_disc_step"))

    def _collect_avd(self, trace: dict) -> None:
        ours = self.ours
        for name, value in trace["avd_losses"].items():
            ours[f"avd.loss.{name}"] = value
        ours["avd.loss.total"] = trace["avd_total"]
        for field in ("shift", "affine"):
            ours[f"avd.pose.{field}"] = trace["avd_pose"][field]
        ours["avd.random_scale.theta"] = trace["avd_pose"]["scale"]
        for field, value in trace["avd_rec"].items():
            ours[f"avd.rec.{field}"] = value
        grads = {f"avd_network.{k}": v for k, v in trace["grad_avd_step"].items()}
        ours.update({f"avd.grad.{k}": v for k, v in grads.items()})
        ours.update(_abs_sums(grads, "avd.grad_abs_sum"))

    def _collect_batch_norms(self) -> None:
        for key in self.expected:
            if key.startswith("bn_after_step."):
                name = key[len("bn_after_step."):]
                model = self.avd_recipe.model if (self.avd_recipe and name.startswith("avd_network.")) else self.recipe.model
                buffers = dict(model.named_buffers())
                self.ours[key] = buffers.get(name)

    # ---- comparison ----

    def is_fed(self, key: str) -> bool:
        return key.startswith(FED_PREFIXES)

    def unrun_batch_norm(self, key: str) -> bool:
        """A BatchNorm of a part the original gives no gradient at all (meta.json grad_none "<part>.*"): the
        MRAA_with_AWP region predictor's hourglass, which the original runs and discards and the project does
        not run. Its running statistics enter nothing; ours must stay as loaded (checked in the test)."""
        if not key.startswith("bn_after_step."):
            return False
        part = key.split(".")[1]
        return any(entry.split()[0] == f"{part}.*" for entry in self.meta.get("grad_none", []))

    def compared_keys(self, kind: str | None = None) -> list[str]:
        keys = [k for k in self.expected if not self.is_fed(k) and not k.endswith(NOT_COMPARED_SUFFIXES)
                and not self.unrun_batch_norm(k)]
        if kind == "loss":
            return [k for k in keys if k.startswith(("loss.", "avd.loss."))]
        if kind == "grad":
            return [k for k in keys if "grad" in k.split(".")[0] or k.startswith(("avd.grad", "avd.grad_abs_sum"))]
        if kind == "forward":
            loss_or_grad = set(self.compared_keys("loss")) | set(self.compared_keys("grad"))
            return [k for k in keys if k not in loss_or_grad]
        return keys

    def error(self, key: str) -> tuple[float, float]:
        """(max |ours - ref|, allowed) for one fixture key."""
        expected = self.expected[key].double()
        got = self.ours.get(key)
        assert got is not None, f"{self.folder.name}: our step computes nothing for {key}"
        got = torch.as_tensor(got).detach().double()
        assert got.numel() == expected.numel(), f"{key}: ours {tuple(got.shape)}, reference {tuple(expected.shape)}"
        got = got.reshape(expected.shape)
        if self.dtype == torch.float64 and torch.equal(expected.float().double(), expected):
            # A float64 reference holding only float32 values was stored rounded (the float64 fixtures keep the
            # BatchNorm running statistics so): it carries no more digits than float32; round ours alike.
            got = got.float().double()
        err = (got - expected).abs().max().item()
        if key in self.rtol:
            return err, self.rtol[key] * expected.abs().max().item()
        head, _, rest = key.partition(".param.")
        assert rest, f"{self.folder.name}: no tolerance for {key} in meta.json"
        module_total = self.expected[f"{head}.module.{rest.split('.')[0]}"].double().abs().item()
        return err, self.param_rtol * module_total

    def check(self, keys: list[str]) -> None:
        failures = []
        for key in keys:
            err, allowed = self.error(key)
            if not err <= allowed:
                failures.append(f"{key}: |ours - ref| = {err:.3g} > {allowed:.3g}")
        assert not failures, f"{self.folder.name} ({self.dtype}):\n" + "\n".join(failures)


@pytest.fixture(scope="module", params=_params())
def folder(request) -> Path:
    if request.param is None:
        require(TRAIN_FIXTURES / "<a folder with meta.json and checkpoint.pth.tar>", "training reference fixtures")
    return request.param


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def run(folder, request) -> TrainReference:
    """Module-scoped: one step per fixture folder and dtype, shared by the tests below."""
    return TrainReference(folder, request.param)


def test_every_loss_term(run):
    keys = run.compared_keys("loss")
    assert keys, "the fixture holds no loss"
    run.check(keys)


def test_the_step_reports_the_losses(run):
    """What `python -m train` logs each step is the same losses."""
    for name, value in run.values.items():
        key = f"loss.{name}"
        if key in run.expected:
            assert value == pytest.approx(float(run.expected[key]), rel=1e-4), key


def test_forward_tensors(run):
    run.check(run.compared_keys("forward"))


def test_gradients(run):
    keys = run.compared_keys("grad")
    assert keys, "the fixture holds no gradient"
    run.check(keys)


def test_grad_none_parameters_get_no_gradient(run):
    """Parameters the original never gives a gradient (meta.json grad_none) get none here either."""
    for entry in run.meta.get("grad_none", []):
        prefix = entry.split("*")[0].split()[0]
        grads = [k for k in run.trace["grad_generator_step"] if k.startswith(prefix)]
        assert not grads, f"{run.folder.name}: {entry} has no gradient in the original, ours: {grads[:3]}"


def test_unrun_batch_norms_keep_their_statistics(run):
    """BatchNorms the project does not run (see `unrun_batch_norm`) keep the checkpoint's statistics."""
    from train.checkpointing import read_checkpoint

    checkpoint = read_checkpoint(run.folder / "checkpoint.pth.tar")
    for key in (k for k in run.expected if run.unrun_batch_norm(k) and not k.endswith(NOT_COMPARED_SUFFIXES)):
        part, name = key.split(".", 2)[1:]
        assert torch.equal(run.ours[key].float(), checkpoint[part][name].float()), key


def test_every_fixture_tensor_is_compared(run):
    """Nothing in the fixture is silently left out (only fed inputs, BatchNorm call counters, unrun BatchNorms)."""
    left = [k for k in run.expected if not run.is_fed(k) and not k.endswith(NOT_COMPARED_SUFFIXES)
            and not run.unrun_batch_norm(k)
            and k not in set(run.compared_keys("loss")) | set(run.compared_keys("grad"))
            | set(run.compared_keys("forward"))]
    assert not left


def test_au_points_from_the_originals_landmarks(folder):
    """The 18 AU points our data pipeline builds from 68 landmarks are those the original built from its dlib's."""
    from safetensors.torch import load_file

    from mefacial import prior

    given = load_file(str(folder / "tensors.safetensors"))
    frames = [k.split(".", 1)[1] for k in given if k.startswith("landmarks68.")]
    if not frames:
        pytest.skip(f"{folder.name}: no prior, no landmarks")
    for frame in frames:
        ours = prior.au_points_from_landmarks(given[f"landmarks68.{frame}"].double())
        assert torch.allclose(ours, given[f"au_points.{frame}"].double(), atol=1e-4), frame


def test_project_au_points_of_the_warped_frame(folder):
    """The project's deliberate difference: AU points of the warped frame from the driving landmarks moved by the
    warp (`StepDraws`), not from dlib run on the warped frame. They land near dlib's (mean < 3 % of the frame;
    not warping them at all is ~5 %, warping the wrong way ~10 % on the shared fixtures), and only the
    equivariance terms change. Prints the loss deltas (README, Training: "Differences from the originals")."""
    from safetensors.torch import load_file

    given = load_file(str(folder / "tensors.safetensors"))
    if "landmarks68.driving" not in given:
        pytest.skip(f"{folder.name}: no prior, no landmarks")
    from train.draws import RecordedDraws

    meta = json.loads((folder / "meta.json").read_text())
    rtol = meta["tolerance"]["float32"]["rtol_per_tensor"]
    rerun = _fresh_recipe(folder)
    rerun.draws = RecordedDraws(theta=given["transform.theta"], control_params=given["transform.control_params"],
                                control_points=given["transform.control_points"])  # AU points: the project's
    rerun.trace = {}
    batch = {"source": given["inputs.source"], "driving": given["inputs.driving"], "source_au": given["au_points.source"],
             "driving_au": given["au_points.driving"], "driving_landmarks": given["landmarks68.driving"]}
    rerun.step(batch, torch.Generator().manual_seed(0))
    au = rerun.trace["au_transformed"]
    size = given["inputs.driving"].shape[-1]
    distance = (au - given["au_points.transformed"]).norm(dim=-1)  # B x 18 pixels
    print(f"\n{folder.name}: AU points of the warped frame, project vs dlib: mean {distance.mean():.2f} px, "
          f"max {distance.max():.2f} px")
    # The original's losses (with its dlib points); `test_every_loss_term` shows ours equal them when fed those.
    for name, value in rerun.trace["losses_generator"].items():
        theirs = float(given[f"loss.{name}"])
        delta = float(value) - theirs
        print(f"  {name:<22} dlib {theirs:.6g}  project {float(value):.6g}  delta {delta:+.3g}")
        if not name.startswith("equivariance"):
            assert abs(delta) <= rtol[f"loss.{name}"] * abs(theirs), name
    assert distance.mean() < 0.03 * size


def _fresh_recipe(folder: Path):
    """The fixture's model and recipe (float32, train mode), as `TrainReference` builds them."""
    from mefacial.config import config_from_reference
    from train.config import config_from_original
    from train.trainer import build_recipe, perceptual_network

    meta = json.loads((folder / "meta.json").read_text())
    block = yaml.safe_load((folder / "config.yaml").read_text())
    cfg = config_from_original(block, config_from_reference(block, meta, name=folder.name), name=folder.name,
                               train={"vgg19_weights": str((folder / meta["vgg19_weights"]).resolve())})
    recipe = build_recipe(cfg, "cpu", vgg=perceptual_network(cfg, torch.device("cpu")),
                          init=folder / "checkpoint.pth.tar")
    recipe.train()
    return recipe

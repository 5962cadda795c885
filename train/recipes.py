"""One training step per backbone and stage: forward, losses, backward, optimiser steps.

* `FOMMRecipe`: keypoint detector + generator (one Adam each) with perceptual,
  LSGAN + feature matching and equivariance value / jacobian losses, then a
  discriminator step (its own Adam), as FOMM's `GeneratorFullModel` /
  `DiscriminatorFullModel` and `train.py` do.
* `MRAARecipe`: region predictor + background predictor + generator (one Adam)
  with perceptual and equivariance shift / affine losses (MRAA's
  `ReconstructionModel`).
* `AVDRecipe`: MRAA's second stage: the AVD network learns to rebuild the
  driving regions from the source regions (identity) and randomly rescaled
  driving regions (pose); the rest of the model is frozen.

Sources and drivings are paired per batch item (B x 3 x H x W each). Prior
variants get the AU points of both frames from the dataset; the random warp of
the equivariance losses, the AU points of the warped frame and the AVD
stage's rescaling come from the recipe's `draws` (`train/draws.py`: drawn from
the step's generator by default, or given, e.g. an original run's).

The parts that see data go through one `DistributedDataParallel` module per
optimiser step; losses are computed outside it in float32 (float64 when the
model runs in float64, as the reference checks do).

Setting `recipe.trace = {}` makes each step record its intermediate tensors
there (network outputs, unweighted loss terms, every parameter's gradient
after each backward): what the reference tests compare with the originals.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import losses as L
from .config import TrainConfig
from .draws import StepDraws

Batch = dict[str, torch.Tensor]


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _full(x: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor (mixed precision) in float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in HALF_DTYPES else x


def _float(d: dict) -> dict:
    """Model outputs in full precision for the losses (mixed precision runs the networks in bf16 / fp16)."""
    return {k: (_full(v) if torch.is_tensor(v) else v) for k, v in d.items()}


def _gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient of `module` (parameters without one left out)."""
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _adam(params, lr: float, betas) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr, betas=tuple(betas))


class _PartsForward(nn.Module):
    """The trainable parts that one optimiser step differentiates through, run as one DDP module."""

    def __init__(self, fn: Callable[..., dict], **parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> dict:
        return self.fn(self.parts, *args, **kwargs)


class Recipe:
    """Optimisers, schedulers and the step of one backbone / stage."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device, ddp: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager], scaler: torch.amp.GradScaler,
                 vgg: nn.Module | None = None):
        self.cfg = cfg
        self.model = model
        self.device = device
        self.ddp = ddp
        self.autocast = autocast
        self.scaler = scaler
        self.vgg = vgg
        self.size = cfg.model.image_size
        self.align_corners = cfg.model.grid_sample_align_corners
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.MultiStepLR] = {}
        self.last: dict[str, Any] = {}  # the latest step's inputs and outputs, for the visualisation
        self.draws: StepDraws = StepDraws()  # random warp, warped-frame AU points, AVD scaling (train/draws.py)
        self.trace: dict[str, Any] | None = None  # when a dict: each step's intermediate tensors (see the module doc)

    def _wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        if not self.ddp:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def _record(self, **values: Any) -> None:
        if self.trace is not None:
            self.trace.update(values)

    def to(self, dtype: torch.dtype) -> "Recipe":
        """Cast the model, the perceptual network and the pyramids to `dtype` (the float64 reference checks:
        built in float32, then cast, as the originals' `.double()`)."""
        self.model.to(dtype)
        for name in ("vgg", "pyramid"):
            if getattr(self, name, None) is not None:
                getattr(self, name).to(dtype)
        return self

    def _schedule(self, milestones: list[int], gamma: float) -> None:
        self.schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=gamma)
                           for name, opt in self.optimizers.items()}

    def _backward_and_step(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        self.scaler.scale(loss).backward()
        clip = self.cfg.train.grad_clip
        for opt in optimizers:
            if clip:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
            self.scaler.step(opt)

    @staticmethod
    def _step_values(losses: dict[str, torch.Tensor], l1: float) -> dict[str, float]:
        """What a step reports: each weighted loss term, and the L1 error the runs compare."""
        return {**{name: float(value.detach()) for name, value in losses.items()}, "l1": l1}

    def train(self) -> None:
        self.model.train()

    def lrs(self) -> dict[str, float]:
        return {f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    def end_epoch(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizers": self.optimizers, "schedulers": self.schedulers}

    def load_state(self, checkpoint: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        for name, sch in self.schedulers.items():
            sch.load_state_dict(checkpoint["schedulers"][name])

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> float:
        """The validation metric of a batch (eval mode): mean L1 of the reconstructed driving frames."""
        return float((self.reconstruct(batch) - batch["driving"]).abs().mean())

    def reconstruct(self, batch: Batch) -> torch.Tensor:
        """Predictions (B x 3 x H x W) of the driving frames from the sources."""
        raise NotImplementedError

    def visuals(self) -> dict[str, torch.Tensor]:
        """Images of the latest step for the visualisation: frames B x 3 x H x W, points B x K x 2 in [-1, 1],
        maps B x 1 x h x w."""
        if not self.last or "out" not in self.last:
            return {}
        batch, out = self.last["batch"], self.last["out"]
        src, drv = out.get("kp_source") or out.get("regions_source"), out.get("kp_driving") or out.get("regions_driving")
        vis = {"source": batch["source"], "driving": batch["driving"], "prediction": _full(out["prediction"])}
        if "deformed" in out:
            vis["deformed"] = _full(out["deformed"])
        if "occlusion_map" in out:
            vis["occlusion"] = _full(out["occlusion_map"])
        if src is not None:
            vis["points_source"], vis["points_driving"] = src["value" if "value" in src else "shift"], drv[
                "value" if "value" in drv else "shift"]
            if "heatmap" in src:  # MRAA: the region maps in use (the per-AU maps with a prior)
                vis["prior"] = _full(src["heatmap"]).sum(dim=1, keepdim=True)
            elif "prior" in src:  # FOMM with a prior: the map fed to the keypoint hourglass
                vis["prior"] = _full(src["prior"])
        return {k: v.detach().float() for k, v in vis.items()}

    # ---- shared pieces ----

    def _forward(self, batch: Batch, generator: torch.Generator
                 ) -> tuple[dict[str, Any], torch.Tensor, L.RandomTPS | None]:
        """The model on a batch, with this step's random warp where the equivariance losses need it: (the model's
        outputs, the prediction in full precision, the warp or None); kept as the latest step (`last`)."""
        tps = transformed = au_transformed = None
        if self.equivariance:
            tps, transformed, au_transformed = self._transform(batch, generator)
        with self.autocast():
            out = self.forward(batch["source"], batch["driving"], batch.get("source_au"), batch.get("driving_au"),
                               transformed, au_transformed)
        self._record(out=out)
        self.last = {"batch": batch, "out": out, "transformed": transformed}
        return out, _full(out["prediction"]), tps

    def _transform(self, batch: Batch, generator: torch.Generator) -> tuple[L.RandomTPS, torch.Tensor, torch.Tensor | None]:
        """The random warp of this step, the warped driving frames and their AU points (prior variants)."""
        driving = batch["driving"]
        tps = self.draws.transform(driving.shape[0], self.cfg.train.transform_params, generator, driving)
        transformed = tps.transform_frame(driving, self.align_corners)  # B x 3 x H x W
        au = self.draws.transformed_au_points(batch, tps, transformed, self.cfg.model.au_points)
        self._record(transformed_frame=transformed.detach(), au_transformed=au)
        return tps, transformed, au

    def _image_losses(self, prediction: torch.Tensor, driving: torch.Tensor, pyramid: L.ImagePyramid
                      ) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """Perceptual and pixel losses over the pyramid scales of train.scales; returns the pyramids too."""
        weights = self.cfg.train.loss_weights
        real, generated = pyramid(driving), pyramid(prediction)
        scales = [float(s) for s in self.cfg.train.scales]
        real_t, generated_t = {s: real[s] for s in scales}, {s: generated[s] for s in scales}
        out: dict[str, torch.Tensor] = {}
        if self.vgg is not None and sum(weights["perceptual"]) != 0:
            terms: list[torch.Tensor] | None = [] if self.trace is not None else None
            with self.autocast():
                out["perceptual"] = L.perceptual_loss(self.vgg, generated_t, real_t, weights["perceptual"], terms)
            out["perceptual"] = _full(out["perceptual"])
            if terms is not None:  # scales x VGG slices
                self._record(perceptual_l1=_full(torch.stack(terms)).view(len(scales), -1))
        if weights.get("reconstruction"):
            out["reconstruction"] = L.pyramid_l1_loss(generated_t, real_t, float(weights["reconstruction"]))
        return out, real, generated


# ---- FOMM ---------------------------------------------------------------------------------------------


def _fomm_forward(parts: nn.ModuleDict, source, driving, au_source, au_driving, transformed=None, au_transformed=None):
    kp_source = parts["kp_detector"](source, au_source)
    kp_driving = parts["kp_detector"](driving, au_driving)
    out = parts["generator"](source, kp_driving=kp_driving, kp_source=kp_source)
    out.update(kp_source=kp_source, kp_driving=kp_driving)
    if transformed is not None:
        out["kp_transformed"] = parts["kp_detector"](transformed, au_transformed)
    return out


def _fomm_discriminate(parts: nn.ModuleDict, real: dict, generated: dict, kp: dict) -> tuple[dict, dict]:
    return parts["discriminator"](real, kp=kp), parts["discriminator"](generated, kp=kp)


class FOMMRecipe(Recipe):
    """FOMM (and its prior variants): generator + keypoint detector, then the discriminator."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        train = self.cfg.train
        model = self.model
        self.weights = train.loss_weights
        self.disc_scales = model.discriminator.scales
        # One pyramid for the losses' scales and the discriminator's.
        self.pyramid = L.ImagePyramid([*train.scales, *self.disc_scales], model.generator.num_channels).to(self.device)
        self.use_gan = self.weights["generator_gan"] != 0
        self.equivariance = (self.weights["equivariance_value"] + self.weights["equivariance_jacobian"]) != 0
        unused = self.cfg.model.prior != "none" and not self.cfg.model.model_params["common_params"].get("estimate_jacobian")
        self.forward = self._wrap(_PartsForward(_fomm_forward, kp_detector=model.kp_detector, generator=model.generator),
                                  find_unused=unused)
        self.discriminate = self._wrap(_PartsForward(_fomm_discriminate, discriminator=model.discriminator))
        self.optimizers = {
            "generator": _adam(model.generator.parameters(), train.lr_generator, train.betas),
            "kp_detector": _adam(model.kp_detector.parameters(), train.lr_kp_detector, train.betas),
            "discriminator": _adam(model.discriminator.parameters(), train.lr_discriminator, train.betas),
        }
        self._schedule(train.epoch_milestones, train.gamma)

    def _disc_input(self, pyramid: dict[float, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"prediction_{s}": pyramid[float(s)] for s in self.disc_scales}

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        driving = batch["driving"]
        out, prediction, tps = self._forward(batch, generator)
        kp_driving = _float(out["kp_driving"])
        losses, real, generated = self._image_losses(prediction, driving, self.pyramid)
        disc = self.model.discriminator  # the generator step only reads it (its gradients are discarded)
        kp_detached = {k: v.detach() for k, v in kp_driving.items() if k in ("value", "jacobian")}
        if self.use_gan:
            with self.autocast():
                maps_generated = disc(self._disc_input(generated), kp=kp_detached)
                maps_real = disc(self._disc_input(real), kp=kp_detached)
            maps_generated, maps_real = _float_maps(maps_generated), _float_maps(maps_real)
            self._record(disc_maps_generated=maps_generated, disc_maps_real=maps_real)
            losses["gen_gan"] = L.generator_gan_loss(maps_generated, self.disc_scales, self.weights["generator_gan"])
            if sum(self.weights["feature_matching"]) != 0:
                terms: list[torch.Tensor] | None = [] if self.trace is not None else None
                losses["feature_matching"] = L.feature_matching_loss(maps_real, maps_generated, self.disc_scales,
                                                                     self.weights["feature_matching"], terms)
                if terms:
                    self._record(feature_matching_l1=torch.stack(terms))
        if self.equivariance:
            kp_t = _float(out["kp_transformed"])
            if self.weights["equivariance_value"]:
                losses["equivariance_value"] = self.weights["equivariance_value"] * L.equivariance_value_loss(
                    kp_driving["value"], kp_t["value"], tps)
            if self.weights["equivariance_jacobian"] and "jacobian" in kp_t:
                losses["equivariance_jacobian"] = self.weights["equivariance_jacobian"] * L.equivariance_matrix_loss(
                    kp_driving["jacobian"], kp_t["value"], kp_t["jacobian"], tps)
        total = sum(losses.values())
        losses_generator = {name: value.detach() for name, value in losses.items()}
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self._backward_and_step(total, [self.optimizers["generator"], self.optimizers["kp_detector"]])
        if self.trace is not None:
            self._record(losses_generator=losses_generator, generator_total=total.detach(),
                         grad_generator_step=_gradients(self.model))

        if self.use_gan:
            self.optimizers["discriminator"].zero_grad(set_to_none=True)  # drops what the generator's backward left
            with self.autocast():
                maps_real, maps_generated = self.discriminate(
                    self._disc_input(real), self._disc_input({k: v.detach() for k, v in generated.items()}), kp_detached)
            losses["disc_gan"] = L.discriminator_gan_loss(_float_maps(maps_real), _float_maps(maps_generated),
                                                          self.disc_scales, self.weights["discriminator_gan"])
            self._backward_and_step(losses["disc_gan"], [self.optimizers["discriminator"]])
            if self.trace is not None:
                self._record(disc_gan=losses["disc_gan"].detach(), grad_disc_step=_gradients(self.model.discriminator))
        self.scaler.update()

        return self._step_values(losses, float((prediction.detach() - driving).abs().mean()))

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor:
        model = self.model
        with self.autocast():
            kp_source = model.kp_detector(batch["source"], batch.get("source_au"))
            kp_driving = model.kp_detector(batch["driving"], batch.get("driving_au"))
            out = model.generator(batch["source"], kp_driving=kp_driving, kp_source=kp_source)
        return _full(out["prediction"])


def _float_maps(maps: dict) -> dict:
    return {k: ([_full(f) for f in v] if isinstance(v, list) else _full(v)) for k, v in maps.items()}


# ---- MRAA ---------------------------------------------------------------------------------------------


def _mraa_forward(parts: nn.ModuleDict, source, driving, au_source, au_driving, transformed=None, au_transformed=None):
    regions_source = parts["region_predictor"](source, au_source)
    regions_driving = parts["region_predictor"](driving, au_driving)
    bg_params = parts["bg_predictor"](source, driving)
    out = parts["generator"](source, driving_region_params=regions_driving, source_region_params=regions_source,
                             bg_params=bg_params)
    out.update(regions_source=regions_source, regions_driving=regions_driving, bg_params=bg_params)
    if transformed is not None:
        out["regions_transformed"] = parts["region_predictor"](transformed, au_transformed)
    return out


class MRAARecipe(Recipe):
    """MRAA reconstruction stage (and its prior variants)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        train = self.cfg.train
        model = self.model
        self.weights = train.loss_weights
        self.pyramid = L.ImagePyramid(train.scales, model.generator.num_channels).to(self.device)
        self.equivariance = (self.weights["equivariance_shift"] + self.weights["equivariance_affine"]) != 0
        self.revert_axis_swap = bool(self.cfg.model.model_params.get("revert_axis_swap", False))
        # With a prior the regions come from the AU points, so the region predictor's hourglass may see no
        # gradient (PCA affine): DDP must not wait for it.
        self.forward = self._wrap(_PartsForward(_mraa_forward, region_predictor=model.region_predictor,
                                                bg_predictor=model.bg_predictor, generator=model.generator),
                                  find_unused=True)
        params = [*model.generator.parameters(), *model.region_predictor.parameters(), *model.bg_predictor.parameters()]
        self.optimizers = {"reconstruction": _adam(params, train.lr, train.betas)}
        self._schedule(train.epoch_milestones, train.gamma)

    def train(self) -> None:
        self.model.train()
        self.model.avd_network.eval()  # not trained in this stage

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        driving = batch["driving"]
        out, prediction, tps = self._forward(batch, generator)
        losses, _, _ = self._image_losses(prediction, driving, self.pyramid)
        if self.equivariance:
            drv, trn = _float(out["regions_driving"]), _float(out["regions_transformed"])
            if self.weights["equivariance_shift"]:
                losses["equivariance_shift"] = self.weights["equivariance_shift"] * L.equivariance_value_loss(
                    drv["shift"], trn["shift"], tps)
            if self.weights["equivariance_affine"] and "affine" in trn:
                losses["equivariance_affine"] = self.weights["equivariance_affine"] * L.equivariance_matrix_loss(
                    drv["affine"], trn["shift"], trn["affine"], tps, self.revert_axis_swap)
        total = sum(losses.values())  # with a prior the equivariance terms are constants (regions = AU points)
        opt = self.optimizers["reconstruction"]
        opt.zero_grad(set_to_none=True)
        self._backward_and_step(total, [opt])
        self.scaler.update()
        if self.trace is not None:
            self._record(losses_generator={k: v.detach() for k, v in losses.items()}, generator_total=total.detach(),
                         grad_generator_step=_gradients(self.model))
        return self._step_values(losses, float((prediction.detach() - driving).abs().mean()))

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor:
        model = self.model
        with self.autocast():
            regions_source = model.region_predictor(batch["source"], batch.get("source_au"))
            regions_driving = model.region_predictor(batch["driving"], batch.get("driving_au"))
            bg_params = model.bg_predictor(batch["source"], batch["driving"])
            out = model.generator(batch["source"], driving_region_params=regions_driving,
                                  source_region_params=regions_source, bg_params=bg_params)
        return _full(out["prediction"])


# ---- MRAA, animation via disentanglement -------------------------------------------------------------


def random_scale(regions: dict[str, torch.Tensor], scale: float, uniform: torch.Tensor) -> dict[str, torch.Tensor]:
    """Regions of a randomly rescaled object: shift and affine multiplied by diag(s_x, s_y), s = u * 2 scale +
    1 - scale for B x 2 uniform numbers u in [0, 1) (the original's `random_scale`); "scale" holds s (B x 2)."""
    shift = regions["shift"]
    factors = uniform * (2 * scale) + (1 - scale)  # B x 2
    theta = torch.diag_embed(factors).unsqueeze(1).to(device=shift.device, dtype=shift.dtype)  # B x 1 x 2 x 2
    return {"shift": (theta @ shift.unsqueeze(-1)).squeeze(-1), "affine": theta @ regions["affine"],
            "scale": factors.to(device=shift.device, dtype=shift.dtype)}


def _avd_forward(parts: nn.ModuleDict, identity: dict, pose: dict) -> dict:
    return parts["avd_network"](identity, pose)


class AVDRecipe(Recipe):
    """MRAA stage 2: train the AVD network on the regions of the frozen region predictor.

    As the original `train_avd.py`, the region predictor runs in train mode
    under no_grad: BatchNorm uses each batch's statistics (and updates its
    running statistics), its weights do not change.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        avd = self.cfg.avd
        model = self.model
        for name in ("generator", "region_predictor", "bg_predictor"):
            getattr(model, name).requires_grad_(False)
        self.forward = self._wrap(_PartsForward(_avd_forward, avd_network=model.avd_network))
        self.optimizers = {"avd": _adam(model.avd_network.parameters(), avd.lr, avd.betas)}
        self._schedule(avd.epoch_milestones, avd.gamma)

    def train(self) -> None:
        self.model.eval()  # generator and background predictor are not used
        self.model.region_predictor.train()  # batch statistics, as the original (under no_grad: weights frozen)
        self.model.avd_network.train()

    @torch.no_grad()
    def regions(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Region params of the sources (identity) and drivings (pose ground truth): shift, affine."""
        model = self.model
        with self.autocast():
            identity = model.region_predictor(batch["source"], batch.get("source_au"))
            pose_gt = model.region_predictor(batch["driving"], batch.get("driving_au"))
        keep = ("shift", "affine")
        return ({k: _full(identity[k]) for k in keep}, {k: _full(pose_gt[k]) for k in keep})

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        identity, pose_gt = self.regions(batch)
        values = self.step_on_regions(identity, pose_gt, generator)
        self.last["batch"] = batch
        return values

    def step_on_regions(self, identity: dict[str, torch.Tensor], pose_gt: dict[str, torch.Tensor],
                        generator: torch.Generator) -> dict[str, float]:
        """The AVD step on given regions (B x K x 2 shifts, B x K x 2 x 2 affines): random rescaling of the
        pose (`draws.scale_uniform`), reconstruction, L1 losses, backward, Adam step."""
        avd = self.cfg.avd
        uniform = self.draws.scale_uniform(pose_gt["shift"].shape[0], generator)  # B x 2
        pose = random_scale(pose_gt, avd.random_scale, uniform)
        with self.autocast():
            rec = _float(self.forward({"shift": identity["shift"], "affine": identity["affine"]}, pose))
        losses = {
            "rec_shift": avd.lambda_shift * (pose_gt["shift"] - rec["shift"]).abs().mean(),
            "rec_affine": avd.lambda_affine * (pose_gt["affine"] - rec["affine"]).abs().mean(),
        }
        total = losses["rec_shift"] + losses["rec_affine"]
        opt = self.optimizers["avd"]
        opt.zero_grad(set_to_none=True)
        self._backward_and_step(total, [opt])
        self.scaler.update()
        if self.trace is not None:
            self._record(avd_pose=pose, avd_rec=rec, avd_losses={k: v.detach() for k, v in losses.items()},
                         avd_total=total.detach(),
                         grad_avd_step=_gradients(self.model.avd_network))
        self.last = {"identity": identity, "pose": pose_gt, "rec": rec}
        return self._step_values(losses, _region_l1(pose_gt, rec))

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> float:
        """Mean L1 of the driving regions rebuilt from the source's (identity) and the driving frame's (pose)."""
        model = self.model
        with self.autocast():
            identity = _float(model.region_predictor(batch["source"], batch.get("source_au")))
            pose = _float(model.region_predictor(batch["driving"], batch.get("driving_au")))
            rec = _float(model.avd_network(identity, pose))
        return _region_l1(pose, rec)

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor:
        """The driving frames animated from the sources in AVD mode."""
        model = self.model
        with self.autocast():
            identity = model.region_predictor(batch["source"], batch.get("source_au"))
            pose = model.region_predictor(batch["driving"], batch.get("driving_au"))
            new = _float(model.avd_network(identity, pose))  # float32 covariances: the generator inverts them
            out = model.generator(batch["source"], driving_region_params=new, source_region_params=identity)
        return _full(out["prediction"])

    def visuals(self) -> dict[str, torch.Tensor]:
        if "batch" not in self.last:
            return {}
        batch = self.last["batch"]
        with torch.no_grad():
            prediction = self.reconstruct(batch)
        return {"source": batch["source"], "driving": batch["driving"], "prediction": prediction,
                "points_source": self.last["identity"]["shift"], "points_driving": self.last["rec"]["shift"].detach()}


def _region_l1(target: dict[str, torch.Tensor], rebuilt: dict[str, torch.Tensor]) -> float:
    return float(((target["shift"] - rebuilt["shift"]).abs().mean() + (target["affine"] - rebuilt["affine"]).abs().mean()).detach())


RECIPES = {("fomm", "reconstruction"): FOMMRecipe, ("mraa", "reconstruction"): MRAARecipe, ("mraa", "avd"): AVDRecipe}

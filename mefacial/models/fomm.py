"""First Order Motion Model (Siarohin et al., NeurIPS 2019) and its facial-prior variants.

* `prior: none`: the original FOMM; keypoints are the expectations of learned heatmaps.
* `prior: ewp` / `awp` (ACM MM 2021, TIP 2024): the keypoints are the 18 AU
  points given as input; a prior map built from them (`mefacial.prior`) is
  concatenated to the downscaled frame at the keypoint hourglass input, and the
  jacobians still come from the hourglass heatmaps. AWP fuses the 18 per-AU
  maps with two 3x3 convolutions (`kp_detector.learn`, `kp_detector.learn1`,
  no activation); EWP sums them with equal weights.

Sub-module and parameter names are the original ones, so original checkpoints
load strictly. `grid_sample` (and the bilinear resize of the flow that goes
with it) follows `config.grid_sample_align_corners`: torch 1.0 behaved as
`True`, which the published FOMM checkpoints were trained with.

The generator is split into `encode` (the source's features, once per clip)
and `decode` (warp and decode a batch of driving frames); the source has
batch 1 and is broadcast over the driving batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import motion, prior
from ..config import ModelConfig
from ..errors import ConfigError, InputError
from .blocks import (
    AntiAliasInterpolation2d,
    DownBlock2d,
    Hourglass,
    ResBlock2d,
    SameBlock2d,
    UpBlock2d,
    kp2gaussian,
    make_coordinate_grid,
)
from . import BackboneSpec, MotionTransferClip, VariantDecl, register_backbone
from .discriminator import MultiScaleDiscriminator

KP = dict  # {"value": B x K x 2, "jacobian": B x K x 2 x 2, ...}


def heatmap_expectation(heatmap: torch.Tensor) -> torch.Tensor:
    """Keypoint positions as expectations over softmax heatmaps: B x K x H x W -> B x K x 2."""
    grid = make_coordinate_grid(heatmap.shape[2:], heatmap.dtype, heatmap.device)  # H x W x 2
    return (heatmap[..., None] * grid).sum(dim=(2, 3))


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-1 tensor (the source) to `batch`; other batch sizes pass unchanged."""
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 and batch != 1 else x


class KPDetector(nn.Module):
    """Keypoints (value, jacobian) from a frame; with a prior, the values are the given AU points."""

    def __init__(
        self,
        block_expansion: int,
        num_kp: int,
        num_channels: int,
        max_features: int,
        num_blocks: int,
        temperature: float,
        estimate_jacobian: bool = False,
        scale_factor: float = 1,
        single_jacobian_map: bool = False,
        pad: int = 0,
        prior_kind: str = "none",
        prior_distance: str = "l2",
        prior_sigma: float = 0.75,
    ):
        super().__init__()
        self.prior_kind = prior_kind
        self.prior_distance = prior_distance
        self.prior_sigma = prior_sigma
        in_features = num_channels + (0 if prior_kind == "none" else 1)  # the prior is one more input channel
        self.predictor = Hourglass(block_expansion, in_features=in_features, max_features=max_features, num_blocks=num_blocks)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=(7, 7), padding=pad)
        if prior_kind == "awp":
            # The learned fusion of the per-AU maps (no activation in between), as in FPB-FOMM.
            self.learn = nn.Conv2d(num_kp, num_kp // 2, kernel_size=(3, 3), padding=1)
            self.learn1 = nn.Conv2d(num_kp // 2, 1, kernel_size=(3, 3), padding=1)
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian = nn.Conv2d(
                self.predictor.out_filters, 4 * self.num_jacobian_maps, kernel_size=(7, 7), padding=pad
            )
            # Start from identity jacobians, as the original does.
            nn.init.zeros_(self.jacobian.weight)
            with torch.no_grad():
                self.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0] * self.num_jacobian_maps))
        else:
            self.jacobian = None
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def prior_maps(self, au_points: torch.Tensor, image_size: int, map_size: int) -> dict[str, torch.Tensor]:
        """The prior channel (B x 1 x m x m, key "prior") and, for AWP, the per-AU maps ("per_au")."""
        # float32, or float64 when the model is (the training reference checks)
        dtype = torch.float64 if self.kp.weight.dtype == torch.float64 else torch.float32
        if self.prior_kind == "ewp":
            return {"prior": prior.ewp_map(au_points, image_size, map_size, self.prior_sigma, self.prior_distance, dtype)}
        per_au = prior.per_au_maps(au_points, image_size, map_size, self.prior_sigma, self.prior_distance, dtype)
        per_au = per_au.to(self.learn.weight.dtype)  # B x 18 x m x m
        return {"prior": self.learn1(self.learn(per_au)), "per_au": per_au}

    def forward(self, x: torch.Tensor, au_points: torch.Tensor | None = None) -> KP:
        """x: B x C x H x W in [0, 1]; au_points: B x 18 x 2 pixels (prior variants only)."""
        height, width = x.shape[2:]
        if self.scale_factor != 1:
            x = self.down(x)
        out: KP = {}
        if self.prior_kind != "none":
            if au_points is None:
                raise InputError("this model has a facial prior: pass the 18 AU points of every frame")
            if au_points.shape != (x.shape[0], self.kp.out_channels, 2):
                raise InputError(
                    f"expected AU points of shape {(x.shape[0], self.kp.out_channels, 2)} (one set per frame), "
                    f"got {tuple(au_points.shape)}"
                )
            out.update(self.prior_maps(au_points, image_size=height, map_size=x.shape[2]))
            x = torch.cat([x, out["prior"].to(x.dtype)], dim=1)  # B x (C + 1) x h x w
        feature_map = self.predictor(x)
        prediction = self.kp(feature_map)  # B x K x h' x w'
        b, k, h, w = prediction.shape
        heatmap = F.softmax(prediction.view(b, k, -1) / self.temperature, dim=2).view(b, k, h, w)
        if self.prior_kind == "none":
            out["value"] = heatmap_expectation(heatmap)
        else:
            size = torch.tensor([width, height], dtype=au_points.dtype, device=au_points.device)
            out["value"] = (au_points * 2 / size - 1).to(heatmap.dtype)  # pixels -> [-1, 1]
        if self.jacobian is not None:
            jacobian_map = self.jacobian(feature_map).reshape(b, self.num_jacobian_maps, 4, h, w)
            jacobian = (heatmap.unsqueeze(2) * jacobian_map).view(b, k, 4, -1).sum(dim=-1)  # B x K x 4
            out["jacobian"] = jacobian.view(b, k, 2, 2)
        return out


class DenseMotionNetwork(nn.Module):
    """Dense backward flow and occlusion from sparse keypoint motions (FOMM Sec. 3)."""

    def __init__(
        self,
        block_expansion: int,
        num_blocks: int,
        max_features: int,
        num_kp: int,
        num_channels: int,
        estimate_occlusion_map: bool = False,
        scale_factor: float = 1,
        kp_variance: float = 0.01,
        align_corners: bool = False,
    ):
        super().__init__()
        self.hourglass = Hourglass(
            block_expansion=block_expansion,
            in_features=(num_kp + 1) * (num_channels + 1),
            max_features=max_features,
            num_blocks=num_blocks,
        )
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, kernel_size=(7, 7), padding=(3, 3))
        self.occlusion = (
            nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=(7, 7), padding=(3, 3)) if estimate_occlusion_map else None
        )
        self.num_kp = num_kp
        self.scale_factor = scale_factor
        self.kp_variance = kp_variance
        self.align_corners = align_corners
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def downscale(self, source_image: torch.Tensor) -> torch.Tensor:
        return self.down(source_image) if self.scale_factor != 1 else source_image

    def heatmap_representations(self, spatial_size: tuple[int, int], kp_driving: KP, kp_source: KP) -> torch.Tensor:
        """Eq. 6: driving minus source Gaussians, with a zero background channel: B x (K+1) x 1 x h x w."""
        heatmap = kp2gaussian(kp_driving["value"], spatial_size, self.kp_variance) - kp2gaussian(
            kp_source["value"], spatial_size, self.kp_variance
        )  # B x K x h x w
        zeros = heatmap.new_zeros(heatmap.shape[0], 1, *spatial_size)
        return torch.cat([zeros, heatmap], dim=1).unsqueeze(2)

    def sparse_motions(self, spatial_size: tuple[int, int], kp_driving: KP, kp_source: KP) -> torch.Tensor:
        """Eq. 4: per-keypoint backward flows T_{s<-d}(z), identity first: B x (K+1) x h x w x 2."""
        value_d, value_s = kp_driving["value"], kp_source["value"]  # B x K x 2
        identity = make_coordinate_grid(spatial_size, value_s.dtype, value_s.device)  # h x w x 2
        coords = identity - value_d[:, :, None, None, :]  # B x K x h x w x 2
        if "jacobian" in kp_driving:
            jacobian = torch.matmul(kp_source["jacobian"], motion.inverse(kp_driving["jacobian"]))  # B x K x 2 x 2
            coords = torch.matmul(jacobian[:, :, None, None], coords.unsqueeze(-1)).squeeze(-1)
        driving_to_source = coords + value_s[:, :, None, None, :]
        background = identity.expand(driving_to_source.shape[0], 1, *identity.shape)
        return torch.cat([background, driving_to_source], dim=1)

    def deformed_sources(self, source_small: torch.Tensor, sparse_motions: torch.Tensor) -> torch.Tensor:
        """Eq. 7: the source warped by each sparse motion: B x (K+1) x C x h x w."""
        b, k1, h, w, _ = sparse_motions.shape
        repeated = source_small.unsqueeze(1).expand(b, k1, *source_small.shape[1:]).reshape(b * k1, -1, h, w)
        deformed = F.grid_sample(repeated, sparse_motions.reshape(b * k1, h, w, 2), align_corners=self.align_corners)
        return deformed.view(b, k1, -1, h, w)

    def forward(self, source_small: torch.Tensor, kp_driving: KP, kp_source: KP) -> dict[str, torch.Tensor]:
        """source_small: the downscaled source (`downscale`), batch 1 or B; keypoints of batch B (source: 1 or B)."""
        batch = kp_driving["value"].shape[0]
        source_small = _expand_batch(source_small, batch)
        kp_source = {k: _expand_batch(v, batch) for k, v in kp_source.items() if k in ("value", "jacobian")}
        spatial_size = tuple(source_small.shape[2:])
        heatmap = self.heatmap_representations(spatial_size, kp_driving, kp_source)
        sparse_motion = self.sparse_motions(spatial_size, kp_driving, kp_source)
        deformed_source = self.deformed_sources(source_small, sparse_motion)
        features = torch.cat([heatmap, deformed_source], dim=2).view(batch, -1, *spatial_size)
        prediction = self.hourglass(features)
        mask = F.softmax(self.mask(prediction), dim=1)  # B x (K+1) x h x w
        deformation = (sparse_motion * mask[..., None]).sum(dim=1)  # B x h x w x 2
        out = {"sparse_deformed": deformed_source, "mask": mask, "deformation": deformation}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction))  # B x 1 x h x w
        return out


class OcclusionAwareGenerator(nn.Module):
    """Encoder, warp of the source features by the dense motion, occlusion masking, decoder."""

    def __init__(
        self,
        num_channels: int,
        num_kp: int,
        block_expansion: int,
        max_features: int,
        num_down_blocks: int,
        num_bottleneck_blocks: int,
        estimate_occlusion_map: bool = False,
        dense_motion_params: dict | None = None,
        estimate_jacobian: bool = False,
        align_corners: bool = False,
    ):
        super().__init__()
        if dense_motion_params is not None:
            self.dense_motion_network = _build(
                DenseMotionNetwork,
                dict(dense_motion_params, num_kp=num_kp, num_channels=num_channels,
                     estimate_occlusion_map=estimate_occlusion_map, align_corners=align_corners),
                "generator_params.dense_motion_params",
            )
        else:
            self.dense_motion_network = None
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))

        def width(level: int) -> int:
            return min(max_features, block_expansion * (2**level))

        self.down_blocks = nn.ModuleList(
            DownBlock2d(width(i), width(i + 1), kernel_size=(3, 3), padding=(1, 1)) for i in range(num_down_blocks)
        )
        self.up_blocks = nn.ModuleList(
            UpBlock2d(width(num_down_blocks - i), width(num_down_blocks - i - 1), kernel_size=(3, 3), padding=(1, 1))
            for i in range(num_down_blocks)
        )
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(width(num_down_blocks), kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))
        self.estimate_occlusion_map = estimate_occlusion_map
        self.num_channels = num_channels
        self.align_corners = align_corners

    def deform_input(self, inp: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
        """Warp B x C x H x W by a B x h x w x 2 backward flow (resized bilinearly to H x W if needed)."""
        h, w = inp.shape[2:]
        if deformation.shape[1:3] != (h, w):
            # The original calls F.interpolate(mode='bilinear') without align_corners, i.e. False.
            deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
            deformation = deformation.permute(0, 2, 3, 1)
        return F.grid_sample(inp, deformation, align_corners=self.align_corners)

    def encode(self, source_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the generator needs of the source, computed once per clip."""
        features = self.first(source_image)
        for down_block in self.down_blocks:
            features = down_block(features)
        cache = {"features": features}
        if self.dense_motion_network is not None:
            cache["source_small"] = self.dense_motion_network.downscale(source_image)
        return cache

    def decode(self, source_image: torch.Tensor, cache: dict[str, torch.Tensor], kp_driving: KP, kp_source: KP) -> dict:
        """Animate the (batch 1 or B) source by a batch of B driving keypoints."""
        batch = kp_driving["value"].shape[0]
        out = _expand_batch(cache["features"], batch)
        output: dict[str, torch.Tensor] = {}
        if self.dense_motion_network is not None:
            dense_motion = self.dense_motion_network(cache["source_small"], kp_driving, kp_source)
            output.update(dense_motion)
            deformation = dense_motion["deformation"]
            out = self.deform_input(out, deformation)
            occlusion_map = dense_motion.get("occlusion_map")
            if occlusion_map is not None:
                if out.shape[2:] != occlusion_map.shape[2:]:
                    occlusion_map = F.interpolate(occlusion_map, size=out.shape[2:], mode="bilinear", align_corners=False)
                out = out * occlusion_map
            output["deformed"] = self.deform_input(_expand_batch(source_image, batch), deformation)
        out = self.bottleneck(out)
        for up_block in self.up_blocks:
            out = up_block(out)
        output["prediction"] = torch.sigmoid(self.final(out))
        return output

    def forward(self, source_image: torch.Tensor, kp_driving: KP, kp_source: KP) -> dict:
        """The original interface (training): encode and decode in one call."""
        return self.decode(source_image, self.encode(source_image), kp_driving, kp_source)


def _build(cls: type, params: dict[str, Any], section: str) -> nn.Module:
    """Instantiate `cls(**params)`, turning a bad or missing config key into a ConfigError naming it."""
    signature = inspect.signature(cls.__init__)
    accepted = set(signature.parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    required = {n for n, p in signature.parameters.items() if n != "self" and p.default is inspect.Parameter.empty}
    missing = sorted(required - set(params))
    if unknown or missing:
        raise ConfigError(
            f"model_params.{section}: unknown key(s) {unknown}, missing key(s) {missing}; "
            f"{cls.__name__} takes {sorted(accepted)}"
        )
    return cls(**params)


# Normalisation flags of each motion mode (FOMM `animate_params.normalization_params`).
MODE_FLAGS = {
    "relative": {"use_relative_movement": True, "use_relative_jacobian": True},
    "absolute": {"use_relative_movement": False, "use_relative_jacobian": False},
}


class FOMM(nn.Module):
    """The FOMM backbone behind the protocol of `mefacial.models` (detect / encode_source / transfer / generate)."""

    MOTION_MODES = tuple(MODE_FLAGS)

    def __init__(self, config: ModelConfig, with_discriminator: bool = False):
        super().__init__()
        self.config = config
        params = config.model_params
        for section in ("common_params", "kp_detector_params", "generator_params"):
            if not isinstance(params.get(section), dict):
                raise ConfigError(f"config {config.name!r}: model_params.{section} is missing (FOMM configs need it)")
        common = params["common_params"]
        if config.prior != "none" and int(common.get("num_kp", 0)) != prior.NUM_AU_POINTS:
            raise ConfigError(
                f"config {config.name!r}: a {config.prior} prior uses the {prior.NUM_AU_POINTS} AU points as keypoints; "
                f"set model_params.common_params.num_kp to {prior.NUM_AU_POINTS}"
            )
        self.kp_detector = _build(
            KPDetector,
            dict(params["kp_detector_params"], **common, prior_kind=config.prior,
                 prior_distance=config.prior_distance, prior_sigma=config.prior_sigma),
            "kp_detector_params",
        )
        self.generator = _build(
            OcclusionAwareGenerator,
            dict(params["generator_params"], **common, align_corners=config.grid_sample_align_corners),
            "generator_params",
        )
        if with_discriminator:
            if not isinstance(params.get("discriminator_params"), dict):
                raise ConfigError(f"config {config.name!r}: model_params.discriminator_params is missing")
            disc = dict(params["discriminator_params"], num_kp=common["num_kp"], num_channels=common["num_channels"])
            self.discriminator = _build(MultiScaleDiscriminator, disc, "discriminator_params")

    def detect(self, frames: torch.Tensor, au_points: torch.Tensor | None = None) -> KP:
        """Keypoints of B frames: value B x K x 2, jacobian B x K x 2 x 2 (+ prior B x 1 x m x m, per_au for AWP)."""
        return self.kp_detector(frames, au_points if self.config.prior != "none" else None)

    def prior_maps(self, au_points: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prior maps this model computes from B x 18 x 2 AU points (pixels): {"prior": B x 1 x m x m}
        (+ "per_au" B x 18 x m x m for AWP) at the keypoint detector's resolution; {} without a prior."""
        if self.config.prior == "none":
            return {}
        detector, size = self.kp_detector, self.config.image_size
        return detector.prior_maps(au_points, size, round(size * detector.scale_factor))

    def encode_source(self, source: torch.Tensor) -> dict[str, torch.Tensor]:
        """Source features for `generate`, computed once per clip (source: 1 x 3 x H x W)."""
        return self.generator.encode(source)

    def transfer(
        self, src: KP, drv: KP, init: KP, mode: str = "relative", adapt_scale: bool = False, magnify: float = 1.0
    ) -> KP:
        """Driving keypoints for the source (`mefacial.motion.normalize_kp`)."""
        if mode not in MODE_FLAGS:
            raise InputError(f"unknown FOMM motion mode {mode!r}; choose one of {self.MOTION_MODES}")
        kp = motion.normalize_kp(src, drv, init, adapt_movement_scale=adapt_scale, magnify=magnify, **MODE_FLAGS[mode])
        return {k: kp[k] for k in ("value", "jacobian") if k in kp}

    def generate(self, source: torch.Tensor, cache: dict[str, torch.Tensor], src_kp: KP, new_kp: KP) -> dict:
        """Frames for a batch of B driving keypoints: prediction B x 3 x H x W, deformation, deformed, occlusion_map."""
        out = self.generator.decode(source, cache, new_kp, src_kp)
        return {k: out[k] for k in ("prediction", "deformation", "deformed", "occlusion_map") if k in out}


SPEC = register_backbone(BackboneSpec(
    name="fomm",
    label="FOMM",
    title="First Order Motion Model (FOMM)",
    builder=lambda config, for_training=False: FOMM(config, with_discriminator=for_training),
    clip=MotionTransferClip,
    motion_modes={"relative": "relative", "absolute": "absolute"},
    points="au_points",
    adapt_scale_default=False,  # the original demo adapts the movement scale only when asked
    checkpoint_parts=("generator", "kp_detector", "discriminator"),
    inference_parts=("generator", "kp_detector"),
    num_points=lambda config: int(config.model_params["common_params"]["num_kp"]),
    points_name="keypoints",
    variants=(
        VariantDecl("fomm-none", "fomm-vox256", "FOMM"),
        VariantDecl("fomm-ewp", "fomm-ewp", "FOMM + EWP"),
        VariantDecl("fomm-awp", "fomm-awp", "FOMM + AWP"),
        VariantDecl("fomm-ewp-mm21", "fomm-ewp-mm21", "FOMM + EWP (ACM MM 2021)", prior_option="ewp-mm21",
                    prior_label="EWP (ACM MM 2021)"),
    ),
))

"""MRAA: motion representations for articulated animation (Siarohin et al., CVPR 2021),
with and without the facial priors of FPB-FOMM (Zhang et al., TIP 2024).

Sub-modules and parameter names follow snap-research/articulated-animation
(`modules/*.py`) and FPB-FOMM `MRAA_with_AWP`, so their `{part: state_dict}`
checkpoints load strictly:

* `region_predictor`: frame -> regions: `shift` (centre, (x, y) in [-1, 1]),
  `covar` (2 x 2 second moment), `affine` (its square root from the SVD, or a
  regressed 2 x 2 matrix) and `heatmap`. With a prior (AWP, EWP) the regions are
  the AU points: shift = AU point, heatmap = per-AU map, covariance of the map
  around the point. The original still runs its hourglass on the frame and the
  fused prior map and throws the result away when the affine comes from the
  SVD; here the hourglass runs only where its output is used (regressed affine).
  AWP fuses the per-AU maps with two learned convs (`region1`, `region2`); EWP,
  which has no original MRAA code, puts the equal-weighted map in their place.
* `bg_predictor`: (source, driving) -> 3 x 3 background motion.
* `generator`: pixelwise flow from region pairs, then an encoder-decoder that
  warps the source features (with skips); the source encoding is computed once
  per clip and shared by a batch of driving frames.
* `avd_network`: animation via disentanglement (identity of the source, pose of
  the driving frame).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import motion
from .. import prior as prior_lib
from ..config import ModelConfig
from ..errors import ConfigError, InputError
from . import BackboneSpec, MotionTransferClip, VariantDecl, register_backbone
from .blocks import (
    AntiAliasInterpolation2d,
    DownBlock2d,
    Encoder,
    Hourglass,
    ResBlock2d,
    SameBlock2d,
    UpBlock2d,
    make_coordinate_grid,
)

Regions = dict[str, torch.Tensor]


# ---- geometry helpers ---------------------------------------------------------------------

def full_precision(device: torch.device):
    """Region geometry (moments, SVD, inverses, coordinate maps) runs in float32, also under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast) -> float32; float32 and float64 (the training reference checks) unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _float(regions: Regions) -> Regions:
    return {k: _full(v) for k, v in regions.items()}


def _weighted_moments(heatmap: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and second moment of B x K x h x w weights over the [-1, 1] grid.

    The mean is the weighted grid position unless `shift` (B x K x 2) is given;
    the second moment is taken around that centre. Same arithmetic order as
    the original `region2affine`, so the SVD below sees the same matrices.
    """
    grid = make_coordinate_grid(heatmap.shape[2:], heatmap.dtype, heatmap.device)[None, None]  # 1 x 1 x h x w x 2
    weights = heatmap.unsqueeze(-1)  # B x K x h x w x 1
    if shift is None:
        shift = (weights * grid).sum(dim=(2, 3))  # B x K x 2
    centred = grid - shift[:, :, None, None, :]  # B x K x h x w x 2
    outer = centred.unsqueeze(-1) @ centred.unsqueeze(-2)  # B x K x h x w x 2 x 2
    covar = (outer * weights.unsqueeze(-1)).sum(dim=(2, 3))  # B x K x 2 x 2
    return shift, covar


def covar_sqrt(covar: torch.Tensor) -> torch.Tensor:
    """U sqrt(S) of the SVD of ... x 2 x 2 covariances (the region's affine).

    Computed with LAPACK on the CPU as the original does (`torch.svd(covar.cpu())`):
    the signs of the singular vectors are part of what the published models
    learned, and GPU solvers may pick others.
    """
    u, s, _ = torch.linalg.svd(_full(covar).cpu(), full_matrices=False)
    u, s = u.to(covar.device), s.to(covar.device)
    return u @ torch.diag_embed(s**0.5)  # ... x 2 x 2


def region_gaussians(shift: torch.Tensor, covar: torch.Tensor | float, spatial_size: tuple[int, int]) -> torch.Tensor:
    """Gaussian-like maps of regions: shift B x K x 2, covar B x K x 2 x 2 (or a variance) -> B x K x h x w."""
    grid = make_coordinate_grid(spatial_size, shift.dtype, shift.device)[None, None]  # 1 x 1 x h x w x 2
    centred = grid - shift[:, :, None, None, :]  # B x K x h x w x 2
    if isinstance(covar, float):
        return torch.exp(-0.5 * (centred**2).sum(-1) / covar)
    inverse = torch.inverse(covar)[:, :, None, None]  # B x K x 1 x 1 x 2 x 2
    quadratic = (centred.unsqueeze(-2) @ inverse) @ centred.unsqueeze(-1)  # B x K x h x w x 1 x 1
    return torch.exp(-0.5 * quadratic.sum(dim=(-1, -2)))


def shared_grid_sample(inp: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """`grid_sample` of S inputs by B sampling grids, B a multiple of S; grid B x N x h x w x 2 -> B x N x C x h x w.

    Grid b samples input b // (B / S). A batch-1 source is expanded (a view, never copied) to the B * N grids.
    """
    s, c = inp.shape[:2]
    b, n, h, w, _ = grid.shape
    if b % s:
        raise ValueError(f"{b} sampling grids cannot share {s} inputs")
    shared = inp[:, None].expand(s, (b // s) * n, *inp.shape[1:]).reshape(b * n, *inp.shape[1:])  # B*N x C x H x W
    out = F.grid_sample(shared, grid.reshape(b * n, h, w, 2), align_corners=align_corners)  # B*N x C x h x w
    return out.view(b, n, c, h, w)


def _build(cls: type, params: dict[str, Any], where: str, **fixed: Any) -> nn.Module:
    """Instantiate `cls(**fixed, **params)`, turning unknown or missing keys into a ConfigError."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"model_params.{where}: unknown key(s) {unknown}; accepted: {sorted(accepted - set(fixed))}")
    try:
        return cls(**fixed, **params)
    except TypeError as exc:
        raise ConfigError(f"model_params.{where}: {exc}") from None


# ---- region predictor ---------------------------------------------------------------------

class RegionPredictor(nn.Module):
    """Frame -> region parameters (`shift`, `covar`, `affine`, `heatmap`; `prior` with a prior).

    Without a prior, regions are softmax heatmaps of an hourglass; their mean is
    the shift and their covariance gives the affine (PCA, `pca_based`) unless a
    `jacobian` head regresses it. With a prior (`awp`, `ewp`) regions are the
    AU points and their per-AU maps; the hourglass (input: frame + fused prior
    map) is needed only by the regression head.
    """

    def __init__(self, block_expansion: int, num_regions: int, num_channels: int, max_features: int,
                 num_blocks: int, temperature: float, estimate_affine: bool = False, scale_factor: float = 1,
                 pca_based: bool = False, fast_svd: bool = False, pad: int = 3, prior: str = "none",
                 image_size: int = 256, prior_sigma: float = 0.75, prior_distance: str = "l2"):
        super().__init__()
        # fast_svd selected torch_batch_svd on the GPU in the original; the SVD here always runs on the CPU.
        self.prior = prior
        in_features = num_channels + (prior != "none")
        self.predictor = Hourglass(block_expansion, in_features=in_features, max_features=max_features,
                                   num_blocks=num_blocks)
        # Kept for checkpoint compatibility; with a prior the heatmaps come from the AU points instead.
        self.regions = nn.Conv2d(self.predictor.out_filters, num_regions, kernel_size=(7, 7), padding=pad)
        if prior == "awp":
            if num_regions != prior_lib.NUM_AU_POINTS:
                raise ConfigError(f"an AWP region predictor needs num_regions = {prior_lib.NUM_AU_POINTS} (one per AU point), got {num_regions}")
            # Learned fusion of the per-AU maps (TIP 2024 AWP): K -> K/2 -> 1 channels, no activation.
            self.region1 = nn.Conv2d(num_regions, num_regions // 2, kernel_size=(3, 3), padding=(1, 1))
            self.region2 = nn.Conv2d(num_regions // 2, 1, kernel_size=(3, 3), padding=(1, 1))
        elif prior == "ewp" and num_regions != prior_lib.NUM_AU_POINTS:
            raise ConfigError(f"an EWP region predictor needs num_regions = {prior_lib.NUM_AU_POINTS}, got {num_regions}")
        if estimate_affine and not pca_based:
            self.jacobian = nn.Conv2d(self.predictor.out_filters, 4, kernel_size=(7, 7), padding=pad)
            self.jacobian.weight.data.zero_()
            self.jacobian.bias.data.copy_(torch.tensor([1, 0, 0, 1], dtype=torch.float))
        else:
            self.jacobian = None
        self.temperature = temperature
        self.scale_factor = scale_factor
        self.pca_based = pca_based
        self.image_size = image_size
        self.prior_sigma = prior_sigma
        self.prior_distance = prior_distance
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor, strided=True)

    def fused_prior(self, per_au: torch.Tensor) -> torch.Tensor:
        """B x K x h x w per-AU maps -> B x 1 x h x w prior map (learned AWP fusion, or EWP)."""
        if self.prior == "awp":
            return self.region2(self.region1(per_au))
        return prior_lib.equal_weighted(per_au)

    def forward(self, frames: torch.Tensor, au_points: torch.Tensor | None = None) -> Regions:
        """frames B x C x H x W in [0, 1]; au_points B x 18 x 2 pixels (prior variants) -> region params."""
        size = frames.shape[2:]
        x = self.down(frames) if self.scale_factor != 1 else frames  # B x C x h x w
        if self.prior == "none":
            feature_map = self.predictor(x)
            logits = _full(self.regions(feature_map))  # B x K x h x w
            heatmap = F.softmax(logits.flatten(2) / self.temperature, dim=2).view_as(logits)
            with full_precision(x.device):
                shift, covar = _weighted_moments(heatmap)
            params = {"shift": shift, "covar": covar, "heatmap": heatmap}
        else:
            if au_points is None:
                raise InputError("this model has a facial prior: pass the 18 AU points of every frame (B x 18 x 2 pixels)")
            heatmap = prior_lib.per_au_maps(au_points, image_size=size[0], map_size=x.shape[2],
                                            sigma=self.prior_sigma, distance=self.prior_distance,
                                            dtype=torch.float64 if self.regions.weight.dtype == torch.float64
                                            else torch.float32)  # B x K x h x w
            points = au_points.double() if au_points.dtype == torch.float64 else au_points.float()
            frame_wh = torch.tensor([size[1], size[0]], dtype=points.dtype, device=au_points.device)
            shift = points * 2 / frame_wh - 1  # B x K x 2, the original's `kp * 2 / 256 - 1`
            with full_precision(x.device):
                _, covar = _weighted_moments(heatmap, shift)
            fused = self.fused_prior(heatmap.to(x.dtype))  # B x 1 x h x w
            params = {"shift": shift, "covar": covar, "heatmap": heatmap, "prior": fused}
            feature_map = self.predictor(torch.cat([x, fused.to(x.dtype)], dim=1)) if self.jacobian is not None else None

        if self.jacobian is not None:
            jacobian_map = _full(self.jacobian(feature_map))  # B x 4 x h x w
            weighted = heatmap.unsqueeze(2) * jacobian_map.unsqueeze(1)  # B x K x 4 x h x w
            affine = weighted.flatten(3).sum(dim=-1).view(*heatmap.shape[:2], 2, 2)  # B x K x 2 x 2
            params["affine"] = affine
            with full_precision(x.device):
                params["covar"] = affine @ affine.transpose(-1, -2)
        elif self.pca_based:
            with full_precision(x.device):
                params["affine"] = covar_sqrt(params["covar"])
        return params


# ---- background motion ----------------------------------------------------------------------

class BGMotionPredictor(nn.Module):
    """(source, driving) -> B x 3 x 3 background transform: identity, shift, affine or perspective."""

    BG_TYPES = ("zero", "shift", "affine", "perspective")
    _OUTPUTS = {"shift": 2, "affine": 6, "perspective": 8}

    def __init__(self, block_expansion: int, num_channels: int, max_features: int, num_blocks: int,
                 bg_type: str = "zero"):
        super().__init__()
        if bg_type not in self.BG_TYPES:
            raise ConfigError(f"bg_predictor_params.bg_type must be one of {self.BG_TYPES}, got {bg_type!r}")
        self.bg_type = bg_type
        if bg_type != "zero":
            self.encoder = Encoder(block_expansion, in_features=num_channels * 2, max_features=max_features,
                                   num_blocks=num_blocks)
            in_features = min(max_features, block_expansion * (2**num_blocks))
            self.fc = nn.Linear(in_features, self._OUTPUTS[bg_type])
            identity = {"shift": [0, 0], "affine": [1, 0, 0, 0, 1, 0], "perspective": [1, 0, 0, 0, 1, 0, 0, 0]}
            self.fc.weight.data.zero_()
            self.fc.bias.data.copy_(torch.tensor(identity[bg_type], dtype=torch.float))

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        """source 1 or B x C x H x W, driving B x C x H x W -> B x 3 x 3."""
        bs = driving.shape[0]
        out = torch.eye(3, dtype=driving.dtype, device=driving.device).repeat(bs, 1, 1)  # B x 3 x 3
        if self.bg_type == "zero":
            return out
        pair = torch.cat([source.expand(bs, -1, -1, -1), driving], dim=1)  # B x 2C x H x W
        prediction = self.fc(self.encoder(pair)[-1].mean(dim=(2, 3)))  # B x n
        if self.bg_type == "shift":
            out[:, :2, 2] = prediction
        else:
            out[:, :2, :] = prediction[:, :6].view(bs, 2, 3)
            if self.bg_type == "perspective":
                out[:, 2, :2] = prediction[:, 6:]
        return out


# ---- dense motion -----------------------------------------------------------------------------

class PixelwiseFlowPredictor(nn.Module):
    """Region pairs -> dense backward flow (B x h x w x 2) and occlusion map, at `scale_factor` of the frame.

    One candidate motion per region (its affine map) plus the background; an
    hourglass on the region heatmap differences and the source warped by each
    candidate predicts soft masks that combine them.
    """

    def __init__(self, block_expansion: int, num_blocks: int, max_features: int, num_regions: int,
                 num_channels: int, estimate_occlusion_map: bool = False, scale_factor: float = 1,
                 region_var: float = 0.01, use_covar_heatmap: bool = False, use_deformed_source: bool = True,
                 revert_axis_swap: bool = False, align_corners: bool = False):
        super().__init__()
        self.hourglass = Hourglass(block_expansion=block_expansion,
                                   in_features=(num_regions + 1) * (num_channels * use_deformed_source + 1),
                                   max_features=max_features, num_blocks=num_blocks)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_regions + 1, kernel_size=(7, 7), padding=(3, 3))
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=(7, 7), padding=(3, 3))
                          if estimate_occlusion_map else None)
        self.num_regions = num_regions
        self.scale_factor = scale_factor
        self.region_var = float(region_var)
        self.use_covar_heatmap = use_covar_heatmap
        self.use_deformed_source = use_deformed_source
        self.revert_axis_swap = revert_axis_swap
        self.align_corners = align_corners
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor, strided=True)

    def downsample(self, source: torch.Tensor) -> torch.Tensor:
        """The source at the flow resolution (cached once per clip)."""
        return self.down(source) if self.scale_factor != 1 else source

    def heatmap_representation(self, spatial_size: tuple[int, int], source: Regions, driving: Regions) -> torch.Tensor:
        """Eq. 6 of the paper: driving minus source region Gaussians, background first: B x K+1 x 1 x h x w."""
        cov_drv = driving["covar"] if self.use_covar_heatmap else self.region_var
        cov_src = source["covar"] if self.use_covar_heatmap else self.region_var
        heatmap = region_gaussians(driving["shift"], cov_drv, spatial_size) - region_gaussians(source["shift"], cov_src, spatial_size)
        background = heatmap.new_zeros(heatmap.shape[0], 1, *spatial_size)
        return torch.cat([background, heatmap], dim=1).unsqueeze(2)

    def sparse_motions(self, spatial_size: tuple[int, int], source: Regions, driving: Regions,
                       bg_params: torch.Tensor | None = None) -> torch.Tensor:
        """Where each driving pixel comes from under each region's motion: B x K+1 x h x w x 2 (background first)."""
        h, w = spatial_size
        bs = driving["shift"].shape[0]
        identity = make_coordinate_grid((h, w), driving["shift"].dtype, driving["shift"].device)[None, None]  # 1 x 1 x h x w x 2
        coords = identity - driving["shift"][:, :, None, None, :]  # B x K x h x w x 2
        if "affine" in driving:
            affine = source["affine"] @ torch.inverse(driving["affine"])  # B x K x 2 x 2
            if self.revert_axis_swap:
                affine = affine * torch.sign(affine[:, :, 0:1, 0:1])
            coords = (affine[:, :, None, None] @ coords.unsqueeze(-1)).squeeze(-1)
        to_source = coords + source["shift"][:, :, None, None, :]  # B x K x h x w x 2
        background = identity.expand(bs, 1, h, w, 2)
        if bg_params is not None:
            homogeneous = torch.cat([background, torch.ones_like(background[..., :1])], dim=-1)  # B x 1 x h x w x 3
            moved = (bg_params.view(bs, 1, 1, 1, 3, 3) @ homogeneous.unsqueeze(-1)).squeeze(-1)
            background = moved[..., :2] / moved[..., 2:3]
        return torch.cat([background, to_source], dim=1)

    def forward(self, source_down: torch.Tensor, source: Regions, driving: Regions,
                bg_params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """source_down 1 or B x C x h x w; region params of B frames -> optical_flow, occlusion_map."""
        h, w = source_down.shape[2:]
        bs = driving["shift"].shape[0]
        with full_precision(source_down.device):
            source, driving = _float(source), _float(driving)
            bg_params = None if bg_params is None else _full(bg_params)
            heatmap = self.heatmap_representation((h, w), source, driving)  # B x K+1 x 1 x h x w
            sparse = self.sparse_motions((h, w), source, driving, bg_params)  # B x K+1 x h x w x 2
            if self.use_deformed_source:
                deformed = shared_grid_sample(_full(source_down), sparse, self.align_corners)  # B x K+1 x C x h x w
                predictor_input = torch.cat([heatmap, deformed], dim=2)
            else:
                predictor_input = heatmap
        prediction = self.hourglass(predictor_input.view(bs, -1, h, w))
        mask = F.softmax(_full(self.mask(prediction)), dim=1)  # B x K+1 x h x w
        flow = (sparse * mask.unsqueeze(-1)).sum(dim=1)  # B x h x w x 2
        out = {"optical_flow": flow}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(_full(self.occlusion(prediction)))  # B x 1 x h x w
        return out


# ---- generator ----------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceEncoding:
    """What the generator needs of the source, computed once per clip (batch 1 or B)."""

    image: torch.Tensor  # S x C x H x W
    features: list[torch.Tensor]  # encoder outputs, full resolution first
    image_down: torch.Tensor  # S x C x h x w, the flow predictor's input


class Generator(nn.Module):
    """Warp the encoded source by the dense motion of region pairs and decode (Johnson-style, optional skips)."""

    def __init__(self, num_channels: int, num_regions: int, block_expansion: int, max_features: int,
                 num_down_blocks: int, num_bottleneck_blocks: int, pixelwise_flow_predictor_params: dict | None = None,
                 skips: bool = False, revert_axis_swap: bool = True, align_corners: bool = False):
        super().__init__()
        if pixelwise_flow_predictor_params is None:
            raise ConfigError("model_params.generator_params.pixelwise_flow_predictor_params is required")
        self.pixelwise_flow_predictor = _build(
            PixelwiseFlowPredictor, pixelwise_flow_predictor_params, "generator_params.pixelwise_flow_predictor_params",
            num_regions=num_regions, num_channels=num_channels, revert_axis_swap=revert_axis_swap,
            align_corners=align_corners)
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        widths = [min(max_features, block_expansion * (2**i)) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(
            DownBlock2d(widths[i], widths[i + 1], kernel_size=(3, 3), padding=(1, 1)) for i in range(num_down_blocks))
        self.up_blocks = nn.ModuleList(
            UpBlock2d(widths[i + 1], widths[i], kernel_size=(3, 3), padding=(1, 1)) for i in reversed(range(num_down_blocks)))
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(widths[-1], kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))
        self.num_channels = num_channels
        self.skips = skips
        self.align_corners = align_corners

    def encode(self, source: torch.Tensor) -> SourceEncoding:
        """Source features at every encoder level (the skips) and the flow predictor's downsampled source."""
        features = [self.first(source)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return SourceEncoding(source, features, self.pixelwise_flow_predictor.downsample(source))

    def deform(self, inp: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Warp S x C x H x W (shared by B / S flows) by B x h x w x 2 flows (resized to H x W) -> B x C x H x W."""
        size = inp.shape[2:]
        if flow.shape[1:3] != size:
            flow = F.interpolate(flow.permute(0, 3, 1, 2), size=size, mode="bilinear").permute(0, 2, 3, 1)
        return shared_grid_sample(inp, flow.unsqueeze(1), self.align_corners)[:, 0]

    def _blend(self, skip: torch.Tensor, previous: torch.Tensor | None, flow: torch.Tensor,
               occlusion: torch.Tensor | None, warped: torch.Tensor | None = None) -> torch.Tensor:
        """Warped skip where visible, `previous` (decoder output) where occluded."""
        warped = self.deform(skip, flow) if warped is None else warped
        if occlusion is None:
            return warped
        if occlusion.shape[2:] != warped.shape[2:]:
            occlusion = F.interpolate(occlusion, size=warped.shape[2:], mode="bilinear")
        if previous is None:
            return warped * occlusion
        # = warped * occlusion + previous * (1 - occlusion) in one pass (it differs by float rounding); lerp
        # wants one dtype where autocast mixes them
        dtype = torch.promote_types(torch.promote_types(previous.dtype, warped.dtype), occlusion.dtype)
        return torch.lerp(previous.to(dtype), warped.to(dtype), occlusion.to(dtype))

    def decode(self, source: SourceEncoding, source_regions: Regions, driving_regions: Regions,
               bg_params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Animate the encoded source to B sets of driving regions -> prediction B x C x H x W and the motion."""
        motion_out = self.pixelwise_flow_predictor(source.image_down, source_regions, driving_regions, bg_params)
        flow, occlusion = motion_out["optical_flow"], motion_out.get("occlusion_map")
        deformed = self.deform(source.image, flow)  # B x C x H x W
        features = source.features
        out = self._blend(features[-1], None, flow, occlusion)
        out = self.bottleneck(out)
        for i, up_block in enumerate(self.up_blocks):
            if self.skips:
                out = self._blend(features[-(i + 1)], out, flow, occlusion)
            out = up_block(out)
        if self.skips:
            out = self._blend(features[0], out, flow, occlusion)
        out = torch.sigmoid(self.final(out))
        if self.skips:
            out = self._blend(source.image, out, flow, occlusion, warped=deformed)
        result = {"prediction": out, "deformed": deformed, "deformation": flow}
        if occlusion is not None:
            result["occlusion_map"] = occlusion
        return result

    def forward(self, source_image: torch.Tensor, driving_region_params: Regions, source_region_params: Regions,
                bg_params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The original call: encode and decode in one go."""
        return self.decode(self.encode(source_image), source_region_params, driving_region_params, bg_params)


# ---- animation via disentanglement ------------------------------------------------------------

def _mlp(sizes: list[int], inplace: bool) -> nn.Sequential:
    """Linear-BN-ReLU stages, a plain Linear last (indices match the original Sequential)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=inplace)]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class AVDNetwork(nn.Module):
    """Regions of the pose frame re-expressed in the shape of the identity frame (MRAA Sec. 3.4)."""

    def __init__(self, num_regions: int, id_bottle_size: int = 64, pose_bottle_size: int = 64,
                 revert_axis_swap: bool = True):
        super().__init__()
        input_size = (2 + 4) * num_regions
        self.num_regions = num_regions
        self.revert_axis_swap = revert_axis_swap
        self.id_encoder = _mlp([input_size, 256, 512, 1024, id_bottle_size], inplace=True)
        self.pose_encoder = _mlp([input_size, 256, 512, 1024, pose_bottle_size], inplace=True)
        self.decoder = _mlp([pose_bottle_size + id_bottle_size, 1024, 512, 256, input_size], inplace=False)

    @staticmethod
    def _embed(regions: Regions) -> torch.Tensor:
        """shift B x K x 2 and affine B x K x 2 x 2 -> B x 6K."""
        shift, affine = regions["shift"], regions["affine"]
        return torch.cat([shift, affine.flatten(2)], dim=-1).flatten(1)

    def forward(self, x_id: Regions, x_pose: Regions) -> Regions:
        """Identity regions (1 or B frames) and pose regions (B frames) -> shift, affine, covar of B frames."""
        bs = x_pose["shift"].shape[0]
        device = x_pose["shift"].device
        id_shift, id_affine = x_id["shift"].expand(bs, -1, -1), x_id["affine"].expand(bs, -1, -1, -1)
        if self.revert_axis_swap:
            with full_precision(device):
                sign = torch.sign((_full(id_affine) @ torch.inverse(_full(x_pose["affine"])))[:, :, 0:1, 0:1])
            id_affine = id_affine * sign
        pose_emb = self.pose_encoder(self._embed(x_pose))
        id_emb = self.id_encoder(self._embed({"shift": id_shift, "affine": id_affine}))
        rec = _full(self.decoder(torch.cat([pose_emb, id_emb], dim=1))).view(bs, self.num_regions, 6)
        affine = rec[:, :, 2:].reshape(bs, self.num_regions, 2, 2)
        with full_precision(device):
            covar = affine @ affine.transpose(-1, -2)
        return {"shift": rec[:, :, :2], "affine": affine, "covar": covar}


# ---- the backbone ---------------------------------------------------------------------------------

class MRAA(nn.Module):
    """MRAA backbone (with an optional facial prior) implementing the protocol of `mefacial.models`."""

    MOTION_MODES = ("standard", "relative", "avd")

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.backbone != "mraa":
            raise ConfigError(f"config {config.name!r} is for the {config.backbone!r} backbone, not mraa")
        self.config = config
        params = dict(config.model_params)
        try:
            num_regions, num_channels = int(params["num_regions"]), int(params["num_channels"])
            region_params, generator_params = params["region_predictor_params"], params["generator_params"]
            bg_params, avd_params = params["bg_predictor_params"], params["avd_network_params"]
        except KeyError as exc:
            raise ConfigError(f"config {config.name!r}: model_params lacks {exc.args[0]!r}") from None
        align = bool(config.grid_sample_align_corners)
        self.region_predictor = _build(
            RegionPredictor, region_params, "region_predictor_params", num_regions=num_regions,
            num_channels=num_channels, estimate_affine=bool(params.get("estimate_affine", False)),
            prior=config.prior, image_size=config.image_size, prior_sigma=config.prior_sigma,
            prior_distance=config.prior_distance)
        self.bg_predictor = _build(BGMotionPredictor, bg_params, "bg_predictor_params", num_channels=num_channels)
        self.generator = _build(Generator, generator_params, "generator_params", num_regions=num_regions,
                                num_channels=num_channels, revert_axis_swap=bool(params.get("revert_axis_swap", False)),
                                align_corners=align)
        self.avd_network = _build(AVDNetwork, avd_params, "avd_network_params", num_regions=num_regions)

    def detect(self, frames: torch.Tensor, au_points: torch.Tensor | None = None) -> Regions:
        """Region params of B frames (B x 3 x H x W): shift, affine, covar, heatmap (and prior)."""
        return self.region_predictor(frames, au_points)

    def prior_maps(self, au_points: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prior maps this model computes from B x 18 x 2 AU points (pixels): {"prior": B x 1 x h x w (AWP's
        learned fusion, or EWP), "per_au": B x 18 x h x w} at the region predictor's resolution; {} without a prior."""
        if self.config.prior == "none":
            return {}
        predictor, size = self.region_predictor, self.config.image_size
        per_au = prior_lib.per_au_maps(au_points, size, round(size * predictor.scale_factor), predictor.prior_sigma,
                                       predictor.prior_distance)  # B x 18 x h x w
        return {"prior": predictor.fused_prior(per_au), "per_au": per_au}

    def dead_computation(self, frames: torch.Tensor, regions: Regions) -> None:
        """What the original MRAA-with-prior region predictor computes and discards (its hourglass on the
        downscaled frame and the fused prior map, used only by a regression head these configs lack); run only
        by the original per-frame loop of `python -m mefacial bench`."""
        predictor = self.region_predictor
        if predictor.prior == "none" or predictor.jacobian is not None:
            return
        small = predictor.down(frames) if predictor.scale_factor != 1 else frames
        predictor.predictor(torch.cat([small, regions["prior"].to(small.dtype)], dim=1))

    def encode_source(self, source: torch.Tensor) -> SourceEncoding:
        """Encoder features (with skips) of the source, once per clip."""
        return self.generator.encode(source)

    def transfer(self, src: Regions, drv: Regions, init: Regions, mode: str = "relative",
                 adapt_scale: bool = False, magnify: float = 1.0) -> Regions:
        """Region params to animate the source with (see `mefacial.motion.transfer_regions`)."""
        if mode not in self.MOTION_MODES:
            raise InputError(f"motion mode {mode!r} is not one of MRAA's {self.MOTION_MODES}")
        with full_precision(drv["shift"].device):
            return motion.transfer_regions(src, drv, init, mode, adapt_scale=adapt_scale, magnify=magnify,
                                           avd_network=self.avd_network)

    def background_motion(self, source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        """3 x 3 background transform from the source (1 or B frames) to each of B driving frames."""
        return self.bg_predictor(source, driving)

    def generate(self, source: torch.Tensor, cache: SourceEncoding | None, src_regions: Regions,
                 new_regions: Regions, bg_params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Animate the source to B region sets: prediction, deformed, occlusion_map, deformation."""
        cache = self.encode_source(source) if cache is None else cache
        return self.generator.decode(cache, src_regions, new_regions, bg_params)


SPEC = register_backbone(BackboneSpec(
    name="mraa",
    label="MRAA",
    title="Motion Representations for Articulated Animation (MRAA)",
    builder=lambda config, for_training=False: MRAA(config),
    clip=MotionTransferClip,
    motion_modes={"relative": "relative", "standard": "standard (MRAA's absolute)", "avd": "AVD"},
    points="au_points",
    adapt_scale_default=True,  # the original demo always adapts the movement scale
    checkpoint_parts=("generator", "region_predictor", "bg_predictor", "avd_network"),
    inference_parts=("generator", "region_predictor", "bg_predictor", "avd_network"),
    num_points=lambda config: int(config.model_params["num_regions"]),
    points_name="regions",
    variants=(
        VariantDecl("mraa-none", "mraa-vox256", "MRAA"),
        VariantDecl("mraa-ewp", "mraa-ewp", "MRAA + EWP"),
        VariantDecl("mraa-awp", "mraa-awp", "MRAA + AWP"),
    ),
))

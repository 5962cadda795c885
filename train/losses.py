"""The losses of FOMM (NeurIPS 2019) and MRAA (CVPR 2021), shared by their prior variants.

* Multi-scale perceptual loss: L1 between VGG19 features (5 slices) of the
  prediction and the driving frame at each scale of an image pyramid
  (`ImagePyramid`, `VGG19Features`, `perceptual_loss`). VGG19 weights are
  torchvision's ImageNet ones from the torch hub cache, or a local file
  (`load_vgg19`, `train.vgg19_weights`).
* Equivariance (`RandomTPS`, `equivariance_*`): the driving frame warped by a
  random affine + thin-plate-spline transform must give keypoints / regions
  that map back onto the driving frame's (values / shifts) and whose
  jacobians / affines compose to the identity.
* LSGAN with feature matching (FOMM): `generator_gan_loss`,
  `feature_matching_loss`, `discriminator_gan_loss`.
* `pyramid_l1_loss`: pixel L1 over the pyramid (not in the papers; the tiny
  test configs train with it instead of VGG).

Keypoints and region shifts are (x, y) in [-1, 1].
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mefacial.errors import WeightsNotFoundError
from mefacial.models.blocks import AntiAliasInterpolation2d, make_coordinate_grid

log = logging.getLogger("train")

VGG_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 30.0


# ---- image pyramid and VGG19 -------------------------------------------------------------------


class ImagePyramid(nn.Module):
    """Anti-aliased downscales of a batch: {scale: B x C x H*s x W*s} for each scale (1 = the input)."""

    def __init__(self, scales: Iterable[float], num_channels: int = 3):
        super().__init__()
        self.scales = tuple(dict.fromkeys(float(s) for s in scales))
        self.downs = nn.ModuleList(AntiAliasInterpolation2d(num_channels, s) for s in self.scales)

    def forward(self, x: torch.Tensor) -> dict[float, torch.Tensor]:
        return {scale: down(x) for scale, down in zip(self.scales, self.downs)}


class VGG19Features(nn.Module):
    """The five ReLU feature maps of VGG19 used by the perceptual loss (frozen, ImageNet-normalised input)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in VGG_SLICES)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":
        return super().train(False)  # always in eval mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        for block in self.slices:
            h = block(h)
            out.append(h)
        return out


def vgg19_weights_url() -> str:
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1.url


def vgg19_weights_path() -> Path:
    """Where torchvision keeps the VGG19 ImageNet weights: $TORCH_HOME/hub/checkpoints/vgg19-<hash>.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(vgg19_weights_url())


def _offline() -> bool:
    from mefacial.checkpoints import hub_offline

    return os.environ.get("MEFACIAL_OFFLINE", "").strip() in {"1", "true", "TRUE", "yes"} or hub_offline()


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def ensure_vgg19_weights(download: bool = True) -> Path:
    """The VGG19 weight file, downloaded once into the torch hub cache if absent; a clear error when it cannot be."""
    path = vgg19_weights_path()
    if path.is_file():
        return path
    url = vgg19_weights_url()
    reason = "downloads are disabled (MEFACIAL_OFFLINE / HF_HUB_OFFLINE)" if _offline() or not download else ""
    if not reason:
        path.parent.mkdir(parents=True, exist_ok=True)
        stem = path.name.split(".")[0]
        hash_prefix = stem.split("-")[-1] if "-" in stem else None
        log.info("perceptual loss: downloading VGG19 ImageNet weights %s -> %s", url, path)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
        except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "no usable file"
            reason = f"the download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            with contextlib.suppress(OSError):
                path.unlink()
    if path.is_file():
        return path
    raise WeightsNotFoundError(
        f"the perceptual loss needs torchvision's VGG19 ImageNet weights, which are not at {path}, and {reason}. "
        f"On a machine with internet download {url} (or run `python -c \"import torchvision; "
        "torchvision.models.vgg19(weights='IMAGENET1K_V1')\"`) and copy the file to that path "
        "(the folder follows $TORCH_HOME), or train with the pixel L1 in its place "
        "(`--set train.loss_weights.perceptual=0 --set train.loss_weights.reconstruction=10`).")


VGG_LAYERS_USED = VGG_SLICES[-1][1]  # features[:30]: everything up to relu5_1


def read_vgg19_features(path: str | Path) -> nn.Sequential:
    """torchvision's `vgg19().features[:30]` with the weights of a local file, in float32.

    The file holds torchvision names (`features.N.weight` / `.bias`, N < 30 all
    present; later layers are ignored): torchvision's own `.pth`, or a
    `.safetensors` file of any float dtype (e.g. an offline copy, or a test
    fixture's seeded weights).
    """
    import torchvision

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"VGG19 weight file {path} does not exist (train.vgg19_weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated / foreign file: say which and why
        raise WeightsNotFoundError(f"cannot read VGG19 weights from {path} ({type(exc).__name__}: {exc})") from exc
    features = torchvision.models.vgg19().features[:VGG_LAYERS_USED]  # only the convolutions are needed
    wanted = {k[len("features."):]: v.float() for k, v in state.items()
              if k.startswith("features.") and int(k.split(".")[1]) < VGG_LAYERS_USED}
    missing = sorted(set(features.state_dict()) - set(wanted))
    if missing:
        raise WeightsNotFoundError(f"{path} is not a VGG19 weight file with torchvision names: it lacks "
                                   f"features.{missing[0]} (and {len(missing) - 1} more)")
    features.load_state_dict(wanted)
    return features


def load_vgg19(download: bool = True, path: str | Path | None = None) -> VGG19Features:
    """VGG19 feature slices: from `path` (a local weight file, see `read_vgg19_features`) when given, else
    torchvision's ImageNet weights from the torch hub cache (see `ensure_vgg19_weights`)."""
    return VGG19Features(read_vgg19_features(path if path is not None else ensure_vgg19_weights(download)))


def perceptual_loss(vgg: nn.Module, generated: dict[float, torch.Tensor], real: dict[float, torch.Tensor],
                    weights: list[float], terms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over scales and VGG slices of weight_i * mean |vgg_i(generated) - vgg_i(real)| (real detached).

    `terms`, when given, receives the unweighted means, scale by scale, slice by slice.
    """
    total = 0
    for scale, prediction in generated.items():
        batch = prediction.shape[0]
        features = vgg(torch.cat([prediction, real[scale].detach()]))  # one pass for both: 2B x ...
        for weight, feature in zip(weights, features):
            if weight or terms is not None:
                l1 = (feature[:batch] - feature[batch:].detach()).abs().mean()
                total = total + weight * l1 if weight else total
                if terms is not None:
                    terms.append(l1.detach())
    return total


def pyramid_l1_loss(generated: dict[float, torch.Tensor], real: dict[float, torch.Tensor], weight: float) -> torch.Tensor:
    """Sum over scales of weight * mean |generated - real|."""
    return sum(weight * (generated[s] - real[s].detach()).abs().mean() for s in generated)


# ---- random thin-plate-spline transform ----------------------------------------------------------


class RandomTPS:
    """A random affine + thin-plate-spline warp per batch item (FOMM's `Transform`), on explicit random numbers.

    `warp_coordinates` maps points of the transformed frame to the original
    frame; `transform_frame` samples the original there. The TPS term adds
    sum_k c_k r_k^2 log(r_k + 1e-6), with r_k the L1 distance to control point k,
    to both coordinates, as the original does.
    """

    EPS = 1e-6

    def __init__(self, batch: int, sigma_affine: float, sigma_tps: float | None = None, points_tps: int | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        noise = torch.randn(batch, 2, 3, generator=generator) * sigma_affine
        self.theta = (noise + torch.eye(2, 3)).to(device=device, dtype=dtype)  # B x 2 x 3
        self.tps = sigma_tps is not None and points_tps is not None
        if self.tps:
            points = int(points_tps)
            grid = make_coordinate_grid((points, points), torch.float32)
            self.control_points = grid.view(1, points * points, 2).to(device=device, dtype=dtype)  # 1 x P x 2
            params = torch.randn(batch, 1, points * points, generator=generator) * sigma_tps
            self.control_params = params.to(device=device, dtype=dtype)  # B x 1 x P
        self.batch = batch

    @classmethod
    def from_params(cls, theta: torch.Tensor, control_params: torch.Tensor | None = None,
                    control_points: torch.Tensor | None = None) -> "RandomTPS":
        """The warp of given parameters (e.g. an original run's draws): theta B x 2 x 3, control_params
        B x 1 x P, control_points P x 2 (default: the P = n x n grid `make_coordinate_grid((n, n))`)."""
        tps = cls.__new__(cls)
        tps.theta, tps.batch = theta, theta.shape[0]
        tps.tps = control_params is not None
        if tps.tps:
            if control_points is None:
                points = round(control_params.shape[-1] ** 0.5)
                control_points = make_coordinate_grid((points, points), theta.dtype, theta.device).view(-1, 2)
            tps.control_points = control_points.to(device=theta.device, dtype=theta.dtype).view(1, -1, 2)  # 1 x P x 2
            tps.control_params = control_params.to(device=theta.device, dtype=theta.dtype)  # B x 1 x P
        return tps

    def _radial(self, coordinates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 distances to the control points and the coordinate differences: B x N x P, B x N x P x 2."""
        diff = coordinates[:, :, None, :] - self.control_points[:, None, :, :]  # B x N x P x 2
        return diff.abs().sum(-1), diff

    def warp_coordinates(self, coordinates: torch.Tensor) -> torch.Tensor:
        """B (or 1) x N x 2 points -> B x N x 2 warped points."""
        theta = self.theta.to(coordinates.dtype)
        out = (theta[:, None, :, :2] @ coordinates.unsqueeze(-1)).squeeze(-1) + theta[:, None, :, 2]  # B x N x 2
        if self.tps:
            distance, _ = self._radial(coordinates)
            radial = distance**2 * torch.log(distance + self.EPS) * self.control_params.to(coordinates.dtype)  # B x N x P
            out = out + radial.sum(dim=2, keepdim=True)  # the same offset on x and y
        return out

    def jacobian(self, coordinates: torch.Tensor) -> torch.Tensor:
        """d warp / d point at B x N x 2 points: B x N x 2 x 2 (closed form, differentiable in the points)."""
        theta = self.theta.to(coordinates.dtype)
        jac = theta[:, None, :, :2].expand(self.batch, coordinates.shape[1], 2, 2)  # B x N x 2 x 2
        if self.tps:
            distance, diff = self._radial(coordinates)
            # d/dr [r^2 log(r + eps)] = 2 r log(r + eps) + r^2 / (r + eps); dr/dp = sign(p - c)
            dradial = 2 * distance * torch.log(distance + self.EPS) + distance**2 / (distance + self.EPS)
            weighted = (dradial * self.control_params.to(coordinates.dtype)).unsqueeze(-1)  # B x N x P x 1
            grad = (weighted * torch.sign(diff)).sum(dim=2)  # B x N x 2: d offset / d (x, y)
            jac = jac + grad.unsqueeze(-2)  # the offset is added to both rows
        return jac

    def inverse_warp(self, targets: torch.Tensor, iterations: int = 8) -> torch.Tensor:
        """Points p with warp(p) = targets (B x N x 2), by Newton's method from p = targets.

        Where a landmark of the driving frame lands in the transformed frame, so
        the prior variants get the AU points of the transformed frame without
        running a detector on it.
        """
        points = targets.clone()
        for _ in range(iterations):
            residual = self.warp_coordinates(points) - targets  # B x N x 2
            step = torch.linalg.solve(self.jacobian(points), residual.unsqueeze(-1)).squeeze(-1)
            points = points - step
        return points

    def transform_frame(self, frames: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
        """Sample B x C x H x W frames at the warped grid (reflection padding)."""
        h, w = frames.shape[2:]
        grid = make_coordinate_grid((h, w), frames.dtype, frames.device).view(1, h * w, 2)
        warped = self.warp_coordinates(grid).view(self.batch, h, w, 2)
        return F.grid_sample(frames, warped, padding_mode="reflection", align_corners=align_corners)


def equivariance_value_loss(driving: torch.Tensor, transformed: torch.Tensor, tps: RandomTPS) -> torch.Tensor:
    """mean |p_driving - warp(p_transformed)| for B x K x 2 keypoint values or region shifts."""
    return (driving - tps.warp_coordinates(transformed)).abs().mean()


def equivariance_matrix_loss(driving_matrix: torch.Tensor, transformed_value: torch.Tensor,
                             transformed_matrix: torch.Tensor, tps: RandomTPS, revert_axis_swap: bool = False) -> torch.Tensor:
    """mean |I - J_d^-1 (dwarp(p_t) J_t)| for B x K x 2 x 2 jacobians (FOMM) or affines (MRAA).

    With `revert_axis_swap` (MRAA) each product is multiplied by the sign of its
    top-left entry first, undoing SVD axis flips.
    """
    composed = tps.jacobian(transformed_value) @ transformed_matrix  # B x K x 2 x 2
    value = torch.inverse(driving_matrix) @ composed
    if revert_axis_swap:
        value = value * torch.sign(value[..., 0:1, 0:1])
    eye = torch.eye(2, dtype=value.dtype, device=value.device)
    return (eye - value).abs().mean()


# ---- LSGAN with feature matching (FOMM) -----------------------------------------------------------


def generator_gan_loss(maps_generated: dict, scales: Iterable, weight: float) -> torch.Tensor:
    """Sum over discriminator scales of weight * mean (1 - D(generated))^2."""
    return sum(weight * ((1 - maps_generated[f"prediction_map_{s}"]) ** 2).mean() for s in scales)


def feature_matching_loss(maps_real: dict, maps_generated: dict, scales: Iterable, weights: list[float],
                          terms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over scales and discriminator blocks of weight_i * mean |D_i(real) - D_i(generated)|.

    The real features are not detached, as in the original (the generator's backward also reaches the
    discriminator; the recipe throws those gradients away). `terms` receives the unweighted means.
    """
    total = 0
    for s in scales:
        pairs = zip(maps_real[f"feature_maps_{s}"], maps_generated[f"feature_maps_{s}"])
        for weight, (a, b) in zip(weights, pairs):
            if weight or terms is not None:
                l1 = (a - b).abs().mean()
                total = total + weight * l1 if weight else total
                if terms is not None:
                    terms.append(l1.detach())
    return total


def discriminator_gan_loss(maps_real: dict, maps_generated: dict, scales: Iterable, weight: float) -> torch.Tensor:
    """Sum over scales of weight * mean ((1 - D(real))^2 + D(generated)^2)."""
    return sum(weight * ((1 - maps_real[f"prediction_map_{s}"]) ** 2 + maps_generated[f"prediction_map_{s}"] ** 2).mean()
               for s in scales)

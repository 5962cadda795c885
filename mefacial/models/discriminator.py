"""FOMM's multi-scale patch discriminator (Pix2Pix-like), used for training only.

Names follow the original (`discs.<scale>.down_blocks.<i>.conv`, `.norm`,
`discs.<scale>.conv`); with `sn: true` the convolutions carry spectral norm
(`weight_orig`, `weight_u`, `weight_v`), as in the published vox-256 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import kp2gaussian


class DiscriminatorBlock(nn.Module):
    """conv (4x4, no padding) -> optional instance norm -> leaky ReLU(0.2) -> optional 2x2 average pooling."""

    def __init__(self, in_features: int, out_features: int, norm: bool = False, kernel_size: int = 4,
                 pool: bool = False, sn: bool = False):
        super().__init__()
        conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size)
        self.conv = nn.utils.spectral_norm(conv) if sn else conv
        self.norm = nn.InstanceNorm2d(out_features, affine=True) if norm else None
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.norm is not None:
            out = self.norm(out)
        out = F.leaky_relu(out, 0.2)
        return F.avg_pool2d(out, (2, 2)) if self.pool else out


class Discriminator(nn.Module):
    """One scale: returns its feature maps (for the feature-matching loss) and its patch prediction map."""

    def __init__(self, num_channels: int = 3, block_expansion: int = 64, num_blocks: int = 4, max_features: int = 512,
                 sn: bool = False, use_kp: bool = False, num_kp: int = 10, kp_variance: float = 0.01):
        super().__init__()

        def width(level: int) -> int:
            return min(max_features, block_expansion * (2**level))

        first_in = num_channels + num_kp * int(use_kp)
        self.down_blocks = nn.ModuleList(
            DiscriminatorBlock(first_in if i == 0 else width(i), width(i + 1), norm=(i != 0), kernel_size=4,
                               pool=(i != num_blocks - 1), sn=sn)
            for i in range(num_blocks)
        )
        conv = nn.Conv2d(width(num_blocks), 1, kernel_size=1)
        self.conv = nn.utils.spectral_norm(conv) if sn else conv
        self.use_kp = use_kp
        self.kp_variance = kp_variance

    def forward(self, x: torch.Tensor, kp: dict | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = x
        if self.use_kp:
            out = torch.cat([out, kp2gaussian(kp["value"], tuple(x.shape[2:]), self.kp_variance)], dim=1)
        feature_maps = []
        for down_block in self.down_blocks:
            out = down_block(out)
            feature_maps.append(out)
        return feature_maps, self.conv(out)


class MultiScaleDiscriminator(nn.Module):
    """One `Discriminator` per image scale; input `{"prediction_<scale>": B x C x H x W}` (an image pyramid)."""

    def __init__(self, scales: tuple = (), num_channels: int = 3, block_expansion: int = 64, num_blocks: int = 4,
                 max_features: int = 512, sn: bool = False, use_kp: bool = False, num_kp: int = 10,
                 kp_variance: float = 0.01):
        super().__init__()
        self.scales = tuple(scales)
        disc_params = dict(num_channels=num_channels, block_expansion=block_expansion, num_blocks=num_blocks,
                           max_features=max_features, sn=sn, use_kp=use_kp, num_kp=num_kp, kp_variance=kp_variance)
        self.discs = nn.ModuleDict({str(scale).replace(".", "-"): Discriminator(**disc_params) for scale in scales})

    def forward(self, x: dict[str, torch.Tensor], kp: dict | None = None) -> dict[str, object]:
        out = {}
        for key, disc in self.discs.items():
            scale = key.replace("-", ".")
            feature_maps, prediction_map = disc(x[f"prediction_{scale}"], kp)
            out[f"feature_maps_{scale}"] = feature_maps
            out[f"prediction_map_{scale}"] = prediction_map
        return out

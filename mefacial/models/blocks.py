"""Layers shared by the FOMM and MRAA families.

Module and attribute names follow the original code (first-order-model and
articulated-animation `modules/util.py`) so that original state dicts load
unchanged: `conv`, `norm`, `pool`, `conv1`/`norm1`, `encoder.down_blocks`,
`decoder.up_blocks`, and the anti-aliasing kernel buffer `weight`.

The originals used SynchronizedBatchNorm2d; in evaluation mode it computes
exactly what `nn.BatchNorm2d` computes, and it has the same state-dict keys.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def make_coordinate_grid(
    spatial_size: tuple[int, int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """A grid of (x, y) coordinates spanning [-1, 1] x [-1, 1]: H x W x 2 (pixel centres at the ends)."""
    h, w = spatial_size
    # Same arithmetic order as the original (2 * (i / (n - 1)) - 1) so the values are bit-identical.
    x = 2 * (torch.arange(w, dtype=dtype, device=device) / (w - 1)) - 1  # W
    y = 2 * (torch.arange(h, dtype=dtype, device=device) / (h - 1)) - 1  # H
    xx = x.view(1, w).expand(h, w)
    yy = y.view(h, 1).expand(h, w)
    return torch.stack([xx, yy], dim=-1)  # H x W x 2


def kp2gaussian(value: torch.Tensor, spatial_size: tuple[int, int], kp_variance: float) -> torch.Tensor:
    """Isotropic Gaussians at keypoints: B x K x 2 values in [-1, 1] -> B x K x H x W."""
    grid = make_coordinate_grid(spatial_size, value.dtype, value.device)  # H x W x 2
    mean_sub = grid - value[..., None, None, :]  # B x K x H x W x 2
    return torch.exp(-0.5 * (mean_sub**2).sum(-1) / kp_variance)


class ResBlock2d(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice), spatial size preserved."""

    def __init__(self, in_features: int, kernel_size: int, padding: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm2d(in_features, affine=True)
        self.norm2 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on fresh tensors (no backward needs them): at these sizes allocation costs as much as the op.
        out = self.conv1(F.relu(self.norm1(x), inplace=True))
        out = self.conv2(F.relu(self.norm2(out), inplace=True))
        # under autocast the conv's output may be narrower than the skip: then the sum keeps the wider type
        return out.add_(x) if out.dtype == x.dtype else out + x

    def fused(self) -> nn.Module:
        """Inference form: norm2 folded into conv1 (norm1 acts on the skip too, so it stays)."""
        block = copy.deepcopy(self)
        block.conv1, block.norm2 = fuse_conv_bn_eval(self.conv1, self.norm2), nn.Identity()
        return block


class UpBlock2d(nn.Module):
    """Nearest x2 upsampling, then conv-BN-ReLU."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(x, scale_factor=2)
        return F.relu(self.norm(self.conv(out)), inplace=True)

    def fused(self) -> nn.Module:
        """Inference form: BN folded into the conv, and upsampling + conv as one transposed conv where that pays."""
        if _transposed_pays(self.conv):
            return nn.Sequential(upsampled_conv_as_transposed(fuse_conv_bn_eval(self.conv, self.norm)),
                                 nn.ReLU(inplace=True))
        return _norm_folded(self)


class DownBlock2d(nn.Module):
    """conv-BN-ReLU, then 2x2 average pooling."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x)), inplace=True))

    def fused(self) -> nn.Module:
        """Inference form: BN folded into the conv."""
        return _norm_folded(self)


class SameBlock2d(nn.Module):
    """conv-BN-ReLU, spatial size preserved."""

    def __init__(self, in_features: int, out_features: int, groups: int = 1, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)), inplace=True)

    def fused(self) -> nn.Module:
        """Inference form: BN folded into the conv."""
        return _norm_folded(self)


def _hourglass_width(block_expansion: int, max_features: int, level: int) -> int:
    """Channels after `level` down blocks of an hourglass (level >= 1)."""
    return min(max_features, block_expansion * (2**level))


class Encoder(nn.Module):
    """Hourglass encoder: returns the input and the output of every down block."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        widths = [in_features] + [_hourglass_width(block_expansion, max_features, i + 1) for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(
            DownBlock2d(widths[i], widths[i + 1], kernel_size=3, padding=1) for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for down_block in self.down_blocks:
            outs.append(down_block(outs[-1]))
        return outs


class Decoder(nn.Module):
    """Hourglass decoder: upsamples and concatenates the encoder's skip connections."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        up_blocks = []
        for i in reversed(range(num_blocks)):
            # The deepest block takes the bottleneck alone; the others also take a skip of the same width.
            skip_factor = 1 if i == num_blocks - 1 else 2
            in_filters = skip_factor * _hourglass_width(block_expansion, max_features, i + 1)
            out_filters = min(max_features, block_expansion * (2**i))
            up_blocks.append(UpBlock2d(in_filters, out_filters, kernel_size=3, padding=1))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skips = list(features)
        out = skips.pop()
        for up_block in self.up_blocks:
            out = torch.cat([up_block(out), skips.pop()], dim=1)
        return out


class Hourglass(nn.Module):
    """U-Net style hourglass; output has `out_filters` = block_expansion + in_features channels."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then subsample by `scale`, for band-limited downsampling.

    The blur kernel is the buffer `weight` (channels x 1 x k x k, part of the
    state dict). FOMM subsamples with nearest `F.interpolate`; MRAA takes every
    (1/scale)-th pixel (`strided=True`). For integer 1/scale both pick the same
    pixels.
    """

    def __init__(self, channels: int, scale: float, strided: bool = False):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1
        self.ka = kernel_size // 2
        self.kb = self.ka - 1 if kernel_size % 2 == 0 else self.ka
        mean = (kernel_size - 1) / 2
        # The 2D Gaussian is the product of two 1D Gaussians, normalised to sum 1.
        ramp = torch.arange(kernel_size, dtype=torch.float32)
        g = torch.exp(-((ramp - mean) ** 2) / (2 * sigma**2)) if sigma > 0 else torch.ones(kernel_size)
        kernel = g.view(-1, 1) * g.view(1, -1)  # k x k
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1))
        self.groups = channels
        self.scale = scale
        self.strided = strided
        self.int_inv_scale = int(1 / scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight, groups=self.groups)
        if self.strided:
            return out[:, :, :: self.int_inv_scale, :: self.int_inv_scale]
        return F.interpolate(out, scale_factor=(self.scale, self.scale))


# ---- inference form ------------------------------------------------------------------------------

# Per axis, which taps of a 3x3 kernel feed each tap of the equivalent stride-2, 4-tap transposed kernel:
# output pixel 2i sees input rows i-1 (tap 0) and i (taps 1, 2); output 2i+1 sees i (taps 0, 1) and i+1 (tap 2).
_UPSAMPLED_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 4 x 3
# The transposed form reads 16/9 as many weights; with more than this many input x output channels (the
# deep, few-pixel levels of an hourglass) fetching them costs more than the 20/36 of the multiply-adds it saves
# (measured on the CPU, benchmarks/upsampled_conv.py).
TRANSPOSED_MAX_CHANNEL_PAIRS = 512 * 256


def _norm_folded(block: nn.Module) -> nn.Module:
    """A copy of a conv-BN-ReLU block with its `norm` folded into its `conv` (and replaced by identity)."""
    folded = copy.deepcopy(block)
    folded.conv, folded.norm = fuse_conv_bn_eval(block.conv, block.norm), nn.Identity()
    return folded


def _transposed_pays(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels * conv.out_channels <= TRANSPOSED_MAX_CHANNEL_PAIRS)


def upsampled_conv_as_transposed(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """`conv(F.interpolate(x, scale_factor=2))` (nearest, 3x3, padding 1) as one stride-2 transposed conv.

    The same function (up to float rounding): each pixel of the upsampled image sees only 2 x 2 distinct
    input pixels, so it costs 16/36 of the multiply-adds and never materialises the upsampled input."""
    taps = _UPSAMPLED_TAPS.to(conv.weight)
    transposed = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, kernel_size=4, stride=2, padding=1,
                                    bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # O x C x 3 x 3 -> C x O x 4 x 4 (a transposed conv's weight is in x out)
        transposed.weight.copy_(torch.einsum("tk,ul,ockl->cotu", taps, taps, conv.weight))
        if conv.bias is not None:
            transposed.bias.copy_(conv.bias)
    return transposed


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` (in evaluation mode) for inference: every block's batch norm folded into the conv
    before it, and nearest-upsample + conv blocks as transposed convs (see `UpBlock2d.fused`).

    Same function up to float32 rounding (checked against the reference fixtures), fewer passes over memory
    and fewer multiply-adds. Training and checkpoints use the unfused model: the copy has other parameter names.
    """
    if model.training:
        raise ValueError("fuse_for_inference folds running batch-norm statistics: call model.eval() first")
    if hasattr(model, "fused"):
        return model.fused()
    fused = copy.deepcopy(model)

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if hasattr(child, "fused"):
                setattr(module, name, child.fused())
            else:
                replace(child)

    replace(fused)
    return fused

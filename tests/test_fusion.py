"""The inference form of the shared blocks (`models.blocks.fuse_for_inference`): same function, other layers.

The reference fixtures check the fused FOMM and MRAA end to end (tests/test_*_reference.py, "fused"); these
tests pin the rewrites themselves, with batch-norm statistics far from the identity so that a fold that
forgot the running mean or the bias would show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mefacial.models import blocks


def _randomise_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            n = norm.num_features
            norm.running_mean.copy_(torch.randn(n, generator=generator))
            norm.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
            norm.weight.data.copy_(torch.randn(n, generator=generator))
            norm.bias.data.copy_(torch.randn(n, generator=generator))
    return module.eval()


@pytest.mark.parametrize("make", [
    lambda: blocks.SameBlock2d(5, 8, kernel_size=(7, 7), padding=(3, 3)),
    lambda: blocks.DownBlock2d(5, 8),
    lambda: blocks.UpBlock2d(5, 8),
    lambda: blocks.ResBlock2d(6, kernel_size=(3, 3), padding=(1, 1)),
    lambda: blocks.Hourglass(block_expansion=4, in_features=3, num_blocks=3, max_features=16),
], ids=["same", "down", "up", "res", "hourglass"])
def test_fused_blocks_compute_the_same_function(make):
    torch.manual_seed(0)
    module = _randomise_norms(make())
    x = torch.randn(2, next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels, 16, 16)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fused = blocks.fuse_for_inference(module)
    with torch.no_grad():
        expected, got = module(x), fused(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Only the ResBlock's pre-activation norm (it also feeds the skip) survives; the original is untouched.
    survivors = [name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(name.endswith("norm1") for name in survivors), survivors
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_upsampled_conv_is_one_transposed_conv_with_fewer_multiply_adds():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, kernel_size=3, padding=1)
    x = torch.randn(2, 6, 9, 7)  # odd sizes: every border case of both phases
    transposed = blocks.upsampled_conv_as_transposed(conv)
    with torch.no_grad():
        torch.testing.assert_close(transposed(x), conv(F.interpolate(x, scale_factor=2)), atol=1e-5, rtol=1e-5)
    assert transposed.weight.shape == (6, 4, 4, 4) and transposed.stride == (2, 2)


def test_only_blocks_where_the_transposed_form_pays_are_rewritten():
    small, deep = blocks.UpBlock2d(64, 32).eval(), blocks.UpBlock2d(1024, 512).eval()
    assert isinstance(small.fused()[0], nn.ConvTranspose2d)
    deep_fused = deep.fused()  # too many weights per pixel: stays upsample + conv, BN folded
    assert isinstance(deep_fused, blocks.UpBlock2d) and isinstance(deep_fused.norm, nn.Identity)
    five = blocks.UpBlock2d(8, 8, kernel_size=5, padding=2).eval()
    assert isinstance(five.fused(), blocks.UpBlock2d)  # the tap table is for 3 x 3 kernels only


def test_fusing_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval"):
        blocks.fuse_for_inference(blocks.SameBlock2d(3, 4))


def test_in_place_residual_keeps_the_skip_precision_under_autocast():
    """The residual add runs in place only where both sides share a dtype: under bf16 autocast the conv's
    output is bf16, and the sum must stay float32 like the skip (as `out + x` would)."""
    block = blocks.ResBlock2d(8, kernel_size=3, padding=1).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x).dtype == torch.float32

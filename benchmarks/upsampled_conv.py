"""Nearest x2 upsampling + 3x3 conv against the equivalent stride-2 transposed conv, per layer shape.

    python benchmarks/upsampled_conv.py [--batch-sizes 1 4] [--device cpu]

The shapes are those of the up blocks in the published FOMM / MRAA configs (generator decoders and the
keypoint / region / dense-motion hourglasses at 256 px). The transposed form does 16/36 of the
multiply-adds but reads 16/9 as many weights, so it loses on the deep levels, where a few pixels meet many
channels; `models.blocks.TRANSPOSED_MAX_CHANNEL_PAIRS` is the cut this table supports.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mefacial.models.blocks import TRANSPOSED_MAX_CHANNEL_PAIRS, upsampled_conv_as_transposed

# (input channels, output channels, input height = width)
SHAPES = [(2048, 512, 4), (1024, 1024, 2), (1024, 256, 8), (512, 256, 8), (512, 128, 16), (256, 128, 16),
          (256, 64, 32), (128, 64, 32), (256, 128, 64), (128, 64, 128)]


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{torch.get_num_threads()} threads, {device}; cut: in x out channels <= {TRANSPOSED_MAX_CHANNEL_PAIRS}")
    print("| in | out | pixels in | batch | upsample + conv ms | transposed ms | speed-up | rewritten |")
    print("|--:|--:|--:|--:|--:|--:|--:|:-:|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for c_in, c_out, size in SHAPES:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(device)
            transposed = upsampled_conv_as_transposed(conv)
            for batch in args.batch_sizes:
                x = torch.randn(batch, c_in, size, size, device=device).contiguous(memory_format=torch.channels_last)
                plain = _ms(lambda: (conv(F.interpolate(x, scale_factor=2)), sync()), args.repeats)
                fast = _ms(lambda: (transposed(x), sync()), args.repeats)
                rewritten = "yes" if c_in * c_out <= TRANSPOSED_MAX_CHANNEL_PAIRS else "no"
                print(f"| {c_in} | {c_out} | {size}x{size} | {batch} | {plain:.1f} | {fast:.1f} | {plain / fast:.2f}x "
                      f"| {rewritten} |")


if __name__ == "__main__":
    main()

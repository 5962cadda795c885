"""Independent check of `python -m mefacial bench`: the ORIGINAL implementation's own animation loop
side by side with the engine, on the same random weights, the same frames and the same machine.

    git clone https://github.com/AliaksandrSiarohin/first-order-model /tmp/fomm
    python benchmarks/side_by_side.py --original /tmp/fomm --backbone fomm --frames 16
    git clone https://github.com/snap-research/articulated-animation /tmp/mraa
    python benchmarks/side_by_side.py --original /tmp/mraa --backbone mraa --frames 16

The demos import training-time modules at top level that `make_animation` never uses (animate.py ->
logger.py -> `skimage.draw.circle`, gone since scikit-image 0.19, and matplotlib; frames_dataset.py ->
scikit-learn; FOMM's ffmpeg-python): install them, or put stand-ins for `logger`, `frames_dataset`,
`ffmpeg` and `matplotlib` (MRAA calls `matplotlib.use`) on PYTHONPATH.

The original repository's `demo.make_animation` (its per-frame loop, `cpu=True`) runs its own
modules, built from the published config (`configs/fomm-vox256.yaml`, `configs/mraa-vox256.yaml`)
and loaded with this project's random weights; the engine runs the same weights batched. The
FPB-FOMM prior variants cannot run this way: their detector calls dlib and `.cuda()` inside `forward`.

The original code calls `grid_sample` without `align_corners`, which on torch >= 1.3 means False;
the FOMM vox config says True (what its checkpoints were trained with, torch 1.0), so for this
comparison the engine's config is switched to False, the behaviour of the original code on this torch.
The checkout goes on `sys.path` because the original modules import each other as top-level packages.

Freshly initialised weights leave parts of the computation trivial: FOMM's jacobian head starts at zero
weights with an identity bias (every jacobian is exactly I) and every BatchNorm has mean 0, variance 1,
scale 1, shift 0. `bench.random_model` perturbs those so the relative-jacobian path and the normalisations
are really compared. MRAA's outputs move by ~1e-5 under float32 rounding alone: the original itself differs
by that much between its own channels-last-strided inputs (`permute` of H x W x 3 arrays) and contiguous
copies of them, since convolutions round differently per memory layout; FOMM stays near 1e-7.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from mefacial import bench
from mefacial.engine import Engine
from mefacial.variants import get_variant

VARIANT = {"fomm": "fomm-none", "mraa": "mraa-none"}


def original_modules(checkout: Path, backbone: str, model: torch.nn.Module) -> tuple:
    """The original repository's `make_animation` and its modules, holding `model`'s weights."""
    sys.path.insert(0, str(checkout))
    demo = importlib.import_module("demo")
    params = model.config.model_params
    if backbone == "fomm":
        from modules.generator import OcclusionAwareGenerator
        from modules.keypoint_detector import KPDetector

        parts = {"generator": OcclusionAwareGenerator(**params["generator_params"], **params["common_params"]),
                 "kp_detector": KPDetector(**params["kp_detector_params"], **params["common_params"])}
    else:
        from modules.avd_network import AVDNetwork
        from modules.generator import Generator
        from modules.region_predictor import RegionPredictor

        common = {"num_regions": params["num_regions"], "num_channels": params["num_channels"]}
        parts = {"generator": Generator(**common, **params["generator_params"]),
                 "region_predictor": RegionPredictor(**common, estimate_affine=params["estimate_affine"],
                                                     **params["region_predictor_params"]),
                 "avd_network": AVDNetwork(num_regions=params["num_regions"], **params["avd_network_params"])}
    for name, module in parts.items():
        module.load_state_dict(getattr(model, name).state_dict(), strict=True)
        module.eval()
    return demo.make_animation, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True, help="checkout of the original repository")
    parser.add_argument("--backbone", choices=sorted(VARIANT), required=True)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the engine's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = get_variant(VARIANT[args.backbone])
    config = dataclasses.replace(spec.config, grid_sample_align_corners=False)  # as the original runs on this torch
    model = bench.random_model(config, args.seed)  # batch norms and zero-initialised heads perturbed
    make_animation, parts = original_modules(args.original, args.backbone, model)
    inputs = bench.bench_inputs(config.image_size, args.frames)
    source = inputs.source.astype(np.float32) / 255  # H x W x 3 in [0, 1], as the original demo feeds it
    driving = list(inputs.driving.astype(np.float32) / 255)
    engine = Engine(device="cpu", precision="fp32", batch_size=args.batch_size)
    batch_size = engine.batch_size
    served = engine.use_model(spec.id, model)  # fused, channels-last: what the engine runs
    adapt_scale = args.backbone == "mraa"  # each demo's behaviour in relative mode

    def original():
        if args.backbone == "fomm":
            return make_animation(source, driving, parts["generator"], parts["kp_detector"], relative=True,
                                  adapt_movement_scale=False, cpu=True)
        return make_animation(source, driving, parts["generator"], parts["region_predictor"], parts["avd_network"],
                              animation_mode="relative", cpu=True)

    times = {"original": [], "engine": []}
    for _ in range(args.repeats):  # alternate, medians: the machine is shared
        t0 = time.perf_counter()
        theirs = np.stack(original())  # T x H x W x 3 float
        times["original"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours, _ = bench.fast_path(engine, spec, served, inputs, batch_size, adapt_scale)
        times["engine"].append(time.perf_counter() - t0)
    ours = ours.permute(0, 2, 3, 1).numpy()
    ms = {k: 1000 * float(np.median(v)) / args.frames for k, v in times.items()}
    speedups = np.array(times["original"]) / np.array(times["engine"])  # paired: each repeat's neighbours
    print(f"{spec.id}, {args.frames} frames at {config.image_size}px, random weights (seed {args.seed}), "
          f"{torch.get_num_threads()} threads; inputs: {inputs.origin}")
    print(f"original make_animation: {ms['original']:.0f} ms/frame; engine (batch {batch_size}): "
          f"{ms['engine']:.0f} ms/frame; speed-up {np.median(speedups):.2f}x (median of {args.repeats} paired "
          f"repeats, {speedups.min():.2f}-{speedups.max():.2f}x); max abs difference {np.abs(theirs - ours).max():.2e}")


if __name__ == "__main__":
    main()

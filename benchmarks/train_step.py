"""Time one training step of each learned variant at its published full-size config (a benchmark, not a test).

    python benchmarks/train_step.py                                  # CPU, fp32, every variant, batch of its config
    python benchmarks/train_step.py --batch 1 --avd-batch 16 --repeats 1   # a quick CPU run
    python benchmarks/train_step.py --device cuda --precision bf16   # one GPU, mixed precision

Each row builds the model of `configs/train/<variant>.yaml` (full size, random weights) and its recipe with
the trainer's own `build_recipe`, then times `recipe.step` (forward, every loss, backward, optimiser steps;
the AVD rows time MRAA's second stage) on random frames. Nothing is downloaded and dlib is not needed: the
perceptual loss's VGG19 has random weights unless `--vgg19 FILE` names a weight file (the cost is the same),
and prior variants get fixed pseudo-random landmarks / AU points (the prior maps cost the same for any
points). Prints a table: seconds per step (median of the repeats), frames per second, peak GPU memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import load_train_config  # noqa: E402
from train.losses import VGG19Features, load_vgg19  # noqa: E402
from train.trainer import build_recipe  # noqa: E402

VARIANTS = ("fomm-none", "fomm-ewp", "fomm-awp", "fomm-ewp-mm21", "mraa-none", "mraa-ewp", "mraa-awp")


def perceptual_network(path: str | None, device: torch.device) -> torch.nn.Module:
    if path:
        return load_vgg19(path=path).to(device)
    import torchvision

    return VGG19Features(torchvision.models.vgg19().features[:30]).to(device)  # random weights: same cost


def make_batch(batch: int, size: int, device: torch.device, prior: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random frames (B x 3 x S x S) and, for prior variants, fixed pseudo-random 68 landmarks and 18 AU points."""
    from mefacial import prior as prior_lib

    g = torch.Generator().manual_seed(seed)
    out = {"source": torch.rand(batch, 3, size, size, generator=g), "driving": torch.rand(batch, 3, size, size, generator=g)}
    if prior:
        landmarks = size * (0.25 + 0.5 * torch.rand(2, batch, 68, 2, generator=g))  # inside the central half
        au = prior_lib.au_points_from_landmarks(landmarks).clamp(0, size - 1)
        out.update(source_landmarks=landmarks[0], driving_landmarks=landmarks[1], source_au=au[0], driving_au=au[1])
    return {k: v.to(device) for k, v in out.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(name: str, stage: str, args: argparse.Namespace, device: torch.device) -> dict:
    overrides = [f"runtime.precision={args.precision}", f"runtime.device={device.type}", f"stage={stage}"]
    cfg = load_train_config(name, overrides)
    params = cfg.avd if stage == "avd" else cfg.train
    batch_size = (args.avd_batch if stage == "avd" else args.batch) or params.batch_size
    torch.manual_seed(0)
    vgg = perceptual_network(args.vgg19, device) if stage == "reconstruction" and cfg.perceptual_weight else None
    recipe = build_recipe(cfg, device, vgg=vgg, verbose=False)
    recipe.train()
    batch = make_batch(batch_size, cfg.model.image_size, device, cfg.needs_landmarks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.repeats):
        generator = torch.Generator().manual_seed(i)
        sync(device)
        start = time.perf_counter()
        values = recipe.step(batch, generator)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = {"variant": name, "stage": stage, "batch": batch_size, "seconds": seconds, "fps": batch_size / seconds,
           "peak_gib": peak, "l1": values["l1"]}
    del recipe, vgg, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, help="batch per step (default: the config's train.batch_size / "
                                                  "avd.batch_size)")
    parser.add_argument("--avd-batch", type=int, help="batch of the AVD rows (default: avd.batch_size of the config; "
                                                      "at least 2: its BatchNorm1d needs a batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--no-avd", action="store_true", help="skip MRAA's AVD-stage rows")
    parser.add_argument("--vgg19", help="VGG19 weight file for the perceptual loss (default: random weights)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.avd_batch is not None and args.avd_batch < 2:
        parser.error("--avd-batch must be >= 2 (the AVD network's BatchNorm1d trains on batch statistics)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# one training step per variant: {name}, {args.precision}, torch {torch.__version__}, "
          f"{args.warmup} warm-up + {args.repeats} timed step(s) per row")
    print(f"{'variant':<15} {'stage':<15} {'batch':>5} {'s/step':>9} {'frames/s':>9} {'peak GiB':>9}")
    rows = []
    for variant in args.variants:
        stages = ["reconstruction"] + ([] if args.no_avd or not variant.startswith("mraa") else ["avd"])
        for stage in stages:
            row = time_variant(variant, stage, args, device)
            rows.append(row)
            print(f"{row['variant']:<15} {row['stage']:<15} {row['batch']:>5} {row['seconds']:>9.3f} "
                  f"{row['fps']:>9.2f} {row['peak_gib']:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far float32 rounding alone moves the gradient sums of one training-fixture step (a measurement, not a test).

    OMP_NUM_THREADS=2 python benchmarks/train_float32_noise.py                      # mraa_none, bg_predictor
    python benchmarks/train_float32_noise.py --fixture fomm_none --module kp_detector --perturb

Runs `tests/test_train_reference.py`'s `TrainReference` (the project's step fed a fixture's inputs and draws)
in float64 (the exact reference: equal to the original's float64 run to ~1e-8) and in float32 twice, with
oneDNN convolutions on and off (same formulas, other kernels, other rounding). `--perturb` adds a float64 run
whose weights are scaled by random factors within 1 +- 6e-8 (a float32 half-ulp, no arithmetic rounding).
Prints, per `grad_abs_sum` of `--module` (the module total and every parameter), the signed relative
deviation from float64 of: the original's own float32 run (fixture), each of ours, and the fixture's tolerance.
Where these runs scatter more than the tolerance, no float32 reimplementation can be checked at it: the
float32 figure measures rounding, not formulation (the float64 check is the one that can).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.chdir(ROOT)  # the fixtures' default location is relative to the repository

from test_train_reference import TRAIN_FIXTURES, TrainReference  # noqa: E402


@contextlib.contextmanager
def mkldnn(enabled: bool):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@contextlib.contextmanager
def perturbed_weights(seed: int, rel: float = 6e-8):
    """Scale every model parameter by (1 + u rel), u uniform in [-1, 1], after the recipe's cast."""
    import train.recipes as recipes

    cast = recipes.Recipe.to
    gen = torch.Generator().manual_seed(seed)

    def to(self, dtype):
        cast(self, dtype)
        with torch.no_grad():
            for p in self.model.parameters():
                p.mul_(1 + rel * (2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1))
        return self

    recipes.Recipe.to = to
    try:
        yield
    finally:
        recipes.Recipe.to = cast


def sums(run: TrainReference, module: str) -> dict[str, float]:
    keys = [f"grad_abs_sum.module.{module}"] + sorted(k for k in run.expected
                                                      if k.startswith(f"grad_abs_sum.param.{module}."))
    return {k: float(torch.as_tensor(run.ours[k]).double()) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixture", default="mraa_none", help="folder under $MEFACIAL_FIXTURES/train")
    parser.add_argument("--module", default="bg_predictor", help="part whose gradient sums are printed")
    parser.add_argument("--perturb", action="store_true", help="also a float64 run with half-ulp weight noise")
    args = parser.parse_args()
    folder = TRAIN_FIXTURES / args.fixture

    exact = TrainReference(folder, torch.float64)
    reference = sums(exact, args.module)
    columns: dict[str, dict[str, float]] = {}
    for label, enabled in (("ours f32", True), ("ours f32 no-oneDNN", False)):
        with mkldnn(enabled):
            columns[label] = sums(TrainReference(folder, torch.float32), args.module)
    if args.perturb:
        with perturbed_weights(seed=1):
            columns["ours f64 w*(1+-6e-8)"] = sums(TrainReference(folder, torch.float64), args.module)

    f32 = exact.given  # tensors.safetensors: the original's float32 run
    f64 = exact.expected  # tensors_float64.safetensors
    tol = exact.meta["tolerance"]["float32"]
    total = f"grad_abs_sum.module.{args.module}"
    print(f"{args.fixture}: signed relative deviation from float64 (param sums relative to the module total)")
    head = ["original f32", *columns, "tolerance"]
    print(f"{'key':<58}" + "".join(f"{h:>22}" for h in head))
    for key in reference:
        scale = abs(float(f64[key])) if key == total else abs(float(f64[total]))
        row = [(float(f32[key]) - float(f64[key])) / scale]
        row += [(col[key] - reference[key]) / scale for col in columns.values()]
        allowed = tol["rtol_per_tensor"].get(key, tol["grad_abs_sum_param_rtol"])
        print(f"{key[len('grad_abs_sum.'):]:<58}" + "".join(f"{v:>+22.2e}" for v in row) + f"{allowed:>22.0e}")


if __name__ == "__main__":
    main()

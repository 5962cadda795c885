"""What a run shows while it trains (rank 0 only): losses per step in `losses.jsonl` and TensorBoard,
a periodic visualisation PNG, and a tqdm bar on a terminal (a plain line every `log_every` steps in a log
file, where a bar's carriage returns would pile up).

The visualisation (`vis/step-XXXXXXX.png`, also in TensorBoard) has one row per
sample (up to 4): source and driving frames with their keypoints / region
centres drawn, the prediction, the source warped by the dense motion, the
occlusion map and the prior map (FOMM: the EWP / AWP map fed to the keypoint
network; MRAA: the sum of the region maps, which are the per-AU maps with a prior).
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

log = logging.getLogger("train")

COLUMNS = ("source", "driving", "prediction", "deformed", "occlusion", "prior")
MAX_ROWS = 4


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop entries after `last_step` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a `losses.jsonl` file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class Monitor:
    """Loss logging and pictures of one run; every method is a no-op off rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, total_steps: int, log_every: int = 10):
        self.enabled = enabled
        self.out_dir = out_dir
        self.log_every = max(1, log_every)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out_dir / "losses.jsonl"
        truncate_jsonl(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional at run time
            log.warning("tensorboard is not installed: losses go to %s only (pip install tensorboard)", self.jsonl_path)
        self.total_steps = total_steps
        if sys.stderr is not None and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log_step(self, step: int, epoch: int, values: dict[str, float], extra: dict[str, float]) -> None:
        if not self.enabled:
            return
        entry = {"step": step, "epoch": epoch, **{k: round(v, 8) for k, v in values.items()}, **extra}
        self.jsonl.write(json.dumps(entry) + "\n")
        self.jsonl.flush()
        if self.writer is not None and (step % self.log_every == 0 or step == 1):
            for key, value in {**values, **extra}.items():
                self.writer.add_scalar(key if "/" in key else f"loss/{key}", value, step)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every == 0 or step == 1 or step == self.total_steps:
            shown = {k: f"{v:.4f}" for k, v in values.items() if k in ("l1", "perceptual", "reconstruction", "rec_shift")}
            if self.bar is not None:
                self.bar.set_postfix(epoch=epoch, **shown)
            else:
                log.info("step %d/%d, epoch %d: %s", step, self.total_steps, epoch,
                         ", ".join(f"{k} {v}" for k, v in shown.items()))

    def log_metric(self, name: str, value: float, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def visualise(self, visuals: dict[str, torch.Tensor], step: int) -> Path | None:
        if not self.enabled or not visuals:
            return None
        grid = render_grid(visuals)
        path = self.out_dir / "vis" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        if self.writer is not None:
            self.writer.add_image("visualisation", grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _to_rgb(images: torch.Tensor, size: int) -> np.ndarray:
    """B x C x h x w in [0, 1] (C = 1 or 3, a map normalised per image) -> B x size x size x 3 uint8."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        low = images.amin(dim=(2, 3), keepdim=True)
        high = images.amax(dim=(2, 3), keepdim=True)
        images = ((images - low) / (high - low).clamp_min(1e-8)).expand(-1, 3, -1, -1)
    if images.shape[2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="nearest")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _colours(count: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / max(count, 1), 1.0, 1.0)) for k in range(count)]


def _draw_points(image: np.ndarray, points: torch.Tensor) -> np.ndarray:
    """Dots at K x 2 points in [-1, 1] on an S x S x 3 image."""
    size = image.shape[0]
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    radius = max(1.0, size / 96)
    pixels = ((points.detach().float().cpu() + 1) / 2 * (size - 1)).tolist()
    for (x, y), colour in zip(pixels, _colours(len(pixels))):
        if math.isfinite(x) and math.isfinite(y):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return np.asarray(canvas)


def render_grid(visuals: dict[str, torch.Tensor]) -> np.ndarray:
    """Rows of samples, columns of COLUMNS (those present), as one H x W x 3 uint8 picture."""
    size = max(int(visuals["source"].shape[-1]), 128)  # small frames are enlarged to stay readable
    rows = min(MAX_ROWS, int(visuals["source"].shape[0]))
    columns = [name for name in COLUMNS if name in visuals]
    tiles = {name: _to_rgb(visuals[name][:rows], size) for name in columns}
    for name in ("source", "driving"):
        key = f"points_{name}"
        if key in visuals:
            tiles[name] = np.stack([_draw_points(tiles[name][i], visuals[key][i]) for i in range(rows)])
    from torchvision.utils import make_grid

    ordered = torch.from_numpy(np.stack([tiles[name][r] for r in range(rows) for name in columns]))  # N x S x S x 3
    grid = make_grid(ordered.permute(0, 3, 1, 2), nrow=len(columns), padding=2, pad_value=255)  # 3 x H x W uint8
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())

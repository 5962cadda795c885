"""Self-describing training checkpoints, written atomically, readable by the engine as they are.

One `.pth.tar` holds the model in the original part layout the engine and
the original code read (`{generator: sd, kp_detector: sd, discriminator: sd}`
for FOMM, `{generator, region_predictor, bg_predictor, avd_network}` for MRAA:
`mefacial.checkpoints.load_weights(model, path, backbone)` loads it strictly)
next to everything a run needs to continue exactly:

    format, format_version, variant, stage, step, epoch, batch_in_epoch,
    config (the resolved training config, architecture included),
    model_config_json (the architecture as JSON text),
    optimizers, schedulers, scaler, rng (python, numpy, torch, cuda), best_metric, metric

Only tensors, numbers, strings, lists, tuples and dicts are stored, so it
loads with `torch.load(weights_only=True)`. Writes go to a temporary file in
the same folder, are flushed and fsync'ed, then renamed over the target
(`os.replace`), so a killed run leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mefacial.checkpoints import (flatten_parts, is_safetensors, load_state_dict_strict, read_pickled_checkpoint,
                                  read_safetensors, unflatten_parts)
from mefacial.errors import CheckpointError
from mefacial.utils import atomic_write, temporary_path
from mefacial.models import CHECKPOINT_PARTS

FORMAT = "mefacial-train"
FORMAT_VERSION = 1
LAST = "last.pth.tar"
BEST = "best.pth.tar"


# ---- random number generators ---------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The global generators' states (python, numpy, torch, cuda) as weights_only-safe data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- model parts ------------------------------------------------------------------------------------


def model_parts(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """`{part: state_dict}` in the original layout (the model's sub-modules carry the part names)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        part, rest = key.split(".", 1)
        parts.setdefault(part, {})[rest] = value.detach().cpu().clone()
    return parts


def load_parts(model: nn.Module, checkpoint: Mapping[str, Any], parts: tuple[str, ...] | None = None,
               source: str = "checkpoint") -> list[str]:
    """Load `parts` (default: every part the model has) strictly; returns the parts loaded.

    With `parts=None`, parts the checkpoint lacks are skipped (their weights stay
    as initialised), which lets `--init` start from a reconstruction-only MRAA
    checkpoint or an FOMM one without a discriminator.
    """
    backbone = model.config.backbone
    wanted = tuple(p for p in CHECKPOINT_PARTS[backbone] if hasattr(model, p))
    chosen = parts if parts is not None else tuple(p for p in wanted if p in checkpoint)
    if not chosen:
        held = sorted(checkpoint)
        raise CheckpointError(f"{source} holds none of the {backbone} parts {wanted}; it holds "
                              f"{held[:8]}{f' and {len(held) - 8} more' if len(held) > 8 else ''}")
    flat = flatten_parts(checkpoint, chosen)
    for part in chosen:
        prefix = f"{part}."
        load_state_dict_strict(getattr(model, part), {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)},
                               source=f"{source} [{part}]")
    return list(chosen)


# ---- writing and reading ------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` to a temporary file beside `path`, fsync, then rename over `path`."""
    with atomic_write(path) as f:  # the temporary is `_temporary(path, pid)`
        torch.save(obj, f)
    return Path(path)


def _temporary(path: Path, pid: int) -> Path:
    """Where process `pid` writes `path` before renaming it: `.<name>.<pid>.tmp` beside it."""
    return temporary_path(path, pid)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_save` left in `folder` when its process was killed mid-write.

    Only files of processes that no longer run are removed (the pid is in the name); returns them."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but is someone else's
        pass
    return True


def build_checkpoint(model: nn.Module, *, config: Mapping[str, Any], variant: str, stage: str, step: int, epoch: int,
                     batch_in_epoch: int, optimizers: Mapping[str, torch.optim.Optimizer],
                     schedulers: Mapping[str, Any], scaler: torch.amp.GradScaler | None, best_metric: float | None,
                     metric: float | None, world_size: int) -> dict[str, Any]:
    """Everything a checkpoint holds (see the module docstring)."""
    checkpoint: dict[str, Any] = model_parts(model)
    checkpoint.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        variant=variant,
        stage=stage,
        step=int(step),
        epoch=int(epoch),
        batch_in_epoch=int(batch_in_epoch),
        config=dict(config),
        model_config_json=json.dumps(config["model"], sort_keys=True),
        optimizers={name: opt.state_dict() for name, opt in optimizers.items()},
        schedulers={name: sch.state_dict() for name, sch in schedulers.items()},
        scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        rng=capture_rng(),
        best_metric=None if best_metric is None else float(best_metric),
        metric=None if metric is None else float(metric),
        world_size=int(world_size),
        torch_version=str(torch.__version__),
    )
    return checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of this trainer or an original-layout one (loaded with weights_only=True), or the project's
    safetensors (`checkpoints convert`, a Hub download), as {part: state dict}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_safetensors(path):
        return unflatten_parts(read_safetensors(path))
    return read_pickled_checkpoint(path)


def check_resumable(checkpoint: Mapping[str, Any], path: str | Path, model_config: Mapping[str, Any], stage: str) -> None:
    """Refuse to resume from a checkpoint of another format, stage or architecture."""
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this trainer (no '{FORMAT}' format field); "
                              "to start from its weights use --init instead of --resume")
    if checkpoint.get("stage") != stage:
        raise CheckpointError(f"{path} is a {checkpoint.get('stage')!r}-stage checkpoint, this run is the {stage!r} stage; "
                              "use --init to start a stage from another stage's weights")
    saved = checkpoint["config"]["model"]
    differing = sorted(k for k in set(saved) | set(model_config)
                       if k not in ("name", "description") and saved.get(k) != model_config.get(k))
    if differing:
        raise CheckpointError(f"{path} was trained with another architecture (fields {differing} differ); "
                              "resume with the config it was trained with")

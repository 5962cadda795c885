"""Weights: load original checkpoint layouts into a model, strictly and safely.

Original layouts are dicts of state dicts per part, e.g. FOMM
`{generator, kp_detector, discriminator, optimizer_*, epoch}` and MRAA
`{generator, region_predictor, bg_predictor, avd_network, ...}`. The model's
sub-modules carry the same part names, so a checkpoint flattens to
`{"generator.dense_motion_network...": tensor}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import CheckpointError

# Prefixes added by DDP and torch.compile, stripped on load.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_pickled_checkpoint(path: str | Path) -> dict:
    """`torch.load` with weights_only=True: a pickle that would run code is refused."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"{path} is not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
            "Only plain tensor checkpoints load (torch.load weights_only=True); re-save it as a state dict "
            "or convert it with `python -m mefacial checkpoints convert`."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of state dicts")
    return data


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def flatten_parts(checkpoint: Mapping, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`{part: state_dict}` -> `{"part.key": tensor}` for the parts the model has.

    Keys of other parts (optimisers, a discriminator the model was built without,
    epoch counters) are ignored; a missing part is an error.
    """
    missing = [p for p in parts if p not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint has no {missing} part(s); it holds {sorted(k for k in checkpoint)}. "
            "Is it a checkpoint of another backbone (FOMM holds kp_detector, MRAA region_predictor)?"
        )
    flat = {}
    for part in parts:
        state = checkpoint[part]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint part {part!r} is a {type(state).__name__}, not a state dict")
        for key, value in state.items():
            flat[f"{part}.{_strip_prefixes(key)}"] = value
    return flat


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `state` into `model`; on any mismatch raise one error naming every bad key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        lines = [f"{source} does not fit this architecture ({type(model).__name__}, config {getattr(getattr(model, 'config', None), 'name', '?')!r})."]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {head(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {head(unexpected)}")
        if misshaped:
            lines.append(f"mis-shaped keys ({len(misshaped)}): {head(misshaped)}")
        lines.append("Pick the variant/config that the checkpoint was trained with (see `python -m mefacial checkpoints list`).")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def load_original_checkpoint(model: nn.Module, path: str | Path, parts: tuple[str, ...]) -> dict:
    """Load an original-layout `.pth.tar` into `model` (strict). Returns the raw dict's non-tensor extras."""
    checkpoint = read_pickled_checkpoint(path)
    load_state_dict_strict(model, flatten_parts(checkpoint, parts), source=str(path))
    return {k: v for k, v in checkpoint.items() if not isinstance(v, Mapping)}

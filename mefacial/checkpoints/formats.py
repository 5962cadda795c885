"""Checkpoint layouts and safe loading: original `.pth.tar` dicts and the project's safetensors + JSON sidecar.

Original layouts are `torch.save` dicts of state dicts per part, e.g. FOMM `{generator, kp_detector,
discriminator, optimizer_*, epoch}` and MRAA `{generator, region_predictor, bg_predictor, avd_network, ...}`;
they are read with `weights_only=True`, so a pickle cannot run code. The project's own format is
`<name>.safetensors` (flat `part.key` tensors) with a `<name>.json` sidecar (variant, config, provenance);
it is preferred when both exist. The model's sub-modules carry the part names, so either flattens to
`{"generator.dense_motion_network...": tensor}` and loads strictly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ..errors import CheckpointError, WeightsNotFoundError

log = logging.getLogger("mefacial.checkpoints")

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth.tar", ".pth", ".pt", ".ckpt", ".tar", ".bin")
FORMAT_NAME = "mefacial"
FORMAT_VERSION = 1

# Prefixes added by DDP and torch.compile, stripped on load.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_pickled_checkpoint(path: str | Path) -> dict:
    """`torch.load` with weights_only=True: a pickle that would run code is refused."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        cause, remedy = _unloadable(path, exc)
        raise CheckpointError(f"{path} is not a loadable checkpoint: {cause}. {remedy}",
                              page=f"This variant's weights file cannot be loaded: {cause}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of state dicts")
    return data


def _unloadable(path: Path, error: Exception) -> tuple[str, str]:
    """(why, what to do) for a file torch.load(weights_only=True) refused, in our words: torch's own message advises
    loading with weights_only=False, which would let the file run code."""
    text = str(error)
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format: a zip archive
    except OSError:
        zipped = False
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return (f"it pickles a Python object ({refused.group(1)}), which could run code when loaded, so it is not "
                "read", "Re-save its state dicts alone, or convert it with `python -m mefacial checkpoints convert`.")
    if zipped or isinstance(error, EOFError) or "central directory" in text or "zip archive" in text:
        return "the file is damaged or incomplete (a copy or download cut short?)", "Copy or download it again."
    return ("it is not a PyTorch checkpoint (damaged, or a file of another kind)",
            "Give the .pth / .pth.tar / .safetensors file of a trained model.")


def strip_prefixes(key: str) -> str:
    """"module._orig_mod.conv.weight" -> "conv.weight" (DDP and torch.compile wrappers)."""
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
            flat[f"{part}.{strip_prefixes(key)}"] = value
    return flat


def unflatten_parts(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"part.key": t}` -> `{part: {key: t}}`, ignoring wrapper prefixes before the part name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        part, _, rest = strip_prefixes(key).partition(".")
        parts.setdefault(part, {})[rest] = value
    return parts


def fit_report(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> str | None:
    """None when `state` fits `model` key for key and shape for shape; else a message naming every bad key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or misshaped):
        return None

    def head(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

    config_name = getattr(getattr(model, "config", None), "name", "?")
    lines = [f"{source} does not fit this architecture ({type(model).__name__}, config {config_name!r})."]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {head(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {head(unexpected)}")
    if misshaped:
        lines.append(f"mis-shaped keys ({len(misshaped)}): {head(misshaped)}")
    lines.append("Pick the variant/config that the checkpoint was trained with (see `python -m mefacial checkpoints list`).")
    return "\n".join(lines)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `state` into `model`; on any mismatch raise one error naming every bad key."""
    report = fit_report(model, state, source)
    if report:
        raise CheckpointError(report)
    model.load_state_dict(state, strict=True)


def load_original_checkpoint(model: nn.Module, path: str | Path, parts: tuple[str, ...]) -> dict:
    """Load an original-layout `.pth.tar` into `model` (strict). Returns the raw dict's non-tensor extras."""
    checkpoint = read_pickled_checkpoint(path)
    load_state_dict_strict(model, flatten_parts(checkpoint, parts), source=str(path))
    return {k: v for k, v in checkpoint.items() if not isinstance(v, Mapping)}


# ---- the project's format ---------------------------------------------------------------------------


def weights_stem(path: Path) -> Path:
    """checkpoints/x.pth.tar -> checkpoints/x (the name shared by a checkpoint and its conversions)."""
    name = path.name
    for suffix in (SAFETENSORS_SUFFIX, ".json", *PICKLE_SUFFIXES):
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def sidecar_path(weights: str | Path) -> Path:
    """<name>.json next to <name>.safetensors (or <name>.pth.tar)."""
    stem = weights_stem(Path(weights))
    return stem.with_name(stem.name + ".json")


def prefer_safetensors(path: str | Path) -> Path:
    """`path`, or the `<name>.safetensors` beside it when one exists (its conversion: safer and faster to load)."""
    path = Path(path)
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return path
    stem = weights_stem(path)
    converted = stem.with_name(stem.name + SAFETENSORS_SUFFIX)
    if not converted.is_file():
        return path
    log.info("using %s instead of %s (converted weights are preferred)", converted, path)
    return converted


def is_safetensors(path: str | Path) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < Path(path).stat().st_size


def read_sidecar(weights: str | Path) -> dict | None:
    """The `<name>.json` beside a weights file, or None."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); regenerate it with `python -m mefacial checkpoints convert`") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Flat `{"part.key": tensor}` from a safetensors file (CPU)."""
    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); convert the original again") from None


def _parts_of(parts: str | Sequence[str]) -> tuple[str, ...]:
    """A backbone name ("fomm") -> its inference parts; a sequence of part names as is."""
    from ..models import INFERENCE_PARTS

    if isinstance(parts, str):
        if parts not in INFERENCE_PARTS:
            raise ValueError(f"unknown backbone {parts!r}; known: {sorted(INFERENCE_PARTS)}")
        return INFERENCE_PARTS[parts]
    return tuple(parts)


def load_weights(model: nn.Module, path: str | Path, parts: str | Sequence[str]) -> dict:
    """Load a checkpoint into `model`, strictly: the project's safetensors (preferred when one sits beside
    `path`) or an original pickled `.pth.tar`. `parts` are the checkpoint parts to load, or a backbone name
    for its inference parts. Returns the checkpoint's metadata (sidecar JSON, or the pickle's non-tensor extras).
    """
    path = prefer_safetensors(path)
    wanted = _parts_of(parts)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint {path} does not exist",
                                   page="The weights file of this variant is missing on the server")
    if not is_safetensors(path):
        return load_original_checkpoint(model, path, wanted)
    flat = flatten_parts(unflatten_parts(read_safetensors(path)), wanted)
    load_state_dict_strict(model, flat, source=str(path))
    return read_sidecar(path) or {}

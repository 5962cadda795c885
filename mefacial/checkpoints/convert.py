"""Conversion of original checkpoints to the project's format: `<name>.safetensors` + `<name>.json`.

The sidecar JSON holds the variant, the full architecture config and the provenance (source file and its
sha256, epoch, what was dropped); the weights are checked against the architecture before anything is written.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import CheckpointError, ConfigError
from ..utils import atomic_write
from .formats import (FORMAT_NAME, FORMAT_VERSION, SAFETENSORS_SUFFIX, fit_report, flatten_parts, is_safetensors,
                      read_pickled_checkpoint, read_sidecar, sha256_file, sidecar_path, strip_prefixes)
from .resolve import checkpoint_dir


# Keys of a train/ checkpoint that describe the run rather than hold weights (see train/checkpointing.py).
_TRAINING_CONFIG_KEYS = ("config", "model_config_json")


def _tensor_parts(checkpoint: Mapping, parts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Split an original or train/ checkpoint into flat tensors of the architecture's `parts` present,
    JSON-able extras (epoch, step, ...) and the names of what was dropped (optimiser and RNG states)."""
    flat: dict[str, torch.Tensor] = {}
    extras: dict[str, Any] = {}
    dropped: list[str] = []
    for part, value in checkpoint.items():
        if part in _TRAINING_CONFIG_KEYS:
            continue
        if part in parts and isinstance(value, Mapping):
            for key, tensor in value.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"checkpoint part {part!r} holds a {type(tensor).__name__} at {key!r}, not a tensor")
                # own, contiguous storage: safetensors refuses shared or strided tensors
                flat[f"{part}.{strip_prefixes(key)}"] = tensor.detach().clone(memory_format=torch.contiguous_format)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            extras[part] = value
        else:
            dropped.append(part)
    return flat, extras, dropped


def check_architecture(checkpoint: Mapping, config: Any, source: str = "checkpoint") -> None:
    """CheckpointError unless the checkpoint's inference parts fit `config`'s model, key for key and shape
    for shape. The model is built on the meta device: no memory for weights, no computation."""
    from ..models import INFERENCE_PARTS, build_model

    flat = flatten_parts(checkpoint, INFERENCE_PARTS[config.backbone])
    with torch.device("meta"):
        model = build_model(config)
    report = fit_report(model, flat, source)
    if report:
        raise CheckpointError(report)


def config_of(config: Any, variant: str | None, checkpoint: Mapping | None = None):
    """A ModelConfig from, in order: a config object or name/path, the architecture a train/ checkpoint
    records (`model_config_json`), the variant's architecture in the code's variant registry."""
    from ..config import ModelConfig, load_config
    from ..variants import get_variant

    if isinstance(config, ModelConfig):
        return config
    if config is not None:
        return load_config(config)
    own = checkpoint.get("model_config_json") if checkpoint is not None else None
    if isinstance(own, str):
        return config_from_dict(json.loads(own))
    if variant is None:
        raise ConfigError("give a variant or a config to describe the checkpoint")
    return load_config(get_variant(variant).config_name)


def convert_to_safetensors(src: str | Path, dst: str | Path | None = None, config: Any = None,
                           variant: str | None = None) -> Path:
    """Turn an original `.pth.tar` into `<dst>.safetensors` + `<dst>.json` (config, variant, provenance).

    `config` is a ModelConfig, a config name or path (default: the architecture a train/ checkpoint records,
    else the variant's config); it must fit the weights. Every part of the architecture is kept
    (discriminator included, for fine-tuning); optimiser and RNG states are dropped. `dst` defaults to
    checkpoints/<variant>.safetensors, where the resolver finds it.
    """
    from ..models import CHECKPOINT_PARTS

    src = Path(src)
    checkpoint = read_pickled_checkpoint(src)
    model_config = config_of(config, variant, checkpoint)
    if variant is not None:  # a name the engine knows, of the backbone the weights are (they would load nowhere)
        from ..variants import get_variant

        backbone = get_variant(variant).backbone
        if backbone != model_config.backbone:
            raise CheckpointError(f"{src} holds {model_config.backbone} weights, not {backbone} ones as variant "
                                  f"{variant!r} needs: name a {model_config.backbone} variant")
    check_architecture(checkpoint, model_config, str(src))
    flat, extras, dropped = _tensor_parts(checkpoint, CHECKPOINT_PARTS[model_config.backbone])
    if dst is None:
        dst = checkpoint_dir() / f"{variant or model_config.name}{SAFETENSORS_SUFFIX}"
    dst = Path(dst)
    if not dst.name.endswith(SAFETENSORS_SUFFIX):
        dst = dst.with_name(dst.name + SAFETENSORS_SUFFIX)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "variant": variant or extras.get("variant"),
        "config": model_config.to_dict(),
        "metadata": {
            "converted_from": src.name,
            "source_sha256": sha256_file(src),
            "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "parts": sorted({k.partition(".")[0] for k in flat}),
            "dropped": dropped,
            **extras,
        },
    }
    if isinstance(checkpoint.get("config"), Mapping):  # a train/ checkpoint: keep its recipe with the weights
        sidecar["training_config"] = json.loads(json.dumps(checkpoint["config"], default=str))
    # written through atomic_write (safetensors' own save_file leaves a file only its owner may read, and a
    # half-written one where it is interrupted)
    with atomic_write(dst) as f:
        f.write(safetensors_bytes(flat, metadata={"format": FORMAT_NAME, "variant": sidecar["variant"] or "",
                                                  "config": model_config.name}))
    with atomic_write(sidecar_path(dst), "w", encoding="utf-8") as f:
        f.write(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return dst



def trained_config(path: str | Path, published: Any):
    """The architecture a weights file was trained with, where it records one (a safetensors' sidecar, a train/
    checkpoint's `model_config_json`; e.g. a tiny smoke-test config), else `published` (the variant's config, which
    the original checkpoints fit). A record of another backbone than `published`'s is a CheckpointError."""
    path = Path(path)
    if is_safetensors(path):
        record = (read_sidecar(path) or {}).get("config")
    else:
        try:  # (memory-mapped: the tensors are not read; an old-format pickle cannot be mapped and records nothing)
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("model_config_json")
        except Exception:  # noqa: BLE001 - unreadable here: loading it says why
            record = None
        record = json.loads(record) if isinstance(record, str) else None
    if not isinstance(record, Mapping):
        return published
    trained = config_from_dict(record)
    if trained.backbone != published.backbone:
        raise CheckpointError(f"{path} holds {trained.backbone} weights (config {trained.name!r}), not "
                              f"{published.backbone}: choose a {trained.backbone} variant for it")
    return trained


def config_from_dict(data: Mapping[str, Any]):
    """A ModelConfig from its `to_dict()` form (a sidecar's or a train/ checkpoint's)."""
    from ..config import ModelConfig

    return ModelConfig.from_dict(dict(data), name=data.get("name"))

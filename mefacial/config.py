"""Architecture configs: YAML -> a typed, validated `ModelConfig`.

A config file holds the original implementation's `model_params` block
unchanged (so the published YAML files of FOMM, MRAA and FPB-FOMM can be read
as they are) plus the fields the original code hard-coded:

    name: fomm-vox256
    backbone: fomm            # a registered backbone (mefacial.models: fomm | mraa | warp ...)
    prior: none               # none | ewp | awp
    prior_distance: l2        # l2 (TIP 2024) | l1 (ACM MM 2021 EWP)
    au_points: per_frame      # per_frame (TIP 2024) | first_frame (MM 2021: fixed per clip)
    grid_sample_align_corners: true
    image_size: 256
    model_params: {...}       # the original block
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

PRIORS = ("none", "ewp", "awp")
PRIOR_DISTANCES = ("l2", "l1")
AU_POINT_MODES = ("per_frame", "first_frame")
# Shipped as package data (mefacial/configs/*.yaml, training configs in configs/train/), found through the
# package so an installed mefacial reads them from any working directory.
CONFIG_DIR = Path(str(resources.files("mefacial") / "configs"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One architecture: backbone, prior flavour and the original `model_params`."""

    name: str
    backbone: str
    prior: str = "none"
    model_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid_sample_align_corners: bool = False
    prior_distance: str = "l2"
    au_points: str = "per_frame"
    image_size: int = 256
    prior_sigma: float = 0.75
    description: str = ""

    def __post_init__(self) -> None:
        from .models import backbones  # the registry (backbone modules import this one)

        known = backbones()
        if self.backbone not in known:
            raise ConfigError(f"config {self.name!r}: field 'backbone' must be one of {tuple(known)}, got {self.backbone!r}")
        spec = known[self.backbone]
        _check_choice("prior", self.prior, spec.priors, self.name)
        _check_choice("prior_distance", self.prior_distance, PRIOR_DISTANCES, self.name)
        _check_choice("au_points", self.au_points, AU_POINT_MODES, self.name)
        if not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 4:
            raise ConfigError(f"config {self.name!r}: field 'image_size' must be an int >= 32 divisible by 4, got {self.image_size!r}")
        if spec.needs_weights and not isinstance(self.model_params, dict):
            raise ConfigError(f"config {self.name!r}: field 'model_params' must be a mapping")

    @property
    def num_points(self) -> int:
        """Keypoints (FOMM) or regions (MRAA) of the architecture; 0 for a backbone without learned points."""
        from .models import get_backbone

        return get_backbone(self.backbone).num_points(self)

    def options(self, defaults: dict[str, Any], **overrides: Any) -> dict[str, Any]:
        """A training-free model's settings: `defaults`, then `model_params`, then `overrides`; unknown names refused."""
        given = {**(self.model_params or {}), **overrides}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"config {self.name!r}: unknown {self.backbone} option(s) {unknown}; known: {sorted(defaults)}")
        return {**defaults, **given}

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config {name!r}: expected a mapping at the top level, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"config {name or data.get('name')!r}: unknown field(s) {unknown}; known: {sorted(fields)}")
        data = dict(data)
        data.setdefault("name", name or "unnamed")
        if "backbone" not in data:
            from .models import backbones

            raise ConfigError(f"config {data['name']!r}: missing field 'backbone' (one of {tuple(backbones())})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(field: str, value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ConfigError(f"config {name!r}: field {field!r} must be one of {choices}, got {value!r}")


def load_config(path_or_name: str | Path) -> ModelConfig:
    """Load a config from a path, or by name from the package's `configs/` (e.g. "fomm-vox256")."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; available: {sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return ModelConfig.from_dict(data, name=path.stem)


def config_from_reference(model_params: dict[str, Any], meta: dict[str, Any], name: str = "reference") -> ModelConfig:
    """Build a config from a reference fixture's `config.yaml` block and its `meta.json`."""
    if "model_params" in model_params:
        model_params = model_params["model_params"]
    distance_note = str(meta.get("prior_distance", "")).lower()
    au_note = str(meta.get("au_points", "")).lower()
    return ModelConfig(
        name=name,
        backbone=meta["backbone"],
        prior=meta.get("prior", "none"),
        model_params=model_params,
        grid_sample_align_corners=bool(meta["grid_sample_align_corners"]),
        prior_distance="l1" if ("l1" in distance_note or "manhattan" in distance_note) else "l2",
        au_points="first_frame" if ("first frame" in au_note and "fixed" in au_note) else "per_frame",
    )

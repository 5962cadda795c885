"""Variant registry: a variant id ("fomm-awp", "mraa-none", "warp", ...) names an
architecture config, whether it needs learned weights, and what it needs as input.

Weights locations live in `checkpoints/registry.yaml` (see `mefacial.checkpoints`);
this module only knows architectures, so it does no I/O beyond reading configs.
"""

from __future__ import annotations

import dataclasses
import functools

from .config import ModelConfig, load_config
from .errors import UnknownVariantError

MOTION_MODES = {
    "fomm": ("relative", "absolute"),
    "mraa": ("relative", "standard", "avd"),
    "warp": ("relative",),
    "dense": ("relative",),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One selectable generator: backbone x prior flavour, and what it needs."""

    id: str
    config_name: str
    label: str
    needs_weights: bool = True

    @functools.cached_property
    def config(self) -> ModelConfig:
        return load_config(self.config_name)

    @property
    def backbone(self) -> str:
        return self.config.backbone

    @property
    def prior(self) -> str:
        return self.config.prior

    @property
    def motion_modes(self) -> tuple[str, ...]:
        return MOTION_MODES[self.backbone]

    @property
    def needs_landmarks(self) -> bool:
        """Whether the model consumes landmarks (AU points for priors, 68 points for warp)."""
        return self.backbone in ("warp", "dense") or self.prior != "none"

    @property
    def landmark_kind(self) -> str:
        """"mesh" (478-point face mesh, `mefacial.mesh`) for the dense backbone, else "68" (68 landmarks)."""
        return "mesh" if self.backbone == "dense" else "68"

    def describe(self) -> dict:
        return {
            "id": self.id,
            "label": self.label,
            "backbone": self.backbone,
            "prior": self.prior,
            "needs_weights": self.needs_weights,
            "needs_landmarks": self.needs_landmarks,
            "motion_modes": list(self.motion_modes),
            "config": self.config_name,
            "description": self.config.description,
        }


_VARIANTS = {
    v.id: v
    for v in (
        Variant("dense", "dense", "Training-free dense mesh", needs_weights=False),
        Variant("dense-geometry", "dense-geometry", "Dense mesh, geometry only", needs_weights=False),
        Variant("warp", "warp", "Training-free landmark warp", needs_weights=False),
        Variant("fomm-none", "fomm-vox256", "FOMM"),
        Variant("fomm-ewp", "fomm-ewp", "FOMM + EWP"),
        Variant("fomm-awp", "fomm-awp", "FOMM + AWP"),
        Variant("fomm-ewp-mm21", "fomm-ewp-mm21", "FOMM + prior (ACM MM 2021)"),
        Variant("mraa-none", "mraa-vox256", "MRAA"),
        Variant("mraa-ewp", "mraa-ewp", "MRAA + EWP"),
        Variant("mraa-awp", "mraa-awp", "MRAA + AWP"),
    )
}


def get_variant(variant_id: str) -> Variant:
    """The variant of that id; an error listing the known ids otherwise."""
    try:
        return _VARIANTS[variant_id]
    except KeyError:
        raise UnknownVariantError(f"unknown variant {variant_id!r}; known: {', '.join(_VARIANTS)}") from None


def list_variants() -> list[dict]:
    """Every variant with what it needs: backbone, prior, weights, landmarks, motion modes."""
    return [v.describe() for v in _VARIANTS.values()]


def variant_ids() -> list[str]:
    return list(_VARIANTS)

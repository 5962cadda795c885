"""Variant registry: a variant id ("fomm-awp", "mraa-none", "warp", ...) is one backbone x prior, declared
once, with one label, by its backbone's module (`mefacial.models`, `BackboneSpec.variants`).

Weights locations live in `mefacial/registry.yaml` (see `mefacial.checkpoints`), keyed by variant id;
this module only knows architectures, so it does no I/O beyond reading configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools

from .config import ModelConfig, load_config
from .errors import ConfigError, UnknownVariantError
from .models import BackboneSpec, backbones

# What the user picks as "facial prior" (a variant may declare its own flavour, e.g. "ewp-mm21").
PRIOR_LABELS = {"none": "none", "ewp": "EWP", "awp": "AWP"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One selectable generator: backbone x prior flavour, and what it needs."""

    id: str
    config_name: str
    label: str
    backbone: str
    prior_option_key: str | None = None
    prior_option_label: str | None = None

    @functools.cached_property
    def config(self) -> ModelConfig:
        config = load_config(self.config_name)
        if config.backbone != self.backbone:
            raise ConfigError(f"variant {self.id!r} is declared by the {self.backbone!r} backbone, but its config "
                              f"{self.config_name!r} says backbone {config.backbone!r}; fix one of them")
        return config

    @property
    def spec(self) -> BackboneSpec:
        """The backbone's spec: labels, motion modes, capabilities, checkpoint parts."""
        return backbones()[self.backbone]

    @property
    def prior(self) -> str:
        """The prior kind of the architecture: none, ewp or awp."""
        return self.config.prior

    @property
    def prior_option(self) -> str:
        """The user's "facial prior" choice this variant answers to (none, ewp, awp, ewp-mm21, ...)."""
        return self.prior_option_key or self.prior

    @property
    def prior_label(self) -> str:
        return self.prior_option_label or PRIOR_LABELS.get(self.prior_option, self.prior_option)

    @property
    def needs_weights(self) -> bool:
        return self.spec.needs_weights

    @property
    def motion_modes(self) -> tuple[str, ...]:
        return tuple(self.spec.motion_modes)

    @property
    def needs_landmarks(self) -> bool:
        """Whether the model consumes landmarks (AU points for priors, 68 points for warp)."""
        return self.spec.needs_landmarks(self.prior)

    @property
    def adapt_scale_default(self) -> bool:
        """Movement-scale adaptation when not asked for: what the backbone's original code does."""
        return self.spec.adapt_scale_default

    def describe(self) -> dict:
        spec = self.spec
        return {
            "id": self.id,
            "label": self.label,
            "backbone": self.backbone,
            "backbone_label": spec.label,
            "prior": self.prior,
            "prior_option": self.prior_option,
            "prior_label": self.prior_label,
            "needs_weights": self.needs_weights,
            "needs_landmarks": self.needs_landmarks,
            "motion_modes": list(self.motion_modes),
            "adapt_scale_default": spec.adapt_scale_default,
            "config": self.config_name,
            "description": self.config.description,
        }


@functools.cache
def _variants() -> dict[str, Variant]:
    variants: dict[str, Variant] = {}
    for spec in backbones().values():
        for decl in spec.variants:
            if decl.id in variants:
                raise ConfigError(f"variant {decl.id!r} is declared twice (backbones {variants[decl.id].backbone!r} "
                                  f"and {spec.name!r})")
            variants[decl.id] = Variant(decl.id, decl.config, decl.label, spec.name, decl.prior_option,
                                        decl.prior_label)
    return variants


def get_variant(variant_id: str | Variant) -> Variant:
    """The variant of that id; an error listing the known ids otherwise."""
    if isinstance(variant_id, Variant):
        return variant_id
    variants = _variants()
    try:
        return variants[variant_id]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(variant_id), list(variants), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UnknownVariantError(f"unknown variant {variant_id!r}{hint}; known: {', '.join(variants)}") from None


def find_variant(backbone: str, prior_option: str) -> Variant:
    """The variant of a backbone and a "facial prior" choice, or an error listing the valid pairs."""
    for v in _variants().values():
        if v.backbone == backbone and v.prior_option == prior_option:
            return v
    valid = [f"{v.backbone}/{v.prior_option}" for v in _variants().values()]
    raise UnknownVariantError(f"no variant for backbone {backbone!r} with prior {prior_option!r}; "
                              f"valid backbone/prior pairs: {valid}")


def list_variants() -> list[dict]:
    """Every variant with what it needs: backbone, prior, weights, landmarks, motion modes."""
    return [v.describe() for v in _variants().values()]


def variant_ids() -> list[str]:
    return list(_variants())

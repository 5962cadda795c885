"""The weights registry: per learned variant, where its weights live (Hub sources, tried in order) and licences.

`mefacial/registry.yaml` (or `$MEFACIAL_REGISTRY`) is keyed by variant id; the architecture of a variant
is the code's (`mefacial.variants`), so an entry carries only where the weights are and what they are. The
file is validated when read: an unknown variant id or field is an error naming it.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, UnknownVariantError
from ..utils import user_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
# the local weights folder: checkpoints/ of the source checkout the package runs from (`pip install -e .`), or
# for an installed package (whose parent folder is site-packages) checkpoints/ in mefacial's user cache
DEFAULT_CHECKPOINT_DIR = (REPO_ROOT / "checkpoints" if (REPO_ROOT / "pyproject.toml").is_file()
                          else user_cache_dir() / "checkpoints")
DEFAULT_REGISTRY = Path(str(resources.files("mefacial") / "registry.yaml"))  # package data
ENV_REGISTRY = "MEFACIAL_REGISTRY"  # another registry file (a lab's private weights)
ENV_VARIANT_PREFIX = "MEFACIAL_CHECKPOINT_"  # + variant, upper case, '-' -> '_'
REPO_TYPES = ("model", "dataset", "space")


@dataclasses.dataclass(frozen=True)
class HubSource:
    """One file on the Hugging Face Hub (a model, dataset or Space repository)."""

    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str = "main"
    sha256: str | None = None

    def describe(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type} "
        return f"{self.filename} in Hub {kind}repo {self.repo_id}@{self.revision}"


HubWeights = HubSource  # the name before sources could be several


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """A learned variant's weights: the Hub sources to try in order (none: no public weights), licence, origin."""

    variant: str
    sources: tuple[HubSource, ...] = ()
    licence: str = "unknown"
    licence_note: str = ""
    origin: dict[str, str] = dataclasses.field(default_factory=dict)
    how_to_get: str = ""
    notes: str = ""

    @property
    def weights(self) -> HubSource | None:
        """The first (preferred) source, or None."""
        return self.sources[0] if self.sources else None

    @property
    def env_var(self) -> str:
        return checkpoint_env_var(self.variant)

    @property
    def config(self) -> str:
        """The architecture config of the variant, from the code's variant registry."""
        from ..variants import get_variant

        return get_variant(self.variant).config_name


def checkpoint_env_var(variant: str) -> str:
    """MEFACIAL_CHECKPOINT_<VARIANT>: "fomm-ewp-mm21" -> MEFACIAL_CHECKPOINT_FOMM_EWP_MM21."""
    return ENV_VARIANT_PREFIX + variant.upper().replace("-", "_")


def registry_path() -> Path:
    return Path(os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY)


def load_registry(path: str | Path | None = None) -> dict[str, CheckpointSpec]:
    """Parse and validate the registry (default mefacial/registry.yaml, or $MEFACIAL_REGISTRY) into specs."""
    from ..variants import get_variant, variant_ids

    path = Path(path) if path is not None else registry_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"checkpoint registry {path} cannot be read ({exc.strerror}); set {ENV_REGISTRY} to a registry file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"checkpoint registry {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint registry {path}: expected a mapping of variant ids at the top level")
    known = variant_ids()
    for key in data:
        if key not in known:
            raise ConfigError(f"checkpoint registry {path}: unknown variant id {key!r} (a key at the top level); "
                              f"the variants are {', '.join(known)}")
        if not get_variant(key).needs_weights:
            raise ConfigError(f"checkpoint registry {path}: variant {key!r} needs no weights; remove its entry")
    return {variant: _parse_spec(variant, entry, path) for variant, entry in data.items()}


_MOVED = {
    "config": "the architecture comes from the code's variant registry (mefacial.variants): remove the field",
    "weights": "weights are now `sources:`, a list of Hub files tried in order: `sources: [{repo_id: ..., filename: ...}]`",
}


def _parse_spec(variant: str, entry: Any, path: Path) -> CheckpointSpec:
    where = f"checkpoint registry {path}, variant {variant!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = {f.name for f in dataclasses.fields(CheckpointSpec)} - {"variant"}
    for field in sorted(set(entry) - known):
        hint = _MOVED.get(field, f"known: {sorted(known)}")
        raise ConfigError(f"{where}: unknown field {field!r}; {hint}")
    sources = entry.get("sources") or []
    if not isinstance(sources, list):
        raise ConfigError(f"{where}: field 'sources' must be a list of Hub files (or empty: no public weights)")
    fields = {k: v for k, v in entry.items() if k != "sources" and v is not None}
    return CheckpointSpec(variant=variant, sources=tuple(_parse_source(s, f"{where}, sources[{i}]")
                                                         for i, s in enumerate(sources)), **fields)


def _parse_source(entry: Any, where: str) -> HubSource:
    hub_fields = {f.name for f in dataclasses.fields(HubSource)}
    if not isinstance(entry, dict) or not {"repo_id", "filename"} <= set(entry):
        raise ConfigError(f"{where}: expected a mapping with repo_id and filename")
    if set(entry) - hub_fields:
        raise ConfigError(f"{where}: unknown field(s) {sorted(set(entry) - hub_fields)}; known: {sorted(hub_fields)}")
    source = HubSource(**{k: v for k, v in entry.items() if v is not None})
    if source.repo_type not in REPO_TYPES:
        raise ConfigError(f"{where}: repo_type must be one of {REPO_TYPES}, got {source.repo_type!r}")
    sha = source.sha256
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or set(sha.lower()) - set("0123456789abcdef")):
        raise ConfigError(f"{where}: sha256 must be 64 hex digits, got {sha!r}")
    return source


def get_spec(variant: str) -> CheckpointSpec:
    """The registry entry of `variant`; an error listing the registered ids otherwise."""
    registry = load_registry()
    try:
        return registry[variant]
    except KeyError:
        raise UnknownVariantError(
            f"variant {variant!r} has no entry in the checkpoint registry {registry_path()}; "
            f"known: {', '.join(registry)}"
        ) from None

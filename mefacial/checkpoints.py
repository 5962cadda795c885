"""Weights: where they live, how they are fetched, and how they load, strictly and safely.

Resolution (`resolve_checkpoint`, the one place that decides which file a variant loads):

    explicit path -> $MEFACIAL_CHECKPOINT_<VARIANT> -> checkpoints/ folder
    -> local Hugging Face cache -> Hub download (then sha256 check when the registry knows it)

`mefacial/registry.yaml` (package data) says, per variant, which architecture config it
uses and on which Hub repository its weights live (or how to get them when no
public weights exist). Offline or unreachable, resolution fails within seconds
with a `WeightsNotFoundError` listing every place it looked and what to do.

Formats. Original layouts are `torch.save` dicts of state dicts per part,
e.g. FOMM `{generator, kp_detector, discriminator, optimizer_*, epoch}` and
MRAA `{generator, region_predictor, bg_predictor, avd_network, ...}`; they are
read with `weights_only=True`, so a pickle cannot run code. The project's own
format is `<name>.safetensors` (flat `part.key` tensors) with a `<name>.json`
sidecar (variant, config, provenance); it is preferred when both exist. The
model's sub-modules carry the part names, so either flattens to
`{"generator.dense_motion_network...": tensor}` and loads strictly.

Publishing (`push_to_hub`) uploads safetensors weights, their config and a
generated model card; `python -m mefacial checkpoints list|convert|push` is the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import huggingface_hub
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from .errors import CheckpointError, ConfigError, MefacialError, UnknownVariantError, WeightsNotFoundError

log = logging.getLogger("mefacial.checkpoints")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
DEFAULT_REGISTRY = Path(str(resources.files("mefacial") / "registry.yaml"))  # package data
ENV_CHECKPOINT_DIR = "MEFACIAL_CHECKPOINT_DIR"  # another folder instead of checkpoints/
ENV_REGISTRY = "MEFACIAL_REGISTRY"  # another registry file (a lab's private weights)
ENV_VARIANT_PREFIX = "MEFACIAL_CHECKPOINT_"  # + variant, upper case, '-' -> '_'
# Seconds to wait for the Hub to answer the metadata request before declaring it unreachable
# (HF_HUB_ETAG_TIMEOUT overrides it, as it does in huggingface_hub).
HUB_PROBE_TIMEOUT_S = 5.0

SOURCES = ("explicit", "env", "local", "hf-cache", "hub")
REPO_TYPES = ("model", "space", "dataset")
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth.tar", ".pth", ".pt", ".ckpt", ".tar", ".bin")
FORMAT_NAME = "mefacial"
FORMAT_VERSION = 1
HUB_WEIGHTS_FILENAME = "model.safetensors"  # names inside a repository published by push_to_hub
HUB_CONFIG_FILENAME = "config.json"

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
        lines = str(exc).splitlines() or [""]
        detail = next((line.strip() for line in lines if "GLOBAL" in line), lines[0])  # the refused class
        raise CheckpointError(
            f"{path} is not a loadable checkpoint ({type(exc).__name__}: {detail[:300]}). "
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


def _fit_report(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> str | None:
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

    lines = [f"{source} does not fit this architecture ({type(model).__name__}, config {getattr(getattr(model, 'config', None), 'name', '?')!r})."]
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
    report = _fit_report(model, state, source)
    if report:
        raise CheckpointError(report)
    model.load_state_dict(state, strict=True)


def load_original_checkpoint(model: nn.Module, path: str | Path, parts: tuple[str, ...]) -> dict:
    """Load an original-layout `.pth.tar` into `model` (strict). Returns the raw dict's non-tensor extras."""
    checkpoint = read_pickled_checkpoint(path)
    load_state_dict_strict(model, flatten_parts(checkpoint, parts), source=str(path))
    return {k: v for k, v in checkpoint.items() if not isinstance(v, Mapping)}


# ---- registry ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HubWeights:
    """One file on the Hugging Face Hub."""

    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str = "main"
    sha256: str | None = None

    def describe(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type} "
        return f"{self.filename} in Hub {kind}repo {self.repo_id}@{self.revision}"


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """A learned variant's architecture config and where its weights live."""

    variant: str
    config: str
    weights: HubWeights | None
    licence: str = "unknown"
    licence_note: str = ""
    origin: dict[str, str] = dataclasses.field(default_factory=dict)
    how_to_get: str = ""
    notes: str = ""

    @property
    def env_var(self) -> str:
        return checkpoint_env_var(self.variant)


def checkpoint_env_var(variant: str) -> str:
    """MEFACIAL_CHECKPOINT_<VARIANT>: "fomm-ewp-mm21" -> MEFACIAL_CHECKPOINT_FOMM_EWP_MM21."""
    return ENV_VARIANT_PREFIX + variant.upper().replace("-", "_")


def registry_path() -> Path:
    return Path(os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY)


def load_registry(path: str | Path | None = None) -> dict[str, CheckpointSpec]:
    """Parse the registry (default mefacial/registry.yaml, or $MEFACIAL_REGISTRY) into specs."""
    path = Path(path) if path is not None else registry_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"checkpoint registry {path} cannot be read ({exc.strerror}); set {ENV_REGISTRY} to a registry file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint registry {path}: expected a mapping of variant ids at the top level")
    return {variant: _parse_spec(variant, entry, path) for variant, entry in data.items()}


def _parse_spec(variant: str, entry: Any, path: Path) -> CheckpointSpec:
    where = f"checkpoint registry {path}, variant {variant!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = {f.name for f in dataclasses.fields(CheckpointSpec)} - {"variant"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    if not isinstance(entry.get("config"), str):
        raise ConfigError(f"{where}: field 'config' (a config name in configs/) is required")
    weights = entry.get("weights")
    if weights is not None:
        if not isinstance(weights, dict) or not {"repo_id", "filename"} <= set(weights):
            raise ConfigError(f"{where}: field 'weights' must be null or a mapping with repo_id and filename")
        hub_fields = {f.name for f in dataclasses.fields(HubWeights)}
        if set(weights) - hub_fields:
            raise ConfigError(f"{where}: unknown weights field(s) {sorted(set(weights) - hub_fields)}; known: {sorted(hub_fields)}")
        weights = HubWeights(**{k: v for k, v in weights.items() if v is not None})
        if weights.repo_type not in REPO_TYPES:
            raise ConfigError(f"{where}: weights.repo_type must be one of {REPO_TYPES}, got {weights.repo_type!r}")
        if weights.sha256 is not None and (len(weights.sha256) != 64 or set(weights.sha256.lower()) - set("0123456789abcdef")):
            raise ConfigError(f"{where}: weights.sha256 must be 64 hex digits, got {weights.sha256!r}")
    fields = {k: v for k, v in entry.items() if k != "weights"}
    return CheckpointSpec(variant=variant, weights=weights, **fields)


def get_spec(variant: str) -> CheckpointSpec:
    """The registry entry of `variant`; an error listing the known ids otherwise."""
    registry = load_registry()
    try:
        return registry[variant]
    except KeyError:
        raise UnknownVariantError(
            f"variant {variant!r} has no entry in the checkpoint registry {registry_path()}; "
            f"known: {', '.join(registry)}"
        ) from None


# ---- resolution ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """The file a variant's weights load from, and how it was found."""

    path: Path
    source: str  # one of SOURCES
    sha256: str | None  # verified hash when the registry pins one, else None
    spec: CheckpointSpec | None


def checkpoint_dir() -> Path:
    """The local weights folder: checkpoints/ of the repository, or $MEFACIAL_CHECKPOINT_DIR."""
    return Path(os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)


def hub_cache_dir() -> Path:
    """Hugging Face cache folder, read at call time: $HF_HUB_CACHE, $HF_HOME/hub, or the library default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    """Hub address, read at call time: $HF_ENDPOINT (a mirror) or the library's endpoint."""
    return (os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Whether Hub requests are disabled: $HF_HUB_OFFLINE when set, else the library's setting."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _probe_timeout() -> float:
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT_S)


def _weights_stem(path: Path) -> Path:
    """checkpoints/x.pth.tar -> checkpoints/x (the name shared by a checkpoint and its conversions)."""
    name = path.name
    for suffix in (SAFETENSORS_SUFFIX, ".json", *PICKLE_SUFFIXES):
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def sidecar_path(weights: str | Path) -> Path:
    """<name>.json next to <name>.safetensors (or <name>.pth.tar)."""
    stem = _weights_stem(Path(weights))
    return stem.with_name(stem.name + ".json")


def prefer_safetensors(path: str | Path) -> Path:
    """`path`, or the `<name>.safetensors` beside it when one exists (its conversion: safer and faster to load)."""
    path = Path(path)
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return path
    stem = _weights_stem(path)
    converted = stem.with_name(stem.name + SAFETENSORS_SUFFIX)
    if not converted.is_file():
        return path
    log.info("using %s instead of %s (converted weights are preferred)", converted, path)
    return converted


def _user_file(path: str | Path, source: str, spec: CheckpointSpec | None, what: str) -> ResolvedWeights:
    """An explicit or env path: it must exist (a typo never falls back to other weights)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsNotFoundError(f"{what} {path} is a folder; give the weights file in it (.safetensors or .pth.tar)")
    if not path.is_file():
        for suffix in (SAFETENSORS_SUFFIX, ".pth.tar"):  # a name given without its suffix
            candidate = path.with_name(path.name + suffix)
            if candidate.is_file():
                return ResolvedWeights(candidate, source, None, spec)
        raise WeightsNotFoundError(
            f"{what} {path} does not exist (current folder {Path.cwd()}). Check the path, or leave it unset to "
            "use the registry's weights (`python -m mefacial checkpoints list` shows where they resolve)."
        )
    return ResolvedWeights(prefer_safetensors(path), source, None, spec)


def local_candidates(spec: CheckpointSpec) -> list[Path]:
    """Files of the checkpoints/ folder that count as `spec`'s weights, in order of preference."""
    folder = checkpoint_dir()
    names = [spec.variant + SAFETENSORS_SUFFIX, spec.variant + ".pth.tar"]
    if spec.weights is not None:
        names.append(Path(spec.weights.filename).name)
    return [folder / name for name in dict.fromkeys(names)]


def _cached_hub_file(weights: HubWeights) -> Path | None:
    """The file in the local Hugging Face cache, without any network request."""
    cached = huggingface_hub.try_to_load_from_cache(
        weights.repo_id, weights.filename, cache_dir=hub_cache_dir(), revision=weights.revision, repo_type=weights.repo_type
    )
    return Path(cached) if isinstance(cached, str) else None


def resolve_checkpoint(variant: str, explicit: str | Path | None = None, *, offline: bool | None = None,
                       progress: bool = True) -> ResolvedWeights:
    """Find the weights file of `variant`: explicit path -> $MEFACIAL_CHECKPOINT_<VARIANT> -> checkpoints/
    -> local Hugging Face cache -> Hub download (progress bars when `progress`).

    `offline` (default: $HF_HUB_OFFLINE) forbids the download. Hub files are checked against the
    registry's sha256 when it has one (mismatch: CheckpointError). Nothing found: WeightsNotFoundError
    naming every place looked at and what to do, within seconds even when the Hub is unreachable.
    """
    if explicit is not None and str(explicit) != "":
        spec = load_registry().get(variant)
        return _user_file(explicit, "explicit", spec, "checkpoint")
    spec = get_spec(variant)
    env_var = spec.env_var
    if os.environ.get(env_var):
        return _user_file(os.environ[env_var], "env", spec, f"${env_var} =")
    return _resolve_registered(spec, offline=hub_offline() if offline is None else offline, progress=progress, verify=True)


def _resolve_registered(spec: CheckpointSpec, *, offline: bool, progress: bool, verify: bool) -> ResolvedWeights:
    """checkpoints/ folder -> HF cache -> Hub, for a variant with no explicit or env path."""
    looked = [f"${spec.env_var}: not set"]
    candidates = local_candidates(spec)
    for candidate in candidates:
        if candidate.is_file():
            return ResolvedWeights(prefer_safetensors(candidate), "local", None, spec)
    looked.append("checkpoints folder: " + ", ".join(str(c) for c in candidates) + " (none exists)")

    hub = spec.weights
    if hub is None:
        raise _not_found(spec, looked, reason="the registry lists no public weights for it")

    cached = _cached_hub_file(hub)
    if cached is not None:
        return ResolvedWeights(cached, "hf-cache", _check_sha256(cached, hub.sha256) if verify else None, spec)
    looked.append(f"Hugging Face cache {hub_cache_dir()}: {hub.describe()} is not cached")

    if offline:
        looked.append("Hub download: skipped, offline mode (HF_HUB_OFFLINE=1 or offline=True)")
        raise _not_found(spec, looked, reason="it is not on this machine and downloads are off")
    path = _download(hub, spec, looked, progress)
    return ResolvedWeights(path, "hub", _check_sha256(path, hub.sha256) if verify else None, spec)


def _download(hub: HubWeights, spec: CheckpointSpec, looked: list[str], progress: bool) -> Path:
    """Fetch `hub` into the HF cache. A single metadata request without retries comes first, so an
    unreachable Hub fails within `_probe_timeout()` seconds instead of hf_hub_download's retry back-off."""
    endpoint = hub_endpoint()
    url = huggingface_hub.hf_hub_url(hub.repo_id, hub.filename, repo_type=hub.repo_type, revision=hub.revision, endpoint=endpoint)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=_probe_timeout(), endpoint=endpoint)
        path = huggingface_hub.hf_hub_download(
            hub.repo_id, hub.filename, repo_type=hub.repo_type, revision=hub.revision, cache_dir=hub_cache_dir(),
            endpoint=endpoint, etag_timeout=_probe_timeout(), tqdm_class=None if progress else _SilentTqdm,
        )
    except Exception as exc:  # network and Hub errors of every kind become one actionable error
        looked.append(f"Hub download {url}: {_describe_hub_error(exc, hub, endpoint)}")
        raise _not_found(spec, looked, reason="the download failed") from exc
    return Path(path)


class _SilentTqdm(tqdm):
    """Progress bar class that shows nothing (progress=False)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# httpx / requests / urllib3 errors of a connection that dropped while the file was coming in
CUT_MIDWAY = {"RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError"}


def _describe_hub_error(exc: Exception, hub: HubWeights, endpoint: str) -> str:
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is on in huggingface_hub (HF_HUB_OFFLINE was set when it was imported)"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"repository {hub.repo_type} {hub.repo_id} not found on {endpoint}, or private/gated "
                "(set HF_TOKEN or run `hf auth login` with an account that has access)")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {hub.revision!r} does not exist in {hub.repo_id}"
    if isinstance(exc, EntryNotFoundError):
        return f"file {hub.filename!r} does not exist in {hub.repo_id}@{hub.revision}"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"HTTP {status} from the Hub ({str(exc).splitlines()[0][:200]})"
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no answer'}"
    if type(exc).__name__ in CUT_MIDWAY:
        return (f"the connection was cut during the download ({detail}); nothing partial is used as weights: "
                "run again to retry (huggingface_hub resumes from its last complete chunk)")
    return f"Hub unreachable ({detail})" if _is_network_error(exc) else f"download failed ({detail})"


def _is_network_error(exc: Exception) -> bool:
    """Connection refused, DNS failure, timeout... for httpx (huggingface_hub >= 1) and requests (< 1) alike."""
    bases = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(bases & {"TransportError", "RequestException"})


def _not_found(spec: CheckpointSpec, looked: list[str], reason: str) -> WeightsNotFoundError:
    """The error that says which file is missing, where it was looked for, and what to do (one wording for the
    command line, one for the page)."""
    from .variants import get_variant

    wanted = spec.weights.describe() if spec.weights else f"{spec.variant}.safetensors or {spec.variant}.pth.tar"
    folder = checkpoint_dir()
    todo = [spec.how_to_get.strip()] if spec.how_to_get else []
    todo.append(f"copy the weights file to {folder / (spec.variant + '.pth.tar')} (or {spec.variant}.safetensors there)")
    if "--checkpoint" not in spec.how_to_get:
        todo.append(f"pass --checkpoint PATH, or set {spec.env_var}=PATH")
    else:
        todo.append(f"set {spec.env_var}=PATH")
    if spec.weights is not None:
        online = "go online (unset HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE") else "check the network"
        todo.append(f"{online}, or set HF_ENDPOINT to a reachable Hub mirror (now {hub_endpoint()}); "
                    "private repositories need HF_TOKEN")
    if "python -m train" not in spec.how_to_get:
        todo.append(f"train it: python -m train (configs/train/), config {spec.config!r}")
    lines = [f"No weights for variant {spec.variant!r} ({wanted}): {reason}.", "Looked in:"]
    lines += [f"  - {item}" for item in looked]
    lines.append("What to do, any one of:")
    lines += [f"  - {item.rstrip('.,; ')}" for item in todo]
    try:
        label = get_variant(spec.variant).label
    except MefacialError:
        label = spec.variant
    return WeightsNotFoundError("\n".join(lines), page=f"{label} has no weights on this server", operator="Weights")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str | None) -> str | None:
    """The file's sha256 when `expected` is known and matches; CheckpointError naming both otherwise."""
    if expected is None:
        return None
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"sha256 mismatch for {path}: expected {expected.lower()} (checkpoint registry), got {actual}. "
            "The file is corrupt or another version: delete it from the cache and retry, or fix the registry's sha256 "
            "if the repository was updated on purpose (pin `revision` to a commit to avoid this)."
        )
    return actual


# ---- reading and loading ------------------------------------------------------------------------


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


def _unflatten_parts(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"part.key": t}` -> `{part: {key: t}}`, ignoring wrapper prefixes before the part name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        part, _, rest = _strip_prefixes(key).partition(".")
        parts.setdefault(part, {})[rest] = value
    return parts


def _parts_of(parts: str | Sequence[str]) -> tuple[str, ...]:
    """A backbone name ("fomm") -> its inference parts; a sequence of part names as is."""
    from .models import INFERENCE_PARTS

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
        raise WeightsNotFoundError(f"checkpoint {path} does not exist")
    if not is_safetensors(path):
        return load_original_checkpoint(model, path, wanted)
    flat = flatten_parts(_unflatten_parts(read_safetensors(path)), wanted)
    load_state_dict_strict(model, flat, source=str(path))
    return read_sidecar(path) or {}


# ---- conversion ---------------------------------------------------------------------------------


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
                flat[f"{part}.{_strip_prefixes(key)}"] = tensor.detach().clone(memory_format=torch.contiguous_format)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            extras[part] = value
        else:
            dropped.append(part)
    return flat, extras, dropped


def check_architecture(checkpoint: Mapping, config: Any, source: str = "checkpoint") -> None:
    """CheckpointError unless the checkpoint's inference parts fit `config`'s model, key for key and shape
    for shape. The model is built on the meta device: no memory for weights, no computation."""
    from .models import INFERENCE_PARTS, build_model

    flat = flatten_parts(checkpoint, INFERENCE_PARTS[config.backbone])
    with torch.device("meta"):
        model = build_model(config)
    report = _fit_report(model, flat, source)
    if report:
        raise CheckpointError(report)


def _config_of(config: Any, variant: str | None, checkpoint: Mapping | None = None):
    """A ModelConfig from, in order: a config object or name/path, the architecture a train/ checkpoint
    records (`model_config_json`), the variant's registry entry."""
    from .config import ModelConfig, load_config

    if isinstance(config, ModelConfig):
        return config
    if config is not None:
        return load_config(config)
    own = checkpoint.get("model_config_json") if checkpoint is not None else None
    if isinstance(own, str):
        return _config_from_dict(json.loads(own))
    if variant is None:
        raise ConfigError("give a variant or a config to describe the checkpoint")
    return load_config(get_spec(variant).config)


def convert_to_safetensors(src: str | Path, dst: str | Path | None = None, config: Any = None,
                           variant: str | None = None) -> Path:
    """Turn an original `.pth.tar` into `<dst>.safetensors` + `<dst>.json` (config, variant, provenance).

    `config` is a ModelConfig, a config name or path (default: the architecture a train/ checkpoint records,
    else the variant's registry config); it must fit the weights. Every part of the architecture is kept
    (discriminator included, for fine-tuning); optimiser and RNG states are dropped. `dst` defaults to
    checkpoints/<variant>.safetensors, where the resolver finds it.
    """
    from .models import CHECKPOINT_PARTS

    src = Path(src)
    checkpoint = read_pickled_checkpoint(src)
    model_config = _config_of(config, variant, checkpoint)
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
    save_safetensors(flat, str(dst), metadata={"format": FORMAT_NAME, "variant": sidecar["variant"] or "",
                                               "config": model_config.name})
    sidecar_path(dst).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dst


# ---- publishing ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PublishedWeights:
    """Where `push_to_hub` put the weights: paste `registry_entry()` into mefacial/registry.yaml."""

    repo_id: str
    filename: str
    revision: str  # commit of the upload
    sha256: str
    url: str

    def registry_entry(self) -> dict:
        return {"repo_id": self.repo_id, "repo_type": "model", "filename": self.filename,
                "revision": self.revision, "sha256": self.sha256}


def model_card(variant: str, config: Any, *, repo_id: str, metrics: Mapping[str, Any] | None = None,
               spec: CheckpointSpec | None = None, provenance: Mapping[str, Any] | None = None) -> str:
    """README.md for a published checkpoint: front matter (library, tags, licence) and what the weights are."""
    prior_names = {"none": "no prior", "ewp": "equal-weighted prior (EWP)", "awp": "adaptive weighted prior (AWP)"}
    from .models import get_backbone

    backbone = get_backbone(config.backbone)
    origin = dict(spec.origin) if spec else {}
    licence = spec.licence if spec else "other"
    front = {
        "library_name": FORMAT_NAME,
        "license": licence,
        "tags": ["mefacial", "micro-expression", "image-animation", "face-reenactment", config.backbone,
                 f"prior-{config.prior}"],
        "pipeline_tag": "image-to-video",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# mefacial `{variant}` weights", "",
             f"Weights for the `{variant}` variant of mefacial (facial-prior-guided micro-expression "
             "generation), in its safetensors format.", "",
             "## Architecture", "",
             f"- backbone: {backbone.title}",
             f"- prior: {prior_names.get(config.prior, config.prior)}",
             f"- config: `{config.name}` ({config.num_points} {backbone.points_name}, "
             f"{config.image_size}x{config.image_size} frames, grid_sample align_corners={config.grid_sample_align_corners})",
             f"- files: `{HUB_WEIGHTS_FILENAME}` (flat `part.key` tensors), `{HUB_CONFIG_FILENAME}` (full config and provenance)",
             "", "## Training data", "",
             f"- {origin.get('dataset', 'not stated by the uploader')} (the variant's registered data; "
             f"`{HUB_CONFIG_FILENAME}` holds the run's own training config when it came from `train/`)"]
    if origin.get("paper"):
        lines += ["", "## Origin", "", f"- paper: {origin['paper']}"] + ([f"- code: {origin['code']}"] if origin.get("code") else [])
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in metrics.items()]
    if provenance:
        lines += ["", "## Provenance", ""] + [f"- {k}: {v}" for k, v in provenance.items() if k in ("converted_from", "source_sha256", "epoch", "step")]
    if spec and spec.licence_note:
        lines += ["", "## Licence", "", f"`{licence}`. Upstream code and data, from the mefacial checkpoint registry: "
                  + " ".join(spec.licence_note.split())]
    lines += ["", "## Use", "", "```bash",
              f"python -m mefacial animate --variant {variant} --source face.png --driving clip.mp4 --out out.mp4 \\",
              f"    --checkpoint \"$(python -c \"from huggingface_hub import hf_hub_download; "
              f"print(hf_hub_download('{repo_id}', '{HUB_WEIGHTS_FILENAME}'))\")\"",
              "```", "",
              "or add it to `mefacial/registry.yaml` (`python -m mefacial checkpoints push` prints the entry).", ""]
    return "\n".join(lines)


def push_to_hub(variant: str, file: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                metrics: Mapping[str, Any] | None = None, *, config: Any = None,
                commit_message: str | None = None) -> PublishedWeights:
    """Upload weights (as safetensors), their config JSON and a generated model card to a model repo.

    `file` is an original `.pth.tar` (converted on the way) or the project's `.safetensors` (with its
    sidecar when present). Uses `HfApi` (token: argument, $HF_TOKEN or the stored login; endpoint: $HF_ENDPOINT).
    """
    file = prefer_safetensors(file)
    if not file.is_file():
        raise WeightsNotFoundError(f"cannot publish {file}: no such file")
    spec = load_registry().get(variant)
    with tempfile.TemporaryDirectory(prefix="mefacial-push-") as tmp:
        staged = Path(tmp) / HUB_WEIGHTS_FILENAME
        if is_safetensors(file):
            previous = read_sidecar(file) or {}
            if config is None and isinstance(previous.get("config"), dict):
                config = _config_from_dict(previous["config"])
            model_config = _config_of(config, variant)
            check_architecture(_unflatten_parts(read_safetensors(file)), model_config, str(file))  # before uploading
            shutil.copyfile(file, staged)
            sidecar = {**previous, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                       "variant": variant, "config": model_config.to_dict()}
        else:
            convert_to_safetensors(file, staged, config, variant)
            sidecar = read_sidecar(staged) or {}
            sidecar_path(staged).unlink()  # published as config.json instead
            model_config = _config_from_dict(sidecar["config"])
        if metrics:
            sidecar["metrics"] = dict(metrics)
        (Path(tmp) / HUB_CONFIG_FILENAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (Path(tmp) / "README.md").write_text(
            model_card(variant, model_config, repo_id=repo_id, metrics=metrics, spec=spec, provenance=sidecar.get("metadata")),
            encoding="utf-8")
        digest = sha256_file(staged)
        api = HfApi(endpoint=hub_endpoint(), token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                   commit_message=commit_message or f"Upload mefacial {variant} weights")
    return PublishedWeights(repo_id=repo_id, filename=HUB_WEIGHTS_FILENAME, revision=getattr(commit, "oid", None) or "main",
                            sha256=digest, url=str(getattr(repo_url, "url", repo_url)))


def _config_from_dict(data: Mapping[str, Any]):
    from .config import ModelConfig

    return ModelConfig.from_dict(dict(data), name=data.get("name"))


# ---- listing ------------------------------------------------------------------------------------


def list_checkpoints(with_hash: bool = False) -> list[dict]:
    """Every registered variant: where its weights resolve to now (no network), present or not, licence."""
    rows = []
    for variant, spec in load_registry().items():
        row = {"variant": variant, "config": spec.config, "licence": spec.licence,
               "hub": spec.weights.describe() if spec.weights else None, "present": False, "source": None, "path": None}
        try:
            env_path = os.environ.get(spec.env_var)
            found = (_user_file(env_path, "env", spec, f"${spec.env_var} =") if env_path
                     else _resolve_registered(spec, offline=True, progress=False, verify=False))
            row.update(present=True, source=found.source, path=str(found.path))
            if with_hash:
                row["sha256"] = sha256_file(found.path)
        except WeightsNotFoundError:
            if env_path:
                row["missing"] = f"${spec.env_var} points to a missing file: {env_path}"
            else:
                row["missing"] = "downloads from the Hub on first use" if spec.weights else "no public weights"
            row["how_to_get"] = " ".join(spec.how_to_get.split())
        rows.append(row)
    return rows


# ---- command line -------------------------------------------------------------------------------


def checkpoints_table(rows: list[dict]) -> str:
    """`checkpoints list` for people: one line per variant, then how to get each missing one."""
    import textwrap

    from .console import table

    def weights(row: dict) -> str:
        if row["present"]:
            return f"{row['source']}: {row['path']}" + (f" (sha256 {row['sha256']})" if row.get("sha256") else "")
        if row.get("hub") and not row["missing"].startswith("$"):
            return "missing: " + ("not downloaded, and downloads are off (HF_HUB_OFFLINE)" if hub_offline()
                                  else "downloaded from the Hub on first use")
        return f"missing: {row['missing']}"

    lines = [table([[r["variant"], r["licence"], weights(r)] for r in rows], ["variant", "licence", "weights"])]
    missing = [r for r in rows if not r["present"] and r.get("how_to_get")]
    if missing:
        lines.append("\nHow to get the missing weights:")
        for row in missing:
            lines.append(textwrap.fill(row["how_to_get"], width=100, initial_indent=f"  {row['variant']}: ",
                                       subsequent_indent="    "))
    lines.append(f"\nRegistry: {registry_path()}\nLocal folder: {checkpoint_dir()}\nHub cache: {hub_cache_dir()}\n"
                 "--json prints all of this as JSON.")
    return "\n".join(lines)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `checkpoints list|convert|push` to the `python -m mefacial` parser."""
    parser = subparsers.add_parser("checkpoints", help="list, convert and publish weights",
                                   description="Where each variant's weights are, and tools to convert and publish them.")
    sub = parser.add_subparsers(dest="checkpoints_command", required=True)
    ls = sub.add_parser("list", help="each variant, where its weights resolve to now (no network), licence")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--hash", action="store_true", help="also print the sha256 of present files (to pin in the registry)")
    cv = sub.add_parser("convert", help="original .pth.tar -> .safetensors + .json config")
    cv.add_argument("src", type=Path, help="original checkpoint (.pth.tar)")
    cv.add_argument("--variant", required=True, help="variant id the weights belong to (e.g. fomm-none)")
    cv.add_argument("--config", help="config name or YAML path (default: the variant's)")
    cv.add_argument("--out", type=Path, help="output .safetensors (default: checkpoints/<variant>.safetensors)")
    ps = sub.add_parser("push", help="upload weights, config and a model card to the Hugging Face Hub")
    ps.add_argument("--variant", required=True)
    ps.add_argument("--file", required=True, type=Path, help=".pth.tar or .safetensors")
    ps.add_argument("--repo", required=True, help="user/name of the model repository (created if absent)")
    ps.add_argument("--config", help="config name or YAML path (default: the sidecar's, else the variant's)")
    ps.add_argument("--metrics", type=Path, help="JSON file of metrics for the model card")
    ps.add_argument("--private", action="store_true")
    ps.add_argument("--token", help="Hub token (default: $HF_TOKEN or the stored login)")
    ps.add_argument("--message", help="commit message")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Run one `checkpoints` sub-command; returns the exit status."""
    if args.checkpoints_command == "list":
        rows = list_checkpoints(with_hash=args.hash)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(checkpoints_table(rows))
        return 0
    if args.checkpoints_command == "convert":
        dst = convert_to_safetensors(args.src, args.out, args.config, args.variant)
        print(f"wrote {dst} and {sidecar_path(dst)}")
        return 0
    if args.checkpoints_command == "push":
        metrics = None
        if args.metrics is not None:
            try:
                metrics = json.loads(args.metrics.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--metrics {args.metrics}: not a readable JSON file ({exc})") from None
        published = push_to_hub(args.variant, args.file, args.repo, private=args.private, token=args.token,
                                metrics=metrics, config=args.config, commit_message=args.message)
        print(f"uploaded to {published.url} (commit {published.revision})")
        print("registry entry (mefacial/registry.yaml):")
        print(yaml.safe_dump({args.variant: {"weights": published.registry_entry()}}, sort_keys=False))
        return 0
    raise ValueError(f"unknown checkpoints command {args.checkpoints_command!r}")

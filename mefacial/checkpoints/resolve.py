"""Which file a variant's weights load from: the one place that decides it.

    explicit path -> $MEFACIAL_CHECKPOINT_<VARIANT> -> checkpoints/ folder
    -> local Hugging Face cache (each registry source) -> Hub download (each source in order)

A Hub file is checked against its source's sha256 when the registry pins one; a mismatch stops (it is never
taken for the weights, and the next source is not tried: a wrong file is a problem to fix, not to route
around). Nothing found: a `WeightsNotFoundError` listing every place looked at, each source and why it failed,
and what to do, within seconds even offline or with the Hub unreachable.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import CheckpointError, MefacialError, WeightsNotFoundError
from . import hub
from .formats import SAFETENSORS_SUFFIX, prefer_safetensors, sha256_file
from .registry import DEFAULT_CHECKPOINT_DIR, CheckpointSpec, HubSource, get_spec, load_registry

ENV_CHECKPOINT_DIR = "MEFACIAL_CHECKPOINT_DIR"  # another folder instead of checkpoints/
SOURCES = ("explicit", "env", "local", "hf-cache", "hub")


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """The file a variant's weights load from, and how it was found."""

    path: Path
    source: str  # one of SOURCES
    sha256: str | None  # verified hash when the registry pins one, else None
    spec: CheckpointSpec | None
    hub: HubSource | None = None  # the registry source of an "hf-cache" or "hub" file


def checkpoint_dir() -> Path:
    """The local weights folder: checkpoints/ of the repository, or $MEFACIAL_CHECKPOINT_DIR."""
    return Path(os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)


def user_file(path: str | Path, source: str, spec: CheckpointSpec | None, what: str) -> ResolvedWeights:
    """An explicit or env path: it must exist (a typo never falls back to other weights)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsNotFoundError(f"{what} {path} is a folder; give the weights file in it (.safetensors or .pth.tar)",
                                   page="The weights set for this variant are a folder, not a file, on the server")
    if not path.is_file():
        for suffix in (SAFETENSORS_SUFFIX, ".pth.tar"):  # a name given without its suffix
            candidate = path.with_name(path.name + suffix)
            if candidate.is_file():
                return ResolvedWeights(candidate, source, None, spec)
        raise WeightsNotFoundError(
            f"{what} {path} does not exist (current folder {Path.cwd()}). Check the path, or leave it unset to "
            "use the registry's weights (`python -m mefacial checkpoints list` shows where they resolve).",
            page="The weights file set for this variant is missing on the server")
    return ResolvedWeights(prefer_safetensors(path), source, None, spec)


def local_candidates(spec: CheckpointSpec) -> list[Path]:
    """Files of the checkpoints/ folder that count as `spec`'s weights, in order of preference."""
    folder = checkpoint_dir()
    names = [spec.variant + SAFETENSORS_SUFFIX, spec.variant + ".pth.tar"]
    names += [Path(source.filename).name for source in spec.sources]
    return [folder / name for name in dict.fromkeys(names)]


def resolve_checkpoint(variant: str, explicit: str | Path | None = None, *, offline: bool | None = None,
                       progress: bool = True) -> ResolvedWeights:
    """Find the weights file of `variant`: explicit path -> $MEFACIAL_CHECKPOINT_<VARIANT> -> checkpoints/
    -> local Hugging Face cache -> Hub download, each registry source in order (progress bars when `progress`).

    `offline` (default: $HF_HUB_OFFLINE) forbids downloads. Hub files are checked against their source's
    sha256 when the registry has one (mismatch: CheckpointError). Nothing found: WeightsNotFoundError
    naming every place and source looked at and what to do.
    """
    if explicit is not None and str(explicit) != "":
        spec = load_registry().get(variant)
        return user_file(explicit, "explicit", spec, "checkpoint")
    spec = get_spec(variant)
    env_var = spec.env_var
    if os.environ.get(env_var):
        return user_file(os.environ[env_var], "env", spec, f"${env_var} =")
    return resolve_registered(spec, offline=hub.hub_offline() if offline is None else offline, progress=progress,
                              verify=True)


def resolve_registered(spec: CheckpointSpec, *, offline: bool, progress: bool, verify: bool) -> ResolvedWeights:
    """checkpoints/ folder -> HF cache -> Hub, for a variant with no explicit or env path."""
    looked = [f"${spec.env_var}: not set"]
    candidates = local_candidates(spec)
    for candidate in candidates:
        if candidate.is_file():
            return ResolvedWeights(prefer_safetensors(candidate), "local", None, spec)
    looked.append("checkpoints folder: " + ", ".join(str(c) for c in candidates) + " (none exists)")
    if not spec.sources:
        raise not_found(spec, looked, reason="the registry lists no public weights for it")

    for source in spec.sources:
        cached = hub.cached_hub_file(source)
        if cached is not None:
            return ResolvedWeights(cached, "hf-cache", check_sha256(cached, source) if verify else None, spec, source)
    count = len(spec.sources)  # (the sources are named once, in the error's first line)
    looked.append(f"Hugging Face cache {hub.hub_cache_dir()}: "
                  + ("not cached" if count == 1 else f"none of the {count} Hub sources is cached"))

    if offline:
        looked.append("Hub download: skipped, offline mode (HF_HUB_OFFLINE=1 or offline=True)")
        raise not_found(spec, looked, reason="it is not on this machine and downloads are off")

    for index, source in enumerate(spec.sources):
        where = f"Hub source {index + 1}/{len(spec.sources)} {hub.source_url(source)}"
        try:
            hub.probe(source)
            path = hub.fetch(source, progress)
        except Exception as exc:  # network and Hub errors of every kind become one line of the final error
            looked.append(f"{where}: {hub.describe_hub_error(exc, source)}")
            if hub.is_network_error(exc) and type(exc).__name__ not in hub.CUT_MIDWAY:
                # The endpoint does not answer: the other sources, on the same endpoint, would wait as long.
                looked += [f"Hub source {later + 1}/{len(spec.sources)} {hub.source_url(rest)}: not tried, "
                           f"{hub.hub_endpoint()} did not answer"
                           for later, rest in enumerate(spec.sources[index + 1:], start=index + 1)]
                break
            continue
        return ResolvedWeights(path, "hub", check_sha256(path, source) if verify else None, spec, source)
    raise not_found(spec, looked, reason="the download failed" + (f" from all {count} Hub sources" if count > 1 else ""))


def not_found(spec: CheckpointSpec, looked: list[str], reason: str) -> WeightsNotFoundError:
    """The error that says which file is missing, where it was looked for, and what to do (one wording for the
    command line, one for the page)."""
    from ..variants import get_variant

    if len(spec.sources) == 1:
        wanted = spec.sources[0].describe()
    elif spec.sources:
        wanted = f"{len(spec.sources)} Hub sources: " + "; ".join(s.describe() for s in spec.sources)
    else:
        wanted = f"{spec.variant}.safetensors or {spec.variant}.pth.tar"
    folder = checkpoint_dir()
    how_to_get = " ".join(spec.how_to_get.split())
    todo = [how_to_get] if how_to_get else []
    if "checkpoints/" not in how_to_get:  # (where the registry's advice names the folder already, once is enough)
        todo.append(f"copy the weights file to {folder / (spec.variant + '.pth.tar')} (or {spec.variant}.safetensors "
                    "there)")
    if "--checkpoint" not in how_to_get:
        todo.append(f"pass --checkpoint PATH, or set {spec.env_var}=PATH")
    else:
        todo.append(f"set {spec.env_var}=PATH")
    if spec.sources:
        online = "go online (unset HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE") else "check the network"
        todo.append(f"{online}, or set HF_ENDPOINT to a reachable Hub mirror (now {hub.hub_endpoint()}); "
                    "private repositories need HF_TOKEN")
    if "python -m train" not in how_to_get:
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


def check_sha256(path: Path, source: HubSource) -> str | None:
    """The file's sha256 when `source` pins one and it matches; CheckpointError naming file and both hashes otherwise."""
    if source.sha256 is None:
        return None
    expected, actual = source.sha256.lower(), sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"sha256 mismatch for {source.describe()} ({path}): expected {expected} (checkpoint registry), got {actual}. "
            "The file is corrupt or another version: delete it from the Hugging Face cache and retry, or fix the "
            "registry's sha256 if the repository was updated on purpose (pin `revision` to a commit to avoid this)."
        )
    return actual

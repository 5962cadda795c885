"""Hugging Face Hub access for weights: the cache, one bounded download per source, and what went wrong, in words.

Settings are read at call time, as huggingface_hub reads them at import: `HF_HUB_CACHE` / `HF_HOME`,
`HF_ENDPOINT` (a mirror), `HF_HUB_OFFLINE`, `HF_HUB_ETAG_TIMEOUT`, `HF_TOKEN`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from .registry import HubSource

# Seconds to wait for the Hub to answer the metadata request before declaring it unreachable
# (HF_HUB_ETAG_TIMEOUT overrides it, as it does in huggingface_hub).
HUB_PROBE_TIMEOUT_S = 5.0
# httpx / requests / urllib3 errors of a connection that dropped while the file was coming in
CUT_MIDWAY = {"RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError"}


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


def probe_timeout() -> float:
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT_S)


def source_url(source: HubSource) -> str:
    return huggingface_hub.hf_hub_url(source.repo_id, source.filename, repo_type=source.repo_type,
                                      revision=source.revision, endpoint=hub_endpoint())


def cached_hub_file(source: HubSource) -> Path | None:
    """The file in the local Hugging Face cache, without any network request."""
    cached = huggingface_hub.try_to_load_from_cache(
        source.repo_id, source.filename, cache_dir=hub_cache_dir(), revision=source.revision, repo_type=source.repo_type
    )
    return Path(cached) if isinstance(cached, str) else None


class _SilentTqdm(tqdm):
    """Progress bar class that shows nothing (progress=False)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def probe(source: HubSource) -> None:
    """One metadata request for `source`, without retries: an unreachable Hub fails within `probe_timeout()`
    seconds instead of hf_hub_download's retry back-off; a missing repository, revision or file fails here."""
    huggingface_hub.get_hf_file_metadata(source_url(source), timeout=probe_timeout(), endpoint=hub_endpoint())


def fetch(source: HubSource, progress: bool = True) -> Path:
    """Download `source` into the HF cache (after `probe`); the file's path there."""
    path = huggingface_hub.hf_hub_download(
        source.repo_id, source.filename, repo_type=source.repo_type, revision=source.revision, cache_dir=hub_cache_dir(),
        endpoint=hub_endpoint(), etag_timeout=probe_timeout(), tqdm_class=None if progress else _SilentTqdm,
    )
    return Path(path)


def describe_hub_error(exc: Exception, source: HubSource) -> str:
    """What a failed download of `source` means, and what to do, in one line."""
    endpoint = hub_endpoint()
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is on in huggingface_hub (HF_HUB_OFFLINE was set when it was imported)"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"repository {source.repo_type} {source.repo_id} not found on {endpoint}, or private/gated "
                "(set HF_TOKEN or run `hf auth login` with an account that has access)")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {source.revision!r} does not exist in {source.repo_id}"
    if isinstance(exc, EntryNotFoundError):
        return f"file {source.filename!r} does not exist in {source.repo_id}@{source.revision}"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"HTTP {status} from the Hub ({str(exc).splitlines()[0][:200]})"
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no answer'}"
    if type(exc).__name__ in CUT_MIDWAY:
        return (f"the connection was cut during the download ({detail}); nothing partial is used as weights: "
                "run again to retry (huggingface_hub resumes from its last complete chunk)")
    return f"Hub unreachable ({detail})" if is_network_error(exc) else f"download failed ({detail})"


def is_network_error(exc: Exception) -> bool:
    """Connection refused, DNS failure, timeout... for httpx (huggingface_hub >= 1) and requests (< 1) alike."""
    bases = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(bases & {"TransportError", "RequestException"})

"""Weights: where they live, how they are fetched, and how they load, strictly and safely. One job per module:

- `formats`: checkpoint layouts (original `.pth.tar`, the project's safetensors + JSON) and strict, safe loading;
- `registry`: `mefacial/registry.yaml`, keyed by variant id: Hub sources (tried in order) and licences;
- `hub`: the Hugging Face cache, bounded downloads, and Hub errors in words;
- `resolve`: which file a variant loads (explicit path -> env -> checkpoints/ -> HF cache -> Hub sources);
- `convert`: original checkpoints -> safetensors + config sidecar;
- `publish`: upload to the Hub with a generated model card;
- `cli`: `python -m mefacial checkpoints list|convert|push` and the listing.

The names below are the package's public interface (`from mefacial.checkpoints import resolve_checkpoint`).
"""

from .cli import checkpoints_table, list_checkpoints, register_cli, run_cli
from .convert import check_architecture, config_of, convert_to_safetensors, trained_config
from .formats import (FORMAT_NAME, FORMAT_VERSION, PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, flatten_parts, is_safetensors,
                      load_original_checkpoint, load_state_dict_strict, load_weights, prefer_safetensors,
                      read_pickled_checkpoint, read_safetensors, read_sidecar, sha256_file, sidecar_path,
                      unflatten_parts)
from .hub import HUB_PROBE_TIMEOUT_S, cached_hub_file, hub_cache_dir, hub_endpoint, hub_offline
from .publish import HUB_CONFIG_FILENAME, HUB_WEIGHTS_FILENAME, PublishedWeights, model_card, push_to_hub
from .registry import (DEFAULT_CHECKPOINT_DIR, DEFAULT_REGISTRY, ENV_REGISTRY, ENV_VARIANT_PREFIX, REPO_TYPES,
                       CheckpointSpec, HubSource, HubWeights, checkpoint_env_var, get_spec, load_registry,
                       registry_path)
from .resolve import (ENV_CHECKPOINT_DIR, SOURCES, ResolvedWeights, checkpoint_dir, local_candidates,
                      resolve_checkpoint)
from ..errors import CheckpointError, ConfigError, UnknownVariantError, WeightsNotFoundError

__all__ = [
    "CheckpointError", "CheckpointSpec", "checkpoints_table", "ConfigError", "DEFAULT_CHECKPOINT_DIR", "DEFAULT_REGISTRY",
    "ENV_CHECKPOINT_DIR", "ENV_REGISTRY", "ENV_VARIANT_PREFIX", "FORMAT_NAME", "FORMAT_VERSION",
    "HUB_CONFIG_FILENAME", "HUB_PROBE_TIMEOUT_S", "HUB_WEIGHTS_FILENAME", "HubSource", "HubWeights",
    "PICKLE_SUFFIXES", "PublishedWeights", "REPO_TYPES", "ResolvedWeights", "SAFETENSORS_SUFFIX", "SOURCES",
    "UnknownVariantError", "WeightsNotFoundError", "cached_hub_file", "check_architecture", "checkpoint_dir",
    "checkpoint_env_var", "config_of", "convert_to_safetensors", "flatten_parts", "get_spec", "hub_cache_dir",
    "trained_config",
    "hub_endpoint", "hub_offline", "is_safetensors", "list_checkpoints", "load_original_checkpoint",
    "load_registry", "load_state_dict_strict", "load_weights", "local_candidates", "model_card",
    "prefer_safetensors", "push_to_hub", "read_pickled_checkpoint", "read_safetensors", "read_sidecar",
    "register_cli", "registry_path", "resolve_checkpoint", "run_cli", "sha256_file", "sidecar_path",
    "unflatten_parts",
]

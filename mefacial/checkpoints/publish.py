"""Publishing weights to the Hugging Face Hub: safetensors, their config JSON and a generated model card."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import OfflineModeIsEnabled

from ..errors import CheckpointError, WeightsNotFoundError
from .convert import check_architecture, config_from_dict, config_of, convert_to_safetensors
from .formats import (FORMAT_NAME, FORMAT_VERSION, is_safetensors, prefer_safetensors, read_safetensors, read_sidecar,
                      sha256_file, sidecar_path, unflatten_parts)
from .hub import hub_endpoint, is_network_error
from .registry import CheckpointSpec, load_registry

HUB_WEIGHTS_FILENAME = "model.safetensors"  # names inside a repository published by push_to_hub
HUB_CONFIG_FILENAME = "config.json"

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
    from ..models import get_backbone

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


def _upload_failure(error: Exception) -> str:
    """Why an upload failed, and what to do, in one line."""
    if isinstance(error, OfflineModeIsEnabled):
        return "huggingface_hub's offline mode is on (HF_HUB_OFFLINE=1): unset it to upload"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"the Hub refused the upload (HTTP {status}): log in with a token that may write there "
                "(`hf auth login`, or HF_TOKEN)")
    if is_network_error(error):
        return (f"the Hub did not answer ({type(error).__name__}): check the network, or set HF_ENDPOINT to a "
                "reachable Hub")
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


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
                config = config_from_dict(previous["config"])
            model_config = config_of(config, variant)
            check_architecture(unflatten_parts(read_safetensors(file)), model_config, str(file))  # before uploading
            shutil.copyfile(file, staged)
            sidecar = {**previous, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                       "variant": variant, "config": model_config.to_dict()}
        else:
            convert_to_safetensors(file, staged, config, variant)
            sidecar = read_sidecar(staged) or {}
            sidecar_path(staged).unlink()  # published as config.json instead
            model_config = config_from_dict(sidecar["config"])
        if metrics:
            sidecar["metrics"] = dict(metrics)
        (Path(tmp) / HUB_CONFIG_FILENAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (Path(tmp) / "README.md").write_text(
            model_card(variant, model_config, repo_id=repo_id, metrics=metrics, spec=spec, provenance=sidecar.get("metadata")),
            encoding="utf-8")
        digest = sha256_file(staged)
        api = HfApi(endpoint=hub_endpoint(), token=token)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                       commit_message=commit_message or f"Upload mefacial {variant} weights")
        except Exception as exc:  # noqa: BLE001 - the network's and the Hub's errors of every kind: one line
            raise CheckpointError(f"cannot publish to {repo_id} on {hub_endpoint()}: {_upload_failure(exc)}") from None
    return PublishedWeights(repo_id=repo_id, filename=HUB_WEIGHTS_FILENAME, revision=getattr(commit, "oid", None) or "main",
                            sha256=digest, url=str(getattr(repo_url, "url", repo_url)))


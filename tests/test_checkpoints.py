"""Weights: registry, the resolver against a local Hub stand-in, both formats, conversion,
publishing and the CLI. No test touches the internet: the Hub is tests/hub_server.py on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from hub_server import FakeHub, resolve_path
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import REPO as REPO_ROOT
from conftest import fixture_meta, model_fixture_dirs
from mefacial import checkpoints as ck
from mefacial.config import CONFIG_DIR, config_from_reference, load_config
from mefacial.errors import CheckpointError, UnknownVariantError, WeightsNotFoundError
from mefacial.models import CHECKPOINT_PARTS, INFERENCE_PARTS, build_model

PARTS = ("generator", "kp_detector")
REPO = "lab/tiny-weights"
# Registry keys must be variant ids of the code (mefacial.variants): tests register their Hub files under
# learned variants that have no public weights of their own.
VARIANT = "fomm-awp"
VARIANT_ENV = "MEFACIAL_CHECKPOINT_FOMM_AWP"


# ---- helpers and fixtures ------------------------------------------------------------------------


class Tiny(nn.Module):
    """Stands in for a backbone: sub-modules named like checkpoint parts, BatchNorm buffers included."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.generator = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))
        self.kp_detector = nn.Linear(width, 2)


def tiny_checkpoint(seed: int = 0, width: int = 4) -> dict:
    """An original-layout checkpoint: parts, an optimiser state, an epoch counter."""
    torch.manual_seed(seed)
    model = Tiny(width)
    model.generator[1].running_mean.uniform_()
    optimizer = torch.optim.Adam(model.parameters())
    return {"generator": model.generator.state_dict(), "kp_detector": model.kp_detector.state_dict(),
            "discriminator": {"conv.weight": torch.randn(2, 2)}, "optimizer_generator": optimizer.state_dict(),
            "epoch": 7}


def small_config(tmp_path: Path, base: str = "fomm-vox256") -> Path:
    """A config file with the architecture of `base` at tiny widths (fast to build and run)."""
    data = load_config(base).to_dict()
    params = data["model_params"]
    params["kp_detector_params"].update(block_expansion=4, max_features=16)
    params["generator_params"].update(block_expansion=4, max_features=16, num_bottleneck_blocks=1)
    params["generator_params"]["dense_motion_params"].update(block_expansion=4, max_features=16)
    params["discriminator_params"].update(block_expansion=4, max_features=16)
    data["name"] = f"small-{base}"
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def small_checkpoint(config_path: Path, seed: int = 0) -> dict:
    """An original-layout FOMM checkpoint of that config, as the training code saves it."""
    torch.manual_seed(seed)
    model = build_model(load_config(config_path), for_training=True)
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)  # not the defaults, so a lost buffer shows
    checkpoint = {part: getattr(model, part).state_dict() for part in CHECKPOINT_PARTS["fomm"]}
    checkpoint["optimizer_generator"] = torch.optim.Adam(model.generator.parameters()).state_dict()
    checkpoint["epoch"] = 7
    return checkpoint


def loaded(config_path: Path, weights: Path) -> nn.Module:
    model = build_model(load_config(config_path))
    ck.load_weights(model, weights, "fomm")
    return model


def checkpoint_bytes(tmp_path: Path, seed: int) -> bytes:
    path = tmp_path / f"blob-{seed}.pth.tar"
    torch.save(tiny_checkpoint(seed), path)
    return path.read_bytes()


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """Cache, checkpoints folder and registry under tmp_path; nothing inherited from the caller's environment."""
    for name in list(os.environ):
        if name.startswith(ck.ENV_VARIANT_PREFIX) or name in (
                "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_ETAG_TIMEOUT", ck.ENV_REGISTRY):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))  # no stored login
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(ck.ENV_CHECKPOINT_DIR, str(tmp_path / "ckpts"))
    (tmp_path / "ckpts").mkdir()
    return tmp_path


@pytest.fixture
def hub(isolated, monkeypatch):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    yield server
    server.stop()


def use_registry(tmp_path: Path, monkeypatch, entries: dict) -> None:
    """Point the resolver at a registry made of `entries` (variant -> fields)."""
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(entries))
    monkeypatch.setenv(ck.ENV_REGISTRY, str(path))


def hub_source(filename: str = "weights/tiny.pth.tar", revision: str = "main", sha256: str | None = None,
               repo_type: str = "model", repo_id: str = REPO) -> dict:
    return {"repo_id": repo_id, "repo_type": repo_type, "filename": filename, "revision": revision, "sha256": sha256}


def hub_entry(filename: str = "weights/tiny.pth.tar", revision: str = "main", sha256: str | None = None,
              repo_type: str = "model", repo_id: str = REPO) -> dict:
    """A registry entry with one Hub source."""
    return {"licence": "mit", "how_to_get": "ask the lab",
            "sources": [hub_source(filename, revision, sha256, repo_type, repo_id)]}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    ck.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---- registry -----------------------------------------------------------------------------------


def test_registry_covers_every_learned_variant_and_only_says_where_weights_live():
    from mefacial.variants import get_variant, variant_ids

    registry = ck.load_registry()
    learned = {v for v in variant_ids() if get_variant(v).needs_weights}
    assert set(registry) == learned
    raw = yaml.safe_load(ck.registry_path().read_text())
    for variant, spec in registry.items():
        assert "config" not in raw[variant]  # the architecture is the code's
        assert spec.config == get_variant(variant).config_name and (CONFIG_DIR / f"{spec.config}.yaml").is_file()
        assert spec.licence and spec.origin.get("paper") and spec.how_to_get, variant


def test_registry_sources_for_fomm_none_are_the_space_then_the_dataset_mirror():
    spec = ck.load_registry()["fomm-none"]
    assert spec.sources == (
        ck.HubSource(repo_id="abhishek/first-order-motion-model", repo_type="space",
                     filename="weights/vox-adv-cpk.pth.tar", revision="main", sha256=None),
        ck.HubSource(repo_id="mishig/first-order-motion-model", repo_type="dataset",
                     filename="vox-cpk.pth.tar", revision="main", sha256=None))
    assert spec.weights == spec.sources[0]
    assert ck.load_registry()["fomm-awp"].sources == ()


@pytest.mark.parametrize("bad, field", [
    ({"fomm-awp": {"config": "fomm-awp"}}, "'config'.*variant registry"),
    ({"fomm-awp": {"weights": {"repo_id": "a/b", "filename": "f"}}}, "'weights'.*sources"),
    ({"fomm-awp": {"sources": {"repo_id": "a/b", "filename": "f"}}}, "must be a list"),
    ({"fomm-awp": {"sources": [{"repo_id": "a/b"}]}}, r"sources\[0\].*repo_id and filename"),
    ({"fomm-awp": {"sources": [{"repo_id": "a/b", "filename": "f"}, {"repo_id": "a/b", "filename": "f", "sha256": "abc"}]}},
     r"sources\[1\].*sha256"),
    ({"fomm-awp": {"sources": [{"repo_id": "a/b", "filename": "f", "repo_type": "bucket"}]}}, "repo_type"),
    ({"fomm-awp": {"sources": [{"repo_id": "a/b", "filename": "f", "branch": "x"}]}}, "branch"),
    ({"fomm-awp": {"licnce": "mit"}}, "licnce"),
    ({"fomm-awp": {}, "fomm-avp": {}}, "unknown variant id 'fomm-avp'.*fomm-awp"),
    ({"warp": {}}, "'warp' needs no weights"),
])
def test_registry_errors_name_the_field(tmp_path, bad, field):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ck.ConfigError, match=field):
        ck.load_registry(path)


def test_env_var_name_and_unknown_variant(isolated):
    assert ck.checkpoint_env_var("fomm-ewp-mm21") == "MEFACIAL_CHECKPOINT_FOMM_EWP_MM21"
    with pytest.raises(UnknownVariantError, match="fomm-none"):
        ck.resolve_checkpoint("fomm-nope")


# ---- resolver: local sources --------------------------------------------------------------------


def test_resolution_order_explicit_env_local_cache(isolated, monkeypatch, hub):
    hub.add_file(REPO, "weights/tiny.pth.tar", checkpoint_bytes(isolated, 0))
    use_registry(isolated, monkeypatch, {VARIANT: hub_entry()})
    assert ck.resolve_checkpoint(VARIANT, progress=False).source == "hub"
    assert ck.resolve_checkpoint(VARIANT).source == "hf-cache"

    local = isolated / "ckpts" / f"{VARIANT}.pth.tar"
    torch.save(tiny_checkpoint(1), local)
    assert ck.resolve_checkpoint(VARIANT) == ck.ResolvedWeights(local, "local", None, ck.get_spec(VARIANT))

    env_file = isolated / "env.pth.tar"
    torch.save(tiny_checkpoint(2), env_file)
    monkeypatch.setenv(VARIANT_ENV, str(env_file))
    assert (ck.resolve_checkpoint(VARIANT).path, ck.resolve_checkpoint(VARIANT).source) == (env_file, "env")

    explicit = isolated / "mine.pth.tar"
    torch.save(tiny_checkpoint(3), explicit)
    assert (ck.resolve_checkpoint(VARIANT, explicit).path, ck.resolve_checkpoint(VARIANT, str(explicit)).source) == (explicit, "explicit")


def test_missing_explicit_or_env_path_never_falls_back(isolated, monkeypatch):
    torch.save(tiny_checkpoint(), isolated / "ckpts" / "fomm-none.pth.tar")  # would be found otherwise
    with pytest.raises(WeightsNotFoundError, match="typo.pth.tar does not exist"):
        ck.resolve_checkpoint("fomm-none", isolated / "typo.pth.tar")
    monkeypatch.setenv("MEFACIAL_CHECKPOINT_FOMM_NONE", str(isolated / "gone.pth.tar"))
    with pytest.raises(WeightsNotFoundError, match="MEFACIAL_CHECKPOINT_FOMM_NONE"):
        ck.resolve_checkpoint("fomm-none")


def test_an_installed_package_keeps_local_weights_in_the_user_cache(tmp_path):
    """`pip install .` puts the package in site-packages: its local weights folder is not site-packages/checkpoints
    but the user cache's; a source checkout (`pip install -e .`) keeps checkpoints/ beside its pyproject.toml."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO_ROOT / "mefacial", site / "mefacial", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name in ("MEFACIAL_CACHE", ck.ENV_CHECKPOINT_DIR):
        env.pop(name, None)
    show = "import mefacial.checkpoints as c; print(c.checkpoint_dir())"
    installed = subprocess.run([sys.executable, "-c", show], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == str(tmp_path / "cache" / "mefacial" / "checkpoints")
    assert ck.checkpoint_dir() == REPO_ROOT / "checkpoints" or os.environ.get(ck.ENV_CHECKPOINT_DIR)


def test_local_folder_prefers_safetensors_and_registry_basename(isolated):
    folder = isolated / "ckpts"
    torch.save(tiny_checkpoint(), folder / "vox-adv-cpk.pth.tar")  # the registry filename's basename
    assert ck.resolve_checkpoint("fomm-none", offline=True).path == folder / "vox-adv-cpk.pth.tar"
    torch.save(tiny_checkpoint(), folder / "fomm-none.pth.tar")
    assert ck.resolve_checkpoint("fomm-none", offline=True).path == folder / "fomm-none.pth.tar"
    torch.save(small_checkpoint(small_config(isolated)), folder / "fomm-none.pth.tar")
    converted = ck.convert_to_safetensors(folder / "fomm-none.pth.tar", None, small_config(isolated), "fomm-none")
    assert converted == folder / "fomm-none.safetensors"
    assert ck.resolve_checkpoint("fomm-none", offline=True).path == converted
    assert ck.resolve_checkpoint("fomm-none", folder / "fomm-none.pth.tar").path == converted  # same stem


def test_variant_without_public_weights_says_how_to_get_them(isolated):
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint("fomm-awp")
    message = str(info.value)
    assert "no public weights" in message and "python -m train" in message
    assert str(isolated / "ckpts" / "fomm-awp.pth.tar") in message and "MEFACIAL_CHECKPOINT_FOMM_AWP" in message


# ---- resolver: the Hub ----------------------------------------------------------------------------


@pytest.mark.parametrize("lfs", [False, True], ids=["git-file", "lfs-via-cdn"])
def test_download_then_served_from_cache_without_requests(hub, isolated, monkeypatch, lfs):
    data = checkpoint_bytes(isolated, 0)
    hub.add_file(REPO, "weights/tiny.pth.tar", data, lfs=lfs)
    use_registry(isolated, monkeypatch, {VARIANT: hub_entry()})

    first = ck.resolve_checkpoint(VARIANT, progress=False)
    assert first.source == "hub" and first.path.read_bytes() == data
    assert first.path.is_relative_to(isolated / "hf" / "hub")  # HF_HOME honoured
    assert hub.count("GET") == 1 and any(r.path.startswith("/cdn/") for r in hub.requests) == lfs
    seen = hub.count()

    second = ck.resolve_checkpoint(VARIANT, progress=False)
    assert (second.source, second.path) == ("hf-cache", first.path)
    assert hub.count() == seen  # the second call made no request
    model = Tiny()
    assert ck.load_weights(model, second.path, PARTS) == {"epoch": 7}


def test_space_repo_and_revision_pinning(hub, isolated, monkeypatch):
    v1, v2 = checkpoint_bytes(isolated, 1), checkpoint_bytes(isolated, 2)
    commit_v1 = hub.add_file(REPO, "w.pth.tar", v1, repo_type="space")
    hub.add_file(REPO, "w.pth.tar", v2, repo_type="space", revision="v2")
    use_registry(isolated, monkeypatch, {
        "fomm-awp": hub_entry("w.pth.tar", repo_type="space"),  # main
        "fomm-ewp": hub_entry("w.pth.tar", revision="v2", repo_type="space"),  # a tag
        "mraa-awp": hub_entry("w.pth.tar", revision=commit_v1, repo_type="space"),  # a commit
    })
    assert ck.resolve_checkpoint("fomm-ewp").path.read_bytes() == v2  # with progress bars
    assert ck.resolve_checkpoint("fomm-awp", progress=False).path.read_bytes() == v1
    assert ck.resolve_checkpoint("mraa-awp", progress=False).path.read_bytes() == v1
    assert any(r.path == resolve_path(REPO, "w.pth.tar", "v2", "space") for r in hub.requests)


def test_sha256_verified_and_mismatch_is_a_checkpoint_error(hub, isolated, monkeypatch):
    data = checkpoint_bytes(isolated, 0)
    hub.add_file(REPO, "w.pth.tar", data)
    good, bad = hashlib.sha256(data).hexdigest(), "0" * 64
    use_registry(isolated, monkeypatch, {"fomm-ewp": hub_entry("w.pth.tar", sha256=good),
                                         "fomm-awp": hub_entry("w.pth.tar", sha256=bad)})
    with pytest.raises(CheckpointError) as info:
        ck.resolve_checkpoint("fomm-awp", progress=False)  # checked after the download
    assert not isinstance(info.value, WeightsNotFoundError)
    assert good in str(info.value) and bad in str(info.value) and "w.pth.tar" in str(info.value)
    requests = hub.count()
    assert ck.resolve_checkpoint("fomm-ewp", progress=False).sha256 == good  # checked in the cache too
    with pytest.raises(CheckpointError, match=bad):
        ck.resolve_checkpoint("fomm-awp", progress=False)
    assert hub.count() == requests


@pytest.mark.parametrize("entry, expected", [
    (hub_entry("missing.pth.tar"), "file 'missing.pth.tar' does not exist"),
    (hub_entry(repo_id="lab/nope"), "not found on http://127.0.0.1"),
    (hub_entry(revision="v9"), "revision 'v9' does not exist"),
], ids=["file", "repo", "revision"])
def test_not_found_on_the_hub_is_a_helpful_error(hub, isolated, monkeypatch, entry, expected):
    hub.add_file(REPO, "weights/tiny.pth.tar", b"data")
    use_registry(isolated, monkeypatch, {VARIANT: entry})
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint(VARIANT, progress=False)
    message = str(info.value)
    assert expected in message
    for place in (VARIANT_ENV, str(isolated / "ckpts" / f"{VARIANT}.pth.tar"), str(isolated / "hf" / "hub"),
                  "ask the lab", "HF_ENDPOINT"):
        assert place in message


def test_private_repo_needs_a_token(hub, isolated, monkeypatch):
    data = checkpoint_bytes(isolated, 0)
    hub.add_file(REPO, "weights/tiny.pth.tar", data, token="hf_secret")
    use_registry(isolated, monkeypatch, {VARIANT: hub_entry()})
    with pytest.raises(WeightsNotFoundError, match="HF_TOKEN"):
        ck.resolve_checkpoint(VARIANT, progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert ck.resolve_checkpoint(VARIANT, progress=False).path.read_bytes() == data
    assert hub.requests[-1].authorization == "Bearer hf_secret"


@pytest.mark.timeout(60)  # hang guard: the call must return (with an error) instead of retrying for minutes
def test_server_down_fails_with_an_error(isolated, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    use_registry(isolated, monkeypatch, {VARIANT: hub_entry()})
    with pytest.raises(WeightsNotFoundError, match="Hub unreachable") as info:
        ck.resolve_checkpoint(VARIANT, progress=False)
    assert "weights/tiny.pth.tar" in str(info.value)


@pytest.mark.timeout(60)
def test_server_that_never_answers_times_out(isolated, monkeypatch):
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        use_registry(isolated, monkeypatch, {VARIANT: hub_entry()})
        with pytest.raises(WeightsNotFoundError, match="Hub unreachable.*Timeout"):
            ck.resolve_checkpoint(VARIANT, progress=False)


def test_offline_mode_fails_at_once_and_lists_where_it_looked(hub, isolated, monkeypatch):
    hub.add_file(REPO, "weights/tiny.pth.tar", b"data")
    use_registry(isolated, monkeypatch, {VARIANT: hub_entry()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint(VARIANT)
    message = str(info.value)
    for place in (VARIANT_ENV, str(isolated / "ckpts"), str(isolated / "hf" / "hub"), "offline"):
        assert place in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsNotFoundError, match="offline"):
        ck.resolve_checkpoint(VARIANT, offline=True)
    assert hub.count() == 0


# ---- resolver: several sources (mirrors) ------------------------------------------------------------

MIRRORS = {"licence": "mit", "how_to_get": "ask the lab", "sources": [
    hub_source("weights/vox.pth.tar", repo_id="lab/models"),  # a model repo
    hub_source("vox.pth.tar", repo_type="dataset", repo_id="lab/mirror"),  # a dataset mirror
    hub_source("weights/vox.pth.tar", repo_type="space", repo_id="lab/demo"),  # a Space
]}


def test_missing_first_source_falls_through_to_the_next(hub, isolated, monkeypatch):
    data = checkpoint_bytes(isolated, 0)
    hub.add_file("lab/mirror", "vox.pth.tar", data, repo_type="dataset")
    hub.add_file("lab/demo", "weights/vox.pth.tar", checkpoint_bytes(isolated, 1), repo_type="space")
    use_registry(isolated, monkeypatch, {VARIANT: MIRRORS})
    resolved = ck.resolve_checkpoint(VARIANT, progress=False)
    assert resolved.source == "hub" and resolved.path.read_bytes() == data
    assert resolved.hub == ck.HubSource("lab/mirror", "vox.pth.tar", repo_type="dataset")
    assert not any(r.path.startswith("/spaces/") for r in hub.requests)  # the Space was not needed
    seen = hub.count()
    cached = ck.resolve_checkpoint(VARIANT, progress=False)  # found in the cache, under its source
    assert (cached.source, cached.path, cached.hub) == ("hf-cache", resolved.path, resolved.hub)
    assert hub.count() == seen
    row = next(r for r in ck.list_checkpoints() if r["variant"] == VARIANT)
    assert row["from"] == resolved.hub.describe() and len(row["sources"]) == 3


def test_every_source_failing_names_each_one_and_why(hub, isolated, monkeypatch):
    hub.add_file("lab/mirror", "other.pth.tar", b"x", repo_type="dataset")  # the repo is there, not the file
    hub.add_file("lab/demo", "weights/vox.pth.tar", b"x", repo_type="space", revision="old")  # no main branch
    use_registry(isolated, monkeypatch, {VARIANT: MIRRORS})
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint(VARIANT, progress=False)
    message = str(info.value)
    assert "the download failed from all 3 Hub sources" in message
    lines = message.splitlines()
    first = next(line for line in lines if "Hub source 1/3" in line)
    second = next(line for line in lines if "Hub source 2/3" in line)
    third = next(line for line in lines if "Hub source 3/3" in line)
    assert "/lab/models/" in first and "repository model lab/models not found" in first
    assert "/datasets/lab/mirror/" in second and "file 'vox.pth.tar' does not exist in lab/mirror@main" in second
    assert "/spaces/lab/demo/" in third and "revision 'main' does not exist in lab/demo" in third
    assert "none of the 3 Hub sources is cached" in message
    for source in MIRRORS["sources"]:  # each source named once, in the first line
        assert message.count(ck.HubSource(**source).describe()) == 1 and ck.HubSource(**source).describe() in lines[0]


def test_hash_mismatch_stops_without_trying_the_next_source(hub, isolated, monkeypatch):
    data = checkpoint_bytes(isolated, 0)
    good = hashlib.sha256(data).hexdigest()
    wrong = "ab" * 32
    hub.add_file("lab/models", "weights/vox.pth.tar", data)
    hub.add_file("lab/mirror", "vox.pth.tar", data, repo_type="dataset")
    entry = {**MIRRORS, "sources": [{**MIRRORS["sources"][0], "sha256": wrong}, MIRRORS["sources"][1]]}
    use_registry(isolated, monkeypatch, {VARIANT: entry})
    with pytest.raises(CheckpointError) as info:
        ck.resolve_checkpoint(VARIANT, progress=False)
    message = str(info.value)
    assert not isinstance(info.value, WeightsNotFoundError)
    assert "sha256 mismatch" in message and "weights/vox.pth.tar in Hub repo lab/models@main" in message
    assert f"expected {wrong}" in message and f"got {good}" in message
    assert not any("/datasets/" in r.path for r in hub.requests)  # a wrong file is not routed around
    with pytest.raises(CheckpointError, match=wrong):  # nor taken from the cache afterwards
        ck.resolve_checkpoint(VARIANT, progress=False, offline=True)


def test_offline_fails_fast_naming_every_source(hub, isolated, monkeypatch):
    use_registry(isolated, monkeypatch, {VARIANT: MIRRORS})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint(VARIANT)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    for source in MIRRORS["sources"]:  # named once, in the first line
        assert message.count(ck.HubSource(**source).describe()) == 1
    assert "Hub download: skipped, offline mode" in message
    assert "3 Hub sources" in message and hub.count() == 0


@pytest.mark.timeout(60)
def test_unreachable_hub_is_asked_once_not_once_per_source(isolated, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    use_registry(isolated, monkeypatch, {VARIANT: MIRRORS})
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint(VARIANT, progress=False)
    message = str(info.value)
    assert "Hub source 1/3" in message and "Hub unreachable" in message
    assert "Hub source 2/3" in message and "Hub source 3/3" in message and message.count("not tried") == 2


# ---- loading and conversion ----------------------------------------------------------------------


def test_both_formats_load_the_same_weights_and_sidecar_describes_them(isolated):
    config = small_config(isolated)
    checkpoint = small_checkpoint(config)
    checkpoint["generator"] = {f"module.{k}": v for k, v in checkpoint["generator"].items()}  # saved from DDP
    kp_weight = checkpoint["kp_detector"]["kp.weight"]
    checkpoint["kp_detector"]["kp.weight"] = kp_weight.transpose(0, 1).contiguous().transpose(0, 1)  # strided
    shared = torch.randn(2, 4)
    checkpoint["discriminator"] = {"a": shared, "b": shared}  # one storage under two names (not loaded)
    src = isolated / "orig.pth.tar"
    torch.save(checkpoint, src)

    dst = ck.convert_to_safetensors(src, isolated / "out" / "small", config, "fomm-none")
    assert dst == isolated / "out" / "small.safetensors"
    from_pickle, from_safetensors = loaded(config, src), loaded(config, dst)
    assert_same_state(from_pickle.state_dict(), from_safetensors.state_dict())
    assert torch.equal(from_safetensors.kp_detector.kp.weight, kp_weight)
    stored = load_file(dst)
    assert torch.equal(stored["discriminator.a"], shared) and torch.equal(stored["discriminator.b"], shared)
    assert ck.load_weights(build_model(load_config(config)), src, "fomm") == {"epoch": 7}

    sidecar = ck.load_weights(build_model(load_config(config)), dst, "fomm")
    assert sidecar == json.loads((isolated / "out" / "small.json").read_text())
    assert sidecar["variant"] == "fomm-none" and sidecar["config"] == load_config(config).to_dict()
    assert sidecar["metadata"]["epoch"] == 7 and sidecar["metadata"]["dropped"] == ["optimizer_generator"]
    assert sidecar["metadata"]["source_sha256"] == ck.sha256_file(src)
    umask = os.umask(0o022)
    os.umask(umask)
    for written in (dst, isolated / "out" / "small.json"):  # readable as the user's other files (to share, to serve)
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written


def test_training_checkpoint_describes_its_own_architecture(isolated):
    """A train/ checkpoint records its architecture: convert uses it instead of the variant's full-size config."""
    config = small_config(isolated, "fomm-awp")
    checkpoint = small_checkpoint(config)
    checkpoint.update(format="mefacial-train", variant="fomm-awp", step=1200, rng={"torch": torch.get_rng_state()},
                      config={"model": load_config(config).to_dict(), "data": {"root": "/data/casme2"}},
                      model_config_json=json.dumps(load_config(config).to_dict(), sort_keys=True))
    torch.save(checkpoint, isolated / "last.pth.tar")
    dst = ck.convert_to_safetensors(isolated / "last.pth.tar", isolated / "published")
    sidecar = ck.read_sidecar(dst)
    assert sidecar["variant"] == "fomm-awp" and sidecar["config"] == load_config(config).to_dict()
    assert sidecar["training_config"]["data"] == {"root": "/data/casme2"} and sidecar["metadata"]["step"] == 1200
    assert sorted(sidecar["metadata"]["dropped"]) == ["optimizer_generator", "rng"]
    assert sorted(sidecar["metadata"]["parts"]) == sorted(CHECKPOINT_PARTS["fomm"])
    assert_same_state(loaded(config, isolated / "last.pth.tar").state_dict(), loaded(config, dst).state_dict())


def test_the_engine_runs_weights_in_the_architecture_they_were_trained_with(isolated):
    """A smoke-test run's weights (a small config) load in the engine as the variant they were trained for: its
    recorded architecture is built (it failed with 'does not fit this architecture'); another backbone's variant
    says which backbone they are."""
    from mefacial import Engine

    config = small_config(isolated, "fomm-awp")
    checkpoint = small_checkpoint(config)
    checkpoint.update(model_config_json=json.dumps(load_config(config).to_dict(), sort_keys=True))
    torch.save(checkpoint, isolated / "run.pth.tar")
    converted = ck.convert_to_safetensors(isolated / "run.pth.tar", isolated / "published", variant="fomm-awp")
    engine = Engine(device="cpu")
    for weights in (isolated / "run.pth.tar", converted):
        model, _ = engine.model("fomm-awp", checkpoint=weights)
        assert model.config.to_dict() == load_config(config).to_dict()
        with pytest.raises(CheckpointError, match="holds fomm weights .* choose a fomm variant"):
            engine.model("mraa-awp", checkpoint=weights)
    assert ck.trained_config(isolated / "run.pth.tar", load_config("fomm-awp")).name == load_config(config).name
    original = isolated / "original.pth.tar"  # no record (the published checkpoints): the variant's own config
    torch.save(small_checkpoint(config), original)
    assert ck.trained_config(original, load_config("fomm-awp")).name == "fomm-awp"


def test_safetensors_with_wrapper_prefixes_loads(isolated):
    model = Tiny()
    state = {f"module.{k}": v.clone() for k, v in Tiny().state_dict().items()}
    save_file(state, isolated / "ddp.safetensors")
    ck.load_weights(model, isolated / "ddp.safetensors", PARTS)
    assert_same_state({f"module.{k}": v for k, v in model.state_dict().items()}, state)


def test_not_a_checkpoint_and_other_architectures_are_refused(isolated):
    text = isolated / "notes.pth.tar"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint: it is not a PyTorch checkpoint"):
        ck.load_weights(Tiny(), text, PARTS)
    noise = isolated / "noise.pth.tar"
    noise.write_bytes(bytes(range(256)) * 12)  # (not a pickle: opcodes torch refuses)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as refused:
        ck.load_weights(Tiny(), noise, PARTS)
    assert "weights_only" not in str(refused.value)  # (torch's message advised weights_only=False, cut off)
    cut = isolated / "cut.pth.tar"
    torch.save(tiny_checkpoint(), cut)
    cut.write_bytes(cut.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        ck.load_weights(Tiny(), cut, PARTS)
    image = isolated / "face.safetensors"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError):
        ck.load_weights(Tiny(), image, PARTS)

    mraa_like = isolated / "mraa.pth.tar"
    torch.save({"generator": {}, "region_predictor": {}, "bg_predictor": {}}, mraa_like)
    with pytest.raises(CheckpointError, match="kp_detector"):
        ck.load_weights(Tiny(), mraa_like, PARTS)
    with pytest.raises(CheckpointError, match="kp_detector"):
        ck.convert_to_safetensors(mraa_like, isolated / "x", "fomm-vox256", "fomm-none")
    fomm = isolated / "fomm.pth.tar"
    torch.save(tiny_checkpoint(), fomm)
    with pytest.raises(CheckpointError, match="holds fomm weights, not mraa ones"):  # named for a variant of another
        ck.convert_to_safetensors(fomm, isolated / "x", "fomm-vox256", "mraa-awp")

    tiny = isolated / "tiny.pth.tar"
    torch.save(tiny_checkpoint(), tiny)
    with pytest.raises(CheckpointError, match="does not fit"):  # its sidecar would describe another model
        ck.convert_to_safetensors(tiny, isolated / "x", "fomm-vox256", "fomm-none")
    assert not (isolated / "x.safetensors").exists()

    wider = isolated / "wider.safetensors"
    save_file({f"{p}": t for p, t in Tiny(width=6).state_dict().items()}, wider)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        ck.load_weights(Tiny(), wider, PARTS)


def test_pickle_that_runs_code_is_refused(isolated):
    marker = isolated / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    evil = isolated / "evil.pth.tar"
    torch.save({"generator": {"weight": Payload()}, "kp_detector": {}}, evil)
    with pytest.raises(CheckpointError, match=r"pickles a Python object \(\w+\.system\), which could run code"
                       ) as refused:
        ck.load_weights(Tiny(), evil, PARTS)
    assert "weights_only" not in str(refused.value)  # torch's advice (load it with weights_only=False) is not passed on
    with pytest.raises(CheckpointError):
        ck.convert_to_safetensors(evil, isolated / "x", "fomm-vox256", "fomm-none")
    assert ck.resolve_checkpoint("fomm-none", evil).path == evil  # resolving only finds it; loading refuses it
    assert not marker.exists()


def _fixture_config(folder: Path):
    return config_from_reference(yaml.safe_load((folder / "config.yaml").read_text()), fixture_meta(folder), name=folder.name)


def _run_model(model: nn.Module, tensors: dict) -> torch.Tensor:
    """Prediction of `model` for the fixture's source and last driving frame, through the backbone protocol."""
    source, driving = tensors["inputs.source"], tensors["inputs.driving"]
    au = tensors.get("au_points_pixels")  # see meta.json: [source, initial, driving...] or [source, driving] fixed
    au_source = au_init = au_driving = None
    if au is not None:
        au_source, au_init, au_driving = au[:1], au[1:2], au[-1:]
    first, driving = driving[:1], driving[-1:]  # one driving frame keeps the test fast
    with torch.inference_mode():
        src = model.detect(source, au_source)
        init = model.detect(first, au_init)
        drv = model.detect(driving, au_driving)
        cache = model.encode_source(source)
        new = model.transfer(src, drv, init, mode="relative")
        return model.generate(source, cache, src, new)["prediction"]


@pytest.mark.parametrize("folder", [pytest.param(d, id=d.name) for d in model_fixture_dirs()]
                         or [pytest.param(None, id="no-fixtures")])
def test_reference_checkpoints_round_trip_through_safetensors(folder, tmp_path, fixtures_dir):
    """Resolve (explicit path) -> convert -> load both formats: same tensors, same model outputs."""
    if folder is None:
        pytest.fail(f"no model fixtures under {fixtures_dir}")
    config = _fixture_config(folder)
    variant = f"{config.backbone}-{config.prior}"
    original = ck.resolve_checkpoint(variant, folder / "checkpoint.pth.tar")
    assert (original.path, original.source) == (folder / "checkpoint.pth.tar", "explicit")
    converted = ck.resolve_checkpoint(variant, ck.convert_to_safetensors(original.path, tmp_path / "converted", config, None))
    assert converted.path == tmp_path / "converted.safetensors"
    assert_same_state(ck.flatten_parts(ck.read_pickled_checkpoint(original.path), CHECKPOINT_PARTS[config.backbone]),
                      load_file(converted.path))
    assert ck.read_sidecar(converted.path)["config"] == config.to_dict()

    models = []
    for resolved in (original, converted):
        model = build_model(config).eval()
        ck.load_weights(model, resolved.path, INFERENCE_PARTS[config.backbone])
        models.append(model)
    assert_same_state(models[0].state_dict(), models[1].state_dict())
    tensors = load_file(folder / "tensors.safetensors")
    assert torch.equal(_run_model(models[0], tensors), _run_model(models[1], tensors))


# ---- publishing -----------------------------------------------------------------------------------


class FakeApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi (and the folder it uploads)."""

    calls: list = []

    def __init__(self, **kwargs):
        FakeApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://hub.example/{repo_id}", endpoint="https://hub.example")

    def upload_folder(self, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
        FakeApi.calls.append(("upload_folder", kwargs, files))
        return argparse.Namespace(oid="c0ffee" * 6 + "c0ff")


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(ck.publish, "HfApi", FakeApi)
    return FakeApi


@pytest.mark.parametrize("start_from", ["pth", "safetensors"])
def test_push_uploads_safetensors_config_and_model_card(isolated, fake_api, tmp_path, start_from):
    config = small_config(tmp_path, "fomm-ewp")
    src = tmp_path / "trained.pth.tar"
    torch.save(small_checkpoint(config, 9), src)
    if start_from == "safetensors":  # its sidecar says which config
        src = ck.convert_to_safetensors(src, tmp_path / "trained", config, "fomm-ewp")
    published = ck.push_to_hub("fomm-ewp", src, "me/fomm-ewp", private=True, token="hf_tok",
                               metrics={"psnr": 28.5, "ssim": 0.91}, config=None if start_from == "safetensors" else config)

    (_, init), (_, repo_id, create), (_, upload, files) = fake_api.calls
    assert init["token"] == "hf_tok" and repo_id == "me/fomm-ewp"
    assert create == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/fomm-ewp" and upload["repo_type"] == "model"
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]

    uploaded = tmp_path / "uploaded.safetensors"
    uploaded.write_bytes(files["model.safetensors"])
    assert_same_state(loaded(config, tmp_path / "trained.pth.tar").state_dict(), loaded(config, uploaded).state_dict())

    described = json.loads(files["config.json"])
    assert described["variant"] == "fomm-ewp" and described["config"] == load_config(config).to_dict()
    assert described["metrics"] == {"psnr": 28.5, "ssim": 0.91}

    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "mefacial" and front["license"] == "mit" and "micro-expression" in front["tags"]
    assert "fomm-ewp" in card and "equal-weighted prior" in card and "| psnr | 28.5 |" in card
    assert "CASME II" in card  # training data from the registry

    assert published.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert published.registry_entry() == {"repo_id": "me/fomm-ewp", "repo_type": "model", "filename": "model.safetensors",
                                          "revision": "c0ffee" * 6 + "c0ff", "sha256": published.sha256}


@pytest.mark.parametrize("failure, said", [
    (huggingface_hub.utils.OfflineModeIsEnabled("offline"), "offline mode is on .*unset it"),
    (ConnectionRefusedError("refused"), "did not answer .*HF_ENDPOINT"),
])
def test_a_failed_upload_is_one_line_saying_what_to_do(isolated, fake_api, tmp_path, monkeypatch, failure, said):
    """No network, or HF_HUB_OFFLINE: a traceback, or "cannot use: ...; check the path and its permissions"."""
    config = small_config(tmp_path, "fomm-ewp")
    src = tmp_path / "trained.pth.tar"
    torch.save(small_checkpoint(config, 9), src)

    def fail(self, repo_id, **kwargs):
        raise failure

    monkeypatch.setattr(FakeApi, "create_repo", fail)
    with pytest.raises(CheckpointError, match=f"cannot publish to me/x on .*{said}") as error:
        ck.push_to_hub("fomm-ewp", src, "me/x", config=config)
    assert "\n" not in str(error.value)


def test_cli_push_prints_a_registry_entry(isolated, fake_api, tmp_path, capsys):
    config = small_config(tmp_path, "fomm-awp")
    src = tmp_path / "trained.pth.tar"
    torch.save(small_checkpoint(config), src)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"l1": 0.05}))
    with pytest.raises(CheckpointError, match="does not fit"):  # the variant's full-size config
        run_cli(["checkpoints", "push", "--variant", "fomm-awp", "--file", str(src), "--repo", "me/awp"])
    assert fake_api.calls == []  # nothing uploaded
    assert run_cli(["checkpoints", "push", "--variant", "fomm-awp", "--file", str(src), "--repo", "me/awp",
                    "--config", str(config), "--metrics", str(metrics)]) == 0
    printed = capsys.readouterr().out
    entry = yaml.safe_load(printed.split("registry entry (mefacial/registry.yaml):")[1])
    assert entry["fomm-awp"]["sources"][0]["repo_id"] == "me/awp"
    assert fake_api.calls[1][2] == {"private": False, "exist_ok": True, "repo_type": "model"}


# ---- CLI: list and convert ------------------------------------------------------------------------


def test_cli_convert_then_list_without_network(isolated, hub, capsys, tmp_path):
    config = small_config(tmp_path)
    src = tmp_path / "vox.pth.tar"
    torch.save(small_checkpoint(config), src)
    assert run_cli(["checkpoints", "convert", str(src), "--variant", "fomm-none", "--config", str(config)]) == 0
    assert (isolated / "ckpts" / "fomm-none.safetensors").is_file() and (isolated / "ckpts" / "fomm-none.json").is_file()
    capsys.readouterr()

    assert run_cli(["checkpoints", "list", "--json", "--hash"]) == 0
    rows = {row["variant"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(ck.load_registry())
    assert rows["fomm-none"]["present"] and rows["fomm-none"]["source"] == "local"
    assert rows["fomm-none"]["sha256"] == ck.sha256_file(isolated / "ckpts" / "fomm-none.safetensors")
    assert not rows["fomm-awp"]["present"] and "python -m train" in rows["fomm-awp"]["how_to_get"]
    assert run_cli(["checkpoints", "list"]) == 0
    assert "fomm-none" in capsys.readouterr().out
    assert hub.count() == 0

"""Shared test helpers: where the reference fixtures and real clips live.

Fixture folders come from MEFACIAL_FIXTURES (default ../shared/fixtures/reference)
and real clips from MEFACIAL_DATA (default ../shared/data/microexpression).
A test that needs them skips when the folder is absent, unless
MEFACIAL_REQUIRE_SHARED=1 (set by .ci/run), where the skip becomes a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_path(env: str, default: str) -> Path:
    return Path(os.environ.get(env) or (REPO / default)).resolve()


FIXTURES = _shared_path("MEFACIAL_FIXTURES", "../shared/fixtures/reference")
DATA = _shared_path("MEFACIAL_DATA", "../shared/data/microexpression")


def require(path: Path, what: str) -> Path:
    """Return `path`, or skip (fail when MEFACIAL_REQUIRE_SHARED=1) if it is absent."""
    if path.exists():
        return path
    message = f"{what} not found at {path} (set MEFACIAL_FIXTURES / MEFACIAL_DATA)"
    if os.environ.get("MEFACIAL_REQUIRE_SHARED") == "1":
        pytest.fail(message + "; MEFACIAL_REQUIRE_SHARED=1 forbids skipping")
    pytest.skip(message)


def model_fixture_dirs() -> list[Path]:
    """Every model fixture folder (one with checkpoint.pth.tar and meta.json), discovered from files."""
    if not FIXTURES.exists():
        return []
    return sorted(p.parent for p in FIXTURES.glob("*/meta.json") if (p.parent / "checkpoint.pth.tar").exists())


def fixture_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def fixture_params(backbone: str) -> list:
    """pytest params for the model fixtures of one backbone (a skipping placeholder when none)."""
    dirs = [d for d in model_fixture_dirs() if fixture_meta(d).get("backbone") == backbone]
    if not dirs:
        return [pytest.param(None, id=f"no-{backbone}-fixtures")]
    return [pytest.param(d, id=d.name) for d in dirs]


@pytest.fixture
def fixtures_dir() -> Path:
    return require(FIXTURES, "reference fixtures")


@pytest.fixture
def data_dir() -> Path:
    return require(DATA, "micro-expression clips")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> str:
    """URL of the `python app.py` shared by the app test modules (started on first use; see app_server.py)."""
    from app_server import shared_app

    return shared_app(tmp_path_factory.getbasetemp() / "app")


@pytest.fixture(scope="module")
def client(app_url: str):
    """A gradio_client Client of the shared app."""
    from gradio_client import Client

    return Client(app_url, verbose=False, httpx_kwargs={"timeout": 120})  # a loaded CI machine answers slowly

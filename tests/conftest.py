"""Shared test helpers: where the reference fixtures and real clips live.

Fixture folders come from MEFACIAL_FIXTURES (default ../shared/fixtures/reference)
and real clips from MEFACIAL_DATA (default ../shared/data/microexpression).
A test that needs them skips when the folder is absent, unless
MEFACIAL_REQUIRE_SHARED=1 (set by .ci/run), where the skip becomes a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_path(env: str, default: str) -> Path:
    return Path(os.environ.get(env) or (REPO / default)).resolve()


FIXTURES = _shared_path("MEFACIAL_FIXTURES", "../shared/fixtures/reference")
DATA = _shared_path("MEFACIAL_DATA", "../shared/data/microexpression")


def open_files() -> dict[str, str]:
    """This process's open descriptors and what they point to (a path, "pipe:[...]", "socket:[...]"); empty where
    /proc is absent (not Linux)."""
    folder = Path("/proc/self/fd")
    targets = {}
    for fd in os.listdir(folder) if folder.is_dir() else []:
        try:
            targets[fd] = os.readlink(folder / fd)
        except OSError:  # closed meanwhile (or the listing's own descriptor)
            pass
    return targets


def left_open(before: dict[str, str], folder: Path, settle: float = 5.0) -> dict[str, str]:
    """Descriptors opened since `before` (`open_files()`) that a reader of files in `folder` may have left: a file
    there, or a pipe (ffmpeg's). Other threads of the test process (a server, the face mesh's interpreters
    opening their model files) may open descriptors meanwhile; those are not the reader's. Asked again for up to
    `settle` seconds while any are open: imageio-ffmpeg's log thread closes ffmpeg's stderr pipe on its own once
    ffmpeg has quit, a moment after the reader is closed (seen open once in a full CI run on a busy machine); a
    leaked descriptor stays."""
    deadline = time.monotonic() + settle
    while True:
        left = {fd: target for fd, target in open_files().items() if before.get(fd) != target
                and (target.startswith(str(folder)) or target.startswith("pipe:"))}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def require(path: Path, what: str) -> Path:
    """Return `path`, or skip (fail when MEFACIAL_REQUIRE_SHARED=1) if it is absent."""
    if path.exists():
        return path
    message = f"{what} not found at {path} (set MEFACIAL_FIXTURES / MEFACIAL_DATA)"
    if os.environ.get("MEFACIAL_REQUIRE_SHARED") == "1":
        pytest.fail(message + "; MEFACIAL_REQUIRE_SHARED=1 forbids skipping")
    pytest.skip(message)


def device_under_test():
    """The device the reference-fixture tests run their models on: $MEFACIAL_TEST_DEVICE (default cpu; e.g.
    cuda in scripts/gpu_check.sh). On CUDA, TF32 is turned off so that float32 is float32 and the fixtures'
    tolerances apply unchanged."""
    import torch

    device = torch.device(os.environ.get("MEFACIAL_TEST_DEVICE") or "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"MEFACIAL_TEST_DEVICE={device} but torch sees no CUDA GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


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
def dlib_searches(monkeypatch) -> list[dict]:
    """The keyword arguments (role, ...) of every dlib landmark search the test makes; the searches still run."""
    from mefacial.landmarks import DlibDetector

    searches: list[dict] = []
    detect = DlibDetector.detect
    monkeypatch.setattr(DlibDetector, "detect", lambda self, frames, **kw: searches.append(kw) or detect(self, frames, **kw))
    return searches


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


# ---- tiny engine: every variant through the public Engine API in seconds, without shared fixtures ----------

TINY_SIZE = 64
MESH_SIZE = 96  # a face mesh needs a face of about 60 px


def synthetic_landmarks(size: int = TINY_SIZE, frames: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A plausible 68-point face (iBUG order: jaw, brows, nose, eyes, mouth) in a size x size frame, and a
    clip of it (frames x 68 x 2) whose brows rise and mouth opens a little: (1 x 68 x 2, T x 68 x 2)."""
    c, r = size / 2, size * 0.32
    arc = lambda a0, a1, n, cx, cy, rx, ry: np.stack(  # noqa: E731
        [cx + rx * np.cos(np.linspace(a0, a1, n)), cy + ry * np.sin(np.linspace(a0, a1, n))], 1)
    eye = lambda cx: arc(np.pi, -np.pi * 2 / 3, 6, cx, c - 0.15 * r, 0.18 * r, 0.08 * r)  # noqa: E731
    face = np.concatenate([
        arc(np.pi, 0, 17, c, c, r, r)[::-1] * [1, -1] + [0, 2 * c],  # jaw 0-16, left to right along the chin
        arc(np.pi * 1.1, np.pi * 1.9, 5, c - 0.45 * r, c - 0.25 * r, 0.3 * r, 0.15 * r),  # left brow 17-21
        arc(np.pi * 1.1, np.pi * 1.9, 5, c + 0.45 * r, c - 0.25 * r, 0.3 * r, 0.15 * r),  # right brow 22-26
        np.stack([np.full(4, c), np.linspace(c - 0.1 * r, c + 0.25 * r, 4)], 1),  # nose bridge 27-30
        np.stack([np.linspace(c - 0.15 * r, c + 0.15 * r, 5), np.full(5, c + 0.32 * r)], 1),  # nostrils 31-35
        eye(c - 0.4 * r), eye(c + 0.4 * r),  # eyes 36-47
        arc(np.pi, -np.pi, 13, c, c + 0.6 * r, 0.35 * r, 0.12 * r)[:12],  # outer lip 48-59
        arc(np.pi, -np.pi, 9, c, c + 0.6 * r, 0.22 * r, 0.05 * r)[:8],  # inner lip 60-67
    ]).astype(np.float32)
    t = np.linspace(0, 1, frames, dtype=np.float32)[:, None, None]
    motion = np.zeros((1, 68, 2), np.float32)
    motion[0, 17:27, 1] = -0.03 * size  # brows up
    motion[0, 57:60, 1] = motion[0, 65:68, 1] = 0.02 * size  # lower lip down
    jitter = np.random.default_rng(seed).normal(0, 0.05, (frames, 68, 2)).astype(np.float32)
    return face[None], face[None] + t * motion + jitter


def synthetic_face(size: int = TINY_SIZE, frames: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured size x size source image and a T-frame driving clip (uint8), to animate with given landmarks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.5 + 0.4 * np.cos(5 * yy), 0.4 + 0.3 * xx], -1)
    source = (255 * base).astype(np.uint8)
    clip = np.clip(source[None] + rng.normal(0, 4, (frames, size, size, 3)), 0, 255).astype(np.uint8)
    return source, clip


@dataclasses.dataclass
class TinyRun:
    """A variant with a tiny seeded random model on an Engine, and inputs it can animate (given landmarks)."""

    engine: Any
    variant: str
    source: np.ndarray  # 64 x 64 x 3 uint8
    driving: np.ndarray  # T x 64 x 64 x 3 uint8
    source_landmarks: np.ndarray | None  # 1 x 68 x 2 (None: found by the engine)
    driving_landmarks: np.ndarray | None  # T x 68 x 2
    model: Any = None  # the tiny model as built (the engine serves a fused copy)
    size: int = TINY_SIZE

    @property
    def inputs(self) -> dict[str, Any]:
        """How the inputs are given: synthetic frames with their landmarks (crop off: the frames are the face), or
        the bundled example, cropped, for a backbone that finds its own points (a face mesh)."""
        if self.source_landmarks is None:
            return {}
        return {"crop": False, "source_landmarks": self.source_landmarks[0], "driving_landmarks": self.driving_landmarks}

    def prepare(self, **options):
        """The inputs prepared by the engine at the tiny size."""
        return self.engine.prepare(self.source, self.driving, size=self.size, **self.inputs, **options)

    def animate(self, **options):
        return self.engine.animate(self.source, self.driving, variant=self.variant, **self.inputs, **options)


@pytest.fixture
def tiny_engine() -> Callable[..., TinyRun]:
    """`tiny_engine(variant)`: a CPU Engine serving `variant` with a tiny seeded random model
    (`mefacial.models.tiny_config`: its backbone's code paths with few channels, 64 px) and synthetic inputs with
    given landmarks, so every variant runs through the public Engine API in seconds, without shared files."""
    import torch

    from mefacial import Engine
    from mefacial.models import build_model, tiny_config
    from mefacial.variants import get_variant

    def make(variant: str, seed: int = 0, **engine_options) -> TinyRun:
        engine = Engine(device="cpu", batch_size=engine_options.pop("batch_size", 2), **engine_options)
        spec = get_variant(variant)
        mesh = spec.spec.points == "mesh"  # finds its own points: the bundled example face, large enough for them
        size = MESH_SIZE if mesh else TINY_SIZE
        torch.manual_seed(seed)
        model = build_model(tiny_config(spec.config, size)).eval()
        with torch.no_grad():  # batch-norm statistics off the identity, so fused and unfused paths differ
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
        engine.use_model(variant, model, weights=f"tiny random (seed {seed})")
        if mesh:
            from mefacial.video import read_clip, read_image

            source, driving = read_image(REPO / "examples" / "astronaut.png"), \
                read_clip(REPO / "examples" / "brow_raise.mp4").frames[:6]
            return TinyRun(engine, variant, source, driving, None, None, model, size)
        source, driving = synthetic_face(seed=seed)
        src_points, drv_points = synthetic_landmarks(seed=seed)
        return TinyRun(engine, variant, source, driving, src_points, drv_points, model, size)

    return make

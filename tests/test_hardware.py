"""ZeroGPU support: with a stand-in `spaces` module and SPACES_ZERO_GPU set, the app's engine handlers run as
`spaces.GPU` tasks with a duration from the request and the engine moves to CUDA inside the call; without
the variable nothing imports `spaces` and the handlers are the plain ones. No GPU is needed."""

from __future__ import annotations

import importlib.abc
import subprocess
import sys
import types

import pytest

import app
from conftest import REPO
from mefacial import Engine, hardware

FACE = {"path": str(app.EXAMPLE_FACE), "orig_name": "face.png"}
CLIP = {"path": str(app.EXAMPLE_CLIP), "orig_name": "clip.mp4"}


class FakeSpaces(types.ModuleType):
    """Records what `spaces.GPU` is asked for and runs the task in-process (as ZeroGPU does in its worker)."""

    def __init__(self):
        super().__init__("spaces")
        self.decorated: list[str] = []
        self.durations: list[int] = []

    def GPU(self, task=None, *, duration=None, size=None):  # noqa: N802 (the package's name)
        def decorate(fn):
            self.decorated.append(fn.__name__)

            def task_call(*args, **kwargs):
                self.durations.append(duration(*args, **kwargs) if callable(duration) else duration)
                return fn(*args, **kwargs)

            task_call.__wrapped__ = fn
            return task_call

        return decorate(task) if callable(task) else decorate


@pytest.fixture
def zero_gpu(monkeypatch):
    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv(hardware.ZERO_GPU_ENV, "true")
    moves: list[str] = []
    monkeypatch.setattr(Engine, "to", lambda self, device: moves.append(str(device)) or self)  # no GPU here
    fake.moves = moves
    return fake


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("t", True),
                                             ("false", False), ("0", False), ("", False), (None, False)])
def test_zero_gpu_is_detected_as_the_spaces_package_does(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(hardware.ZERO_GPU_ENV, raising=False)
    else:
        monkeypatch.setenv(hardware.ZERO_GPU_ENV, value)
    assert hardware.on_zero_gpu() is expected
    assert hardware.startup_device("auto") == ("cpu" if expected else "auto")


def test_gpu_seconds_grow_with_frames_and_variants_up_to_the_cap():
    assert hardware.gpu_seconds(1) < hardware.gpu_seconds(100) < hardware.gpu_seconds(100, 4)
    assert hardware.gpu_seconds(10_000, 8) == hardware.GPU_MAX_S


def test_on_zero_gpu_the_handlers_are_gpu_tasks_that_move_the_engine(zero_gpu):
    demo = app.Demo(Engine(device=hardware.startup_device("auto"), landmarks="dlib"), app.Limits())
    assert demo.engine.device.type == "cpu"  # models load on the CPU at start-up
    app.zero_gpu_handlers(demo)
    assert sorted(zero_gpu.decorated) == ["compare", "generate", "prior"]

    video, grid, download, status = demo.generate(FACE, CLIP, "warp", progress=lambda *a, **k: None)
    assert "Training-free" in status and video.endswith(".mp4")
    assert zero_gpu.moves == ["cuda"]  # inside the call
    frames = app.read_clip(app.EXAMPLE_CLIP).num_frames
    assert zero_gpu.durations == [hardware.gpu_seconds(frames)]

    demo.compare(FACE, CLIP, ["warp", "fomm-awp"], progress=lambda *a, **k: None)
    assert zero_gpu.durations[-1] == hardware.gpu_seconds(frames, 2)
    with pytest.raises(app.gr.Error, match="No source face"):  # the message, raised inside the GPU task
        demo.generate(None, CLIP)


class Refuse(importlib.abc.MetaPathFinder):
    """Fails any import of `spaces`."""

    def find_spec(self, name, path=None, target=None):
        if name == "spaces" or name.startswith("spaces."):
            raise AssertionError("`spaces` was imported without SPACES_ZERO_GPU")
        return None


def test_elsewhere_nothing_imports_spaces_and_handlers_are_plain(monkeypatch):
    monkeypatch.delenv(hardware.ZERO_GPU_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    demo = app.Demo(Engine(device="cpu", landmarks="dlib"), app.Limits())
    generate = demo.generate
    app.zero_gpu_handlers(demo)
    assert demo.generate == generate and "spaces" not in sys.modules
    handler = object()
    assert hardware.gpu_handler(handler, demo.engine, 10) is handler


def test_app_starts_without_spaces_installed_and_zero_gpu_without_it_says_what_to_add():
    """A subprocess: the app module and its start-up path import no `spaces` unless the variable is set."""
    code = ("import sys, app; from mefacial import hardware; assert 'spaces' not in sys.modules; "
            "import os; os.environ['SPACES_ZERO_GPU'] = 'true'; sys.modules['spaces'] = None\n"
            "try:\n    hardware.import_spaces()\nexcept RuntimeError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "SPACES_ZERO_GPU": ""})
    assert out.returncode == 0, out.stderr
    assert "add `spaces` to requirements.txt" in out.stdout

"""The benchmark and helper scripts (benchmarks/, scripts/) import: nothing runs them in CI, so a name they take
from `mefacial` that moved or was removed would otherwise go unnoticed until someone runs them by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py")])


def load_tool(name: str):
    """benchmarks/NAME.py as a module (its functions, none of its work)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tools_are_found():
    assert {"dense_quality.py", "gpu_check.py", "au_strips.py"} <= {path.name for path in TOOLS}


@pytest.mark.parametrize("path", TOOLS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_tool_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # a tool may import its neighbours, as when run as a script
    monkeypatch.chdir(REPO)  # ... from the repository's root, as their docstrings say
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # module level only: each runs its work under `if __name__ == "__main__"`


def test_drawn_opening_reads_how_much_eye_a_synthesised_clip_shows():
    """`dense_quality.drawn_opening`, the squint table's reader-free column: 1 on the neutral face, and as the
    synthesis shuts the eyes (AU43E), it falls to the share the shut lids keep (CLOSED: the margins meet without
    crossing) at the apex and back; a lid that only droops (AU43B) shows more than a shut one, less than open."""
    from mefacial import Engine, au
    from mefacial.models.dense import CLOSED

    quality = load_tool("dense_quality")
    engine = Engine(device="cpu")
    timing = au.Timing(onset_ms=40, apex_ms=20, offset_ms=40, fps=100)
    shown = {}
    for aus in ("43:E", "43:B"):
        meshes = engine.synthesize(REPO / "examples" / "astronaut.png", aus, timing).meshes.astype(np.float64)
        shown[aus] = quality.drawn_opening(meshes[0], meshes)  # T
    shut = shown["43:E"]
    assert shut[0] == pytest.approx(1.0) and shut[-1] == pytest.approx(1.0, abs=0.02)
    assert shut.min() < 2 * CLOSED and int(np.argmin(shut)) in range(4, 7)  # the apex: frames 4-6
    assert shut.min() < shown["43:B"].min() < 0.9


def test_raw_sized_clip_centres_the_enlarged_face_on_the_presets_canvas():
    """`raw_sized_clip.enlarge` (the README's raw-sized Speed rows): the canvas has the preset's size, the clip
    is scaled to the preset's face width and centred (its centre pixel lands on the canvas's), the rest is the
    flat background, and the SAMM preset is grey."""
    tool = load_tool("raw_sized_clip")
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[:, 6:10, 6:10] = (200, 40, 10)  # a coloured centre
    for preset, (width, height, face, grey) in tool.PRESETS.items():
        out = tool.enlarge(frames, width, height, face, grey)
        assert out.shape == (2, height, width, 3), preset
        centre = out[1, height // 2, width // 2]
        assert (len(set(centre)) == 1) == grey and centre.max() > 30, preset
        assert (out[:, 0, 0] == tool.BACKGROUND).all() and (out[:, -1, -1] == tool.BACKGROUND).all(), preset
        face_rows = np.flatnonzero((out[0, :, :, :] != tool.BACKGROUND).any((1, 2)))
        assert abs(len(face_rows) - face) <= 2, preset  # a square clip: as tall as wide, `face` px

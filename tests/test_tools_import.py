"""The benchmark and helper scripts (benchmarks/, scripts/) import: nothing runs them in CI, so a name they take
from `mefacial` that moved or was removed would otherwise go unnoticed until someone runs them by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py")])


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

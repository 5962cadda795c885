"""Security properties that are checked, not just believed (see README, "Security").

- Loading never runs code from a file: every `torch.load` passes weights_only=True; no pickle,
  no `yaml.load` without a safe loader, no `np.load(allow_pickle=True)`, no eval / exec, no shell.
- The demo's API takes no path, URL or checkpoint from the page: its only file inputs are uploads
  (Gradio FileData, checked to lie in Gradio's upload folder: tests/test_app_hostile.py), and
  every other input is a bounded choice, number or flag; weights come from the command line or
  the environment only.
- Every dependency is pinned or bounded above.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

SOURCES = sorted([*REPO.glob("mefacial/**/*.py"), *REPO.glob("train/**/*.py"), *REPO.glob("benchmarks/*.py"),
                  REPO / "app.py"])


def call_name(node: ast.Call) -> str:
    """`torch.load` for torch.load(...), `eval` for eval(...), `?.eval` for f(x).eval(...)."""
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "?")  # "?.eval" for build(...).eval()
    return ".".join(reversed(parts))


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unsafe_calls(path: Path, root: Path = REPO) -> list[str]:
    """The calls of `path` that could run code from data, as "file:line: what"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name, where = call_name(node), f"{path.relative_to(root)}:{node.lineno}"
        if name == "torch.load" and keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "dill.load", "torch.jit.load", "marshal.loads"):
            found.append(f"{where}: {name}")
        elif name == "yaml.load" and "Safe" not in ast.unparse(node):
            found.append(f"{where}: yaml.load without SafeLoader")
        elif name == "np.load" and keyword(node, "allow_pickle") is True:
            found.append(f"{where}: np.load(allow_pickle=True)")
        elif name in ("eval", "exec", "os.system", "os.popen"):
            found.append(f"{where}: {name}")
        elif name.startswith("subprocess.") and keyword(node, "shell") is True:
            found.append(f"{where}: {name}(shell=True)")
    return found


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, yaml, pickle, subprocess, numpy as np\n"
                   "torch.load('a')\ntorch.load('b', weights_only=False)\nyaml.load(s)\npickle.loads(b)\n"
                   "np.load('c', allow_pickle=True)\neval('1')\nsubprocess.run('ls', shell=True)\n"
                   "torch.load('ok', weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\n")
    assert len(unsafe_calls(bad, tmp_path)) == 7


def test_no_code_runs_from_loaded_files():
    assert len(SOURCES) > 20, "the scan found too few sources"
    found = [problem for path in SOURCES for problem in unsafe_calls(path)]
    assert not found, "\n".join(found)


REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9_.\-\[\]]+)\s*(?P<spec>.*)$")


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_dependencies_are_pinned_or_bounded(name):
    lines = [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("-r")]
    assert requirements
    for line in requirements:
        spec = REQUIREMENT.match(line)["spec"]
        assert "==" in spec or "<" in spec, f"{name}: {line!r} has no upper bound"


def test_the_app_takes_only_uploads_and_bounded_choices():
    """No endpoint has a path, URL or checkpoint parameter; file inputs are upload components."""
    import app
    from mefacial import Engine

    info = app.build_demo(Engine(device="cpu")).get_api_info()
    assert not info["unnamed_endpoints"]
    endpoints = info["named_endpoints"]
    assert {"/generate", "/compare", "/prior", "/preview_driving"} <= set(endpoints)
    for endpoint, description in endpoints.items():
        for parameter in description["parameters"]:
            name, component = parameter["parameter_name"], parameter["component"]
            kind = parameter["python_type"]["type"]
            assert not re.search(r"checkpoint|weight|path|dir|url|file", name, re.I), f"{endpoint}: {name}"
            if kind == "filepath":
                assert component in ("Image", "File") and name in ("source", "driving"), f"{endpoint}: {name}"
            else:
                assert kind in ("bool", "float") or kind.startswith(("Literal[", "list[Literal[")), \
                    f"{endpoint}: {name} is a free {kind}"

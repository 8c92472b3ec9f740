"""The shape of the code (issue 10): no import cycles between the packages, no torch networks in the ONNX runtime,
thin entry points, small functions, few parameters."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "core", "models": "models", "export": "export", "engine": "engine", "demo": "demo"}


def _sources(folder: str):
    for path in sorted((ROOT / folder).glob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imports(tree) -> set[str]:
    """unclip packages imported anywhere in a module (at the top or inside functions)."""
    out = set()
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for n in names:
            parts = n.split(".")
            if parts[0] == "unclip" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_the_package_import_graph_has_no_cycles():
    graph = {p: set() for p in PACKAGES}
    for pkg, folder in PACKAGES.items():
        for _, tree in _sources(folder):
            graph[pkg] |= _imports(tree) - {pkg}
    assert graph["core"] == set(), graph["core"]  # the neutral core imports no other package
    # depth-first search for a cycle
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in graph.get(n, ()):
            assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for p in graph:
        if p not in state:
            visit(p, [p])


def test_the_onnx_runtime_imports_no_networks(tmp_path):
    """An onnxruntime generation through the API (engines already exported) loads no module of unclip.models and
    no torch network code."""
    from unclip.export.onnx_export import export_model
    from unclip.models import build_preset
    export_model(build_preset("tiny"), tmp_path / "e", source="tiny")
    code = f"""
import json, sys
from unclip.engine.api import run
from unclip.engine.pipeline import Settings
from unclip.engine.request import Request
run(Request(prompt="a cat", model="tiny", engines={str(tmp_path / 'e')!r}, out={str(tmp_path / 'out')!r},
            settings=Settings(prior_steps=2, decoder_steps=2, sr256_steps=2, size=64)), notify=lambda m: None)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("unclip"))))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "unclip.engine.backend_ort" in loaded
    assert not [m for m in loaded if m.startswith(("unclip.models", "unclip.export", "unclip.demo"))], loaded
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _functions(folder: str):
    for path, tree in _sources(folder):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_thin_entry_points_and_small_functions():
    lines = sum(len((ROOT / "engine" / f).read_text().splitlines()) for f in ("api.py", "cli.py"))
    assert lines <= 200, lines
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in _functions("engine")
            if n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


@pytest.mark.parametrize("folder", list(PACKAGES.values()))
def test_no_function_takes_more_than_eight_parameters(folder):
    many = []
    for p, n in _functions(folder):
        a = n.args
        count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - int(bool(a.args) and a.args[0].arg in ("self",
                                                                                                          "cls"))
        if count > 8:
            many.append(f"{p.name}:{n.name} ({count})")
    assert not many, many

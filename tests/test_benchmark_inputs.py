"""benchmarks/latency.py and benchmarks/quality.py refuse bad input with one line and no traceback, before any work
or write (exit 2 for a usage error, 1 for a model or backend that can't load or run), and never replace earlier
results or the README's pictures with empty or half-written files. No test here generates an image."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = b"earlier results\n"


@functools.cache
def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(stderr: str, expected: str, progress: bool = False) -> None:
    """stderr is one 'Error: ...' line (with progress=True: ends with one, after the run's progress lines)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert (progress or len(lines) == 1) and lines[-1].startswith("Error: "), stderr
    assert sum(line.startswith("Error: ") for line in lines) == 1 and expected in lines[-1], stderr


def _refused(main, argv: list[str], capsys) -> tuple[int, str]:
    """Runs a script's main in this process: its exit status and stderr (any exception but SystemExit fails)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def _run(script: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def earlier(tmp_path):
    """A folder as a user has it: earlier results and README pictures, which a refused run must leave as they are."""
    (tmp_path / "results").mkdir()
    for name in ("latency.md", "latency.json", "quality.md", "quality.json"):
        (tmp_path / "results" / name).write_bytes(OLD)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "demo-sheet.png").write_bytes(b"\x89PNG the README's picture")
    (tmp_path / "empty").mkdir()
    return tmp_path


LATENCY_CASES = [
    (["--backend", "torch:fp99"], 2, "torch has no precision 'fp99' (choose torch:fp32, torch:fp16, torch:bf16)"),
    (["--backend", "torch:bf16:nonsense"], 2, "unknown torch mode 'nonsense' (choose eager, static"),
    (["--backend", "foo"], 2, "unknown backend 'foo' (choose diffusers, onnxruntime, openvino, tensorrt, torch)"),
    (["--backend", "diffusers:bf16"], 2, "diffusers, the baseline, takes no suffix"),
    (["--backend", "onnxruntime:fp32:static"], 2, "only torch takes a mode"),
    (["--backend", "torch:fp32:cuda-graphs"], 2, "cuda-graphs needs --device cuda"),
    (["--backend", "onnxruntime", "--precision", "bf16"], 2, "onnxruntime doesn't have"),
    (["--backend", "torch", "--backend", "torch:fp32"], 2, "same run as --backend torch"),
    (["--batch", "0"], 2, "--batch must be >= 1, got 0"),
    (["--repeats", "0"], 2, "--repeats must be >= 1, got 0"),
    (["--steps", "0,0,0,0"], 2, "--steps must be four whole numbers >= 1"),
    (["--steps", "1,2"], 2, "--steps must be four whole numbers >= 1"),
    (["--steps", "a,b,c,d"], 2, "got 'a,b,c,d'"),
    (["--steps", "2000,25,7,15"], 2, "--steps 2000,25,7,15: at most 1000 per stage (the timesteps every built-in"),
    (["--preset", "nope"], 2, "invalid choice: 'nope'"),
    (["--model", "empty"], 1, "not an unCLIP model folder (no model_index.json)"),
    (["--out", "results/latency.md"], 2, "exists and is not a folder"),
]


@pytest.mark.parametrize("args,rc,expected", LATENCY_CASES, ids=[" ".join(c[0]) for c in LATENCY_CASES])
def test_latency_refuses_bad_options_before_any_write(earlier, monkeypatch, capsys, args, rc, expected):
    monkeypatch.chdir(earlier)
    before = _files(earlier)
    code, err = _refused(_module("latency").main, ["--preset", "tiny", "--out", "results", *args], capsys)
    assert code == rc, err
    _one_line_error(err, expected)
    assert _files(earlier) == before  # no file written, none replaced


@pytest.mark.parametrize("args,rc,expected", [
    (["--backend", "torch:fp99"], 2, "torch has no precision 'fp99'"),  # it was: exit 0, the tables emptied
    (["--model", "empty"], 1, "not an unCLIP model folder"),  # it was: a ModelLoadError traceback
])
def test_latency_script_exits_with_one_line(earlier, args, rc, expected):
    before = _files(earlier)
    res = _run("latency.py", ["--preset", "tiny", "--out", "results", *args], earlier)
    assert res.returncode == rc, res.stderr
    _one_line_error(res.stderr, expected)
    assert _files(earlier) == before


def test_latency_help_lists_the_forms_it_takes():
    res = _run("latency.py", ["--help"], ROOT)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for word in ("NAME[:PRECISION[:TORCH_MODE]]", "diffusers", "onnxruntime (fp32, fp16)", "openvino (fp32, bf16)",
                 "tensorrt (fp32, fp16)", "torch (fp32, fp16, bf16)", "eager, static, cuda-graphs, compile"):
        assert word in text, word


def test_latency_takes_the_readmes_backends():
    lat = _module("latency")
    runs = lat.backend_runs(["diffusers", "torch", "torch:bf16", "torch:bf16:static", "torch:bf16:compile",
                             "onnxruntime", "openvino", "openvino:bf16"], "fp32", "cpu")
    assert [r[0] for r in runs] == ["diffusers", "torch", "torch bf16", "torch bf16 static", "torch bf16 compile",
                                    "onnxruntime", "openvino", "openvino bf16"]
    assert lat.backend_runs(["torch:fp16:cuda-graphs"], "fp16", "cuda")[0][1:] == ("torch", "fp16", "cuda-graphs")


def _latency_offline(monkeypatch, worker):
    """latency.py with its workers and the machine's peak replaced (no generation, no GEMMs)."""
    lat = _module("latency")
    monkeypatch.setattr(lat, "run_worker", worker)
    monkeypatch.setattr(lat, "peak_gflops", lambda device, dtype: (100.0, {"gemm 1024": 100.0}))
    monkeypatch.setattr(lat, "flops_per_call", lambda model, batch: {"decoder": 1e9})
    return lat


def _failing_worker(kind, cfg):
    raise RuntimeError(f"{kind} worker failed:\nTraceback (most recent call last):\nSomeError: boom in {kind}")


def test_latency_keeps_earlier_results_when_every_backend_fails(earlier, monkeypatch, capsys):
    lat = _latency_offline(monkeypatch, _failing_worker)
    out = earlier / "results"
    with pytest.raises(SystemExit) as e:
        lat.main(["--preset", "tiny", "--backend", "torch", "--backend", "diffusers", "--out", str(out)])
    assert e.value.code == 1
    _one_line_error(capsys.readouterr().err, "every backend failed, no results were written (torch: SomeError",
                    progress=True)
    assert (out / "latency.md").read_bytes() == OLD and (out / "latency.json").read_bytes() == OLD


def test_latency_writes_the_others_but_exits_1_when_a_backend_fails(earlier, monkeypatch, capsys):
    def worker(kind, cfg):
        if kind == "diffusers":
            _failing_worker(kind, cfg)
        return {"image": "x.npy", "load_s": 0.1, "seconds_per_image": 2.0, "runs": [2.0], "images_per_second": 1.0,
                "batch": cfg["batch"], "peak_memory_mb": 10.0, "networks": {"decoder": {"seconds": 1.0, "calls": 3}},
                "network_calls_per_image": 3, "cuda_launches_per_image": None}
    lat = _latency_offline(monkeypatch, worker)
    out = earlier / "results"
    with pytest.raises(SystemExit) as e:
        lat.main(["--preset", "tiny", "--backend", "diffusers", "--backend", "torch", "--out", str(out)])
    assert e.value.code == 1
    _one_line_error(capsys.readouterr().err, "1 of 2 backends failed and were left out", progress=True)
    report = json.loads((out / "latency.json").read_text())
    assert set(report["results"]) == {"torch"}
    md = (out / "latency.md").read_text()
    assert "| torch |" in md and "Note: diffusers failed and was left out: SomeError: boom in diffusers" in md


QUALITY_CASES = [
    (["--backend", "torch:fp99"], 2, "torch has no precision 'fp99' (choose torch:fp32, torch:fp16, torch:bf16)"),
    (["--backend", "foo"], 2, "unknown backend 'foo' (choose onnxruntime, openvino, torch)"),
    (["--backend", "torch:bf16:static"], 2, "is not NAME:PRECISION"),
    (["--n", "0"], 2, "--n must be >= 1, got 0"),
    (["--n", "-1"], 2, "--n must be >= 1, got -1"),
    (["--batch", "0"], 2, "--batch must be >= 1, got 0"),
    (["--variations", "0"], 2, "--variations must be >= 1, got 0"),
    (["--size", "33"], 2, "--size 33 is not an image size of model 'demo' (its sizes: 32, 128, 512)"),
    (["--model", "nope"], 1, "nope: no such model folder"),
    (["--pictures", "docs/demo-sheet.png"], 2, "exists and is not a folder"),
    (["--n", "x"], 2, "invalid int value: 'x'"),
]


@pytest.mark.parametrize("args,rc,expected", QUALITY_CASES, ids=[" ".join(c[0]) for c in QUALITY_CASES])
def test_quality_refuses_bad_options_before_any_write(earlier, monkeypatch, capsys, args, rc, expected):
    monkeypatch.chdir(earlier)
    before = _files(earlier)
    code, err = _refused(_module("quality").main, ["--quick", "--size", "32", "--out", "results", *args], capsys)
    assert code == rc, err
    _one_line_error(err, expected)
    assert _files(earlier) == before  # the README's picture and the earlier results as they were


@pytest.mark.parametrize("args,rc,expected", [
    (["--n", "-1"], 2, "--n must be >= 1, got -1"),  # it was: a traceback, and a 33-byte docs/demo-sheet.png
    (["--model", "nope"], 1, "nope: no such model folder"),  # it was: a ModelLoadError traceback
])
def test_quality_script_exits_with_one_line(earlier, args, rc, expected):
    before = _files(earlier)
    res = _run("quality.py", ["--quick", "--out", "results", *args], earlier)
    assert res.returncode == rc, res.stderr
    _one_line_error(res.stderr, expected)
    assert _files(earlier) == before


@functools.cache
def _demo_spec():
    """The demo model's description with no generation defaults of its own (for_model reads its sizes and
    schedulers)."""
    from dataclasses import replace

    from unclip.core.spec import spec_from_model
    from unclip.models import build_preset
    return replace(spec_from_model(build_preset("demo")), defaults={})


def _quality_offline(monkeypatch, images=None):
    """quality.py with a backend that draws flat grey images (the judge and the report are the real ones)."""
    q = _module("quality")
    monkeypatch.setattr(q, "open_backend", lambda req, notify: SimpleNamespace(spec=_demo_spec()))
    monkeypatch.setattr(q, "generate_many", images or (lambda b, prompts, settings, batch:
                                                       [np.full((32, 32, 3), 128, np.uint8) for _ in prompts]))
    monkeypatch.setattr(q, "seconds_per_image", lambda b, settings: 0.5)
    return q


def test_quality_writes_pictures_only_when_asked(earlier, monkeypatch, capsys):
    q = _quality_offline(monkeypatch)
    monkeypatch.chdir(earlier)
    sheet = (earlier / "docs" / "demo-sheet.png").read_bytes()
    q.main(["--quick", "--size", "32", "--n", "2", "--backend", "torch", "--out", "results"])
    assert (earlier / "docs" / "demo-sheet.png").read_bytes() == sheet  # no --pictures: the README's is kept
    assert sorted(p.name for p in (earlier / "docs").iterdir()) == ["demo-sheet.png"]
    report = json.loads((earlier / "results" / "quality.json").read_text())
    assert list(report["backends"]) == ["torch:fp32"]  # NAME alone is fp32
    # no prompt of these two names a size: "-" in the table (not nan%), null in the JSON (valid JSON, not NaN)
    assert report["backends"]["torch:fp32"]["accuracy"]["size"] == [None, 0]
    md = (earlier / "results" / "quality.md").read_text()
    assert "nan" not in md and "| torch:fp32 |" in md and " | - | " in md
    assert not list(earlier.rglob(".*.tmp"))
    q.main(["--quick", "--size", "32", "--n", "2", "--backend", "torch:fp32", "--out", "results",
            "--pictures", "pics"])
    from PIL import Image
    with Image.open(earlier / "pics" / "demo-sheet.png") as im:
        assert im.size == (6 * 192, 192 + 34)  # one row of 6 columns (2 images), captions under them


def test_quality_that_fails_half_way_writes_nothing(earlier, monkeypatch, capsys):
    from unclip.core.errors import BackendError

    def broken(b, prompts, settings, batch):
        raise BackendError("the torch backend failed to run decoder (boom); try a smaller --max-batch")
    q = _quality_offline(monkeypatch, broken)
    monkeypatch.chdir(earlier)
    before = _files(earlier)
    with pytest.raises(SystemExit) as e:
        q.main(["--quick", "--size", "32", "--n", "2", "--backend", "torch:fp32", "--out", "results",
                "--pictures", "docs"])
    assert e.value.code == 1
    _one_line_error(capsys.readouterr().err, "failed to run decoder (boom)")
    assert _files(earlier) == before


def test_an_output_folder_is_checked_without_creating_anything(tmp_path, monkeypatch):
    """The check both scripts make on --out / --pictures: a file, a folder this user may not write in, a path below a
    file or below a folder this user may not write in are refused with the fix; a new nested folder is fine; nothing
    is created either way."""
    from unclip.engine.outputs import folder_problem
    (tmp_path / "f").write_text("x")
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not str(p).endswith("ro"))
    before = _files(tmp_path), sorted(tmp_path.rglob("*"))
    assert folder_problem(str(tmp_path / "f"), "--out") == f"--out {tmp_path}/f: exists and is not a folder; pass a " \
                                                          "folder"
    assert folder_problem(str(tmp_path / "ro"), "--pictures") == f"--pictures {tmp_path}/ro: this user may not " \
                                                                 "write in it; pass a folder of your own"
    assert folder_problem(str(tmp_path / "f" / "a" / "b"), "--out") == \
        f"--out {tmp_path}/f/a/b: cannot be created ({tmp_path}/f is not a writable folder); pass another folder"
    assert folder_problem(str(tmp_path / "ro" / "a"), "--out") == \
        f"--out {tmp_path}/ro/a: cannot be created ({tmp_path}/ro is not a writable folder); pass another folder"
    assert folder_problem(str(tmp_path / "new" / "deeper"), "--out") is None
    assert folder_problem(str(tmp_path), "--out") is None
    assert (_files(tmp_path), sorted(tmp_path.rglob("*"))) == before

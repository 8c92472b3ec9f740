"""benchmarks/latency.py runs end to end on the tiny preset and writes every field (no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_latency_script_writes_full_report(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--preset", "tiny",
                          "--repeats", "1", "--batch", "2", "--steps", "3,3,2,2", "--out", str(tmp_path),
                          "--backend", "diffusers", "--backend", "torch", "--backend", "onnxruntime",
                          "--backend", "torch:bf16"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "latency.json").read_text())
    for key in ("date", "machine", "versions", "settings", "peak_gflops", "peak_shapes", "flops_per_call", "export_s",
                "results", "stages", "ratios", "image_difference"):
        assert key in report, key
    assert report["machine"]["cores"] >= 1
    assert report["peak_gflops"]["fp32"] == max(report["peak_shapes"]["fp32"].values()) > 0
    assert set(report["results"]) == {"diffusers", "torch", "onnxruntime", "torch bf16"}
    for backend, r in report["results"].items():
        for key in ("load_s", "seconds_per_image", "images_per_second", "peak_memory_mb", "networks"):
            assert r[key] is not None, (backend, key)
        stages = report["stages"][backend]
        assert set(stages) == {"text_encoder", "prior", "text_proj", "decoder", "sr256", "sr1024"}
        for row in stages.values():
            assert {"ms_per_step", "ms_per_stage", "gflops_per_step", "achieved_gflops", "fraction_of_peak"} <= set(row)
        # step counts are the requested ones: 3 prior steps at guided batch, 2 sr256 calls, ...
        assert r["networks"]["prior"]["calls"] == 3 and stages["sr256"]["calls"] == 2
    assert report["flops_per_call"]["decoder"] > report["flops_per_call"]["text_proj"] > 0
    assert set(report["ratios"]) == {"torch", "onnxruntime", "torch bf16"}
    assert set(report["peak_gflops"]) == {"fp32", "bf16"}
    for d in report["image_difference"].values():
        assert 0 <= d["mean_abs"] <= d["max_abs"] <= 1
    md = (tmp_path / "latency.md").read_text()
    assert "| decoder |" in md
    # a small stage's GFLOP is printed to 1% (two decimals would print a 0.026 GFLOP text encoder as 0.03)
    for st, row in report["stages"]["torch"].items():
        cell = next(line for line in md.splitlines() if line.startswith(f"| {st} |")).split("|")[2]
        assert abs(float(cell) - row["gflops_per_step"]) <= 0.01 * row["gflops_per_step"], (st, cell)


def _latency_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("latency", os.path.join(ROOT, "benchmarks", "latency.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(s, ips, mem, net_s):
    return {"load_s": s / 10, "seconds_per_image": s, "images_per_second": ips, "peak_memory_mb": mem,
            "runs": [s], "image": f"{s}.npy", "networks": {"decoder": {"seconds": net_s, "calls": 25}}}


def test_rounds_merge_to_medians_and_ratios_are_taken_within_each_round():
    lat = _latency_module()
    base = [_result(8.0, 0.10, 100, 2.0), _result(5.0, 0.12, 120, 1.0), _result(7.0, 0.09, 110, 1.5)]
    ours = [_result(4.0, 0.40, 200, 0.5), _result(2.5, 0.36, 190, 0.4), _result(3.5, 0.30, 210, 0.6)]
    m = lat.merge_rounds(ours)
    assert m["seconds_per_image"] == 3.5 and m["images_per_second"] == 0.36 and m["peak_memory_mb"] == 210
    assert m["networks"]["decoder"] == {"seconds": 0.5, "calls": 25} and m["image"] == "4.0.npy"
    assert m["rounds"][1] == {"seconds_per_image": 2.5, "images_per_second": 0.36}
    r = lat.round_ratios(base, ours)
    assert r["batch_1"] == [2.0, 2.0, 2.0] and r["batch_1_median"] == 2.0
    assert r["batch"] == [4.0, 3.0, 0.30 / 0.09] and r["batch_median"] == 3.3333333333333335


def test_rounds_below_one_are_refused():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--rounds", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--rounds must be >= 1, got 0" in res.stderr

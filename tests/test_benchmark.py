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
    assert "| decoder |" in (tmp_path / "latency.md").read_text()

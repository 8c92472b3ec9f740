"""Slow end-to-end checks on the `small` preset (real image sizes): run with `python -m pytest -m slow`."""
from __future__ import annotations

import pytest
from unclip.engine.backend_ort import OnnxRuntimeBackend
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate
from unclip.export.onnx_export import export_model
from unclip.models import build_preset

pytestmark = pytest.mark.slow


def test_small_preset_onnxruntime_equals_torch_at_1024(tmp_path):
    model = build_preset("small")
    reports = export_model(model, tmp_path, source="small")
    assert all(r.max_abs <= 1e-4 for r in reports)
    ort_b, torch_b = OnnxRuntimeBackend(tmp_path), TorchBackend(build_preset("small"))
    s = Settings(size=1024, seed=5)
    a = generate(ort_b, ort_b.spec, "a photo of a red frog", s).images.float() / 255
    b = generate(torch_b, torch_b.spec, "a photo of a red frog", s).images.float() / 255
    assert a.shape == (1, 1024, 1024, 3)
    d = (a - b).abs()
    assert d.mean() <= 2e-3 and (d > 0.05).float().mean() <= 1e-3, (d.mean(), (d > 0.05).float().mean())

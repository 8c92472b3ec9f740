"""unclip-export on the tiny preset (fp32 and fp16, batch 1, 2, 5), a diffusers save_pretrained folder, and the
TensorRT decisions that need no TensorRT."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from refs import save_reference_folder
from unclip.engine.backend_ort import OnnxRuntimeBackend
from unclip.export import trt
from unclip.export.cli import main as export_cli
from unclip.export.contract import contracts
from unclip.export.onnx_export import export_model
from unclip.models import build_preset

FP16_TOL = 2e-2  # max abs error / output scale of an fp16 graph against the fp32 torch module


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", FP16_TOL)])
def test_every_stage_matches_torch(tiny, tmp_path_factory, precision, tol):
    out = tmp_path_factory.mktemp(precision)
    export_model(tiny, out, precision=precision, source="tiny")
    b = OnnxRuntimeBackend(out)
    nets = tiny.networks()
    for name, c in contracts(b.spec).items():
        for batch in (1, 2, 5):
            inp = c.sample_inputs(batch, b.spec, seed=batch)
            got = b.run(name, inp)
            with torch.no_grad():
                ref = nets[name](*[inp[t.name] for t in c.inputs])
            ref = ref if isinstance(ref, tuple) else (ref,)
            for t, r in zip(c.outputs, ref):
                err = (got[t.name] - r).abs().max().item()
                assert err <= tol * max(r.abs().max().item(), 1e-6), (name, batch, t.name, err)


def test_diffusers_folder_exports_with_stage_all(tmp_path):
    pytest.importorskip("diffusers")
    folder, _, _ = save_reference_folder("A", tmp_path)
    res = CliRunner().invoke(export_cli, ["--model", str(folder), "--out", str(tmp_path / "e"), "--stage", "all"])
    assert res.exit_code == 0, res.output
    assert "| decoder |" in res.output and "| sr1024 |" in res.output


def test_cli_bad_model_one_line(tmp_path):
    res = CliRunner().invoke(export_cli, ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert res.exit_code == 1 and "no such model folder" in res.output and "Traceback" not in res.output


def test_trt_without_tensorrt_says_what_to_install(tmp_path):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here")
    res = CliRunner().invoke(export_cli, ["--model", "tiny", "--out", str(tmp_path / "e"), "--trt"])
    assert res.exit_code == 1 and "pip install tensorrt" in res.output


def _entry():
    return {"profile": [1, 2, 8], "inputs": [["x_t", ["B", 3, 64, 64], "float32"], ["t", ["B"], "float32"]],
            "files": {"decoder.onnx": {"size": 10, "sha256": "a" * 64}}}


def test_trt_profile_shapes():
    assert trt.profile_shapes(_entry()) == {"x_t": ((1, 3, 64, 64), (2, 3, 64, 64), (8, 3, 64, 64)),
                                            "t": ((1,), (2,), (8,))}


def test_trt_cache_key_covers_every_input():
    base = dict(onnx_sha256="a", profile={"x": [[1], [2], [8]]}, flags=("FP16",), trt_version="10.0",
                gpu_name="H100", compute_capability=(9, 0))
    k = trt.cache_key(**base)
    assert k == trt.cache_key(**base)
    for field, other in [("onnx_sha256", "b"), ("profile", {"x": [[1], [2], [16]]}), ("flags", ()),
                         ("trt_version", "10.1"), ("gpu_name", "A100"), ("compute_capability", (8, 0))]:
        assert trt.cache_key(**{**base, field: other}) != k, field


def test_trt_rebuild_decisions(tmp_path):
    entry = _entry()
    assert trt.needs_rebuild(entry, "k", tmp_path)  # never built
    (tmp_path / "decoder.plan").write_bytes(b"x" * 5)
    entry["trt"] = {"key": "k", "file": {"name": "decoder.plan", "size": 5}}
    assert not trt.needs_rebuild(entry, "k", tmp_path)
    assert trt.needs_rebuild(entry, "other", tmp_path)  # ONNX, profile, flags, version or GPU changed
    assert trt.needs_rebuild(entry, "k", tmp_path, force=True)
    (tmp_path / "decoder.plan").write_bytes(b"x" * 3)  # truncated engine
    assert trt.needs_rebuild(entry, "k", tmp_path)


@pytest.mark.tensorrt
@pytest.mark.skipif(not importlib.util.find_spec("tensorrt") or not torch.cuda.is_available(),
                    reason="needs the tensorrt package and an NVIDIA GPU (not installable on this project's machines)")
def test_tensorrt_engines_match_torch(tiny, tmp_path):
    from unclip.engine.backend_trt import TensorRTBackend
    export_model(tiny, tmp_path, source="tiny")
    trt.build_engines(tmp_path)
    b = TensorRTBackend(tmp_path)
    for name, c in contracts(b.spec).items():
        inp = {k: v.cuda() for k, v in c.sample_inputs(2, b.spec).items()}
        got = b.run(name, inp)
        with torch.no_grad():
            ref = tiny.networks()[name].cuda()(*[inp[t.name] for t in c.inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        for t, r in zip(c.outputs, ref):
            assert (got[t.name] - r).abs().max() <= FP16_TOL * r.abs().max()

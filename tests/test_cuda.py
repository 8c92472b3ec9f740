"""GPU checks, for a machine with CUDA: fp16 parity of the torch backend and the CUDA onnxruntime path.
Marked `cuda`; they skip with the reason where torch sees no GPU (this project's CPU machines)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from unclip.core.contract import contracts
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate
from unclip.models import build_preset

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_fp16_networks_match_fp32():
    ref = TorchBackend(build_preset("tiny"), "cuda", "fp32")
    half = TorchBackend(build_preset("tiny"), "cuda", "fp16")
    for name, c in contracts(ref.spec).items():
        inp = {k: v.cuda() for k, v in c.sample_inputs(2, ref.spec).items()}
        a = ref.run(name, inp)
        b = half.run(name, {k: v.half() if v.is_floating_point() else v for k, v in inp.items()})
        for k in a:
            err = (a[k].float() - b[k].float()).abs().max().item()
            assert err <= 2e-2 * a[k].abs().max().item(), (name, k, err)


def test_cuda_image_matches_cpu():
    cpu = TorchBackend(build_preset("tiny"))
    gpu = TorchBackend(build_preset("tiny"), "cuda", "fp32")
    a = generate(cpu, cpu.spec, "a cat", Settings(size=64)).images.float() / 255
    b = generate(gpu, gpu.spec, "a cat", Settings(size=64)).images.float() / 255
    d = (a - b).abs()
    assert d.mean() <= 2e-3 and (d > 0.05).float().mean() <= 1e-3


@pytest.mark.skipif(not importlib.util.find_spec("onnxruntime") or
                    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu with CUDA libraries")
def test_onnxruntime_cuda_io_binding(tmp_path):
    from unclip.engine.backend_ort import OnnxRuntimeBackend
    from unclip.export.onnx_export import export_model
    m = build_preset("tiny")
    export_model(m, tmp_path, source="tiny")
    ort_b = OnnxRuntimeBackend(tmp_path, "cuda")
    ref = TorchBackend(m, "cuda")
    for name, c in contracts(ref.spec).items():
        inp = {k: v.cuda() for k, v in c.sample_inputs(3, ref.spec).items()}
        a, b = ort_b.run(name, inp), ref.run(name, inp)
        for k in b:
            assert a[k].is_cuda and (a[k] - b[k]).abs().max() <= 1e-3 * b[k].abs().max()


@pytest.mark.parametrize("mode", ["static", "cuda-graphs"])
def test_static_buffers_and_cuda_graphs_equal_eager_on_cuda(mode):
    """Each network call captured once per batch and replayed gives the eager path's images (fp32)."""
    eager = TorchBackend(build_preset("tiny"), "cuda", "fp32")
    fast = TorchBackend(build_preset("tiny"), "cuda", "fp32", mode=mode)
    s = Settings(size=256, num_images=2, prior_steps=5, decoder_steps=5, sr256_steps=3, sr1024_steps=3)
    a = generate(eager, eager.spec, "a cat", s).images.float() / 255
    b = generate(fast, fast.spec, "a cat", s).images.float() / 255
    b2 = generate(fast, fast.spec, "a cat", s).images.float() / 255  # replayed graphs: the same again
    d = (a - b).abs()
    assert d.mean() <= 1e-4 and (d > 0.05).float().mean() <= 1e-4, (d.mean(), (d > 0.05).float().mean())
    assert torch.equal(b, b2)
    if mode == "cuda-graphs":
        assert all(s.graph is not None for s in fast.statics.values())

"""The `openvino` backend on the tiny preset's export: it gives torch's images and network outputs, and runs the
export's two-stage GroupNorms as OpenVINO's single MVN kernels (fuse_group_norms) without losing accuracy."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from unclip.core.contract import contracts
from unclip.engine.backend_ov import fuse_group_norms
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate
from unclip.models import build_preset

ov = pytest.importorskip("openvino")
from unclip.engine.backend_ov import OpenVINOBackend


@pytest.fixture(scope="module")
def engines(tiny_export):
    return tiny_export  # conftest: exported once per session, read only here


@pytest.fixture(scope="module")
def torch_backend():
    return TorchBackend(build_preset("tiny"))


def test_openvino_and_torch_give_the_same_image(engines, torch_backend):
    b = OpenVINOBackend(engines)
    s = Settings(size=256, seed=3)
    a = generate(b, b.spec, "a photo of a cat", s).images.float() / 255
    ref = generate(torch_backend, torch_backend.spec, "a photo of a cat", s).images.float() / 255
    d = (a - ref).abs()
    assert d.mean() <= 2e-3 and (d > 0.05).float().mean() <= 1e-3, (d.mean(), (d > 0.05).float().mean())


def test_each_network_matches_torch(engines, torch_backend):
    b = OpenVINOBackend(engines)
    for net, c in contracts(b.spec).items():
        inp = c.sample_inputs(3, b.spec, seed=9)
        out, ref = b.run(net, inp), torch_backend.run(net, inp)
        for k in ref:
            assert (out[k] - ref[k]).abs().max() <= 1e-4 * max(ref[k].abs().max(), 1e-6), (net, k)


def test_bf16_keeps_the_embedding_networks_fp32(engines):
    """In bf16 the text encoder, image encoder and prior compile with an f32 inference precision
    (core.stages.FP32_IN_BF16): their outputs equal the fp32 backend's exactly; the U-Nets compute in bf16."""
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native bf16")
    fp32, bf16 = OpenVINOBackend(engines), OpenVINOBackend(engines, precision="bf16")
    cs = contracts(fp32.spec)
    for net in ("text_encoder", "image_encoder", "prior"):
        assert bf16.compile_config(net)["INFERENCE_PRECISION_HINT"] == "f32", net
        inp = cs[net].sample_inputs(2, fp32.spec, seed=4)
        a, b = fp32.run(net, inp), bf16.run(net, inp)
        for k in a:
            assert torch.equal(a[k], b[k]), (net, k)
    inp = cs["decoder"].sample_inputs(2, fp32.spec, seed=4)
    assert bf16.compile_config("decoder")["INFERENCE_PRECISION_HINT"] == "bf16"
    a, b = fp32.run("decoder", inp)["out"].clone(), bf16.run("decoder", inp)["out"]
    assert 0 < (a - b).abs().max() <= 0.1 * a.abs().max()  # bf16's rounding: close, not equal


def test_each_input_shape_compiles_static_and_the_oldest_shapes_are_dropped(engines, torch_backend, monkeypatch):
    """Each batch size gets its own compilation with every dimension fixed; past SHAPES_KEPT shapes of a network the
    least recently used is dropped, and a dropped shape compiles again when it comes back, giving the same result."""
    from unclip.engine import backend_ov
    monkeypatch.setattr(backend_ov, "SHAPES_KEPT", 2)
    b = OpenVINOBackend(engines)
    c = contracts(b.spec)["decoder"]
    feeds = {n: c.sample_inputs(n, b.spec, seed=n) for n in (1, 2, 3)}
    first = b.run("decoder", feeds[1])["out"].clone()
    b.run("decoder", feeds[2])
    b.run("decoder", feeds[1])  # used again: now the most recent
    b.run("decoder", feeds[3])  # drops batch 2, the least recently used
    kept = [dict(k[1])["x_t"][0] for k in b.requests]
    assert kept == [1, 3]
    for request in b.requests.values():
        assert all(p.get_partial_shape().is_static for p in request.get_compiled_model().inputs)
    again = b.run("decoder", feeds[2])["out"]  # compiled afresh
    ref = torch_backend.run("decoder", feeds[2])["out"]
    assert (again - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert [dict(k[1])["x_t"][0] for k in b.requests] == [3, 2]
    assert torch.equal(b.run("decoder", feeds[1])["out"], first)  # same shape compiled twice: the same numbers


def test_a_graph_over_the_static_limit_is_compiled_once_with_its_batch_dynamic(engines, torch_backend, monkeypatch):
    from unclip.engine import backend_ov
    monkeypatch.setattr(backend_ov, "STATIC_MAX_BYTES", 0)  # every graph counts as large
    b = OpenVINOBackend(engines)
    c = contracts(b.spec)["decoder"]
    for n in (1, 3):
        inp = c.sample_inputs(n, b.spec, seed=n)
        out, ref = b.run("decoder", inp)["out"], torch_backend.run("decoder", inp)["out"]
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    (request,) = b.requests.values()  # one compilation served both batch sizes
    assert b.requests.keys() == {("decoder", None)}
    assert request.get_compiled_model().inputs[0].get_partial_shape()[0].is_dynamic


def _mvn_layers(compiled) -> int:
    return sum(op.get_rt_info()["layerType"].astype(str) == "MVN" for op in compiled.get_runtime_model().get_ops())


def test_split_group_norms_run_as_mvn_kernels(engines):
    """The tiny sr1024's large GroupNorms were exported in two stages; merged, OpenVINO compiles one MVN per
    GroupNorm (as it does for torch's own export of the small ones), and the file on disk is unchanged."""
    path = engines / "sr1024.onnx"
    before = path.read_bytes()
    model = onnx.load(str(path))
    pairs = sum(n.op_type == "ReduceMean" for n in model.graph.node) // 2
    assert pairs > 0  # the preset has GroupNorms over more than LONG_REDUCTION elements per group
    assert fuse_group_norms(model) == pairs  # mean and variance of each: 2 pairs per GroupNorm
    assert all(n.op_type != "ReduceMean" or list(n.attribute[0].ints) == [2, 3] for n in model.graph.node)
    core = ov.Core()
    plain = _mvn_layers(core.compile_model(core.read_model(str(path)), "CPU"))
    fused = _mvn_layers(core.compile_model(core.read_model(model.SerializeToString()), "CPU"))
    assert fused == plain + pairs // 2
    b = OpenVINOBackend(engines)
    b.run("sr1024", contracts(b.spec)["sr1024"].sample_inputs(1, b.spec))
    (request,) = b.requests.values()
    assert _mvn_layers(request.get_compiled_model()) == fused  # the backend compiles the merged graph
    assert path.read_bytes() == before


def _graph(second_axes=(2,), extra_reader=False):
    """x (1, 2, 6, 5) float64 -> ReduceMean over axis 3 -> ReduceMean over `second_axes` (-> Sub from x)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m1"], axes=[3], keepdims=1),
             helper.make_node("ReduceMean", ["m1"], ["m2"], axes=list(second_axes), keepdims=1),
             helper.make_node("Sub", ["x", "m2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 2, 6, 5])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["m1"], ["m1_copy"]))
        outputs.append(helper.make_tensor_value_info("m1_copy", TensorProto.DOUBLE, [1, 2, 6, 1]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 2, 6, 5])], outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fuse_group_norms_keeps_the_function_and_leaves_other_patterns():
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 5)) + 4.0
    model = _graph()
    ref = x - x.mean(axis=(2, 3), keepdims=True)  # float64, by hand
    assert fuse_group_norms(model) == 1 and len(model.graph.node) == 2
    onnx.checker.check_model(model)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(y, ref, rtol=0, atol=1e-12)
    for untouched in (_graph(second_axes=(1,)), _graph(extra_reader=True)):  # other axes; a mean read elsewhere
        n = len(untouched.graph.node)
        assert fuse_group_norms(untouched) == 0 and len(untouched.graph.node) == n

"""Runtime behaviour on the tiny preset: backends agree, guidance fusion, determinism, chunking, export checks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from refs import ReusingBackend
from unclip.core.artifacts import ExportError
from unclip.core.contract import contracts
from unclip.engine.backend_ort import OnnxRuntimeBackend
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate, guide
from unclip.export.onnx_export import export_model
from unclip.models import build_preset

FAST = Settings(prior_steps=5, decoder_steps=5, sr256_steps=3, sr1024_steps=3, size=64)  # tiny: 16/64/256 px


@pytest.fixture(scope="module")
def engines(tiny_export):
    return tiny_export  # conftest: exported once per session, read only here


@pytest.fixture(scope="module", params=["torch", "reusing"])
def torch_backend(request):
    """The torch backend, and the same behind TensorRT's output contract (buffers overwritten on every call)."""
    b = TorchBackend(build_preset("tiny"))
    return ReusingBackend(b) if request.param == "reusing" else b


@pytest.mark.parametrize("settings", [Settings(size=64), Settings(size=256, seed=3, sampler="unclip")])
def test_onnxruntime_and_torch_give_the_same_image(engines, torch_backend, settings):
    ort_b = OnnxRuntimeBackend(engines)
    a = generate(ort_b, ort_b.spec, "a photo of a cat", settings).images.float() / 255
    b = generate(torch_backend, torch_backend.spec, "a photo of a cat", settings).images.float() / 255
    d = (a - b).abs()
    assert d.mean() <= 2e-3 and (d > 0.05).float().mean() <= 1e-3, (d.mean(), (d > 0.05).float().mean())


def test_one_step_at_a_time_onnxruntime(engines, torch_backend):
    ort_b = OnnxRuntimeBackend(engines)
    for net, c in contracts(ort_b.spec).items():
        inp = c.sample_inputs(3, ort_b.spec, seed=9)
        a, b = ort_b.run(net, inp), torch_backend.run(net, inp)
        for k in b:
            assert (a[k] - b[k]).abs().max() <= 1e-4 * max(b[k].abs().max(), 1e-6), (net, k)


def test_fused_guidance_equals_separate_calls(torch_backend):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 4, 4, generator=g), torch.full((2,), 500.0)
    cond_u, cond_c = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    calls = []

    def run(x, t, i):  # a toy model whose output depends on which half it sees
        calls.append(x.shape[0])
        return torch.cat([x, x], 1) * torch.cat([cond_u, cond_c])[: x.shape[0]] + t[:, None, None, None] / 1000

    out = guide(run, 8.0, channels=3)(x, t, 0)
    u = torch.cat([x, x], 1) * cond_u + 0.5
    c = torch.cat([x, x], 1) * cond_c + 0.5
    assert calls == [4]
    assert torch.allclose(out[:, :3], u[:, :3] + 8 * (c[:, :3] - u[:, :3]))
    assert torch.equal(out[:, 3:], c[:, 3:])  # learned variance from the conditional half


def test_guidance_one_runs_the_conditional_half_only(torch_backend):
    seen = []
    orig = torch_backend.run

    def spy(net, inp):
        seen.append((net, next(iter(inp.values())).shape[0]))
        return orig(net, inp)

    torch_backend.run = spy
    try:
        generate(torch_backend, torch_backend.spec, "cat", Settings(prior_guidance=1.0, decoder_guidance=1.0,
                                                                     prior_steps=2, decoder_steps=2, sr256_steps=2))
    finally:
        torch_backend.run = orig
    assert all(b == 1 for _, b in seen), seen


def test_same_seed_same_pixels(torch_backend):
    a = generate(torch_backend, torch_backend.spec, "cat", FAST).images
    b = generate(torch_backend, torch_backend.spec, "cat", FAST).images
    c = generate(torch_backend, torch_backend.spec, "cat", Settings(**{**FAST.__dict__, "seed": 1})).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_chunked_batches_equal_one_batch(torch_backend):
    s = Settings(**{**FAST.__dict__, "num_images": 3})
    whole = generate(torch_backend, torch_backend.spec, "cat", s).images
    parts = [generate(torch_backend, torch_backend.spec, "cat", Settings(**{**FAST.__dict__, "num_images": n}),
                      first_image=f).images for f, n in ((0, 2), (2, 1))]
    d = (whole.float() - torch.cat(parts).float()).abs() / 255
    assert d.mean() <= 1e-4 and (d > 0.05).float().mean() <= 1e-3


def _copy(engines, tmp_path):
    dst = tmp_path / "e"
    shutil.copytree(engines, dst)
    return dst


def test_runtime_rejects_truncated_file(engines, tmp_path):
    d = _copy(engines, tmp_path)
    p = d / "decoder.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"truncated or replaced\); run: unclip-export --model tiny"):
        OnnxRuntimeBackend(d).session("decoder")


def test_runtime_rejects_modified_file(engines, tmp_path):
    d = _copy(engines, tmp_path)
    p = d / "prior.onnx"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"modified after export\); run: unclip-export --model tiny"):
        OnnxRuntimeBackend(d).session("prior")


def test_runtime_rejects_missing_manifest(engines, tmp_path):
    d = _copy(engines, tmp_path)
    (d / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest.json .* run: unclip-export"):
        OnnxRuntimeBackend(d)


def test_export_is_skipped_when_unchanged_and_manifest_complete(engines):
    reports = export_model(build_preset("tiny"), engines, source="tiny")
    assert all(r.skipped for r in reports)
    m = json.loads((engines / "manifest.json").read_text())
    for key in ("versions", "options", "spec", "networks"):
        assert key in m
    for entry in m["networks"].values():
        assert entry["max_abs"] <= 1e-4 and all(len(r["sha256"]) == 64 for r in entry["files"].values())


def test_graphs_of_an_older_form_are_exported_again(engines, tmp_path, monkeypatch):
    """Engines written by an exporter whose graph form has since changed are replaced by `unclip-export` without
    --force (same weights, same versions), and the new graphs load."""
    d = _copy(engines, tmp_path)
    import unclip.export.onnx_export as ox
    monkeypatch.setattr(ox, "GRAPH_FORM", ox.GRAPH_FORM + 1)
    reports = export_model(build_preset("tiny"), d, stages=["prior"], source="tiny")
    assert [(r.network, r.skipped) for r in reports] == [("prior", False)]
    assert export_model(build_preset("tiny"), d, stages=["prior"], source="tiny")[0].skipped  # now current
    OnnxRuntimeBackend(d).session("prior")


def test_interrupted_export_is_loadable_or_refused(engines, tmp_path, monkeypatch):
    """Kill the export after it has replaced one file: the old manifest no longer matches, so it's refused."""
    d = _copy(engines, tmp_path)
    import unclip.export.onnx_export as ox
    real = ox.file_record

    def die(path):
        raise KeyboardInterrupt  # the process dies right after renaming the new graph into place

    monkeypatch.setattr(ox, "file_record", die)
    other = build_preset("tiny")
    with torch.no_grad():
        other.decoder.conv_out.bias += 1  # different weights: the decoder must be re-exported
    with pytest.raises(KeyboardInterrupt):
        export_model(other, d, stages=["decoder"], source="tiny")
    monkeypatch.setattr(ox, "file_record", real)
    b = OnnxRuntimeBackend(d)
    with pytest.raises(ExportError, match="no decoder graph in this export; run: unclip-export"):
        b.session("decoder")
    b.session("prior")  # untouched networks still load
    assert not (d / ".export.lock").exists()


def test_concurrent_export_refused(engines, tmp_path):
    d = _copy(engines, tmp_path)
    import os
    (d / ".export.lock").write_text(str(os.getppid()))  # a live process holds the lock
    with pytest.raises(ExportError, match="another export"):
        export_model(build_preset("tiny"), d, source="tiny")


def test_torch_backend_converts_copies_and_keeps_statistics_fp32():
    model = build_preset("tiny")
    b = TorchBackend(model, precision="fp16")  # (bf16 keeps the prior fp32: fp16 converts every network)
    assert next(b.nets["prior"].parameters()).dtype == torch.float16
    assert next(model.decoder.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert model.decoder.conv_in.weight.is_contiguous()  # (channels-last is the backend's copy's business)
    assert b.spec.clip_mean == [float(v) for v in model.prior.clip_mean.flatten()]  # not rounded to fp16
    out = b.run("prior", contracts(b.spec)["prior"].sample_inputs(2, b.spec))
    assert out["x0"].dtype == torch.float32  # callers get fp32 whatever the compute precision


def test_torch_bf16_keeps_the_embedding_networks_fp32():
    """bf16 runs the text encoder, image encoder and prior in fp32 (core.stages.FP32_IN_BF16): their outputs equal
    the fp32 backend's bit for bit, while the U-Nets compute in bf16 (their outputs differ from fp32's)."""
    model = build_preset("tiny")
    fp32, bf16 = TorchBackend(model), TorchBackend(model, precision="bf16")
    cs = contracts(fp32.spec)
    for net in ("text_encoder", "image_encoder", "prior"):
        assert next(bf16.nets[net].parameters()).dtype == torch.float32, net
        inp = cs[net].sample_inputs(2, fp32.spec, seed=4)
        a, b = fp32.run(net, inp), bf16.run(net, inp)
        for k in a:
            assert torch.equal(a[k], b[k]), (net, k)
    for net in ("text_proj", "decoder", "sr256_first", "sr1024"):
        assert next(bf16.nets[net].parameters()).dtype == torch.bfloat16, net
    inp = cs["decoder"].sample_inputs(2, fp32.spec, seed=4)
    assert not torch.equal(fp32.run("decoder", inp)["out"], bf16.run("decoder", inp)["out"])


@pytest.mark.parametrize("native", [True, False])
def test_torch_bf16_on_a_cpu_without_native_bf16_warns(native, monkeypatch, caplog):
    from types import SimpleNamespace

    from unclip.engine import backend_torch
    from unclip.engine.backend import open_backend
    monkeypatch.setattr(backend_torch, "native_bf16", lambda: native)
    req = SimpleNamespace(backend="torch", model="tiny", engines=None, device="cpu", precision="bf16", max_batch=2)
    with caplog.at_level("WARNING", logger="unclip"):
        b = open_backend(req)
    assert b.dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1), warned
    assert native or "use --precision fp32" in warned[0]


def test_static_buffers_equal_eager_bit_for_bit_and_bind_constants_once():
    """The GPU fast path's buffer logic, on the CPU: the same images bit for bit (fp32), every network call on the
    same static tensors, and a stage's constant inputs copied in once, not every step."""
    model = build_preset("tiny")
    eager, static = TorchBackend(model), TorchBackend(model, mode="static")
    s = Settings(**{**FAST.__dict__, "num_images": 2, "size": 256, "sampler": "ddpm"})
    a = generate(eager, eager.spec, "a cat", s, keep=True)
    b = generate(static, static.spec, "a cat", s, keep=True)
    assert torch.equal(a.images, b.images)
    for k in a.intermediates:
        assert torch.equal(a.intermediates[k], b.intermediates[k]), k
    dec = static.statics[("decoder", 4)]  # guided: [uncond; cond] rows of 2 images
    steps = FAST.decoder_steps
    # per step x_t and t are new tensors; class_emb, context and context_mask come from one text_proj call
    assert dec.binder.copies == 2 * steps + 3, dec.binder.copies
    sr = static.statics[("sr256_first", 2)]
    assert sr.binder.copies == 2 * (FAST.sr256_steps - 1) + 1  # low_res once
    out_before = dec.outputs["out"]
    generate(static, static.spec, "a dog", s)
    assert static.statics[("decoder", 4)].outputs["out"] is out_before  # static: the same tensor every call


def test_binder_never_trusts_a_reused_address():
    from unclip.engine.static import Binder
    b, dst = Binder(), torch.zeros(3)
    x = torch.ones(3)
    b.bind("x", x, dst)
    x.add_(1)  # changed in place: copied again
    b.bind("x", x, dst)
    assert torch.equal(dst, torch.full((3,), 2.0)) and b.copies == 2
    b.bind("x", x, dst)
    assert b.copies == 2  # unchanged: skipped
    b.bind("x", x.clone(), dst)  # another tensor, equal values: copied (identity, not equality, decides)
    assert b.copies == 3


# --- the model's own guidance scales (generation_config.json) ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from unclip.models.io import save_model
    return save_model(build_preset("tiny"), tmp_path_factory.mktemp("m") / "tiny")


def test_guidance_left_unset_is_the_models_own_else_karlos(tiny_folder, tmp_path):
    from unclip.models import load_model
    from unclip.models.io import GENERATION_CONFIG
    plain = TorchBackend(load_model(tiny_folder))
    assert plain.spec.defaults == {}
    karlo = generate(plain, plain.spec, "a cat", FAST).images
    assert torch.equal(karlo, generate(plain, plain.spec, "a cat", Settings(**{**FAST.__dict__, "prior_guidance": 4.0,
                                                                              "decoder_guidance": 8.0})).images)
    own = tmp_path / "own"
    shutil.copytree(tiny_folder, own)
    (own / GENERATION_CONFIG).write_text(json.dumps({"decoder_guidance": 2.5, "_comment": "measured"}))
    b = TorchBackend(load_model(own))
    assert b.spec.defaults == {"decoder_guidance": 2.5}
    mine = generate(b, b.spec, "a cat", FAST).images
    assert torch.equal(mine, generate(plain, plain.spec, "a cat", Settings(**{**FAST.__dict__,
                                                                              "decoder_guidance": 2.5})).images)
    assert not torch.equal(mine, karlo)
    # given explicitly, a scale wins over the folder's
    eight = Settings(**{**FAST.__dict__, "decoder_guidance": 8.0})
    assert torch.equal(karlo, generate(b, b.spec, "a cat", eight).images)
    # the scales travel with an export (its spec.json), so onnxruntime runs them too
    out = tmp_path / "eng"
    export_model(load_model(own), out, source=str(own))
    assert OnnxRuntimeBackend(out).spec.defaults == {"decoder_guidance": 2.5}


def test_step_counts_left_unset_are_the_models_own_else_karlos(tiny_folder, tmp_path):
    from unclip.engine.pipeline import timesteps
    from unclip.models import load_model
    from unclip.models.io import GENERATION_CONFIG
    plain = TorchBackend(load_model(tiny_folder))
    counts = {k: len(v) for k, v in timesteps(plain.spec, Settings()).items()}
    assert counts == {"prior": 25, "decoder": 25, "sr256": 7, "sr1024": 15}  # diffusers' defaults; sr1024 Karlo's
    own = tmp_path / "own"
    shutil.copytree(tiny_folder, own)
    (own / GENERATION_CONFIG).write_text(json.dumps({"sr256_steps": 2, "decoder_steps": 4}))
    b = TorchBackend(load_model(own))
    assert b.spec.defaults == {"sr256_steps": 2, "decoder_steps": 4}
    counts = {k: len(v) for k, v in timesteps(b.spec, Settings()).items()}
    assert counts == {"prior": 25, "decoder": 4, "sr256": 2, "sr1024": 15}
    unset = Settings(prior_steps=5, size=64)
    mine = generate(b, b.spec, "a cat", unset).images
    explicit = Settings(prior_steps=5, decoder_steps=4, sr256_steps=2, size=64)
    assert torch.equal(mine, generate(plain, plain.spec, "a cat", explicit).images)
    assert not torch.equal(mine, generate(plain, plain.spec, "a cat", unset).images)  # 25 and 7 steps there
    assert torch.equal(generate(b, b.spec, "a cat", FAST).images, generate(plain, plain.spec, "a cat", FAST).images)


@pytest.mark.parametrize("content, words", [({"decoder_scale": 3}, "unknown key 'decoder_scale'"),
                                            ({"decoder_guidance": "3"}, "decoder_guidance must be a finite number"),
                                            ({"prior_guidance": -1}, "prior_guidance must be a finite number"),
                                            ({"sr1024_steps": 0}, "sr1024_steps must be a whole number >= 1"),
                                            ({"decoder_steps": 2.5}, "decoder_steps must be a whole number >= 1"),
                                            ([3.0], "expected a JSON object")])
def test_bad_generation_config_is_one_clear_error(tiny_folder, tmp_path, content, words):
    from unclip.models import ModelLoadError, load_model
    from unclip.models.io import GENERATION_CONFIG
    own = tmp_path / "own"
    shutil.copytree(tiny_folder, own)
    (own / GENERATION_CONFIG).write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=words) as e:
        load_model(own)
    assert "\n" not in str(e.value) and GENERATION_CONFIG in str(e.value)


@pytest.mark.parametrize("defaults, words", [({"decoder_scale": 3}, "unknown key 'decoder_scale'"),
                                             ({"sr256_steps": 0}, "sr256_steps must be a whole number >= 1"),
                                             ({"prior_guidance": float("nan")}, "prior_guidance must be a finite")])
def test_save_model_refuses_defaults_it_could_not_read_back(tmp_path, defaults, words):
    """A model whose defaults load_model would refuse is not saved: ValueError, and no folder (nor temporary one)."""
    from unclip.models import save_model
    model = build_preset("tiny")
    model.defaults = defaults
    with pytest.raises(ValueError, match=words):
        save_model(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    model.defaults = {"decoder_guidance": 2.5, "sr256_steps": 3, "_comment": "kept"}
    from unclip.models import load_model
    from unclip.models.io import GENERATION_CONFIG
    folder = save_model(model, tmp_path / "m")
    assert load_model(folder).defaults == {"decoder_guidance": 2.5, "sr256_steps": 3}
    assert json.loads((folder / GENERATION_CONFIG).read_text())["_comment"] == "kept"


def test_guide_refuses_an_unresolved_scale():
    with pytest.raises(ValueError, match="for_model"):
        guide(lambda x, t, i: x, None)(torch.zeros(1, 3), torch.zeros(1), 0)
    from unclip.core.stages import guided
    for stage in ("text_encoder", "text_proj", "decoder"):  # the decoder's scale is unset (None)
        with pytest.raises(ValueError, match="decoder_guidance unresolved.*for_model"):
            guided(stage, Settings(prior_guidance=1.0))
    assert not guided("decoder", Settings(prior_guidance=4.0, decoder_guidance=1.0))
    assert guided("text_encoder", Settings(prior_guidance=4.0, decoder_guidance=1.0))  # it feeds the guided prior


def test_unreadable_generation_config_says_fix_or_delete(tiny_folder, tmp_path):
    from unclip.models import ModelLoadError, load_model
    from unclip.models.io import GENERATION_CONFIG
    own = tmp_path / "own"
    shutil.copytree(tiny_folder, own)
    (own / GENERATION_CONFIG).write_text("{decoder_guidance: 3")
    with pytest.raises(ModelLoadError, match="not valid JSON .*fix or delete the file"):
        load_model(own)


def test_the_fingerprint_reads_a_small_folders_contents_and_a_large_ones_times(tiny_folder, tmp_path, monkeypatch):
    """A small folder's fingerprint is its files' contents: a copy with other file times (a fresh clone, a package
    reinstall) matches, an edit past the first 64 KiB that keeps the size doesn't. A folder over FULL_HASH_BYTES
    (Karlo's) is read in part, by size, mtime and first 64 KiB: there a touch changes it. Fingerprints recorded in
    that partial form before (every folder's, until 2026-11-27) are still the model's (same_model)."""
    import hashlib
    import os

    from unclip.core import identity
    own = tmp_path / "own"
    shutil.copytree(tiny_folder, own)
    for p in own.rglob("*"):
        os.utime(p, ns=(10**18, 10**18))
    assert identity.fingerprint(str(own)) == identity.fingerprint(str(tiny_folder))
    old_form = identity._folder_fingerprint(own, hashlib.sha256(), whole=False)
    assert old_form != identity.fingerprint(str(own)) and identity.same_model(old_form, str(own))
    w = own / "decoder" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    assert len(data) > 1 << 16
    data[-4:] = bytes(4) if data[-4:] != bytes(4) else b"\x00\x00\x80\x3f"  # the last weight, same size
    w.write_bytes(bytes(data))
    os.utime(w, ns=(10**18, 10**18))
    assert identity.fingerprint(str(own)) != identity.fingerprint(str(tiny_folder))
    assert not identity.same_model(identity.fingerprint(str(tiny_folder)), str(own))
    size = sum(p.stat().st_size for p in own.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json",
                                                                                         ".txt")
               and p.name != identity.GENERATION_CONFIG)
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", size)  # at the threshold: still hashed whole
    whole = identity.fingerprint(str(own))
    os.utime(w, ns=(2 * 10**18, 2 * 10**18))
    assert identity.fingerprint(str(own)) == whole
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", size - 1)  # one byte over: size, mtime, first 64 KiB
    large = identity.fingerprint(str(own))
    os.utime(w, ns=(3 * 10**18, 3 * 10**18))
    touched = identity.fingerprint(str(own))
    assert touched != large and identity.same_model(touched, str(own)) and not identity.same_model(large, str(own))


def test_editing_generation_config_needs_no_reexport(tiny_folder, tmp_path):
    """Engines don't depend on the default scales: a changed file is read when a backend opens, the export stays."""
    from types import SimpleNamespace

    from unclip.core.identity import fingerprint
    from unclip.engine.backend import open_backend
    from unclip.models import load_model
    from unclip.models.io import GENERATION_CONFIG
    own = tmp_path / "own"
    shutil.copytree(tiny_folder, own)
    out = tmp_path / "eng"
    export_model(load_model(own), out, source=str(own))
    before = fingerprint(str(own))
    (own / GENERATION_CONFIG).write_text(json.dumps({"prior_guidance": 2.0}))
    assert fingerprint(str(own)) == before
    req = SimpleNamespace(backend="onnxruntime", model=str(own), engines=str(out), device="cpu", precision="fp32",
                          max_batch=1)
    b = open_backend(req, notify=lambda m: pytest.fail(f"exported again: {m}"))
    assert b.spec.defaults == {"prior_guidance": 2.0}
    plain = TorchBackend(load_model(tiny_folder))
    two = Settings(**{**FAST.__dict__, "prior_guidance": 2.0})
    a = generate(b, b.spec, "a cat", FAST).images.float()
    ref = generate(plain, plain.spec, "a cat", two).images.float()
    assert (a - ref).abs().mean() <= 2e-3 * 255  # onnxruntime vs torch, at the file's scale
    export_model(load_model(own), out, source=str(own))  # same folder, only the scales changed: no --force needed

"""Every bad model folder gives one ModelLoadError line naming the path and the fix."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from unclip.models import ModelLoadError, build_preset, load_model, save_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_model(build_preset("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def folder(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def load_error(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def edit_config(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_roundtrip_is_exact(good):
    a, b = build_preset("tiny"), load_model(good)
    for stage, net in a.networks().items():
        sb = getattr(b, stage).state_dict()
        for k, v in net.state_dict().items():
            assert torch.equal(v, sb[k]), (stage, k)


def test_missing_folder(tmp_path):
    msg = load_error(tmp_path / "nope")
    assert "no such model folder" in msg and "nope" in msg


def test_not_unclip_no_index(tmp_path):
    msg = load_error(tmp_path)
    assert "not an unCLIP model folder" in msg and "model_index.json" in msg


def test_not_unclip_other_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    msg = load_error(tmp_path)
    assert "StableDiffusionPipeline" in msg and "not an unCLIP model" in msg


def test_karlo_text_proj_entry_accepted(folder):
    edit_config(folder / "model_index.json", text_proj=["unclip", "UnCLIPTextProjModel"])
    assert load_model(folder).text_proj is not None


def test_missing_component_folder(folder):
    shutil.rmtree(folder / "decoder")
    msg = load_error(folder)
    assert str(folder / "decoder") in msg and "component folder is missing" in msg


def test_missing_weight_file(folder):
    (folder / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    msg = load_error(folder)
    assert str(folder / "prior") in msg and "no weight file" in msg and "download" in msg


def test_unsupported_config_key(folder):
    edit_config(folder / "prior" / "config.json", shiny_new_option=3)
    msg = load_error(folder)
    assert "'shiny_new_option'" in msg and "prior" in msg


def test_unsupported_config_value(folder):
    edit_config(folder / "decoder" / "config.json", use_linear_projection=True)
    msg = load_error(folder)
    assert "use_linear_projection=True" in msg and "supported: False" in msg


def test_unsupported_block_type(folder):
    cfg = json.loads((folder / "decoder" / "config.json").read_text())
    cfg["down_block_types"][1] = "CrossAttnDownBlock2D"
    (folder / "decoder" / "config.json").write_text(json.dumps(cfg))
    msg = load_error(folder)
    assert "CrossAttnDownBlock2D" in msg and "SimpleCrossAttnDownBlock2D" in msg


def _rewrite_weights(path, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_wrong_shape(folder):
    path = folder / "text_proj" / "diffusion_pytorch_model.safetensors"
    _rewrite_weights(path, lambda sd: sd.__setitem__("embedding_proj.weight", torch.zeros(7, 5)))
    msg = load_error(folder)
    assert "embedding_proj.weight" in msg and "(7, 5)" in msg and "(128, 32)" in msg


def test_missing_keys(folder):
    path = folder / "text_proj" / "diffusion_pytorch_model.safetensors"
    _rewrite_weights(path, lambda sd: sd.pop("embedding_proj.bias"))
    msg = load_error(folder)
    assert "1 missing keys (embedding_proj.bias)" in msg


def test_unexpected_keys(folder):
    path = folder / "text_proj" / "diffusion_pytorch_model.safetensors"
    _rewrite_weights(path, lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)))
    msg = load_error(folder)
    assert "1 unexpected keys (extra.weight)" in msg


def test_truncated_safetensors(folder):
    path = folder / "decoder" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(folder)
    assert str(path) in msg and "truncated or corrupt" in msg


def test_corrupt_safetensors(folder):
    path = folder / "prior" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\xff" * 64)
    msg = load_error(folder)
    assert str(path) in msg and "truncated or corrupt" in msg


def test_corrupt_config_json(folder):
    (folder / "text_proj" / "config.json").write_text("{not json")
    msg = load_error(folder)
    assert "text_proj" in msg and "not valid JSON" in msg


def test_wrong_component_class(folder):
    edit_config(folder / "decoder" / "config.json", _class_name="AutoencoderKL")
    msg = load_error(folder)
    assert "AutoencoderKL" in msg and "UNet2DConditionModel" in msg


def test_bin_weights_load(folder):
    from safetensors.torch import load_file
    path = folder / "text_proj" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    torch.save(sd, folder / "text_proj" / "diffusion_pytorch_model.bin")
    path.unlink()
    m = load_model(folder)
    assert torch.equal(m.text_proj.embedding_proj.weight, sd["embedding_proj.weight"])


def test_missing_tokenizer(folder):
    shutil.rmtree(folder / "tokenizer")
    msg = load_error(folder)
    assert "tokenizer" in msg and "copy the tokenizer/ folder" in msg

"""Variations, inversion, interpolation, text diffs, negative prompts and best-of-N on the tiny preset."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from refs import ReusingBackend
from unclip.engine import manipulate as mp
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.cli import main
from unclip.engine.pipeline import Noise, Settings, finish, for_model, generate
from unclip.models import build_preset, save_model

FAST = Settings(prior_steps=4, decoder_steps=4, sr256_steps=2, size=64)  # tiny: 16 / 64 / 256 px


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model(build_preset("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module", params=["torch", "reusing"])
def backend(folder, request):
    """The torch backend, and the same behind TensorRT's output contract (buffers overwritten on each call)."""
    from unclip.models import load_model
    b = TorchBackend(load_model(folder))
    return ReusingBackend(b) if request.param == "reusing" else b


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:45, 0:60]
    arr = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1) + rng.integers(0, 20, (45, 60, 3))
    path = tmp_path_factory.mktemp("img") / "pic.png"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_clip_preprocessing_equals_transformers(picture):
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=Image.open(picture).convert("RGB"), return_tensors="pt").pixel_values
    ours = mp.clip_pixels(mp.load_image(picture), 32)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.02  # resampler implementations differ by a few levels on some pixels


def test_variation_equals_decoder_on_transformers_embedding(folder, backend, picture):
    from transformers import CLIPVisionModelWithProjection
    ref_enc = CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder")).eval()
    img = mp.load_image(picture)
    with torch.no_grad():
        z_ref = ref_enc(pixel_values=mp.clip_pixels(img, backend.spec.image_size)).image_embeds
    s = for_model(FAST, backend.spec)  # the scales the variation itself resolves
    ours = mp.variation(backend, backend.spec, s, img).images
    text = mp.empty_text(backend, backend.spec, s, 1)
    ref = finish(backend, backend.spec, s, z_ref, text, Noise(s.seed, 1, backend.device)).images
    assert (ours.int() - ref.int()).abs().max() <= 1


def test_inversion_reconstructs_with_eta_zero(picture):
    """DDIM inversion then DDIM decoding (eta = 0) gives the input back: the paper's property.

    Stated tolerance: mean abs difference 0.01 on [-1, 1] pixels. The decoder's output layer is scaled by 0.01 so
    that eps is as smooth in x as a trained network's and each step's fixed-point solve converges; a full-scale
    random network is chaotic (SPEC.md, known traps) and no inversion reconstructs through it."""
    m = build_preset("tiny")
    with torch.no_grad():
        m.decoder.conv_out.weight *= 0.01
        m.decoder.conv_out.bias *= 0.01
    backend = TorchBackend(m)
    s = Settings(decoder_steps=25, decoder_guidance=1.0, size=16, eta=0.0)  # guidance x8 would amplify eps too
    img = mp.load_image(picture)
    res = mp.variation(backend, backend.spec, s, img, invert=True, keep=True)
    S = backend.spec.decoder_size
    x0 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    from unclip.engine.pipeline import upsample
    target = upsample(mp._center_square(x0), S).clamp(-1, 1)
    err = (res.intermediates["image_decoder"] - target).abs().mean()
    assert err < 0.01, err
    fresh = mp.variation(backend, backend.spec, s, img, keep=True).intermediates["image_decoder"]
    assert (fresh - target).abs().mean() > 0.5  # fresh noise does not reconstruct


def test_interpolation_endpoints_equal_plain_generation(backend):
    s = FAST
    frames = list(mp.interpolate(backend, backend.spec, s, "a red cat", "a green frog", 4))
    a = generate(backend, backend.spec, "a red cat", s).images[0]
    b = generate(backend, backend.spec, "a green frog", s).images[0]
    assert torch.equal(frames[0], a) and torch.equal(frames[-1], b)
    again = list(mp.interpolate(backend, backend.spec, s, "a red cat", "a green frog", 4))
    assert all(torch.equal(x, y) for x, y in zip(frames, again))
    assert not torch.equal(frames[1], frames[0])


def test_interpolation_of_images_endpoints_equal_variations(backend, picture, tmp_path):
    other = tmp_path / "other.png"
    Image.fromarray((np.asarray(Image.open(picture))[::-1]).copy()).save(other)
    s = FAST
    frames = list(mp.interpolate(backend, backend.spec, s, mp.load_image(picture), mp.load_image(other), 3))
    assert torch.equal(frames[0], mp.variation(backend, backend.spec, s, mp.load_image(picture)).images[0])
    assert torch.equal(frames[-1], mp.variation(backend, backend.spec, s, mp.load_image(other)).images[0])


def test_text_diff_zero_is_the_unedited_image(backend):
    s = FAST
    edited = next(mp.text_diff(backend, backend.spec, s, "a photo of a cat", ("cat", "dog"), 0.0))
    plain = generate(backend, backend.spec, "a photo of a cat", s).images[0]
    assert torch.equal(edited, plain)
    moved = next(mp.text_diff(backend, backend.spec, s, "a photo of a cat", ("cat", "dog"), 0.5))
    assert not torch.equal(moved, plain)


def test_negative_prompt_changes_only_the_unconditional_half(backend):
    calls = {}
    orig = backend.run

    def spy(net, inp):
        calls.setdefault(net, []).append({k: v.clone() for k, v in inp.items()})
        return orig(net, inp)

    backend.run = spy
    try:
        generate(backend, backend.spec, "a cat", FAST)
        plain, calls = calls, {}
        generate(backend, backend.spec, "a cat", Settings(**{**FAST.__dict__, "negative": "blurry dog"}))
        neg = calls
    finally:
        backend.run = orig
    ids_p, ids_n = plain["text_encoder"][0]["input_ids"], neg["text_encoder"][0]["input_ids"]
    assert torch.equal(ids_p[1:], ids_n[1:]) and not torch.equal(ids_p[:1], ids_n[:1])  # [uncond; cond]
    first_p, first_n = plain["prior"][0], neg["prior"][0]
    assert torch.equal(first_p["x_t"], first_n["x_t"])
    for k in ("text_embeds", "text_hidden", "text_mask"):
        assert torch.equal(first_p[k][1:], first_n[k][1:])  # conditional rows identical
    assert not torch.equal(first_p["text_embeds"][:1], first_n["text_embeds"][:1])


def test_best_of_n_keeps_the_highest_dot_product(backend):
    res = generate(backend, backend.spec, "a cat", Settings(**{**FAST.__dict__, "num_images": 2}), keep=True,
                   candidates=3)
    cand = res.intermediates["prior_candidates"]  # (2, 3, D)
    e = res.intermediates["text_embeds"][-2:]  # conditional text embeddings
    explicit = torch.einsum("nkd,nd->nk", cand.double(), e.double())
    best = cand[torch.arange(2), explicit.argmax(1)]
    assert torch.allclose(res.intermediates["image_embeds"], best)
    assert not torch.allclose(cand[:, 0], cand[:, 1])  # the candidates really differ


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


CLI = ["--model", "tiny", "--size", "64", "--backend", "torch", "--prior-steps", "2", "--decoder-steps", "2", "--sr256-steps", "2"]


def test_cli_variation_interpolate_text_diff(runner, picture, tmp_path):
    rgba = tmp_path / "odd.png"
    Image.open(picture).convert("RGBA").resize((37, 23)).save(rgba)  # alpha and an odd size are handled
    res = runner.invoke(main, [*CLI, "--variation", str(rgba), "--num-images", "2"])
    assert res.exit_code == 0, res.output
    assert [p.split("/")[-1] for p in res.stdout.split()] == ["var-0-0.png", "var-0-1.png"]
    res = runner.invoke(main, [*CLI, "--interpolate", str(picture), "a cat", "--frames", "3"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.split()) == 4 and Image.open(res.stdout.split()[-1]).size == (3 * 64, 64)
    res = runner.invoke(main, ["a cat", *CLI, "--text-diff", "cat", "dog", "--amount", "0.3", "--frames", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.split()[-1].endswith("edit-0-sheet.png")


@pytest.mark.parametrize("args,message", [
    (["--variation", "missing.png"], "no such file"),
    (["--interpolate", "a", "b", "--frames", "1"], "--frames must be at least 2"),
    (["a cat", "--text-diff", "a", "b", "--amount", "1.5"], "--amount 1.5 is outside [0, 1]"),
    (["--invert"], "--invert needs --variation"),
])
def test_cli_manipulation_errors(runner, args, message):
    res = runner.invoke(main, [*CLI, *args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output


def test_cli_not_an_image(runner, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    res = runner.invoke(main, [*CLI, "--variation", str(bad)])
    assert res.exit_code == 1 and "not a readable image" in res.output


def test_cli_model_without_image_encoder(runner, picture, tmp_path):
    m = build_preset("tiny")
    m.image_encoder = None
    save_model(m, tmp_path / "noenc")
    res = runner.invoke(main, [*CLI, "--model", str(tmp_path / "noenc"), "--variation", str(picture)])
    assert res.exit_code == 1 and "has no image encoder" in res.output

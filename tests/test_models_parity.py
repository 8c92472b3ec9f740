"""Every stage equals its diffusers/transformers counterpart, loaded through load_model from save_pretrained output."""
from __future__ import annotations

import pytest
import torch
from refs import CONFIGS, save_reference_folder
from unclip.models import load_model

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPTS = ["horse", "a photo of a red cat, 123!", ""]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"max abs diff {err:.3g} > {rel} x output scale {scale:.3g}"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    folder, pipe, extras = save_reference_folder(request.param, tmp_path_factory.mktemp(f"ref{request.param}"))
    return load_model(folder), pipe, extras, request.param


def _text_inputs(ours, batch):
    ids, mask = ours.tokenizer(PROMPTS[:batch] if batch <= 3 else PROMPTS * batch)
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3])
def test_text_encoder(pair, batch):
    ours, pipe, _, _ = pair
    ids, _ = _text_inputs(ours, batch)
    with torch.no_grad():
        ref = pipe.text_encoder(ids)
        e, H = ours.text_encoder(ids)
    assert_close(e, ref.text_embeds)
    assert_close(H, ref.last_hidden_state)


def _cond(ours, batch, seed):
    g = torch.Generator().manual_seed(seed)
    D = ours.prior.config.embedding_dim
    e = torch.randn(batch, D, generator=g)
    H = torch.randn(batch, 77, D, generator=g)
    mask = torch.ones(batch, 77, dtype=torch.bool)
    for i in range(batch):  # padded masks of different lengths
        mask[i, 3 + 7 * i:] = False
    return e, H, mask, g


@pytest.mark.parametrize("batch", [1, 3])
def test_prior(pair, batch):
    ours, pipe, _, _ = pair
    e, H, mask, g = _cond(ours, batch, 1)
    x = torch.randn(batch, e.shape[1], generator=g)
    for t in (999, 500, 0):
        with torch.no_grad():
            ref = pipe.prior(x, timestep=torch.tensor(t), proj_embedding=e, encoder_hidden_states=H,
                             attention_mask=mask).predicted_image_embedding
            out = ours.prior(x, torch.tensor(float(t)), e, H, mask)
        assert_close(out, ref)
    assert_close(x * ours.prior.clip_std + ours.prior.clip_mean, pipe.prior.post_process_latents(x))  # the pipeline's un-normalisation


@pytest.mark.parametrize("batch", [1, 3])
def test_text_proj(pair, batch):
    ours, pipe, _, _ = pair
    e, H, mask, g = _cond(ours, batch, 2)
    z = torch.randn_like(e)
    with torch.no_grad():
        # diffusers with guidance: the batch is [uncond (learned embedding); cond]
        ctx_ref, time_ref = pipe.text_proj(image_embeddings=z, prompt_embeds=torch.cat([e, e]),
                                           text_encoder_hidden_states=torch.cat([H, H]),
                                           do_classifier_free_guidance=True)
        cond = torch.cat([torch.zeros(batch), torch.ones(batch)])
        class_emb, ctx, ctx_mask = ours.text_proj(torch.cat([z, z]), cond, torch.cat([e, e]), torch.cat([H, H]),
                                                  torch.cat([mask, mask]))
    assert_close(class_emb, time_ref)
    assert_close(ctx, ctx_ref)
    K = ours.text_proj.config.clip_extra_context_tokens
    assert torch.equal(ctx_mask[:, :K], torch.ones(2 * batch, K))
    assert torch.equal(ctx_mask[:, K:], torch.cat([mask, mask]).float())


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder(pair, batch):
    ours, pipe, _, _ = pair
    cfg = ours.decoder.config
    g = torch.Generator().manual_seed(3)
    L = 4 + 77
    x = torch.randn(batch, 3, cfg.sample_size, cfg.sample_size, generator=g)
    class_emb = torch.randn(batch, 4 * cfg.block_out_channels[0], generator=g)
    ctx = torch.randn(batch, L, cfg.cross_attention_dim, generator=g)
    mask = torch.ones(batch, L, dtype=torch.bool)
    for i in range(batch):
        mask[i, 6 + 5 * i:] = False
    for t in (999, 250):
        with torch.no_grad():
            ref = pipe.decoder(sample=x, timestep=torch.tensor(t), encoder_hidden_states=ctx, class_labels=class_emb,
                               attention_mask=mask).sample
            out = ours.decoder(x, torch.tensor(float(t)), class_emb, ctx, mask)
        assert_close(out, ref)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stage", ["sr256_first", "sr256_last", "sr1024"])
def test_superres(pair, batch, stage):
    ours, pipe, extras, _ = pair
    ref_net = {"sr256_first": pipe.super_res_first, "sr256_last": pipe.super_res_last, "sr1024": extras["sr1024"]}[stage]
    net = getattr(ours, stage)
    S = net.config.sample_size
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, S, S, generator=g)
    low = torch.randn(batch, 3, S, S, generator=g)
    with torch.no_grad():
        ref = ref_net(sample=torch.cat([x, low], 1), timestep=torch.tensor(666)).sample
        out = net(x, torch.tensor(666.0), low)
    assert_close(out, ref)


@pytest.mark.parametrize("batch", [1, 3])
def test_image_encoder(pair, batch):
    ours, _, extras, _ = pair
    S = ours.image_encoder.config.image_size
    px = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = extras["image_encoder"](pixel_values=px).image_embeds
        out = ours.image_encoder(px)
    assert_close(out, ref)


def test_schedulers_read_from_folder(pair):
    ours, _, _, _ = pair
    assert ours.schedulers["prior"].prediction_type == "sample"
    assert ours.schedulers["prior"].clip_sample_range == 5.0
    assert ours.schedulers["decoder"].variance_type == "learned_range"
    assert ours.schedulers["sr256"].variance_type == "fixed_small_log"

"""The `karlo` preset has exactly the state-dict keys and shapes of Karlo v1 alpha's diffusers/transformers modules,
so a real Karlo folder loads. Both sides are built on the meta device (no memory, no download)."""
from __future__ import annotations

import pytest
import torch
from refs import text_proj_class
from unclip.models import build_preset

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _karlo_reference():
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    sr = dict(sample_size=256, layers_per_block=3, in_channels=6, out_channels=3, add_attention=False,
              block_out_channels=(320, 640, 960, 1280), down_block_types=("ResnetDownsampleBlock2D",) * 4,
              up_block_types=("ResnetUpsampleBlock2D",) * 4)
    with torch.device("meta"):
        return {
            # openai/clip-vit-large-patch14's text tower, as Karlo's text_encoder/config.json
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")),
            "prior": PriorTransformer(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768),
            "text_proj": text_proj_class()(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1280,
                                           cross_attention_dim=1536),
            "decoder": UNet2DConditionModel(
                sample_size=64, layers_per_block=3, in_channels=3, out_channels=6,
                down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280),
                cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
                resnet_time_scale_shift="scale_shift"),
            "sr256_first": UNet2DModel(**sr),
            "sr256_last": UNet2DModel(**sr),
            "sr1024": UNet2DModel(sample_size=1024, layers_per_block=2, in_channels=6, out_channels=3,
                                  add_attention=False, block_out_channels=(192, 192, 384, 384, 768, 768),
                                  down_block_types=("ResnetDownsampleBlock2D",) * 6,
                                  up_block_types=("ResnetUpsampleBlock2D",) * 6),
        }


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def test_karlo_state_dicts_match():
    ours = build_preset("karlo", device="meta").networks()
    ref = _karlo_reference()
    assert set(ours) == set(ref)
    for stage, module in ref.items():
        assert _shapes(ours[stage]) == _shapes(module), stage


def test_karlo_sizes_match_spec():
    """Parameter counts of SPEC.md's table (millions)."""
    nets = build_preset("karlo", device="meta").networks()
    millions = {k: round(sum(p.numel() for p in v.parameters()) / 1e6, 1) for k, v in nets.items()}
    assert millions["text_encoder"] == 123.7
    assert millions["prior"] == 1022.0
    assert millions["text_proj"] == 7.9
    assert millions["decoder"] == 885.4
    assert millions["sr256_first"] == millions["sr256_last"] == 691.6

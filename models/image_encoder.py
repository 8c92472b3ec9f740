"""Stage `image_encoder`: the CLIP ViT image tower with its projection (CLIPVisionModelWithProjection)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from unclip.models.clip import CLIPEncoder


@dataclass(frozen=True)
class ImageEncoderConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


class _Embeddings(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        n_pos = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(n_pos, cfg.hidden_size)


class _VisionModel(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' key name
        self.encoder = CLIPEncoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S), CLIP-normalised -> image_embeds (B, D)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = _VisionModel(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        emb = vm.embeddings
        B = pixel_values.shape[0]
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))  # (B, W, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = emb.class_embedding.to(patches.dtype).expand(B, 1, -1)  # (B, 1, W)
        x = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight  # (B, N+1, W)
        x = vm.encoder(vm.pre_layrnorm(x))
        pooled = vm.post_layernorm(x[:, 0])  # class token (B, W)
        return self.visual_projection(pooled)  # (B, D)

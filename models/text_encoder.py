"""Stage `text_encoder`: the OpenAI CLIP text tower with its projection (transformers' CLIPTextModelWithProjection)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from unclip.models.clip import CLIPEncoder


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768  # W
    intermediate_size: int = 3072
    projection_dim: int = 768  # D
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


class _Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class _TextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = CLIPEncoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class TextEncoder(nn.Module):
    """input_ids (B, T) int64 -> text_embeds e (B, D), last_hidden_state H (B, T, W)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = _TextModel(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = input_ids.shape
        emb = self.text_model.embeddings
        x = emb.token_embedding(input_ids) + emb.position_embedding.weight[:T]  # (B, T, W)
        # CLIP's text tower is causal; the padding mask is never applied (the pooled token is the EOS).
        causal = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)  # (T, T)
        x = self.text_model.encoder(x, causal)
        H = self.text_model.final_layer_norm(x)  # (B, T, W)
        if self.config.eos_token_id == 2:
            # transformers' legacy rule for old configs: the EOS is the largest id in the vocabulary.
            eos_pos = input_ids.argmax(dim=-1)
        else:
            eos_pos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # first EOS
        pooled = H[torch.arange(B, device=H.device), eos_pos]  # (B, W)
        return self.text_projection(pooled), H

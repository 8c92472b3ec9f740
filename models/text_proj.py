"""Stage `text_proj`: turns (image embedding z, text embedding e, text tokens H) into the decoder's conditioning
(diffusers' UnCLIPTextProjModel; GLIDE's text conditioning extended with CLIP, paper section 2.1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TextProjConfig:
    clip_embeddings_dim: int = 768
    clip_extra_context_tokens: int = 4
    cross_attention_dim: int = 1536
    time_embed_dim: int = 1280


class TextProj(nn.Module):
    """(z (B, D), cond (B,), e (B, D), H (B, 77, D), m (B, 77)) -> class_emb (B, T), context (B, 4+77, C),
    context_mask (B, 4+77).

    `cond` is 1 for conditional rows and 0 for the classifier-free-guidance rows, whose image embedding is
    replaced by the learned null embedding; keeping the switch inside the network lets every backend run it.
    """

    def __init__(self, cfg: TextProjConfig):
        super().__init__()
        self.config = cfg
        D, C, T, K = cfg.clip_embeddings_dim, cfg.cross_attention_dim, cfg.time_embed_dim, cfg.clip_extra_context_tokens
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(D))
        self.embedding_proj = nn.Linear(D, T)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(D, T)
        self.clip_extra_context_tokens_proj = nn.Linear(D, K * C)
        self.encoder_hidden_states_proj = nn.Linear(D, C)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(C)

    def forward(self, image_embeds: torch.Tensor, cond: torch.Tensor, text_embeds: torch.Tensor,
                text_hidden: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = image_embeds.shape[0]
        K = self.config.clip_extra_context_tokens
        dtype = self.embedding_proj.weight.dtype
        c = cond.to(dtype)[:, None]  # (B, 1)
        z = c * image_embeds.to(dtype) + (1 - c) * self.learned_classifier_free_guidance_embeddings  # (B, D)
        class_emb = (self.clip_image_embeddings_project_to_time_embeddings(z)
                     + self.embedding_proj(text_embeds.to(dtype)))  # (B, T)
        # Karlo's layout is channel-major: token k, channel c is output index c*K + k.
        extra = self.clip_extra_context_tokens_proj(z).reshape(B, -1, K).transpose(1, 2)  # (B, K, C)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_hidden.to(dtype)))  # (B, 77, C)
        context = torch.cat([extra, text], dim=1)  # (B, K+77, C)
        context_mask = F.pad(text_mask.to(dtype), (K, 0), value=1.0)  # (B, K+77)
        return class_emb, context, context_mask

"""Stage `prior`: the unCLIP diffusion prior (a causal decoder-only transformer predicting the clean CLIP image
embedding x0; diffusers' PriorTransformer with Karlo's config)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from unclip.models.common import TIME_ACTIVATIONS, TimestepMLP, attention, broadcast_timestep, timestep_embedding

MASK_VALUE = -10000.0  # additive bias of masked keys, as Karlo/diffusers use


@dataclass(frozen=True)
class PriorConfig:
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768  # CLIP embedding size D
    num_embeddings: int = 77  # text tokens
    additional_embeddings: int = 4  # [text_embeds, time, x_t, prd]
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"

    def __post_init__(self):
        if self.time_embed_act_fn not in TIME_ACTIVATIONS:
            raise ValueError(f"time_embed_act_fn={self.time_embed_act_fn!r} is not supported "
                             f"(supported: {', '.join(map(repr, TIME_ACTIVATIONS))})")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.ModuleList([nn.Linear(width, width)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.to_q, self.to_k, self.to_v))  # (B, h, T, d)
        y = attention(q, k, v, bias)  # (B, h, T, d)
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, C))


class _GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # exact (erf) GELU


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _Block(nn.Module):
    """Pre-LN block: h += Attn(LN(h), mask); h += FF(LN(h)). Key names follow BasicTransformerBlock."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn1 = _Attention(width, heads)
        self.norm3 = nn.LayerNorm(width)
        self.ff = _FeedForward(width)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = h + self.attn1(self.norm1(h), bias)
        return h + self.ff(self.norm3(h))


class Prior(nn.Module):
    """(x_t (B, D), t (B,), text_embeds e (B, D), text_hidden H (B, 77, D), text_mask m (B, 77)) -> x0 (B, D).

    x_t and the output live in the normalised space; a sample maps to a CLIP image embedding as
    x * clip_std + clip_mean (the pipeline does it, with the statistics kept in fp32).
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.config = cfg
        W, D = cfg.width, cfg.embedding_dim
        self.time_embedding = TimestepMLP(W, W, W, act=cfg.time_embed_act_fn)
        self.proj_in = nn.Linear(D, W)
        self.embedding_proj = nn.Linear(D, W)
        self.encoder_hidden_states_proj = nn.Linear(D, W)
        self.positional_embedding = nn.Parameter(torch.zeros(1, cfg.num_embeddings + cfg.additional_embeddings, W))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, W))
        self.transformer_blocks = nn.ModuleList([_Block(W, cfg.num_attention_heads) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(W)
        self.proj_to_clip_embeddings = nn.Linear(W, D)
        self.clip_mean = nn.Parameter(torch.zeros(1, D))
        self.clip_std = nn.Parameter(torch.zeros(1, D))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor, text_hidden: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        B, W = x_t.shape[0], self.config.width
        dtype = self.proj_in.weight.dtype
        t = broadcast_timestep(t, B, x_t.device)
        time = self.time_embedding(timestep_embedding(t, W).to(dtype))  # (B, W)
        tokens = torch.cat([
            self.encoder_hidden_states_proj(text_hidden.to(dtype)),  # (B, 77, W)
            self.embedding_proj(text_embeds.to(dtype))[:, None],  # (B, 1, W)
            time[:, None],  # (B, 1, W)
            self.proj_in(x_t.to(dtype))[:, None],  # (B, 1, W)
            self.prd_embedding.expand(B, -1, -1),  # (B, 1, W)
        ], dim=1)
        h = tokens + self.positional_embedding  # (B, T=81, W)
        T = h.shape[1]
        # Additive bias: padded text tokens (the 4 extra tokens are never masked) + causal.
        pad = (1.0 - text_mask.to(dtype)) * MASK_VALUE  # (B, 77)
        pad = F.pad(pad, (0, T - pad.shape[1]))  # (B, T)
        causal = torch.full((T, T), MASK_VALUE, device=h.device, dtype=dtype).triu(1)  # (T, T)
        bias = (pad[:, None, :] + causal)[:, None]  # (B, 1, T, T)
        for block in self.transformer_blocks:
            h = block(h, bias)
        h = self.norm_out(h)
        return self.proj_to_clip_embeddings(h[:, -1])  # the prd token's output = x0 (B, D)

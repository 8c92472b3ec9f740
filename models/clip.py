"""The CLIP transformer layers (OpenAI CLIP, as in transformers' CLIPTextModel / CLIPVisionModel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from unclip.models.common import attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's GELU approximation
    "gelu": F.gelu,
}


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, (width, heads)
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, h, T, d)
        y = attention(q, k, v, bias)  # (B, h, T, d)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-LN residual block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, mlp: int, act: str, eps: float):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.layers = nn.ModuleList([CLIPLayer(width, heads, mlp, act, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


# Generic keys of transformers' PretrainedConfig that don't change the network.
TRANSFORMERS_METADATA = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "initializer_factor", "attention_dropout", "dropout", "return_dict", "output_hidden_states",
    "output_attentions", "id2label", "label2id", "name_or_path", "problem_type",
})

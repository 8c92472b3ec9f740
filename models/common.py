"""Layers shared by several stages: sinusoidal time embedding, its MLP, and config parsing helpers."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from unclip.core.errors import ModelLoadError  # noqa: E402,F401  (raised by every loader here)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (DDPM / ADM; f_k = exp(-ln(1e4) k / (dim/2 - shift)))."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * k / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


TIME_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}  # gelu: exact (erf), as diffusers' get_activation("gelu")


class TimestepMLP(nn.Module):
    """Lin2(act(Lin1(x))), act SiLU or GELU: the time-embedding MLP (keys linear_1 / linear_2 as in diffusers)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, act: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)
        self.act = TIME_ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def broadcast_timestep(t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) timestep -> (B,) float32 tensor."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t[None]
    return t.float().expand(batch)


def config_from_dict(cls: type, raw: dict[str, Any], path: str, *, fixed: dict[str, tuple] = {},
                     ignored: frozenset[str] = frozenset(), strict: bool = True) -> Any:
    """Build the frozen dataclass `cls` from a diffusers/transformers config dict.

    Keys starting with "_" and `ignored` keys are metadata. `fixed` keys are architecture switches this
    project implements for one set of values only: any other value is refused by name. Any other unknown
    key is refused too (unless `strict` is False: transformers configs carry dozens of generic generation
    keys), so a checkpoint of a different architecture never loads silently.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in types:
            value = tuple(value) if isinstance(value, list) else value
            if not _fits(value, types[key]):
                raise ModelLoadError(f"{path}: config value {key}={value!r} should be {types[key]}; restore the file "
                                     "from the model download")
            kwargs[key] = value
        elif key in fixed:
            if value not in fixed[key]:
                allowed = ", ".join(repr(v) for v in fixed[key])
                raise ModelLoadError(
                    f"{path}: config value {key}={value!r} is not supported by this engine (supported: {allowed}); "
                    "this checkpoint has a different architecture from unCLIP/Karlo")
        elif strict:
            raise ModelLoadError(
                f"{path}: config key {key!r} is not supported by this engine; remove it if it is metadata, "
                "otherwise this checkpoint has a different architecture from unCLIP/Karlo")
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: invalid config: {e}") from None
    return cfg


def _fits(value: Any, annotation: str) -> bool:
    """Whether a JSON value has the type a config field declares (int, float, bool, str, tuples, | None)."""
    if value is None:
        return "None" in annotation
    kind = annotation.split("[")[0].split("|")[0].strip()
    if kind == "tuple":
        inner = annotation.split("[", 1)[1].split(",")[0].strip() if "[" in annotation else "Any"
        return isinstance(value, tuple) and all(_fits(v, inner) for v in value)
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}
    return checks.get(kind, lambda v: True)(value)


def config_to_dict(cfg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inverse of config_from_dict (tuples as lists), with metadata keys first."""
    out = dict(extra or {})
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (B, h, N, d) tensors.

    In eager torch this is SDPA (flash / memory-efficient kernels accumulate in fp32). When exporting a
    reduced-precision graph the scores and softmax are written out in fp32: in fp16 they overflow."""
    if not (torch.onnx.is_in_onnx_export() and q.dtype != torch.float32):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scale = q.shape[-1] ** -0.5
    scores = (q.float() * scale) @ k.float().transpose(-1, -2)  # (B, h, N, M) fp32
    if bias is not None:
        scores = scores + bias.float()
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)

"""U-Net building blocks shared by the decoder and the upsamplers (ADM / GLIDE lineage, diffusers key names).

A level is a list of ResNet blocks (optionally each followed by an attention block) and a ResNet block that
resamples (avg-pool / nearest x2 on both branches). The decoder's attention attends from each pixel to
[projected text context ; the pixels themselves].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from unclip.models.common import attention

MASK_VALUE = -10000.0


class ResBlock(nn.Module):
    """ADM residual block with time conditioning, optionally resampling (up or down by 2).

    scale_shift: h = GN(h) * (1 + s) + b  (decoder); default: h = GN(h + Linear(SiLU(emb)))  (upsamplers).
    """

    def __init__(self, c_in: int, c_out: int, temb: int, groups: int, eps: float, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * c_out if scale_shift else c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resample(h))
        skip = self._resample(x)
        e = self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.silu(h))
        if self.conv_shortcut is not None:
            skip = self.conv_shortcut(skip)
        return skip + h


class ContextAttention(nn.Module):
    """Self-attention over pixels whose keys/values are [add_k/add_v(context) ; k/v(GN(x))]; residual output."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int, eps: float):
        super().__init__()
        assert channels % head_dim == 0, (channels, head_dim)
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(context_dim, channels)
        self.add_v_proj = nn.Linear(context_dim, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor, context: torch.Tensor, ctx_bias: torch.Tensor) -> torch.Tensor:
        """ctx_bias (B, L): additive bias of the context keys; pixel keys are never masked."""
        B, C, H, W = x.shape
        bias = F.pad(ctx_bias, (0, H * W))[:, None, None, :]  # (B, 1, 1, L+HW)
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, h, N, d)
            return t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)

        q = heads(self.to_q(h))
        k = torch.cat([heads(self.add_k_proj(context)), heads(self.to_k(h))], dim=2)  # (B, h, L+HW, d)
        v = torch.cat([heads(self.add_v_proj(context)), heads(self.to_v(h))], dim=2)
        y = attention(q, k, v, bias)  # (B, h, HW, d)
        y = self.to_out[0](y.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return x + y.transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """One U-Net resolution: resnets (each optionally followed by attention) then an optional resampler.

    Down levels return every intermediate activation for the skip connections; up levels consume them.
    """

    def __init__(self, resnets: list[ResBlock], attentions: list[ContextAttention] | None, resampler: ResBlock | None,
                 up: bool):
        super().__init__()
        self.up = up
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        else:
            self.attentions = None
        if resampler is not None:
            setattr(self, "upsamplers" if up else "downsamplers", nn.ModuleList([resampler]))
        self.resampler_name = None if resampler is None else ("upsamplers" if up else "downsamplers")

    def forward(self, h, emb, context, bias, skips: list[torch.Tensor]):
        for i, resnet in enumerate(self.resnets):
            if self.up:
                h = torch.cat([h, skips.pop()], dim=1)
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, bias)
            if not self.up:
                skips.append(h)
        if self.resampler_name is not None:
            h = getattr(self, self.resampler_name)[0](h, emb)
            if not self.up:
                skips.append(h)
        return h


class MidBlock(nn.Module):
    """resnet, [attention, resnet]."""

    def __init__(self, channels: int, temb: int, groups: int, eps: float, scale_shift: bool,
                 attention: ContextAttention | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, temb, groups, eps, scale_shift) for _ in range(2)])
        self.attentions = nn.ModuleList([attention]) if attention is not None else None

    def forward(self, h, emb, context, bias):
        h = self.resnets[0](h, emb)
        if self.attentions is not None:
            h = self.attentions[0](h, context, bias)
        return self.resnets[1](h, emb)


@dataclass(frozen=True)
class UNetShape:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attn_down: tuple[bool, ...]  # per level: resnets followed by attention
    attn_up: tuple[bool, ...]
    mid_attention: bool
    head_dim: int
    context_dim: int
    groups: int
    eps: float
    scale_shift: bool


def build_unet_body(module: nn.Module, u: UNetShape) -> None:
    """Create conv_in, down_blocks, mid_block, up_blocks, conv_norm_out, conv_out on `module`."""
    in_channels, out_channels, layers_per_block = u.in_channels, u.out_channels, u.layers_per_block
    attn_down, attn_up, mid_attention, head_dim = u.attn_down, u.attn_up, u.mid_attention, u.head_dim
    context_dim, groups, eps, scale_shift = u.context_dim, u.groups, u.eps, u.scale_shift
    chans = u.block_out_channels
    temb = 4 * chans[0]
    n = len(chans)

    def attn(c: int) -> ContextAttention:
        return ContextAttention(c, head_dim, context_dim, groups, eps)

    module.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
    downs = []
    c_prev = chans[0]
    for i, c in enumerate(chans):
        last = i == n - 1
        resnets = [ResBlock(c_prev if j == 0 else c, c, temb, groups, eps, scale_shift) for j in range(layers_per_block)]
        attns = [attn(c) for _ in range(layers_per_block)] if attn_down[i] else None
        down = None if last else ResBlock(c, c, temb, groups, eps, scale_shift, resample="down")
        downs.append(Level(resnets, attns, down, up=False))
        c_prev = c
    module.down_blocks = nn.ModuleList(downs)
    module.mid_block = MidBlock(chans[-1], temb, groups, eps, scale_shift, attn(chans[-1]) if mid_attention else None)
    ups = []
    rev = list(reversed(chans))
    for i, c in enumerate(rev):
        last = i == n - 1
        c_skip_in = rev[min(i + 1, n - 1)]  # channels of the level below, for its first skip
        resnets = []
        for j in range(layers_per_block + 1):
            skip = c_skip_in if j == layers_per_block else c
            c_in = (rev[i - 1] if i > 0 else rev[0]) if j == 0 else c
            resnets.append(ResBlock(c_in + skip, c, temb, groups, eps, scale_shift))
        attns = [attn(c) for _ in range(layers_per_block + 1)] if attn_up[i] else None
        up = None if last else ResBlock(c, c, temb, groups, eps, scale_shift, resample="up")
        ups.append(Level(resnets, attns, up, up=True))
    module.up_blocks = nn.ModuleList(ups)
    module.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=eps)
    module.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)


def run_unet_body(module: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                  bias: torch.Tensor | None) -> torch.Tensor:
    h = module.conv_in(x)
    skips = [h]
    for level in module.down_blocks:
        h = level(h, emb, context, bias, skips)
    h = module.mid_block(h, emb, context, bias)
    for level in module.up_blocks:
        h = level(h, emb, context, bias, skips)
    assert not skips, len(skips)
    return module.conv_out(F.silu(module.conv_norm_out(h)))

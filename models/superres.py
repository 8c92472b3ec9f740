"""Stages `sr256` and `sr1024`: the diffusion upsamplers (diffusers' UNet2DModel with ResNet resampling blocks and
no attention). Input: the noisy high-res x_t concatenated with the bicubic-upsampled low-res image."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from unclip.models.common import TimestepMLP, broadcast_timestep, timestep_embedding
from unclip.models.unet import UNetShape, build_unet_body, run_unet_body


@dataclass(frozen=True)
class SuperResConfig:
    sample_size: int | None = 256
    in_channels: int = 6
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("ResnetUpsampleBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    resnet_time_scale_shift: str = "default"
    add_attention: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, types, allowed in (("down_block_types", self.down_block_types, "ResnetDownsampleBlock2D"),
                                     ("up_block_types", self.up_block_types, "ResnetUpsampleBlock2D")):
            if len(types) != n:
                raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t != allowed:
                    raise ValueError(f"{name} entry {t!r} is not supported (supported: {allowed!r})")
        if self.add_attention:
            raise ValueError("add_attention=True (mid-block attention) is not supported (supported: false, as Karlo)")
        if self.resnet_time_scale_shift not in ("scale_shift", "default"):
            raise ValueError(f"resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported "
                             "(supported: 'default', 'scale_shift')")
        if self.in_channels != 2 * self.out_channels:
            raise ValueError(f"in_channels={self.in_channels} must be twice out_channels={self.out_channels} "
                             "(noisy image ++ upsampled low-res image)")


class SuperRes(nn.Module):
    """(x_t (B, 3, S, S), t (B,), low_res (B, 3, S, S) already upsampled) -> eps (B, 3, S, S)."""

    def __init__(self, cfg: SuperResConfig):
        super().__init__()
        self.config = cfg
        c0 = cfg.block_out_channels[0]
        self.time_embedding = TimestepMLP(c0, 4 * c0)
        n = len(cfg.block_out_channels)
        build_unet_body(self, UNetShape(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            attn_down=(False,) * n, attn_up=(False,) * n, mid_attention=False, head_dim=1, context_dim=1,
            groups=cfg.norm_num_groups, eps=cfg.norm_eps, scale_shift=cfg.resnet_time_scale_shift == "scale_shift"))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B = x_t.shape[0]
        dtype = self.conv_in.weight.dtype
        t = broadcast_timestep(t, B, x_t.device)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(dtype))  # (B, 4*C0)
        x = torch.cat([x_t, low_res], dim=1).to(dtype)  # (B, 6, S, S)
        return run_unet_body(self, x, emb, None, None)

"""Stage `decoder`: the 64x64 text- and CLIP-conditioned diffusion U-Net (GLIDE + unCLIP conditioning;
diffusers' UNet2DConditionModel with Karlo's block types). Predicts eps and the learned variance (6 channels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from unclip.models.common import TimestepMLP, broadcast_timestep, timestep_embedding
from unclip.models.unet import MASK_VALUE, UNetShape, build_unet_body, run_unet_body

DOWN_TYPES = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}  # -> has attention
UP_TYPES = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}


@dataclass(frozen=True)
class DecoderConfig:
    sample_size: int = 64
    in_channels: int = 3
    out_channels: int = 6
    down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3
    up_block_types: tuple[str, ...] = ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)
    mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
    layers_per_block: int = 3
    cross_attention_dim: int = 1536
    attention_head_dim: int = 64
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    resnet_time_scale_shift: str = "scale_shift"
    class_embed_type: str = "identity"

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_TYPES),
                                     ("up_block_types", self.up_block_types, UP_TYPES)):
            if len(types) != n:
                raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"{name} entry {t!r} is not supported (supported: {', '.join(allowed)})")
        if self.mid_block_type != "UNetMidBlock2DSimpleCrossAttn":
            raise ValueError(f"mid_block_type={self.mid_block_type!r} is not supported "
                             "(supported: 'UNetMidBlock2DSimpleCrossAttn')")
        if self.resnet_time_scale_shift not in ("scale_shift", "default"):
            raise ValueError(f"resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported "
                             "(supported: 'scale_shift', 'default')")
        if self.class_embed_type != "identity":
            raise ValueError(f"class_embed_type={self.class_embed_type!r} is not supported (supported: 'identity')")


class Decoder(nn.Module):
    """(x_t (B, 3, S, S), t (B,), class_emb (B, 4*C0), context (B, L, Cx), context_mask (B, L)) -> (B, 6, S, S).

    class_emb (from text_proj) is added to the time embedding; attention keys/values are [context ; pixels]
    with padded context tokens masked.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        c0 = cfg.block_out_channels[0]
        self.time_embedding = TimestepMLP(c0, 4 * c0)
        build_unet_body(self, UNetShape(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            attn_down=tuple(DOWN_TYPES[t] for t in cfg.down_block_types),
            attn_up=tuple(UP_TYPES[t] for t in cfg.up_block_types), mid_attention=True,
            head_dim=cfg.attention_head_dim, context_dim=cfg.cross_attention_dim, groups=cfg.norm_num_groups,
            eps=cfg.norm_eps, scale_shift=cfg.resnet_time_scale_shift == "scale_shift"))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B = x_t.shape[0]
        dtype = self.conv_in.weight.dtype
        t = broadcast_timestep(t, B, x_t.device)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(dtype))  # (B, 4*C0)
        emb = emb + class_emb.to(dtype)
        ctx_bias = (1.0 - context_mask.to(dtype)) * MASK_VALUE  # (B, L): -1e4 on padded context tokens
        return run_unet_body(self, x_t.to(dtype), emb, context.to(dtype), ctx_bias)

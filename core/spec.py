"""ModelSpec: the sizes, schedules and tokenizer the runtime needs, as plain data (JSON in every export), so the
runtime never imports the torch networks."""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab_size: int
    text_len: int  # 77
    text_width: int  # W: width of the text encoder's hidden states
    embed_dim: int  # D: CLIP embedding size (text and image)
    time_embed_dim: int  # decoder time embedding = text_proj class embedding
    context_dim: int  # decoder cross-attention width
    extra_tokens: int  # K
    decoder_size: int  # 64 for Karlo
    decoder_out_channels: int  # 6: eps + learned variance
    sr256_size: int
    sr1024_size: int | None
    image_size: int | None  # image encoder input size (None: no image encoder)
    clip_mean: list[float] = field(default_factory=list)  # (D,) the prior's un-normalisation statistics
    clip_std: list[float] = field(default_factory=list)
    schedulers: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokenizer_files: dict[str, str] = field(default_factory=dict)  # name -> base64
    defaults: dict[str, float | int] = field(default_factory=dict)  # guidance scales, steps (generation_config.json)

    @property
    def networks(self) -> list[str]:
        nets = ["text_encoder", "prior", "text_proj", "decoder", "sr256_first", "sr256_last"]
        if self.sr1024_size is not None:
            nets.append("sr1024")
        if self.image_size is not None:
            nets.insert(1, "image_encoder")
        return nets

    @functools.cached_property
    def tokenizer(self):
        """Built once per spec (cached_property writes the instance dict, which a frozen dataclass allows)."""
        from unclip.core.tokenizer import CLIPTokenizer  # pure tokenizers code, no torch networks
        return CLIPTokenizer({k: base64.b64decode(v) for k, v in self.tokenizer_files.items()},
                             source=f"{self.name}/tokenizer")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls(**json.loads(text))


def spec_from_model(model) -> ModelSpec:
    """Read the sizes off an unclip.models.UnCLIPModel (duck-typed: no import of the networks here)."""
    te, tp, dec = model.text_encoder.config, model.text_proj.config, model.decoder.config
    sr = model.sr256_first.config
    sr256 = sr.sample_size or 4 * dec.sample_size
    return ModelSpec(
        name=model.name, vocab_size=te.vocab_size, text_len=model.tokenizer.max_length, text_width=te.hidden_size,
        embed_dim=te.projection_dim, time_embed_dim=tp.time_embed_dim,
        context_dim=tp.cross_attention_dim, extra_tokens=tp.clip_extra_context_tokens,
        decoder_size=dec.sample_size, decoder_out_channels=dec.out_channels, sr256_size=sr256,
        sr1024_size=None if model.sr1024 is None else (model.sr1024.config.sample_size or 4 * sr256),
        image_size=None if model.image_encoder is None else model.image_encoder.config.image_size,
        clip_mean=[float(v) for v in model.prior.clip_mean.detach().float().flatten().cpu()],
        clip_std=[float(v) for v in model.prior.clip_std.detach().float().flatten().cpu()],
        schedulers={k: dataclasses.asdict(v) for k, v in model.schedulers.items()},
        tokenizer_files={k: base64.b64encode(v).decode() for k, v in model.tokenizer.files.items()},
        defaults=dict(getattr(model, "defaults", None) or {}),
    )

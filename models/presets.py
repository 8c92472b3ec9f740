"""Named models: `demo` (trained on the shapes world, shipped in the package) and the presets with seeded random
weights: `tiny` (tests), `small` (real Karlo image sizes at a small width) and `karlo` (Karlo v1 alpha's exact
shapes plus the paper's 256->1024 upsampler; build it on the meta device to inspect)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from unclip.core.errors import ModelLoadError
from unclip.core.identity import NAMES, RANDOM_PRESETS, demo_folder
from unclip.core.tokenizer import CLIPTokenizer, synthetic_vocab
from unclip.models.decoder import Decoder, DecoderConfig
from unclip.models.image_encoder import ImageEncoder, ImageEncoderConfig
from unclip.models.io import KARLO_SCHEDULERS, UnCLIPModel
from unclip.models.prior import Prior, PriorConfig
from unclip.models.superres import SuperRes, SuperResConfig
from unclip.models.text_encoder import TextEncoder, TextEncoderConfig
from unclip.models.text_proj import TextProj, TextProjConfig

# Words the synthetic tokenizer spells as single tokens (any text still tokenizes, byte by byte).
DEMO_WORDS = ("a photo of an the and with in on red green blue big small cat dog horse frog leaf painting "
              "astronaut riding oil high resolution photograph").split()


@dataclass(frozen=True)
class Preset:
    text_encoder: TextEncoderConfig
    prior: PriorConfig
    text_proj: TextProjConfig
    decoder: DecoderConfig
    sr256: SuperResConfig
    sr1024: SuperResConfig | None
    image_encoder: ImageEncoderConfig | None
    seed: int = 0


def _sr(size: int, chans: tuple[int, ...], layers: int, groups: int = 32) -> SuperResConfig:
    n = len(chans)
    return SuperResConfig(sample_size=size, block_out_channels=chans, layers_per_block=layers,
                          down_block_types=("ResnetDownsampleBlock2D",) * n, up_block_types=("ResnetUpsampleBlock2D",) * n,
                          norm_num_groups=groups)


def _decoder(size: int, chans: tuple[int, ...], layers: int, head_dim: int, ctx: int, groups: int = 32) -> DecoderConfig:
    n = len(chans)
    return DecoderConfig(sample_size=size, block_out_channels=chans, layers_per_block=layers,
                         attention_head_dim=head_dim, cross_attention_dim=ctx, norm_num_groups=groups,
                         down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
                         up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",))


def _text(vocab: int, width: int, layers: int, heads: int, proj: int) -> TextEncoderConfig:
    return TextEncoderConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, projection_dim=proj,
                             num_hidden_layers=layers, num_attention_heads=heads, pad_token_id=1,
                             bos_token_id=vocab - 2, eos_token_id=vocab - 1)


_TOKENIZER_FILES = synthetic_vocab(DEMO_WORDS)
_VOCAB = len(CLIPTokenizer(_TOKENIZER_FILES).__dict__["_tok"].get_vocab())

PRESETS: dict[str, Preset] = {
    # Images of 16 / 64 / 256 px from the decoder / sr256 / sr1024 stages: the whole chain in seconds.
    "tiny": Preset(
        text_encoder=_text(_VOCAB, 32, 2, 4, 32),
        prior=PriorConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32),
        text_proj=TextProjConfig(clip_embeddings_dim=32, cross_attention_dim=48, time_embed_dim=4 * 32),
        decoder=_decoder(16, (32, 64), 1, 16, 48, groups=8),
        sr256=_sr(64, (16, 32), 1, groups=8),
        sr1024=_sr(256, (8, 16), 1, groups=4),
        image_encoder=ImageEncoderConfig(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8),
    ),
    # Real image sizes (64 / 256 / 1024) at a size a 2-core CPU runs in well under a minute.
    "small": Preset(
        text_encoder=_text(_VOCAB, 128, 4, 4, 128),
        prior=PriorConfig(num_attention_heads=4, attention_head_dim=64, num_layers=4, embedding_dim=128),
        text_proj=TextProjConfig(clip_embeddings_dim=128, cross_attention_dim=192, time_embed_dim=4 * 32),
        decoder=_decoder(64, (32, 64, 96, 128), 2, 32, 192, groups=16),
        sr256=_sr(256, (16, 32, 64, 96), 1, groups=8),
        sr1024=_sr(1024, (4, 8, 16, 32), 1, groups=4),
        image_encoder=ImageEncoderConfig(hidden_size=128, intermediate_size=512, projection_dim=128,
                                         num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=32),
    ),
    # Karlo v1 alpha, and the paper's 256->1024 upsampler (ADM, 192 channels x 1,1,2,2,4,4, 2 blocks, no attention).
    "karlo": Preset(
        text_encoder=TextEncoderConfig(),
        prior=PriorConfig(),
        text_proj=TextProjConfig(),
        decoder=DecoderConfig(),
        sr256=SuperResConfig(),
        sr1024=_sr(1024, (192, 192, 384, 384, 768, 768), 2),
        image_encoder=ImageEncoderConfig(),
    ),
}


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give the zero-initialised parameters (embeddings, CLIP statistics) seeded non-trivial values."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "clip_std":
            p.data.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.75)
        elif leaf in ("clip_mean", "positional_embedding", "prd_embedding", "class_embedding",
                      "learned_classifier_free_guidance_embeddings"):
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)


assert tuple(PRESETS) == RANDOM_PRESETS, (tuple(PRESETS), RANDOM_PRESETS)


def build_preset(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UnCLIPModel:
    """The named model: `demo` read from the package, or a preset with seeded random weights (on the meta device:
    shapes only, no memory)."""
    if name == "demo":
        from unclip.models.io import load_model
        folder = demo_folder()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder}: the demo model's weights are missing from this installation; "
                                 "reinstall the package (or train them: unclip-train --out DIR)")
        model = load_model(folder, dtype).to(device)
        model.name = "demo"
        return model
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r} (choose from: {', '.join(NAMES)})")
    p = PRESETS[name]
    meta = torch.device(device).type == "meta"
    gen = torch.Generator().manual_seed(p.seed)
    nets = {}
    specs = [("text_encoder", TextEncoder, p.text_encoder), ("prior", Prior, p.prior),
             ("text_proj", TextProj, p.text_proj), ("decoder", Decoder, p.decoder),
             ("sr256_first", SuperRes, p.sr256), ("sr256_last", SuperRes, p.sr256),
             ("sr1024", SuperRes, p.sr1024), ("image_encoder", ImageEncoder, p.image_encoder)]
    for i, (attr, cls, cfg) in enumerate(specs):
        if cfg is None:
            nets[attr] = None
            continue
        if meta:
            with torch.device("meta"):
                nets[attr] = cls(cfg)
            continue
        with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
            torch.manual_seed(p.seed * 1000 + i)  # default initialisers draw from the global generator
            net = cls(cfg)
        _randomise(net, gen)
        nets[attr] = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return UnCLIPModel(tokenizer=CLIPTokenizer(_TOKENIZER_FILES, source=f"preset:{name}"),
                       schedulers=dict(KARLO_SCHEDULERS), name=name, **nets)


def resolve_model(model: str) -> UnCLIPModel:
    """A built-in name (demo, tiny, small) or a model folder -> UnCLIPModel (fp32, CPU)."""
    if model == "karlo":
        raise ModelLoadError("the 'karlo' preset is for shape checks (3.4 B random parameters); "
                             "pass --model PATH to a downloaded Karlo folder instead")
    if model in NAMES:
        return build_preset(model)
    near = str(model).strip().lower()
    if near in NAMES and not os.path.isdir(model):  # 'Tiny', 'demo ': a built-in name, mistyped
        raise ModelLoadError(f"{model!r}: no such model folder; the built-in model is {near!r} (built in: "
                             f"{', '.join(NAMES)})")
    from unclip.models.io import load_model
    return load_model(model)


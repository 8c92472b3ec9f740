"""Reference (diffusers / transformers) unCLIP components with random weights, and small vocab files.

Everything here is built independently of the code under test, so the tests compare two implementations.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def text_proj_class():
    """diffusers >= 0.38 moved UnCLIPTextProjModel under pipelines.deprecated and can't reload an unCLIP folder
    unless the class is reachable from the top-level module: find it wherever it lives and register it."""
    import diffusers
    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    if not hasattr(diffusers, "UnCLIPTextProjModel"):
        diffusers.UnCLIPTextProjModel = UnCLIPTextProjModel
    return UnCLIPTextProjModel


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every zero-initialised parameter (embeddings, clip stats, CFG embedding) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if name.endswith("clip_std"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return module.eval()


# Own tiny BPE vocabulary, written the way CLIP's vocab.json / merges.txt are laid out.
def _byte_alphabet() -> list[str]:
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = keep + [b for b in range(256) if b not in keep]
    return [chars[b] for b in order]


def write_vocab(folder: Path, words=("horse", "photo", "of", "a", "the", "cat", "red", "123", "hello", "world"),
                pad_token="!") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            m = (parts[0], parts[1])
            if m not in merges:
                merges.append(m)
                vocab.setdefault(m[0] + m[1], len(vocab))
            parts = [m[0] + m[1]] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": pad_token, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return folder


def hf_tokenizer(folder: Path, pad_token="!"):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=77)
    assert len(tok) > 500, "the vocabulary files were not read"
    return tok


# Two configurations per family: diffusers' own unCLIP test sizes ("A"), and a deeper, differently shaped one ("B").
CONFIGS = {
    "A": dict(
        text=dict(bos_token_id=0, eos_token_id=2, hidden_size=32, projection_dim=32, intermediate_size=37,
                  layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1),
        prior=dict(num_attention_heads=2, attention_head_dim=12, num_layers=1),
        text_proj=dict(time_embed_dim=128, cross_attention_dim=100),
        decoder=dict(sample_size=32, in_channels=3, out_channels=6,
                     down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                     up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                     cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                     class_embed_type="identity"),
        sr=dict(sample_size=64, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 2,
                up_block_types=("ResnetUpsampleBlock2D",) * 2, block_out_channels=(32, 64), in_channels=6,
                out_channels=3, add_attention=False),
        vision=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                    num_hidden_layers=2, image_size=32, patch_size=4),
    ),
    "B": dict(
        text=dict(bos_token_id=None, eos_token_id=None, hidden_size=48, projection_dim=24, intermediate_size=96,
                  layer_norm_eps=1e-05, num_attention_heads=3, num_hidden_layers=2, pad_token_id=1, hidden_act="gelu"),
        prior=dict(num_attention_heads=4, attention_head_dim=8, num_layers=3, time_embed_act_fn="gelu"),
        text_proj=dict(time_embed_dim=64, cross_attention_dim=40, clip_extra_context_tokens=4),
        decoder=dict(sample_size=16, in_channels=3, out_channels=6,
                     down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                       "SimpleCrossAttnDownBlock2D"),
                     up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32, 48),
                     layers_per_block=2, cross_attention_dim=40, attention_head_dim=8, norm_num_groups=8,
                     resnet_time_scale_shift="scale_shift", class_embed_type="identity"),
        sr=dict(sample_size=32, layers_per_block=2, down_block_types=("ResnetDownsampleBlock2D",) * 3,
                up_block_types=("ResnetUpsampleBlock2D",) * 3, block_out_channels=(16, 32, 32), in_channels=6,
                out_channels=3, add_attention=False, norm_num_groups=8, resnet_time_scale_shift="scale_shift"),
        vision=dict(hidden_size=48, intermediate_size=64, num_attention_heads=4,
                    num_hidden_layers=3, image_size=24, patch_size=6, hidden_act="gelu"),
    ),
}


def reference_components(name: str, vocab_dir: Path, seed: int = 0) -> dict:
    """diffusers/transformers modules of one CONFIGS family, randomised; keys as UnCLIPPipeline's components."""
    from diffusers import (
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        UNet2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    c = CONFIGS[name]
    tok = hf_tokenizer(vocab_dir)
    text_cfg = dict(c["text"])
    if text_cfg["bos_token_id"] is None:  # a modern config: EOS found by id, not by argmax
        text_cfg["bos_token_id"] = tok.bos_token_id
        text_cfg["eos_token_id"] = tok.eos_token_id
    vocab_size = len(tok)
    D = text_cfg["projection_dim"]
    torch.manual_seed(seed)
    comps = {
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab_size, **text_cfg)),
        "prior": PriorTransformer(embedding_dim=D, **c["prior"]),
        "text_proj": text_proj_class()(clip_embeddings_dim=D, **c["text_proj"]),
        "decoder": UNet2DConditionModel(**c["decoder"]),
        "super_res_first": UNet2DModel(**c["sr"]),
        "super_res_last": UNet2DModel(**c["sr"]),
        "tokenizer": tok,
        "prior_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                           num_train_timesteps=1000, clip_sample_range=5.0),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                             num_train_timesteps=1000),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                               num_train_timesteps=1000),
    }
    for i, k in enumerate(["text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last"]):
        randomise_(comps[k], seed + i)
    extras = {
        "sr1024": randomise_(UNet2DModel(**c["sr"]), seed + 10),
        "image_encoder": randomise_(CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=D, **c["vision"])),
                                    seed + 11),
    }
    return comps, extras


def save_reference_folder(name: str, root: Path, seed: int = 0):
    """save_pretrained an UnCLIPPipeline (+ image_encoder and sr1024 folders) into root/model."""
    from diffusers import UnCLIPPipeline
    vocab_dir = write_vocab(root / "vocab")
    comps, extras = reference_components(name, vocab_dir, seed)
    pipe = UnCLIPPipeline(**comps)
    out = root / "model"
    pipe.save_pretrained(str(out))
    extras["sr1024"].save_pretrained(str(out / "sr1024"))
    extras["image_encoder"].save_pretrained(str(out / "image_encoder"))
    return out, pipe, extras


class ReusingBackend:
    """A test double with TensorRT's output contract: each network's outputs live in buffers that its next call
    overwrites in place, and run() returns those buffers. Wraps another backend, so images must not change."""

    def __init__(self, inner):
        self.inner, self.spec, self.device = inner, inner.spec, inner.device
        self.name = "reusing-" + inner.name
        self.buffers: dict[tuple[str, str], torch.Tensor] = {}

    def max_batch(self, network: str) -> int:
        return self.inner.max_batch(network)

    def run(self, network: str, feed: dict) -> dict:
        out = {}
        for name, value in self.inner.run(network, feed).items():
            buf = self.buffers.get((network, name))
            if buf is None or buf.numel() < value.numel():  # one buffer per output, grown as needed
                if buf is not None:
                    buf.fill_(float("nan"))  # outputs a caller kept from earlier calls are gone
                buf = self.buffers[(network, name)] = torch.empty(value.numel(), dtype=value.dtype,
                                                                  device=value.device)
            view = buf[:value.numel()].view(value.shape)
            view.copy_(value)
            out[name] = view
        return out


def descendants(pid: int) -> set[int]:
    """Every live (not zombie) process below `pid`, read from /proc (Ray's daemons and workers are children of the
    process that started it)."""
    import os
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parent[int(p)] = int(fields[1])
            except OSError:
                continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


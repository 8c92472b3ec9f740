"""The five training stages of the demo model, in order: clip (text + image encoders), prior, decoder (with
text_proj), sr256 and sr1024. Each builds its networks, a loss over a fresh batch, a judge-based evaluation of its
EMA weights, and writes its component folders (fp16) into the model folder, where later stages read them."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from unclip.demo import data, losses, world
from unclip.demo.config import GENERATION, DemoConfig
from unclip.demo.judge import ATTRIBUTES, judge, scene_attributes
from unclip.engine import samplers
from unclip.engine.pipeline import guide, to_uint8
from unclip.engine.schedules import step_table
from unclip.models.decoder import Decoder
from unclip.models.image_encoder import ImageEncoder
from unclip.models.io import COMPONENTS, load_component, save_component
from unclip.models.prior import Prior
from unclip.models.superres import SuperRes
from unclip.models.text_encoder import TextEncoder
from unclip.models.text_proj import TextProj

STAGES = ("clip", "prior", "decoder", "sr256", "sr1024")
FOLDERS = {"clip": ("text_encoder", "image_encoder"), "prior": ("prior",), "decoder": ("text_proj", "decoder"),
           "sr256": ("super_res_first", "super_res_last"), "sr1024": ("sr1024",)}
NEEDS = {"prior": ("clip",), "decoder": ("clip",)}  # the stages whose folders a stage reads (frozen encoders)


@dataclass
class Context:
    """What a stage reads: config, model folder, device, and its own seeded generators (saved in checkpoints)."""
    cfg: DemoConfig
    out: Path
    device: torch.device
    rng: np.random.Generator
    gen: torch.Generator
    bf16: bool = True  # bf16 autocast for the forward passes (train.training_precision decides)

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)


@dataclass
class Stage:
    name: str
    modules: dict[str, nn.Module]  # trained, with EMA copies; saved at the end
    loss: Callable[[], tuple[torch.Tensor, float]]  # a fresh batch -> (loss to minimise, value to report)
    evaluate: Callable[[dict[str, nn.Module]], str]  # EMA modules -> one line of figures
    save: Callable[[dict[str, nn.Module]], None]
    extra: dict[str, nn.Parameter] = field(default_factory=dict)  # trained, not kept (CLIP's temperature)


def frozen(ctx: Context, folder: str) -> nn.Module:
    comp = next(c for c in COMPONENTS if c.folder == folder)
    return load_component(ctx.out, comp).to(ctx.device)


def encode_text(tok, text_encoder: nn.Module, captions: list[str], device) -> tuple[torch.Tensor, ...]:
    ids, mask = tok(captions)
    e, H = text_encoder(ids.to(device))
    return e, H, mask.to(device).float()


def _accuracy(verdicts, named: list[dict[str, str]]) -> str:
    right = {a: [] for a in ATTRIBUTES}
    whole = []
    for v, n in zip(verdicts, named):
        m = v.matches(n)
        for a, ok in m.items():
            right[a].append(ok)
        whole.append(all(m.values()))
    parts = [f"{a[:3]} {np.mean(r):.2f}" for a, r in right.items() if r]
    return f"judge: all {np.mean(whole):.2f} | " + " ".join(parts)


# --- clip ----------------------------------------------------------------------------------------------------

def clip_stage(ctx: Context) -> Stage:
    cfg, dev = ctx.cfg, ctx.device
    tok = cfg.tokenizer()
    text, image = TextEncoder(cfg.text_encoder()).to(dev), ImageEncoder(cfg.image_encoder()).to(dev)
    logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07)), device=dev))

    def loss():
        scenes, captions = data.scenes_and_captions(ctx.rng, cfg.clip.batch)
        with ctx.autocast():
            e, _, _ = encode_text(tok, text, captions, dev)
            z = image(data.clip_input(scenes, cfg.clip_image).to(dev))
        value = losses.clip_loss(e, z, logit_scale, data.compatible(captions, scenes).to(dev))
        return value, value.item()

    def evaluate(m):
        """Image -> text retrieval among 512 full captions: is the best caption's scene the image's scene?"""
        rng = np.random.default_rng(7)
        scenes = [world.sample_scene(rng) for _ in range(512)]
        with torch.no_grad():
            e = nn.functional.normalize(encode_text(tok, m["text_encoder"], [world.caption(s, full=True) for s in
                                                                              scenes], dev)[0], dim=-1)
            z = nn.functional.normalize(m["image_encoder"](data.clip_input(scenes, cfg.clip_image).to(dev)), dim=-1)
        best = (z @ e.T).argmax(dim=1).cpu()
        hit = [scene_attributes(scenes[int(b)]) == scene_attributes(s) for b, s in zip(best, scenes)]
        return f"retrieval top-1 {np.mean(hit):.3f}, temperature {1 / float(logit_scale.exp()):.4f}"

    def save(m):
        save_component(m["text_encoder"], ctx.out, "text_encoder", torch.float16)
        save_component(m["image_encoder"], ctx.out, "image_encoder", torch.float16)

    return Stage("clip", {"text_encoder": text, "image_encoder": image}, loss, evaluate, save,
                 extra={"logit_scale": logit_scale})


# --- prior ---------------------------------------------------------------------------------------------------

def clip_statistics(ctx: Context, image: nn.Module, n: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the CLIP image embeddings of n scenes (the prior's normalisation)."""
    rng = np.random.default_rng(11)
    zs = []
    with torch.no_grad():
        for i in range(0, n, 512):
            scenes = [world.sample_scene(rng) for _ in range(min(512, n - i))]
            zs.append(image(data.clip_input(scenes, ctx.cfg.clip_image).to(ctx.device)))
    z = torch.cat(zs)
    return z.mean(0, keepdim=True), z.std(0, keepdim=True)


def prior_stage(ctx: Context) -> Stage:
    cfg, dev = ctx.cfg, ctx.device
    tok = cfg.tokenizer()
    text, image = frozen(ctx, "text_encoder"), frozen(ctx, "image_encoder")
    prior = Prior(cfg.prior_config()).to(dev)
    mean, std = clip_statistics(ctx, image)
    sched = losses.Schedule()

    def loss():
        scenes, captions = data.scenes_and_captions(ctx.rng, cfg.prior.batch)
        drop = torch.rand(len(captions), generator=ctx.gen) < cfg.prior_text_dropout
        captions = ["" if d else c for d, c in zip(drop.tolist(), captions)]
        with torch.no_grad():
            e, H, m = encode_text(tok, text, captions, dev)
            x0 = (image(data.clip_input(scenes, cfg.clip_image).to(dev)) - mean) / std  # (B, D) normalised
        t = torch.randint(0, sched.T, (len(scenes),), generator=ctx.gen)
        x_t = sched.noise(x0, t, torch.randn(x0.shape, generator=ctx.gen).to(dev))
        with ctx.autocast():
            x0_hat = prior(x_t, t.to(dev).float(), e, H, m)
        value = (x0_hat.float() - x0).pow(2).mean()
        return value, value.item()

    def evaluate(m):
        """Sample 64 prompts (guidance 4, 25 steps); the nearest of 2048 real scene embeddings has what they name?"""
        rng = np.random.default_rng(5)
        prompts = world.sample_prompts(64, seed=5)
        bank = [world.sample_scene(rng) for _ in range(2048)]
        with torch.no_grad():
            zb = torch.cat([image(data.clip_input(bank[i:i + 512], cfg.clip_image).to(dev)) for i in range(0, 2048, 512)])
            z = sample_prior(m["prior"], tok, text, prompts, (mean, std), dev)
        best = (nn.functional.normalize(z, dim=-1) @ nn.functional.normalize(zb, dim=-1).T).argmax(1).cpu()
        attrs = [scene_attributes(s) for s in bank]
        named = [world.parse_caption(p) for p in prompts]
        ok = [all(attrs[int(b)][k] == v for k, v in n.items()) for b, n in zip(best, named)]
        # the bank holds a scene with every attribute a prompt names for only some prompts (about 80%): the ceiling
        can = [any(all(a[k] == v for k, v in n.items()) for a in attrs) for n in named]
        return (f"nearest real embedding has every named attribute: {np.mean(ok):.3f} (ceiling {np.mean(can):.3f}; "
                f"{np.mean([o for o, c in zip(ok, can) if c]):.3f} where the bank has a match)")

    def save(m):
        p = copy.deepcopy(m["prior"])
        p.clip_mean.data.copy_(mean)
        p.clip_std.data.copy_(std)
        save_component(p, ctx.out, "prior", torch.float16)

    return Stage("prior", {"prior": prior}, loss, evaluate, save)


def sample_prior(prior, tok, text, prompts, stats, dev) -> torch.Tensor:
    """CLIP image embeddings for prompts: 25 DDIM steps at the model's prior guidance (GENERATION)."""
    e, H, m = encode_text(tok, text, [""] * len(prompts) + list(prompts), dev)  # [uncond; cond]
    x = torch.randn((len(prompts), e.shape[1]), generator=torch.Generator().manual_seed(0)).to(dev)
    scale = GENERATION["prior_guidance"]
    x = _ddim(lambda x, t, i: prior(x, t, e, H, m), scale, None, x, step_table(25), clip=5.0)
    return x * stats[1] + stats[0]


def _ddim(run, guidance, channels, x, table, clip):
    """Deterministic DDIM over `table` of the x0-predicting network run(x, t, i), guided."""
    ts = torch.as_tensor(table.timesteps.astype("float32"), device=x.device)
    model = guide(run, guidance, channels) if guidance != 1.0 else run
    denoise = samplers.denoiser(lambda x, i: model(x, ts[i].expand(x.shape[0]), i), table, "sample", clip)
    return samplers.ddim(denoise, x, table, torch.empty(0), eta=0.0)


# --- decoder -------------------------------------------------------------------------------------------------

def decoder_stage(ctx: Context) -> Stage:
    cfg, dev = ctx.cfg, ctx.device
    tok = cfg.tokenizer()
    text, image = frozen(ctx, "text_encoder"), frozen(ctx, "image_encoder")
    proj, dec = TextProj(cfg.text_proj()).to(dev), Decoder(cfg.decoder_config()).to(dev)
    sched = losses.Schedule()

    def loss():
        scenes, captions = data.scenes_and_captions(ctx.rng, cfg.decoder.batch)
        u = torch.rand(len(scenes), 2, generator=ctx.gen)
        captions = ["" if d else c for d, c in zip((u[:, 0] < cfg.text_dropout).tolist(), captions)]
        cond = (u[:, 1] >= cfg.image_dropout).float().to(dev)  # 0: the learned null image embedding
        with torch.no_grad():
            e, H, m = encode_text(tok, text, captions, dev)
            z = image(data.clip_input(scenes, cfg.clip_image).to(dev))
        x0 = data.pixels(scenes, cfg.base).to(dev)
        t = torch.randint(0, sched.T, (len(scenes),), generator=ctx.gen)
        x_t = sched.noise(x0, t.to(dev), torch.randn(x0.shape, generator=ctx.gen).to(dev))
        with ctx.autocast():
            class_emb, context, cmask = proj(z, cond, e, H, m)
            out = dec(x_t, t.to(dev).float(), class_emb, context, cmask).float()
        mse = losses.x0_loss(out[:, :3], x0, t.to(dev), sched, cfg.gamma)
        vlb = losses.vlb_loss(out[:, 3:], out[:, :3], x0, x_t, t.to(dev), sched)
        return mse + cfg.vlb_weight * vlb, mse.item()

    def evaluate(m):
        """32 scenes from their full captions and true image embeddings (the model's guidance, 25 DDIM steps), judged
        (the shipped model's training.json figures were measured at guidance 8, before GENERATION set 3)."""
        rng = np.random.default_rng(3)
        scenes = [world.sample_scene(rng) for _ in range(32)]
        captions = [world.caption(s, full=True) for s in scenes]
        with torch.no_grad():
            z = image(data.clip_input(scenes, cfg.clip_image).to(dev))
            x = sample_decoder(m["text_proj"], m["decoder"], tok, text, z, captions, cfg.base, dev)
        verdicts = [judge(im.numpy()) for im in to_uint8(x)]
        return _accuracy(verdicts, [scene_attributes(s) for s in scenes])

    def save(m):
        save_component(m["text_proj"], ctx.out, "text_proj", torch.float16)
        save_component(m["decoder"], ctx.out, "decoder", torch.float16)

    return Stage("decoder", {"text_proj": proj, "decoder": dec}, loss, evaluate, save)


def sample_decoder(proj, dec, tok, text, z, captions, size, dev) -> torch.Tensor:
    """Images of 25 DDIM steps at the model's decoder guidance (GENERATION, the engine's default for it)."""
    N = z.shape[0]
    e, H, m = encode_text(tok, text, [""] * N + list(captions), dev)
    cond = torch.cat([torch.zeros(N), torch.ones(N)]).to(dev)
    class_emb, context, cmask = proj(torch.cat([z, z]), cond, e, H, m)
    x = torch.randn((N, 3, size, size), generator=torch.Generator().manual_seed(0)).to(dev)
    return _ddim(lambda x, t, i: dec(x, t, class_emb, context, cmask), GENERATION["decoder_guidance"], 3, x,
                 step_table(25), clip=1.0)


# --- upsamplers ----------------------------------------------------------------------------------------------

def sr_stage(ctx: Context, stage: str) -> Stage:
    cfg, dev = ctx.cfg, ctx.device
    net = SuperRes(cfg.superres(stage)).to(dev)
    size = cfg.base * (4 if stage == "sr256" else 16)
    crop = cfg.sr256_crop if stage == "sr256" else cfg.sr1024_crop
    sch = cfg.sr256 if stage == "sr256" else cfg.sr1024
    sched = losses.Schedule()
    pairs = data.SRData(size, crop, max_blur=1.0 if stage == "sr256" else 1.5, max_noise=0.04, resize=stage == "sr1024",
                        edge_crop=cfg.sr256_edge_crop if stage == "sr256" else cfg.sr1024_edge_crop)

    def loss():
        hr, low = data.sr_batch(ctx.rng, ctx.gen, sch.batch, pairs)
        hr, low = hr.to(dev), low.to(dev)
        t = torch.randint(0, sched.T, (hr.shape[0],), generator=ctx.gen)
        x_t = sched.noise(hr, t.to(dev), torch.randn(hr.shape, generator=ctx.gen).to(dev))
        with ctx.autocast():
            out = net(x_t, t.to(dev).float(), low).float()
        value = losses.x0_loss(out, hr, t.to(dev), sched, cfg.gamma)
        return value, value.item()

    def evaluate(m):
        """4 scenes upsampled from their clean renders (7 or 15 DDIM steps): judged, and PSNR to the true render."""
        from unclip.engine.pipeline import upsample
        rng = np.random.default_rng(9)
        scenes = [world.sample_scene(rng) for _ in range(4)]
        low = upsample(data.pixels(scenes, size // 4), size).to(dev)
        with torch.no_grad():
            x = torch.randn(low.shape, generator=torch.Generator().manual_seed(0)).to(dev)
            x = _ddim(lambda x, t, i: m[stage](x, t, low), 1.0, None, x, step_table(7 if stage == "sr256" else 15),
                      clip=1.0)
        truth = data.pixels(scenes, size)
        psnr = 10 * np.log10(4 / float((x.cpu().clamp(-1, 1) - truth).pow(2).mean()))
        verdicts = [judge(im.numpy()) for im in to_uint8(x)]
        return f"PSNR {psnr:.1f} dB, " + _accuracy(verdicts, [scene_attributes(s) for s in scenes])

    def save(m):
        for folder in FOLDERS[stage]:
            save_component(m[stage], ctx.out, folder, torch.float16)

    return Stage(stage, {stage: net}, loss, evaluate, save)


def build(stage: str, ctx: Context) -> Stage:
    if stage == "clip":
        return clip_stage(ctx)
    if stage == "prior":
        return prior_stage(ctx)
    if stage == "decoder":
        return decoder_stage(ctx)
    return sr_stage(ctx, stage)

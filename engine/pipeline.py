"""The unCLIP chain: tokenize -> text_encoder -> prior (+CFG) -> un-normalise -> text_proj -> decoder (+CFG)
-> bicubic x4 -> sr256 -> (bicubic x4 -> sr1024) -> uint8 images. Backend-agnostic: every network call goes
through `backend.run(network, inputs)`; samplers and guidance never know which backend runs."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from unclip.engine import samplers
from unclip.engine.schedules import StepTable, table_for
from unclip.engine.spec import ModelSpec

log = logging.getLogger(__name__)

SIZES = (64, 256, 1024)  # the nominal output size of each image stage (decoder, sr256, sr1024)


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    num_images: int = 1
    size: int = 256
    prior_steps: int = 25
    prior_guidance: float = 4.0
    decoder_steps: int = 25
    decoder_guidance: float = 8.0
    sr256_steps: int = 7
    sr1024_steps: int = 15
    sampler: str = "ddim"
    eta: float = 0.0
    negative: str = ""  # the prompt of the unconditional half (prior and decoder)

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size {self.size} is not one of {', '.join(map(str, SIZES))}")
        for name in ("prior_steps", "decoder_steps", "sr256_steps", "sr1024_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_images < 1:
            raise ValueError(f"num-images must be at least 1, got {self.num_images}")
        if self.sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {', '.join(samplers.SAMPLERS)}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


class Noise:
    """Seeded standard-normal draws, independent of the backend: one CPU generator per image (seed + i), drawn in
    diffusers' order, moved to the device. Image i is the same whether it is generated alone or in a batch."""

    def __init__(self, seed: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32, first: int = 0):
        self.gens = [torch.Generator().manual_seed(seed + first + i) for i in range(n)]
        self.device, self.dtype = device, dtype

    def draw(self, shape: tuple) -> torch.Tensor:
        """A (B, ...) draw on the CPU; with B = k * images, image i draws its k rows from its own generator."""
        k, rest = shape[0] // len(self.gens), tuple(shape[1:])
        assert k * len(self.gens) == shape[0], (shape, len(self.gens))
        return torch.cat([torch.randn((k,) + rest, generator=g) for g in self.gens])

    def __call__(self, shape: tuple) -> torch.Tensor:
        return self.draw(shape).to(self.device, self.dtype)

    def upfront(self, shape: tuple, n: int) -> torch.Tensor:
        """n consecutive draws, stacked (n, *shape) and moved to the device in one copy."""
        return torch.stack([self.draw(shape) for _ in range(n)]).to(self.device, self.dtype)

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.gens]

    def set_state(self, state: list[torch.Tensor]) -> None:
        for g, st in zip(self.gens, state):
            g.set_state(st)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize (Pillow-style kernel, a = -0.5), as Karlo / diffusers condition the upsamplers."""
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).to(x.dtype)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = (x.float().clamp(-1, 1) * 0.5 + 0.5) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@dataclass
class Result:
    images: torch.Tensor  # (N, H, W, 3) uint8
    intermediates: dict[str, torch.Tensor] = field(default_factory=dict)
    timesteps: dict[str, list[int]] = field(default_factory=dict)


def _guided(run: Callable, scale: float, eps_channels: int | None = None):
    """Classifier-free guidance as a wrapper of the model function: one call at batch 2N ([uncond; cond]),
    out = u + s (c - u) on the first `eps_channels` channels; the rest (learned variance) from the cond half."""
    if scale == 1.0:
        return run

    def model(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        out = run(torch.cat([x, x]), torch.cat([t, t]), i)
        u, c = out.chunk(2)
        C = eps_channels or out.shape[1]
        guided = u[:, :C] + scale * (c[:, :C] - u[:, :C])
        return torch.cat([guided, c[:, C:]], dim=1) if C < out.shape[1] else guided

    return model


def _sample(settings: Settings, sched: dict, table: StepTable, model, x, noise, progress, stage):
    """Run the chosen sampler for one stage; `model(x, t_batch, i)` is wrapped into the samplers' (x, i) form."""
    t_all = torch.as_tensor(table.timesteps.astype("float32"), device=x.device)  # hoisted: no per-step host work
    n = len(table)

    def fn(x, i):
        return model(x, t_all[i].expand(x.shape[0]), i)

    # Draw this stage's per-step noise up front (same generator order) and move it to the device in one copy,
    # so the step loop does no host work or host-to-device transfer.
    draws = samplers.noise_draws(table, settings.sampler, settings.eta)
    if draws:
        pre = iter(noise.upfront(tuple(x.shape), draws).unbind(0))
        noise = lambda shape: next(pre)  # noqa: E731
    cb = (lambda i, *_: progress(stage, i + 1, n)) if progress else None
    kw = dict(prediction=sched["prediction_type"], clip=sched["clip_sample_range"] if sched["clip_sample"] else 1e9,
              callback=cb)
    if settings.sampler == "ddim":
        return samplers.ddim(fn, x, table, noise, eta=settings.eta, **kw)
    return samplers.unclip(fn, x, table, noise, variance=sched["variance_type"], **kw)


@dataclass
class Text:
    """Text conditioning of a batch: [uncond; cond] rows when guided (2N), cond rows only otherwise."""
    ids: torch.Tensor  # (R, 77) int64
    mask: torch.Tensor  # (R, 77) int64
    e: torch.Tensor  # text_embeds (R, D)
    H: torch.Tensor  # text_hidden (R, 77, W)
    m: torch.Tensor  # mask as the backend's float dtype (R, 77)
    guided: bool

    def cond(self) -> "Text":
        n = self.e.shape[0] // 2 if self.guided else self.e.shape[0]
        return Text(self.ids[-n:], self.mask[-n:], self.e[-n:], self.H[-n:], self.m[-n:], False)


def guided_any(settings: Settings) -> bool:
    return settings.prior_guidance != 1.0 or settings.decoder_guidance != 1.0


def encode_text(backend, spec: ModelSpec, prompts: list[str], settings: Settings, negative: list[str] | None = None
                ) -> Text:
    tok = spec.tokenizer
    ids, mask = tok(prompts)  # (N, 77)
    guide = guided_any(settings)
    if guide:
        ids_u, mask_u = tok(negative if negative is not None else [settings.negative] * len(prompts))
        ids, mask = torch.cat([ids_u, ids]), torch.cat([mask_u, mask])  # [uncond; cond] (2N, 77)
    out = backend.run("text_encoder", {"input_ids": ids.to(backend.device)})
    return Text(ids, mask, out["text_embeds"], out["text_hidden"], mask.to(backend.device, backend.dtype), guide)


def sample_prior(backend, spec: ModelSpec, settings: Settings, text: Text, noise: Noise, progress=None,
                 candidates: int = 1, dump: dict | None = None) -> torch.Tensor:
    """Diffusion prior (+CFG) -> un-normalised CLIP image embeddings z (N, D). With candidates k > 1 it samples k
    embeddings per image in one batch and keeps the one with the largest dot product with the text embedding
    (the paper's best-of-2)."""
    dtype, k = backend.dtype, candidates
    use = text if settings.prior_guidance != 1.0 else text.cond()
    e, H, m = (v.repeat_interleave(k, dim=0) for v in (use.e, use.H, use.m))  # (R*k, ...)
    N = text.cond().e.shape[0]
    s = spec.schedulers["prior"]
    table = table_for(SimpleNamespace(**s), settings.prior_steps)

    def prior_run(x, t, i):
        return backend.run("prior", {"x_t": x.to(dtype), "t": t, "text_embeds": e, "text_hidden": H,
                                     "text_mask": m})["x0"].float()

    x = noise((N * k, spec.embed_dim))
    if dump is not None:
        dump["prior_noise"] = x
        dump.setdefault("_timesteps", {})["prior"] = table.timesteps.tolist()
    x = _sample(settings, s, table, _guided(prior_run, settings.prior_guidance), x, noise, progress, "prior")
    dev = x.device
    z = x * torch.tensor(spec.clip_std, device=dev) + torch.tensor(spec.clip_mean, device=dev)  # (N*k, D)
    if k > 1:
        scores = (z.view(N, k, -1) * text.cond().e.float()[:, None]).sum(-1)  # (N, k) dot with the text embedding
        best = scores.argmax(dim=1)  # (N,)
        if dump is not None:
            dump["prior_candidates"], dump["prior_scores"] = z.view(N, k, -1), scores
        z = z.view(N, k, -1)[torch.arange(N, device=dev), best]
    return z


def finish(backend, spec: ModelSpec, settings: Settings, z: torch.Tensor, text: Text, noise: Noise, progress,
           out: "Result", x_T: torch.Tensor | None = None) -> torch.Tensor:
    """text_proj + decoder (+CFG) + upsamplers -> (N, H, W, 3) uint8 images."""
    image = decode(backend, spec, settings, z, text, noise, progress, out, x_T)
    if settings.size >= 256:
        image = upsample_stage(backend, spec, settings, "sr256", image, noise, progress, out)
    if settings.size >= 1024:
        image = upsample_stage(backend, spec, settings, "sr1024", image, noise, progress, out)
    return to_uint8(image)


def generate(backend, spec: ModelSpec, prompt: str | list[str], settings: Settings = Settings(),
             progress: Callable[[str, int, int], None] | None = None, noise: Noise | None = None,
             first_image: int = 0, keep: bool = False, candidates: int = 1) -> Result:
    """Generate settings.num_images images for one prompt (or one image per prompt of a list).

    `first_image` offsets the per-image noise seeds (used to split large requests into chunks)."""
    if settings.size == 1024 and spec.sr1024_size is None:
        raise ValueError(f"model {spec.name!r} has no 256->1024 stage (no sr1024/ folder); use --size 256 or 64")
    prompts = [prompt] * settings.num_images if isinstance(prompt, str) else list(prompt)
    noise = noise or Noise(settings.seed, len(prompts), backend.device, torch.float32, first=first_image)
    out = Result(images=torch.empty(0))
    text = encode_text(backend, spec, prompts, settings)
    out.intermediates.update(tokens=text.ids, text_embeds=text.e, text_hidden=text.H, text_mask=text.mask)
    z = sample_prior(backend, spec, settings, text, noise, progress, candidates, out.intermediates)
    out.timesteps["prior"] = out.intermediates.pop("_timesteps")["prior"]
    out.intermediates["image_embeds"] = z
    out.images = finish(backend, spec, settings, z, text, noise, progress, out)
    if not keep:
        out.intermediates = {}
    return out


def decoder_model(backend, settings: Settings, z: torch.Tensor, text: Text):
    """text_proj once (hoisted out of the step loop), then the guided decoder as a model function (x, t, i) -> out
    with guidance on the eps channels and the learned variance from the conditional half."""
    N, dev, dtype = z.shape[0], backend.device, backend.dtype
    if text.guided and settings.decoder_guidance != 1.0:
        cond = torch.cat([torch.zeros(N), torch.ones(N)]).to(dev, dtype)  # [null image embedding; z]
        zz, t_in = torch.cat([z, z]), text
    else:
        cond, zz, t_in = torch.ones(N, device=dev, dtype=dtype), z, text.cond()
    c = backend.run("text_proj", {"image_embeds": zz.to(dtype), "cond": cond, "text_embeds": t_in.e,
                                  "text_hidden": t_in.H, "text_mask": t_in.m})

    def run(x, t, i):
        return backend.run("decoder", {"x_t": x.to(dtype), "t": t, "class_emb": c["class_emb"],
                                       "context": c["context"], "context_mask": c["context_mask"]})["out"].float()

    return _guided(run, settings.decoder_guidance, eps_channels=3)


def decode(backend, spec: ModelSpec, settings: Settings, z, text: Text, noise, progress, out: Result,
           x_T: torch.Tensor | None = None):
    """The 64 px decoder; returns x64 in [-1, 1] (N, 3, S, S). `x_T` (an inversion) replaces the initial noise."""
    N = z.shape[0]
    s = spec.schedulers["decoder"]
    table = table_for(SimpleNamespace(**s), settings.decoder_steps)
    S = spec.decoder_size
    x = noise((N, 3, S, S))  # drawn even when replaced, so later draws don't depend on x_T
    if x_T is not None:
        x = x_T.to(x)
    out.intermediates["decoder_noise"] = x
    x = _sample(settings, s, table, decoder_model(backend, settings, z, text), x, noise, progress, "decoder")
    x = x.clamp(-1, 1)
    out.intermediates["image_64"] = x
    out.timesteps["decoder"] = table.timesteps.tolist()
    return x


def upsample_stage(backend, spec: ModelSpec, settings: Settings, stage: str, low: torch.Tensor, noise, progress,
                   out: Result) -> torch.Tensor:
    """sr256 (first-steps network, then the last-step network for the final step) or sr1024; no guidance."""
    N, dtype = low.shape[0], backend.dtype
    size = spec.sr256_size if stage == "sr256" else spec.sr1024_size
    steps = settings.sr256_steps if stage == "sr256" else settings.sr1024_steps
    s = spec.schedulers[stage]
    table = table_for(SimpleNamespace(**s), steps)
    low_res = upsample(low.clamp(-1, 1), size).to(dtype)  # hoisted out of the step loop
    first, last = ("sr256_first", "sr256_last") if stage == "sr256" else ("sr1024", "sr1024")

    def sr_run(x, t, i):
        net = last if i == len(table) - 1 else first
        return backend.run(net, {"x_t": x.to(dtype), "t": t, "low_res": low_res})["eps"].float()

    x = noise((N, 3, size, size))
    out.intermediates[f"{stage}_noise"] = x
    x = _sample(settings, s, table, sr_run, x, noise, progress, stage)
    out.intermediates[f"image_{256 if stage == 'sr256' else 1024}"] = x
    out.timesteps[stage] = table.timesteps.tolist()
    return x


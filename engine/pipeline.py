"""The unCLIP chain, one function per stage, each returning what it made:

    encode_text -> sample_prior -> un-normalise -> conditioning (text_proj) -> decode -> upsample (sr256, sr1024)

Backend-agnostic: every network call is `backend.run(network, feed)` with fp32 (and int64) tensors, and a
backend's outputs are valid until its next call of the same network (TensorRT, static CUDA-graph buffers), so
what this module keeps across calls it copies (`kept`). Guided stages run one call at batch 2N, rows
[unconditional; conditional]; which stages are guided is decided by unclip.core.stages.guided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from unclip.core import values
from unclip.core.errors import NonFiniteError, RequestError
from unclip.core.spec import ModelSpec
from unclip.core.stages import IMAGE_STAGES, NETWORK_STAGE, STAGES, can_guide, guided
from unclip.engine import samplers
from unclip.engine.schedules import table_for

Progress = Callable[[str, int, int], None]
MAX_SEED = 2 ** 63 - 1


# diffusers' UnCLIPPipeline defaults (sr1024: Karlo's own sampling script), used where a model has no own
KARLO_GUIDANCE = {"prior_guidance": 4.0, "decoder_guidance": 8.0}
KARLO_STEPS = {"prior_steps": 25, "decoder_steps": 25, "sr256_steps": 7, "sr1024_steps": 15}
KARLO_DEFAULTS = {**KARLO_GUIDANCE, **KARLO_STEPS}


def for_model(settings: Settings, spec: ModelSpec) -> Settings:
    """`settings` with each guidance scale and step count left at None set to the model's own (spec.defaults, from
    the folder's generation_config.json), or else to Karlo's; a step count over its stage's trained timesteps is
    refused. Every entry point calls it; a resolved Settings passes unchanged."""
    unset = [k for k in KARLO_DEFAULTS if getattr(settings, k) is None]
    if unset:
        kind = {**dict.fromkeys(KARLO_GUIDANCE, float), **dict.fromkeys(KARLO_STEPS, int)}
        settings = replace(settings, **{k: kind[k](spec.defaults.get(k, KARLO_DEFAULTS[k])) for k in unset})
    sizes, size = image_sizes(spec), settings.size or max(image_sizes(spec))  # the stages that run up to the size
    runs = IMAGE_STAGES[:IMAGE_STAGES.index(sizes[size]) + 1] if size in sizes else IMAGE_STAGES  # (a bad size: later)
    for stage in (STAGES[s] for s in ("prior", *runs)):  # more steps than trained timesteps would repeat timesteps
        trained = spec.schedulers.get(stage.scheduler, {}).get("num_train_timesteps")
        n = getattr(settings, stage.steps)
        if trained and n > trained:
            where = (f"the model's generation_config.json sets {stage.steps} {n}," if stage.steps in unset else
                     f"--{stage.steps.replace('_', '-')} {n} is")
            raise RequestError(f"{where} more than the {trained} timesteps {stage.name} was trained with; pass "
                               f"--{stage.steps.replace('_', '-')} {trained} or fewer")
    return settings


@dataclass(frozen=True)
class Settings:
    """The numbers of a generation. Checked here, once; each error names its command-line flag."""
    seed: int = 0
    num_images: int = 1
    size: int | None = None  # image side in pixels, one of the model's stage sizes (None: its largest)
    prior_steps: int | None = None  # None: the model's count (generation_config.json), else Karlo's 25
    prior_guidance: float | None = None  # None: the model's scale (generation_config.json), else Karlo's 4
    decoder_steps: int | None = None  # None: the model's, else 25
    decoder_guidance: float | None = None  # None: the model's scale, else Karlo's 8
    sr256_steps: int | None = None  # None: the model's, else 7
    sr1024_steps: int | None = None  # None: the model's, else 15
    sampler: str = "ddim"
    eta: float = 0.0
    negative: str = ""  # the prompt of the unconditional half (prior and decoder)

    def __post_init__(self):
        for name in ("seed", "num_images", "size", *KARLO_STEPS):  # types first: a notebook's numpy ints are fine
            object.__setattr__(self, name, values.whole(name, getattr(self, name), optional=name not in (
                "seed", "num_images")))
        for name in (*KARLO_GUIDANCE, "eta"):
            object.__setattr__(self, name, values.real(name, getattr(self, name), optional=name != "eta"))
        for name in ("sampler", "negative"):
            values.text(name, getattr(self, name))
        for name in ("prior_steps", "decoder_steps", "sr256_steps", "sr1024_steps", "num_images"):
            v = getattr(self, name)
            if (v is not None or name == "num_images") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {v}")
        for name in ("prior_guidance", "decoder_guidance", "eta"):  # guidance >= 0, as generation_config.json's
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and (name == "eta" or v >= 0)):
                raise RequestError(f"--{name.replace('_', '-')} must be a finite number"
                                   f"{'' if name == 'eta' else ' >= 0'}, got {v}")
        if self.sampler not in samplers.CHOICES:
            raise RequestError(f"--sampler {self.sampler!r} is not one of {', '.join(samplers.CHOICES)}")
        if self.eta < 0:
            raise RequestError(f"--eta must be >= 0, got {self.eta}")
        if self.num_images > MAX_SEED:  # else the seed's range below would be negative and blame --seed
            raise RequestError(f"--num-images {self.num_images} is more than the 2^63 seeds there are (image i uses "
                               "seed + i); a run is capped at --max-images (1000 unless raised)")
        if not 0 <= self.seed <= MAX_SEED - self.num_images + 1:
            raise RequestError(f"--seed must be in 0 ... 2^63 - 1 - (images - 1) = {MAX_SEED - self.num_images + 1} "
                               f"(image i uses seed + i), got {self.seed}")


def image_sizes(spec: ModelSpec) -> dict[int, str]:
    """The image side in pixels that each image stage of the model makes -> the stage (Karlo: 64, 256)."""
    sizes = {spec.decoder_size: "decoder", spec.sr256_size: "sr256"}
    if spec.sr1024_size is not None:
        sizes[spec.sr1024_size] = "sr1024"
    return sizes


def final_stage(spec: ModelSpec, size: int | None) -> str:
    """The stage that makes images of `size` pixels (None: the model's largest); a RequestError lists the sizes."""
    sizes = image_sizes(spec)
    if size is None:
        return sizes[max(sizes)]
    if size not in sizes:
        raise RequestError(f"--size {size} is not an image size of model {spec.name!r} (its sizes: "
                           f"{', '.join(map(str, sorted(sizes)))})")
    return sizes[size]


class Noise:
    """Seeded standard-normal draws, independent of the backend: one CPU generator per image (seed + i), drawn in
    diffusers' order, moved to the device. Image i draws the same noise whether it is generated alone or in a batch
    (the networks' arithmetic at another batch size may still differ in the last bits: a grey level here and there)."""

    def __init__(self, seed: int, n: int, device: torch.device, first: int = 0):
        self.gens = [torch.Generator().manual_seed(seed + first + i) for i in range(n)]
        self.device = device

    @classmethod
    def from_seeds(cls, seeds: list[int], device: torch.device) -> Noise:
        """One generator per image with its own seed (images of different requests batched together)."""
        noise = cls(0, 0, device)
        noise.gens = [torch.Generator().manual_seed(s) for s in seeds]
        return noise

    @classmethod
    def from_states(cls, states: list[torch.Tensor], device: torch.device) -> Noise:
        """Generators that continue where others stopped (get_state): a pipeline split across processes."""
        noise = cls(0, 0, device)
        noise.gens = [torch.Generator() for _ in states]
        noise.set_state(states)
        return noise

    def draw(self, shape: tuple) -> torch.Tensor:
        """A (B, ...) draw on the CPU; with B = k * images, image i draws its k rows from its own generator."""
        k, rest = shape[0] // len(self.gens), tuple(shape[1:])
        assert k * len(self.gens) == shape[0], (shape, len(self.gens))
        return torch.cat([torch.randn((k,) + rest, generator=g) for g in self.gens])

    def __call__(self, shape: tuple) -> torch.Tensor:
        return self.draw(shape).to(self.device)

    def upfront(self, shape: tuple, n: int) -> torch.Tensor:
        """n consecutive draws, stacked (n, *shape) and moved to the device in one copy."""
        if n == 0:
            return torch.empty((0, *shape), device=self.device)
        return torch.stack([self.draw(shape) for _ in range(n)]).to(self.device)

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.gens]

    def set_state(self, state: list[torch.Tensor]) -> None:
        for g, st in zip(self.gens, state):
            g.set_state(st)


def kept(t: torch.Tensor) -> torch.Tensor:
    """A copy of a backend output that must outlive the next call of its network."""
    return t.clone()


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize (Pillow-style kernel, a = -0.5), as Karlo / diffusers condition the upsamplers."""
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = (x.float().clamp(-1, 1) * 0.5 + 0.5) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def check_finite(x: torch.Tensor, stage: str, outputs_finite: torch.Tensor | bool = True) -> torch.Tensor:
    """Refuse a stage whose result or network outputs hold NaN or inf (once per stage: one host sync)."""
    if not bool(torch.isfinite(x).all() & torch.as_tensor(outputs_finite, device=x.device)):
        raise NonFiniteError(f"the {stage} stage produced NaN or inf values (its network overflows in this "
                             "precision, or the model's weights hold NaN/inf); try --precision fp32, or check the "
                             "model folder")
    return x


def guide(run: Callable, scale: float, channels: int | None = None) -> Callable:
    """Classifier-free guidance around a model function run(x, t, i): one call at batch 2N ([uncond; cond]),
    out = u + s (c - u) on the first `channels` channels; the rest (a learned variance) from the conditional half.
    Callers wrap a stage's network with it when unclip.core.stages.guided says the stage is guided."""
    if scale is None:
        raise ValueError("guidance scale unresolved: pass the settings through for_model(settings, spec) first")

    def model(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        out = run(torch.cat([x, x]), torch.cat([t, t]), i)
        u, c = out.chunk(2)
        C = channels or out.shape[1]
        guided_ = u[:, :C] + scale * (c[:, :C] - u[:, :C])
        return torch.cat([guided_, c[:, C:]], dim=1) if C < out.shape[1] else guided_

    return model


def sample_stage(spec: ModelSpec, settings: Settings, stage: str, model: Callable, x: torch.Tensor, noise: Noise,
                 progress: Progress | None = None) -> torch.Tensor:
    """Run the chosen sampler over one diffusion stage; model(x, t_batch, i) -> network output (guided)."""
    settings = for_model(settings, spec)
    s = spec.schedulers[stage]
    table = table_for(SimpleNamespace(**s), getattr(settings, STAGES[stage].steps))
    t_all = torch.as_tensor(table.timesteps.astype("float32"), device=x.device)  # no per-step host work
    sampler = samplers.get(settings.sampler)
    # The stage's step noise, drawn up front in the generators' order and copied to the device once.
    pre = noise.upfront(tuple(x.shape), sampler.draws(table, settings.eta))
    denoise = samplers.denoiser(lambda x, i: model(x, t_all[i].expand(x.shape[0]), i), table, s["prediction_type"],
                                s["clip_sample_range"] if s["clip_sample"] else 1e9, s["variance_type"])
    n = len(table)
    cb = (lambda i, *_: progress(stage, i + 1, n)) if progress else None
    x = sampler.sample(denoise, x, table, pre, eta=settings.eta, callback=cb)
    return check_finite(x, stage, denoise.finite)


@dataclass
class Text:
    """Text conditioning of a batch: [uncond; cond] rows when guided (2N), cond rows only otherwise."""
    ids: torch.Tensor  # (R, T) int64
    mask: torch.Tensor  # (R, T) float 0/1
    e: torch.Tensor  # text_embeds (R, D)
    H: torch.Tensor  # text_hidden (R, T, W)
    guided: bool

    def cond(self) -> Text:
        n = self.e.shape[0] // 2 if self.guided else self.e.shape[0]
        return Text(self.ids[-n:], self.mask[-n:], self.e[-n:], self.H[-n:], False)

    def feed(self) -> dict[str, torch.Tensor]:
        return {"text_embeds": self.e, "text_hidden": self.H, "text_mask": self.mask}


def encode_text(backend, spec: ModelSpec, prompts: list[str], settings: Settings,
                negatives: list[str] | None = None) -> Text:
    tok = spec.tokenizer
    ids, mask = tok(prompts)  # (N, T)
    guide_ = guided("text_encoder", for_model(settings, spec))
    if guide_:
        ids_u, mask_u = tok(negatives if negatives is not None else [settings.negative] * len(prompts))
        ids, mask = torch.cat([ids_u, ids]), torch.cat([mask_u, mask])  # [uncond; cond] (2N, T)
    out = backend.run("text_encoder", {"input_ids": ids.to(backend.device)})
    check_finite(out["text_embeds"], "text_encoder", torch.isfinite(out["text_hidden"]).all())
    return Text(ids, mask.to(backend.device, torch.float32), kept(out["text_embeds"]), kept(out["text_hidden"]),
                guide_)


@dataclass
class PriorSample:
    z: torch.Tensor  # (N, D) CLIP image embeddings
    noise: torch.Tensor  # (N*k, D) the initial noise
    candidates: torch.Tensor | None = None  # (N, k, D) with best-of-k
    scores: torch.Tensor | None = None  # (N, k) their dot products with the text embedding


def sample_prior(backend, spec: ModelSpec, settings: Settings, text: Text, noise: Noise, progress=None,
                 candidates: int = 1) -> PriorSample:
    """Diffusion prior (+CFG) -> un-normalised CLIP image embeddings. With k candidates it samples k embeddings per
    image in one batch and keeps the one with the largest dot product with the text embedding (paper: best of 2)."""
    settings = for_model(settings, spec)
    k = candidates
    use = text if guided("prior", settings) else text.cond()
    feed = {n: v.repeat_interleave(k, dim=0) for n, v in use.feed().items()}  # (R*k, ...)
    N = text.cond().e.shape[0]

    def run(x, t, i):
        return backend.run("prior", {"x_t": x, "t": t, **feed})["x0"]

    x_T = noise((N * k, spec.embed_dim))
    model = guide(run, settings.prior_guidance) if guided("prior", settings) else run
    x = sample_stage(spec, settings, "prior", model, x_T, noise, progress)
    dev = x.device
    z = x * torch.tensor(spec.clip_std, device=dev) + torch.tensor(spec.clip_mean, device=dev)  # (N*k, D)
    if k == 1:
        return PriorSample(z, x_T)
    cand = z.view(N, k, -1)
    scores = (cand * text.cond().e[:, None]).sum(-1)  # (N, k) dot product with the text embedding
    return PriorSample(cand[torch.arange(N, device=dev), scores.argmax(dim=1)], x_T, cand, scores)


def decoder_model(backend, settings: Settings, z: torch.Tensor, text: Text) -> Callable:
    """text_proj once (hoisted out of the step loop), then the guided decoder as a model function (x, t, i) -> out
    with guidance on the image channels and the learned variance from the conditional half."""
    N, dev = z.shape[0], backend.device
    if guided("text_proj", settings):
        cond = torch.cat([torch.zeros(N), torch.ones(N)]).to(dev)  # [null image embedding; z]
        zz, t_in = torch.cat([z, z]), text
    else:
        cond, zz, t_in = torch.ones(N, device=dev), z, text.cond()
    c = {k: kept(v) for k, v in backend.run("text_proj", {"image_embeds": zz, "cond": cond, **t_in.feed()}).items()}

    def run(x, t, i):
        return backend.run("decoder", {"x_t": x, "t": t, **c})["out"]

    if not guided("decoder", settings):
        return run
    return guide(run, settings.decoder_guidance, channels=STAGES["decoder"].out_channels)


def decode(backend, spec: ModelSpec, settings: Settings, z: torch.Tensor, text: Text, noise: Noise, progress=None,
           x_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder: (x in [-1, 1] (N, 3, S, S), its initial noise). `x_T` (an inversion) replaces the noise."""
    settings = for_model(settings, spec)
    S = spec.decoder_size
    drawn = noise((z.shape[0], 3, S, S))  # drawn even when replaced, so later draws don't depend on x_T
    start = drawn if x_T is None else x_T.to(drawn)
    x = sample_stage(spec, settings, "decoder", decoder_model(backend, settings, z, text), start, noise, progress)
    return x.clamp(-1, 1), start


def upsample_stage(backend, spec: ModelSpec, settings: Settings, stage: str, low: torch.Tensor, noise: Noise,
                   progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """sr256 (first-steps network, then the last-step network for the final step) or sr1024; no guidance."""
    settings = for_model(settings, spec)
    size = spec.sr256_size if stage == "sr256" else spec.sr1024_size
    steps = getattr(settings, STAGES[stage].steps)
    low_res = upsample(low.clamp(-1, 1), size)  # hoisted out of the step loop
    first, last = STAGES[stage].networks[0], STAGES[stage].networks[-1]

    def run(x, t, i):
        return backend.run(last if i == steps - 1 else first, {"x_t": x, "t": t, "low_res": low_res})["eps"]

    x_T = noise((low.shape[0], 3, size, size))
    return sample_stage(spec, settings, stage, run, x_T, noise, progress), x_T


def images_per_call(backend) -> int:
    """How many images one call of every network takes (guided stages run [uncond; cond]: twice the rows)."""
    return min(backend.max_batch(n) // (2 if can_guide(NETWORK_STAGE[n]) else 1) for n in backend.spec.networks
               if n != "image_encoder")


def timesteps(spec: ModelSpec, settings: Settings) -> dict[str, list[int]]:
    """Each diffusion stage's timesteps for these settings, up to settings.size."""
    settings = for_model(settings, spec)
    last = IMAGE_STAGES.index(final_stage(spec, settings.size))
    return {st: table_for(SimpleNamespace(**spec.schedulers[st]), getattr(settings, STAGES[st].steps)).timesteps.tolist()
            for st in ("prior", *IMAGE_STAGES[:last + 1])}


@dataclass
class Result:
    images: torch.Tensor  # (N, H, W, 3) uint8
    intermediates: dict[str, torch.Tensor] = field(default_factory=dict)  # with keep=True


def finish(backend, spec: ModelSpec, settings: Settings, z: torch.Tensor, text: Text, noise: Noise, progress=None,
           x_T: torch.Tensor | None = None) -> Result:
    """Image embeddings -> decoder -> upsamplers up to settings.size -> (N, H, W, 3) uint8, with each stage's
    initial noise and image as intermediates."""
    settings = for_model(settings, spec)
    last = IMAGE_STAGES.index(final_stage(spec, settings.size))
    image, start = decode(backend, spec, settings, z, text, noise, progress, x_T)
    inter = {"image_embeds": z, "decoder_noise": start, "image_decoder": image}
    for stage in IMAGE_STAGES[1:last + 1]:
        image, start = upsample_stage(backend, spec, settings, stage, image, noise, progress)
        inter.update({f"{stage}_noise": start, f"image_{stage}": image})
    return Result(to_uint8(image), inter)


def check_call(backend, spec: ModelSpec, settings: Settings) -> None:
    """What a direct caller of generate() or the unclip.engine.manipulate functions passes: Settings, and the spec of
    this backend's model (another model's would index its networks out of range; its generation defaults may
    differ: they are the caller's to choose)."""
    if not isinstance(settings, Settings):
        raise RequestError(f"settings must be an unclip.engine.pipeline.Settings, got {settings!r} "
                           f"({type(settings).__name__}); e.g. Settings(seed=1, num_images=4)")
    if spec is not backend.spec and replace(spec, defaults={}) != replace(backend.spec, defaults={}):
        which = (f"that of model {spec.name!r}, and the backend runs model {backend.spec.name!r}"
                 if spec.name != backend.spec.name else f"that of another version of model {spec.name!r} than the "
                 "backend's")
        raise RequestError(f"spec is {which}; pass backend.spec")


def generate(backend, spec: ModelSpec, prompt: str | list[str], settings: Settings = Settings(),
             progress: Progress | None = None, first_image: int = 0, keep: bool = False,
             candidates: int = 1) -> Result:
    """settings.num_images images of one prompt, or one image per prompt of a list; image i draws its noise from
    seed + first_image + i, so a request split into chunks draws the same noise as one batch (and gives the same
    images within the last bits of the networks' arithmetic at each batch size)."""
    check_call(backend, spec, settings)
    settings = for_model(settings, spec)
    final_stage(spec, settings.size)  # refuse a size the model doesn't make before any work
    prompts = [prompt] * settings.num_images if isinstance(prompt, str) else values.texts("prompts", prompt)
    if not prompts:
        raise RequestError("no prompts: pass a prompt (str, \"\" for unconditional) or a non-empty list of them")
    if values.whole("prior_candidates", candidates) < 1:
        raise RequestError(f"--prior-candidates must be at least 1, got {candidates}")
    noise = Noise(settings.seed, len(prompts), backend.device, first=first_image)
    text = encode_text(backend, spec, prompts, settings)
    prior = sample_prior(backend, spec, settings, text, noise, progress, candidates)
    res = finish(backend, spec, settings, prior.z, text, noise, progress)
    if not keep:
        return Result(res.images)
    res.intermediates.update(tokens=text.ids, text_embeds=text.e, text_hidden=text.H, text_mask=text.mask,
                             prior_noise=prior.noise)
    if prior.candidates is not None:
        res.intermediates.update(prior_candidates=prior.candidates, prior_scores=prior.scores)
    return res

"""The paper's image manipulations (section 3): variations (optionally from a DDIM inversion), interpolations
between two image embeddings, and text diffs; all on the same engines as text-to-image generation."""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from unclip.core import values
from unclip.core.errors import RequestError
from unclip.core.spec import ModelSpec
from unclip.engine import samplers
from unclip.engine.pipeline import (
    Noise,
    Result,
    Settings,
    Text,
    check_call,
    decoder_model,
    encode_text,
    finish,
    for_model,
    kept,
    sample_prior,
    upsample,
)
from unclip.engine.schedules import table_for

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageInputError(RequestError):
    """An input image that can't be used; the message names the file and the fix."""


def load_image(path: str | Path):
    """Open any image file as RGB (alpha composited on white, palette, greyscale and 16-bit converted). Images
    over Pillow's decompression-bomb limit (about 179 megapixels) are refused."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise ImageInputError(f"{path}: no such file; pass an image file (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{path}: the image is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} "
                              "pixels); pass a smaller image") from None
    except PermissionError:
        raise ImageInputError(f"{path}: permission denied; pass an image file you can read") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"{path}: not a readable image ({e.__class__.__name__}); pass a PNG, JPEG or WebP "
                              "file") from None
    return _rgb(img)


def image_input(img, name: str = "the image"):
    """What a Python caller passes as an image: a file's path (str or pathlib.Path), a PIL image of any mode, or a
    uint8 array (H, W), (H, W, 3) or (H, W, 4); as RGB, converted as load_image converts files."""
    from PIL import Image
    if isinstance(img, (str, os.PathLike)):
        return load_image(img)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)) \
                or 0 in img.shape:
            raise ImageInputError(f"{name}: an array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got "
                                  f"{img.dtype} {img.shape}; e.g. np.asarray(pil_image.convert('RGB'))")
        img = Image.fromarray(img)
    if not isinstance(img, Image.Image):
        raise ImageInputError(f"{name} must be an image file's path, a PIL image or a uint8 array (H, W, 3), got "
                              f"{type(img).__name__}")
    return _rgb(img)


def _rgb(img):
    """Any PIL image as RGB: alpha composited on white, palette, greyscale and 16-bit converted."""
    from PIL import Image
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit greyscale: scale, don't clip
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") else (1.0 if a.max() <= 1.0 else 255.0)  # I: 16-bit sources
        img = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def clip_pixels(img, size: int) -> torch.Tensor:
    """CLIP preprocessing: shortest edge to `size` (bicubic), centre crop, /255, normalise -> (1, 3, size, size)."""
    from PIL import Image
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, int(w * scale)), max(size, int(h * scale))  # floor, as CLIP's processor
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return x[None]


def image_embedding(backend, spec: ModelSpec, img) -> torch.Tensor:
    if spec.image_size is None:
        raise ImageInputError(f"model {spec.name!r} has no image encoder (no image_encoder/ folder); use a model "
                              "that has one, e.g. kakaobrain/karlo-v1-alpha-image-variations")
    px = clip_pixels(img, spec.image_size).to(backend.device)
    return kept(backend.run("image_encoder", {"pixel_values": px})["image_embeds"])  # (1, D)


def empty_text(backend, spec: ModelSpec, settings: Settings, n: int) -> Text:
    """The prompt "" on both guidance halves, as Karlo / diffusers do for variations."""
    return encode_text(backend, spec, [""] * n, settings, negatives=[""] * n)


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """Spherical interpolation of directions, with the norm interpolated linearly (theta=0: a, theta=1: b)."""
    if theta == 0.0:  # exact endpoints: float rounding would otherwise move them by 1e-7
        return a.clone()
    if theta == 1.0:
        return b.clone()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    if float(so.abs().min()) < 1e-6:  # (anti)parallel: fall back to linear
        u = (1 - theta) * ua + theta * ub
    else:
        u = (torch.sin((1 - theta) * omega) * ua + torch.sin(theta * omega) * ub) / so
    return u * ((1 - theta) * na + theta * nb)


def ddim_invert(backend, spec: ModelSpec, settings: Settings, z: torch.Tensor, text: Text, image: torch.Tensor,
                fixed_point_iters: int = 4) -> torch.Tensor:
    """x0 (N, 3, S, S) in [-1, 1] -> x_T by running deterministic DDIM backwards through the guided decoder
    (paper section 3.1). Decoding step i uses eps(x_t, t_i) at the point it starts from, which inversion doesn't
    know yet: each step is solved by fixed-point iteration x_t = F(eps(x_t, t_i)), starting from eps at the
    current point, so that decoding the result with eta = 0 retraces the same path."""
    settings = for_model(settings, spec)
    N, dev = z.shape[0], backend.device
    sched = spec.schedulers["decoder"]
    table = table_for(SimpleNamespace(**sched), settings.decoder_steps)
    model = decoder_model(backend, settings, z, text)  # guided as decoding will be
    # The network's own (unclipped) eps: at a fixed point whose x0 lies inside the clip range, decoding's clipped
    # x0 and recomputed eps are the same, so decoding retraces the path. Starting from clipped values instead
    # would never find it at the noisy end, where x0 = x_t / sqrt(abar_t) is clipped for almost every x_t.
    denoise = samplers.denoiser(lambda x, i: model(x, torch.full((N,), float(table.timesteps[i]), device=dev), i),
                                table, sched["prediction_type"], math.inf)
    x = image.float()
    for i in reversed(range(len(table))):  # undo decoding step i: abar_s[i] -> abar_t[i]
        a_t, a_s = float(table.alpha_bar_t[i]), float(table.alpha_bar_s[i])
        x_t = x
        for _ in range(1 + fixed_point_iters):
            eps = (x_t - math.sqrt(a_t) * denoise(x_t, i).x0) / math.sqrt(1 - a_t)
            x0 = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
            x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
        x = x_t
    return x


def variation(backend, spec: ModelSpec, settings: Settings, img, invert: bool = False, progress=None,
              keep: bool = False, first_image: int = 0) -> Result:
    """Variations of an image: its CLIP image embedding -> decoder -> upsamplers, no prior, prompt "" both halves."""
    check_call(backend, spec, settings)
    settings = for_model(settings, spec)
    img = image_input(img)
    n = settings.num_images
    z = image_embedding(backend, spec, img).expand(n, -1)
    text = empty_text(backend, spec, settings, n)
    noise = Noise(settings.seed, n, backend.device, first=first_image)
    x_T = None
    if invert:
        S = spec.decoder_size
        x0 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        x0 = upsample(_center_square(x0), S).clamp(-1, 1).to(backend.device).expand(n, -1, -1, -1)
        x_T = ddim_invert(backend, spec, replace(settings, sampler="ddim"), z, text, x0)
    res = finish(backend, spec, settings, z, text, noise, progress, x_T)
    if not keep:
        return Result(res.images)
    if x_T is not None:
        res.intermediates["inverted_noise"] = x_T
    return res


def _center_square(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = min(h, w)
    return x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def image_or_prompt(item: str):
    """A command-line endpoint: an existing image file is loaded as an image, anything else is a prompt."""
    return load_image(item) if Path(item).is_file() else item


def _endpoint(backend, spec, settings, item, noise: Noise):
    """A prompt (str) or an image (a PIL image, an array or a pathlib.Path) -> (z (1, D), text conditioning for the
    decoder, whether it is a prompt)."""
    if not isinstance(item, str):
        img = image_input(item)
        return image_embedding(backend, spec, img), empty_text(backend, spec, settings, 1), False
    text = encode_text(backend, spec, [item], settings)
    return sample_prior(backend, spec, settings, text, noise).z, text, True


def _blend_text(a: Text, b: Text, theta: float) -> Text:
    """Text conditioning between two prompts: embeddings interpolated, the mask of the nearer end."""
    near = a if theta <= 0.5 else b
    return Text(near.ids, near.mask, (1 - theta) * a.e + theta * b.e, (1 - theta) * a.H + theta * b.H, a.guided)


def interpolate(backend, spec: ModelSpec, settings: Settings, a, b, frames: int, progress=None):
    """Frames (H, W, 3) uint8 of slerp(z_a, z_b, theta), theta = 0 ... 1, yielded one by one, with the decoder and
    upsampler noise fixed across frames. A and B are prompts (str) or images (see image_input); frame 0 and the last
    frame equal plain generation from A and B. The arguments are checked at the call, the frames made as they are
    taken."""
    check_call(backend, spec, settings)
    settings = for_model(settings, spec)
    if values.whole("frames", frames) < 2:
        raise RequestError(f"--frames must be at least 2 for an interpolation (A and B), got {frames}")
    a, b = (x if isinstance(x, str) else image_input(x) for x in (a, b))
    return _interpolate(backend, spec, settings, a, b, frames, progress)


def _interpolate(backend, spec: ModelSpec, settings: Settings, a, b, frames: int, progress):
    noise = Noise(settings.seed, 1, backend.device)
    za, ta, pa = _endpoint(backend, spec, settings, a, noise)
    state_after_a = noise.get_state()
    noise_b = Noise(settings.seed, 1, backend.device)
    zb, tb, _ = _endpoint(backend, spec, settings, b, noise_b)
    # Noise for every frame: the state plain generation has when the decoder starts (after the prior's draws,
    # the same count for any prompt; a fresh generator for images).
    state = state_after_a if pa else Noise(settings.seed, 1, backend.device).get_state()
    for k, theta in enumerate(np.linspace(0.0, 1.0, frames)):
        noise.set_state(state)
        z = slerp(za, zb, float(theta))
        text = _blend_text(ta, tb, float(theta))
        yield finish(backend, spec, settings, z, text, noise, _frame(progress, k, frames)).images[0]


def text_diff(backend, spec: ModelSpec, settings: Settings, source, diff: tuple[str, str], amount: float,
              frames: int = 1, progress=None):
    """Edit toward `after` and away from `before`: z_theta = slerp(z, normalise(e_after - e_before), theta), for
    theta in [0, amount] (one frame: theta = amount), frames yielded one by one; the decoder noise is fixed. The
    arguments are checked at the call, the frames made as they are taken."""
    check_call(backend, spec, settings)
    settings = for_model(settings, spec)
    if not 0.0 <= values.real("amount", amount) <= 1.0:
        raise RequestError(f"--amount {amount} is outside [0, 1]; the paper uses 0.25 to 0.5")
    if values.whole("frames", frames) < 1:
        raise RequestError(f"--frames must be at least 1, got {frames}")
    before, after = values.pair("text_diff", diff)
    source = source if isinstance(source, str) else image_input(source)
    return _text_diff(backend, spec, settings, source, (before, after), amount, frames, progress)


def _text_diff(backend, spec: ModelSpec, settings: Settings, source, diff: tuple[str, str], amount: float,
               frames: int, progress):
    before, after = diff
    pair = encode_text(backend, spec, [before, after], replace(settings, prior_guidance=1.0, decoder_guidance=1.0))
    d = pair.e[1] - pair.e[0]
    if float(d.norm()) < 1e-6 * max(float(pair.e.norm()), 1e-12):
        raise RequestError(f"--text-diff {before!r} {after!r}: the two texts encode the same (the tokenizer "
                           "lower-cases and normalises them), so there is no direction to move in; give two "
                           "different texts")
    noise = Noise(settings.seed, 1, backend.device)
    z, text, _ = _endpoint(backend, spec, settings, source, noise)
    state = noise.get_state()
    z_d = (d / d.norm().clamp_min(1e-12))[None] * z.norm(dim=-1, keepdim=True)  # direction of the diff, |z|
    thetas = [amount] if frames == 1 else list(np.linspace(0.0, amount, frames))
    for k, theta in enumerate(thetas):
        noise.set_state(state)
        z_t = slerp(z, z_d, float(theta))
        yield finish(backend, spec, settings, z_t, text, noise, _frame(progress, k, len(thetas))).images[0]


def _frame(progress, k: int, n: int):
    return progress if progress is None or n == 1 else (lambda s, i, m: progress(f"frame {k + 1}/{n} {s}", i, m))


def contact_sheet(images: list[torch.Tensor]) -> torch.Tensor:
    """Frames (H, W, 3) uint8 side by side -> one (H, n*W, 3) image."""
    return torch.cat(images, dim=1)

"""Training batches of the shapes world for every stage: scenes with captions, pixels as each network sees them,
and (high-res crop, degraded low-res) pairs for the upsamplers. Every draw comes from the generator passed in, so
a seed fixes the data."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from unclip.demo import world
from unclip.demo.judge import ATTRIBUTES, scene_attributes
from unclip.engine.manipulate import CLIP_MEAN, CLIP_STD
from unclip.engine.pipeline import upsample

_VALUES = {"background": world.COLOURS, "colour": world.COLOURS, "shape": world.SHAPES, "size": tuple(world.SIZES),
           "position": tuple(world.POSITIONS)}


def scenes_and_captions(rng: np.random.Generator, n: int) -> tuple[list[world.Scene], list[str]]:
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return scenes, [world.caption(s, rng) for s in scenes]


def pixels(scenes: list[world.Scene], size: int) -> torch.Tensor:
    """Rendered scenes as (n, 3, size, size) float32 in [-1, 1] (the diffusion stages' image space)."""
    arr = np.stack([world.render(s, size) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def clip_input(scenes: list[world.Scene], size: int) -> torch.Tensor:
    """Rendered scenes CLIP-normalised, as unclip.engine.manipulate.clip_pixels gives them to the image encoder."""
    arr = np.stack([world.render(s, size) for s in scenes]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def compatible(captions: list[str], scenes: list[world.Scene]) -> torch.Tensor:
    """(n_captions, n_scenes) bool: whether every attribute a caption names matches the scene (the positives of
    the contrastive loss: "a red circle" describes every red circle in the batch)."""
    def codes(attrs: dict[str, str]) -> list[int]:
        return [_VALUES[a].index(attrs[a]) if a in attrs else -1 for a in ATTRIBUTES]

    cap = np.array([codes(world.parse_caption(c)) for c in captions])  # (n, 5), -1 = not named
    sc = np.array([codes(scene_attributes(s)) for s in scenes])  # (m, 5)
    ok = (cap[:, None, :] == -1) | (cap[:, None, :] == sc[None, :, :])
    return torch.from_numpy(ok.all(axis=-1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of (n, 3, H, W) with standard deviations sigma (n,) in pixels (0: unchanged)."""
    r = max(1, int(math.ceil(3 * float(sigma.max()))))
    k = torch.arange(-r, r + 1, dtype=torch.float32)
    w = torch.exp(-0.5 * (k[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)  # (n, 2r+1)
    w = w / w.sum(dim=1, keepdim=True)
    n, c, H, W = x.shape
    y = F.pad(x.reshape(1, n * c, H, W), (r, r, r, r), mode="replicate")
    wk = w.repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = F.conv2d(y, wk[:, None, None, :], groups=n * c)
    y = F.conv2d(y, wk[:, None, :, None], groups=n * c)
    return y.reshape(n, c, H, W)


def degrade(low: torch.Tensor, gen: torch.Generator, max_blur: float, max_noise: float, resize: bool) -> torch.Tensor:
    """The paper's degradation of an upsampler's conditioning image (GLIDE / unCLIP: blur for the first, a BSR-like
    mix for the second): random Gaussian blur, optionally a down-up resize, and Gaussian noise; in [-1, 1]."""
    n, _, S, _ = low.shape
    u = torch.rand(n, 4, generator=gen)
    sigma = torch.where(u[:, 0] < 0.7, u[:, 1] * max_blur, torch.zeros(n))
    x = gaussian_blur(low, sigma)
    if resize:
        for i in range(n):
            if u[i, 2] < 0.5:
                s = max(4, int(round(S / (1 + u[i, 2].item() * 2))))  # down by 1x..2x, back up
                x[i] = F.interpolate(F.interpolate(x[i:i + 1], size=(s, s), mode="bilinear", antialias=True),
                                     size=(S, S), mode="bilinear")[0]
    noise_sd = torch.where(u[:, 3] < 0.5, u[:, 3] * 2 * max_noise, torch.zeros(n))
    x = x + noise_sd[:, None, None, None] * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def crop_origin(rng: np.random.Generator, scene: world.Scene, size: int, crop: int, edge_crop: float) -> tuple[int, int]:
    """Top-left corner of an upsampler's training crop: three in four on the object (plain background teaches
    little), the rest anywhere. The pipeline upsamples whole images, whose borders meet the convolutions' zero
    padding, and a crop drawn anywhere almost never touches a border (sr1024 then drew a coloured line along the
    image's edges): each axis is moved onto its nearer border with probability edge_crop."""
    if rng.random() < 0.75:
        cx = scene.cx * size + rng.uniform(-crop / 2, crop / 2)
        cy = scene.cy * size + rng.uniform(-crop / 2, crop / 2)
        x0 = int(np.clip(round(cx - crop / 2), 0, size - crop))
        y0 = int(np.clip(round(cy - crop / 2), 0, size - crop))
    else:
        x0, y0 = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
    if edge_crop > 0:  # (no draws at 0: the data stream the first upsamplers were trained on)
        if rng.random() < edge_crop:
            x0 = 0 if x0 < (size - crop) / 2 else size - crop
        if rng.random() < edge_crop:
            y0 = 0 if y0 < (size - crop) / 2 else size - crop
    return x0, y0


@dataclass(frozen=True)
class SRData:
    """How one upsampler's training pairs are made: output side, crop side, the low-res input's degradation
    (degrade's arguments) and the crops' chance of sitting on the border (crop_origin's)."""
    size: int
    crop: int
    max_blur: float
    max_noise: float
    resize: bool
    edge_crop: float = 0.0


def sr_batch(rng: np.random.Generator, gen: torch.Generator, n: int, d: SRData) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-res crops (n, 3, crop, crop), their conditioning: the degraded size/4 render upsampled as the pipeline
    does, same crops), the crops placed by crop_origin."""
    size, crop = d.size, d.crop
    scenes = [world.sample_scene(rng) for _ in range(n)]
    low = degrade(pixels(scenes, size // 4), gen, d.max_blur, d.max_noise, d.resize)
    up = upsample(low, size)  # (n, 3, size, size): antialiased bicubic, as the pipeline conditions the upsampler
    hr, cond = [], []
    for i, s in enumerate(scenes):
        x0, y0 = crop_origin(rng, s, size, crop, d.edge_crop)
        img = world.render(s, size, window=(x0, y0, crop, crop)).astype(np.float32)
        hr.append(torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1)
        cond.append(up[i, :, y0:y0 + crop, x0:x0 + crop])
    return torch.stack(hr), torch.stack(cond)

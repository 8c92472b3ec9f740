"""Samplers: free functions over a precomputed float64 StepTable, all with one signature

    sampler(denoise, x, table, noise, *, eta=0.0, callback=None) -> x at t = 0

`denoise(x, i)` returns the Prediction of step i: the clean sample x0 (guided, clipped) and, for a learned
variance, log sigma^2 of the step; `denoiser` builds it from a network function, so samplers never see
prediction types or variance channels. `noise` holds the step noise drawn up front, (draws, *x.shape); each
sampler's own `draws(table, eta)` says how many it uses. Per-step coefficients are Python floats from float64
tables: the host never waits on the device inside the loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from unclip.engine.schedules import StepTable


@dataclass
class Prediction:
    x0: torch.Tensor  # (B, C, ...) the clean sample, clipped to the stage's range
    log_var: torch.Tensor | None = None  # learned log sigma^2 of the step (ddpm); None: the fixed posterior variance


Denoise = Callable[[torch.Tensor, int], Prediction]


def predict_x0(out: torch.Tensor, x: torch.Tensor, a_t: float, prediction: str, clip: float) -> torch.Tensor:
    """x0 from the network output (eps: x0 = (x - sqrt(1-a) eps)/sqrt(a); sample: x0 = out), clipped to +-clip."""
    if prediction == "epsilon":
        x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
    else:
        assert prediction == "sample", prediction
        x0 = out
    return x0.clamp(-clip, clip)


def posterior_variance(a_t: float, a_s: float) -> tuple[float, float]:
    """(beta of the respaced step t -> s, the posterior variance of x_s given x_t and x0) (Ho et al. 2020, eq. 7)."""
    beta = 1 - a_t / a_s
    return beta, beta * (1 - a_s) / (1 - a_t)


class denoiser:
    """Adapt a network function model(x, i) -> output (C channels, or 2C with a learned variance) into denoise(x, i):
    x0 from the prediction type, clipped; a learned-range variance (Nichol & Dhariwal 2021, eq. 15) as log sigma^2.
    `finite` (a device tensor, read once per stage) says whether every network output was finite: clipping would
    otherwise turn an inf into a plausible +-R."""

    def __init__(self, model: Callable[[torch.Tensor, int], torch.Tensor], table: StepTable, prediction: str,
                 clip: float, variance: str = "fixed_small_log"):
        self.model, self.table, self.prediction, self.clip, self.variance = model, table, prediction, clip, variance
        self.finite = torch.tensor(True)

    def __call__(self, x: torch.Tensor, i: int) -> Prediction:
        table, prediction, clip, variance = self.table, self.prediction, self.clip, self.variance
        C = x.shape[1]
        a_t, a_s = float(table.alpha_bar_t[i]), float(table.alpha_bar_s[i])
        out = self.model(x, i)
        self.finite = self.finite.to(out.device) & torch.isfinite(out).all()  # no host sync in the loop
        x0 = predict_x0(out[:, :C], x, a_t, prediction, clip)
        log_var = None
        if variance == "learned_range" and a_s < 1.0:
            assert out.shape[1] == 2 * C, (out.shape, C)
            beta, var_post = posterior_variance(a_t, a_s)
            frac = (out[:, C:] + 1) / 2
            log_var = frac * math.log(beta) + (1 - frac) * math.log(var_post)
        return Prediction(x0, log_var)


def ddim_sigma(a_t: float, a_s: float, eta: float) -> float:
    """DDIM's sigma_t (Song et al. 2021, eq. 16); 0 on the last step (a_s = 1) and for eta = 0."""
    return eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)


def ddim_draws(table: StepTable, eta: float = 0.0) -> int:
    return sum(ddim_sigma(float(a), float(b), eta) > 0 for a, b in zip(table.alpha_bar_t, table.alpha_bar_s))


def ddim(denoise: Denoise, x: torch.Tensor, table: StepTable, noise: torch.Tensor, *, eta: float = 0.0,
         callback: Callable | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eps is recomputed from the clipped x0, as GLIDE / guided-diffusion do."""
    k = 0
    for i in range(len(table)):
        a_t, a_s = float(table.alpha_bar_t[i]), float(table.alpha_bar_s[i])
        x0 = denoise(x, i).x0
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = ddim_sigma(a_t, a_s, eta)
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise[k]
            k += 1
        if callback is not None:
            callback(i, x, x0)
    assert k == len(noise), (k, len(noise))
    return x


def ddpm_draws(table: StepTable, eta: float = 0.0) -> int:
    """Every step but the last (t = 0 or abar_s = 1: diffusers' rule) adds noise."""
    return int(((table.timesteps > 0) & (table.alpha_bar_s < 1.0)).sum())


def ddpm(denoise: Denoise, x: torch.Tensor, table: StepTable, noise: torch.Tensor, *, eta: float = 0.0,
         callback: Callable | None = None) -> torch.Tensor:
    """Ancestral DDPM steps over the respaced chain (Ho et al. 2020, eq. 7): Karlo's / diffusers' UnCLIPScheduler.
    The variance is the posterior's (log-clamped, "fixed_small_log") or the learned one; eta is not used."""
    k = 0
    for i in range(len(table)):
        a_t, a_s = float(table.alpha_bar_t[i]), float(table.alpha_bar_s[i])
        p = denoise(x, i)
        beta, var_post = posterior_variance(a_t, a_s)
        x = (math.sqrt(a_s) * beta / (1 - a_t)) * p.x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
        if int(table.timesteps[i]) > 0 and a_s < 1.0:
            if p.log_var is not None:
                sigma = torch.exp(0.5 * p.log_var)
            else:
                sigma = math.exp(0.5 * math.log(max(var_post, 1e-20)))
            x = x + sigma * noise[k]
            k += 1
        if callback is not None:
            callback(i, x, p.x0)
    assert k == len(noise), (k, len(noise))
    return x


@dataclass(frozen=True)
class Sampler:
    sample: Callable[..., torch.Tensor]
    draws: Callable[[StepTable, float], int]
    uses_eta: bool


SAMPLERS = {"ddim": Sampler(ddim, ddim_draws, True), "ddpm": Sampler(ddpm, ddpm_draws, False)}
ALIASES = {"unclip": "ddpm"}  # the name diffusers gives the same steps (UnCLIPScheduler)
CHOICES = (*SAMPLERS, *ALIASES)


def get(name: str) -> Sampler:
    return SAMPLERS[ALIASES.get(name, name)]

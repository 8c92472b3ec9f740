"""Samplers: free functions over a precomputed StepTable. One signature:

    sample(model, x, table, noise, *, prediction, clip, eta/variance, callback) -> x_0

`model(x, i)` returns the (already guided) network output at step i; `noise(shape)` returns a standard normal
draw (the engine's seeded, backend-independent source). The host never waits on the device inside the loop:
per-step coefficients are Python floats taken from float64 tables.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from unclip.engine.schedules import StepTable

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]
NoiseFn = Callable[[tuple], torch.Tensor]


def predict_x0(out: torch.Tensor, x: torch.Tensor, a_t: float, prediction: str, clip: float) -> torch.Tensor:
    """x0 from the network output (eps: x0 = (x - sqrt(1-a) eps)/sqrt(a); sample: x0 = out), clipped to +-clip."""
    if prediction == "epsilon":
        x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
    elif prediction == "sample":
        x0 = out
    else:
        raise ValueError(f"unknown prediction type {prediction!r} (choose from: epsilon, sample)")
    return x0.clamp(-clip, clip)


def ddim_sigma(a_t: float, a_s: float, eta: float) -> float:
    """DDIM's sigma_t (Song et al. 2021, eq. 16); 0 on the last step (a_s = 1) and for eta = 0."""
    return eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)


def noise_draws(table: StepTable, sampler: str, eta: float = 0.0) -> int:
    """How many per-step noise draws a sampler makes over `table` (the initial noise not included)."""
    if sampler == "ddim":
        return sum(ddim_sigma(float(a), float(b), eta) > 0 for a, b in zip(table.alpha_bar_t, table.alpha_bar_s))
    return int(((table.timesteps > 0) & (table.alpha_bar_s < 1.0)).sum())


def ddim(model: ModelFn, x: torch.Tensor, table: StepTable, noise: NoiseFn, *, prediction: str = "epsilon",
         clip: float = 1.0, eta: float = 0.0, callback: Callable | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eps is recomputed from the clipped x0, as GLIDE / guided-diffusion do."""
    C = x.shape[1]
    for i in range(len(table)):
        a_t, a_s = float(table.alpha_bar_t[i]), float(table.alpha_bar_s[i])
        out = model(x, i)[:, :C]  # drop learned-variance channels
        x0 = predict_x0(out, x, a_t, prediction, clip)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = ddim_sigma(a_t, a_s, eta)
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise(tuple(x.shape))
        if callback is not None:
            callback(i, x, x0)
    return x


def unclip(model: ModelFn, x: torch.Tensor, table: StepTable, noise: NoiseFn, *, prediction: str = "epsilon",
           clip: float = 1.0, variance: str = "fixed_small_log", callback: Callable | None = None) -> torch.Tensor:
    """Karlo's / diffusers' UnCLIPScheduler: DDPM ancestral steps over the respaced chain (Ho et al. 2020, eq. 7),
    variance fixed-small (log-clamped) or learned-range (Nichol & Dhariwal 2021, eq. 15)."""
    C = x.shape[1]
    for i in range(len(table)):
        a_t, a_s = float(table.alpha_bar_t[i]), float(table.alpha_bar_s[i])
        t = int(table.timesteps[i])
        out = model(x, i)
        x0 = predict_x0(out[:, :C], x, a_t, prediction, clip)
        beta = 1 - a_t / a_s  # beta of the respaced step t -> s
        mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
        if t > 0 and a_s < 1.0:  # diffusers' rule (t > 0); the final step (abar_s = 1) never adds noise
            var_post = beta * (1 - a_s) / (1 - a_t)
            if variance == "learned_range":
                assert out.shape[1] == 2 * C, out.shape
                frac = (out[:, C:] + 1) / 2
                log_var = frac * math.log(beta) + (1 - frac) * math.log(var_post)
                sigma = torch.exp(0.5 * log_var)
            elif variance == "fixed_small_log":
                sigma = math.exp(0.5 * math.log(max(var_post, 1e-20)))
            else:
                raise ValueError(f"unknown variance type {variance!r} (choose from: fixed_small_log, learned_range)")
            x = mean + sigma * noise(tuple(x.shape))
        else:
            x = mean
        if callback is not None:
            callback(i, x, x0)
    return x


SAMPLERS = ("ddim", "unclip")

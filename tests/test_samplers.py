"""ddim and the schedules against independent float64 implementations written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unclip.engine import samplers
from unclip.engine.schedules import betas_for, spaced_timesteps, step_table


def test_spacing_matches_karlo():
    assert spaced_timesteps(7).tolist() == [999, 832, 666, 500, 333, 166, 0]
    assert spaced_timesteps(25)[:3].tolist() == [999, 957, 916]


def test_cosine_betas():
    b = betas_for("squaredcos_cap_v2")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert b[0] == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    assert b[-1] == 0.999
    assert np.cumprod(1 - b)[999] == pytest.approx(2.4287e-9, rel=1e-3)


def _ddim_reference(model, x, ts, abar, noises, prediction, clip, eta):
    """Song et al. 2021 eq. 12, float64, written from the paper."""
    x = x.double()
    k = 0
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_s = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out = model(x, i).double()
        x0 = out if prediction == "sample" else (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
        x0 = x0.clamp(-clip, clip)
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        sigma = eta * np.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * noises[k].double()
            k += 1
    return x


@pytest.mark.parametrize("prediction,clip", [("epsilon", 1.0), ("sample", 5.0)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_equals_float64_reference(prediction, clip, eta):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.5

    def model(x, i):  # a smooth toy network
        return torch.tanh(x.double() @ W + 0.1 * i).to(x.dtype)

    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    noises = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(10)]
    table = step_table(10)
    abar = np.cumprod(1 - betas_for("squaredcos_cap_v2"))
    ref = _ddim_reference(model, x, spaced_timesteps(10), abar, noises, prediction, clip, eta)
    it = iter(noises)
    ours = samplers.ddim(model, x.clone(), table, lambda shape: next(it), prediction=prediction, clip=clip, eta=eta)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


def test_linear_schedule():
    b = betas_for("linear")
    assert b[0] == 1e-4 and b[-1] == 0.02 and len(b) == 1000


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("unclip", 0.0)])
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_noise_draws_counts_what_the_sampler_draws(sampler, eta, steps):
    """The pipeline draws each stage's step noise up front; the count must be exactly what the sampler uses."""
    table = step_table(steps)
    calls = []

    def noise(shape):
        calls.append(shape)
        return torch.zeros(shape)

    model = lambda x, i: torch.zeros(x.shape[0], 2 * x.shape[1])  # noqa: E731
    x = torch.zeros(1, 3)
    if sampler == "ddim":
        samplers.ddim(model, x, table, noise, eta=eta)
    else:
        samplers.unclip(model, x, table, noise, variance="learned_range")
    assert len(calls) == samplers.noise_draws(table, sampler, eta)

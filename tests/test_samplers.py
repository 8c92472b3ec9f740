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
    pre = torch.stack(noises[:samplers.ddim_draws(table, eta)]) if eta else torch.empty(0)
    denoise = samplers.denoiser(model, table, prediction, clip)
    ours = samplers.ddim(denoise, x.clone(), table, pre, eta=eta)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


def test_linear_schedule():
    b = betas_for("linear")
    assert b[0] == 1e-4 and b[-1] == 0.02 and len(b) == 1000


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("unclip", 0.0)])
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_each_sampler_uses_exactly_the_noise_its_rule_counts(sampler, eta, steps):
    """The pipeline draws each stage's step noise up front from the sampler's own count; the sampler asserts it used
    every draw, and each draw lands in x: the final sample moves with each one."""
    table = step_table(steps)
    s = samplers.get(sampler)
    n = s.draws(table, eta)
    assert n == (0 if sampler == "ddim" and eta == 0 else steps - 1)  # every step but the last (t = 0)
    denoise = samplers.denoiser(lambda x, i: torch.zeros(x.shape[0], 2 * x.shape[1]), table, "epsilon", 1.0,
                                "learned_range")
    x = torch.zeros(1, 3)
    base = s.sample(denoise, x, table, torch.zeros(n, 1, 3), eta=eta)
    for k in range(n):
        bumped = torch.zeros(n, 1, 3)
        bumped[k] = 1.0
        assert not torch.equal(s.sample(denoise, x, table, bumped, eta=eta), base), k
    with pytest.raises(AssertionError):
        s.sample(denoise, x, table, torch.zeros(n + 1, 1, 3), eta=eta)


def _ddpm_reference(model, x, ts, abar, noises, learned):
    """Ho et al. 2020 eq. 6-7 over the respaced chain, float64, with Nichol & Dhariwal's learned range."""
    x = x.double()
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_s = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        beta = 1 - a_t / a_s
        out = model(x, i).double()
        x0 = ((x - np.sqrt(1 - a_t) * out[:, :2]) / np.sqrt(a_t)).clamp(-1, 1)
        mean = np.sqrt(a_s) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x
        if i + 1 < len(ts):
            post = beta * (1 - a_s) / (1 - a_t)
            f = (out[:, 2:] + 1) / 2
            log_var = f * np.log(beta) + (1 - f) * np.log(post) if learned else np.log(post) + 0 * f
            x = mean + torch.exp(0.5 * log_var) * noises[i].double()
        else:
            x = mean
    return x


@pytest.mark.parametrize("variance", ["fixed_small_log", "learned_range"])
def test_ddpm_equals_float64_reference(variance):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.5

    def model(x, i):
        return torch.tanh(x.double() @ W + 0.1 * i).to(x.dtype)

    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    table = step_table(8)
    noise = torch.randn(7, 3, 2, generator=g, dtype=torch.float64)
    abar = np.cumprod(1 - betas_for("squaredcos_cap_v2"))
    ref = _ddpm_reference(model, x, spaced_timesteps(8), abar, noise, variance == "learned_range")
    ours = samplers.ddpm(samplers.denoiser(model, table, "epsilon", 1.0, variance), x.clone(), table, noise)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)

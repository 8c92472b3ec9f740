"""Training objectives: CLIP's symmetric InfoNCE, and the diffusion losses of the prior, decoder and upsamplers.

The diffusion stages predict the clean sample x0 (scheduler prediction_type "sample", which the engine's samplers
and diffusers' UnCLIPScheduler both read). The image stages weight the x0 error by clamp(SNR, 1, gamma) (gamma = 5):
min-SNR-gamma (Hang et al. 2023) caps the weight of nearly clean steps, and the floor of 1 keeps the weight of the
noisiest steps, where an image's global colours are decided, instead of letting it vanish as in plain epsilon MSE
(whose x0 weight is SNR = 2.4e-9 at t = 999). Tried and measured with the judge (32 images, true embeddings):
gamma = 1000 (epsilon MSE wherever SNR > 1) starved the noisy steps: after 1000 steps colour 0.38 and objects
often missing, against colour 0.81 with gamma = 5. The decoder's variance channels are trained with the
variational bound on a stopped-gradient mean (Nichol & Dhariwal 2021, L_hybrid).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from unclip.engine.schedules import betas_for


class Schedule:
    """The 1000-step training chain in float64 (SPEC: squaredcos_cap_v2), indexed by integer timesteps."""

    def __init__(self, schedule: str = "squaredcos_cap_v2", T: int = 1000):
        self.T = T
        self.betas = torch.from_numpy(betas_for(schedule, T))  # (T,) float64
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)  # (T,)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)."""
        a = self.alpha_bar[t.cpu()].float().to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t.cpu()]
        return (a / (1 - a)).float().to(t.device)


def x0_loss(x0_hat: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, sched: Schedule, gamma: float) -> torch.Tensor:
    """Per-sample mean squared x0 error weighted by clamp(SNR_t, 1, gamma); mean over the batch."""
    mse = (x0_hat.float() - x0).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (sched.snr(t).clamp(1.0, gamma) * mse).mean()


def vlb_loss(v: torch.Tensor, x0_hat: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             sched: Schedule) -> torch.Tensor:
    """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension, for the learned-range variance
    log var = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2, with the mean from stop-grad x0_hat (t >= 1)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    beta, a, a_prev = (s[t.cpu()].float().to(x0.device).view(shape)
                       for s in (sched.betas, sched.alpha_bar, sched.alpha_bar_prev))
    c0 = a_prev.sqrt() * beta / (1 - a)  # posterior mean coefficients (Ho et al. 2020, eq. 7)
    ct = (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
    mean_q = c0 * x0 + ct * x_t
    mean_p = c0 * x0_hat.detach().float() + ct * x_t
    var_q = (beta * (1 - a_prev) / (1 - a)).clamp_min(1e-20)
    log_var_q = var_q.log()
    frac = (v.float() + 1) / 2
    log_var_p = frac * beta.log() + (1 - frac) * log_var_q
    kl = 0.5 * (-1.0 + log_var_p - log_var_q + torch.exp(log_var_q - log_var_p)
                + (mean_q - mean_p).pow(2) * torch.exp(-log_var_p))
    kl = kl.flatten(1).mean(dim=1) / math.log(2.0)  # (B,) bits/dim
    return (kl * (t >= 1).float()).mean()


def clip_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor
              ) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) with a learned temperature. `positives` (N_text, N_image) marks the
    matching pairs: a caption that leaves attributes out matches every image that has the ones it names, so the
    targets spread evenly over all of them (the diagonal is always among them)."""
    t = F.normalize(text.float(), dim=-1)
    i = F.normalize(image.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * t @ i.T  # (N, N)
    p = positives.float()
    loss_t = -(F.log_softmax(logits, dim=1) * p / p.sum(1, keepdim=True)).sum(1).mean()
    loss_i = -(F.log_softmax(logits.T, dim=1) * p.T / p.T.sum(1, keepdim=True)).sum(1).mean()
    return (loss_t + loss_i) / 2

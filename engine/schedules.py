"""Noise schedules and per-step coefficient tables, computed once in float64 (DDPM / improved DDPM)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def betas_for(schedule: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_i for i in [0, T): squaredcos_cap_v2 (Nichol & Dhariwal 2021, eq. 17) or linear (Ho et al. 2020)."""
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(tau: float) -> float:
            return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule!r} (choose from: squaredcos_cap_v2, linear)")


def spaced_timesteps(steps: int, T: int = 1000) -> np.ndarray:
    """Karlo's spacing: round(arange(N) * (T-1)/(N-1)), descending (round half to even); N=7 -> 999, 832, ..., 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps == 1:
        return np.array([T - 1], dtype=np.int64)
    return np.round(np.arange(steps) * ((T - 1) / (steps - 1)))[::-1].astype(np.int64).copy()


@dataclass(frozen=True)
class StepTable:
    """What a sampler needs for N steps: timesteps t_i, alpha_bar at t_i and at the next timestep s_i
    (alpha_bar_s = 1 after the last step, so the chain ends on the clean sample)."""
    timesteps: np.ndarray  # (N,) int64
    alpha_bar_t: np.ndarray  # (N,) float64
    alpha_bar_s: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return len(self.timesteps)


def step_table(steps: int, schedule: str = "squaredcos_cap_v2", T: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> StepTable:
    alpha_bar = np.cumprod(1.0 - betas_for(schedule, T, beta_start, beta_end))  # (T,)
    ts = spaced_timesteps(steps, T)
    a_t = alpha_bar[ts]
    a_s = np.append(alpha_bar[ts[1:]], 1.0)
    return StepTable(ts, a_t, a_s)


def table_for(scheduler_config, steps: int) -> StepTable:
    """The StepTable of a stage from its SchedulerConfig (unclip.models.SchedulerConfig or the same fields)."""
    c = scheduler_config
    return step_table(steps, c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)

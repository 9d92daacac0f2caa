"""DiT's sampler: DDPM ancestral sampling on respaced timesteps (ADM's SpacedDiffusion), ε prediction with DiT's
fixed large variance or its learned range; the training schedule is the trainer's (trainer.objectives)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from redi.common.errors import UserError
from redi.sampler.guidance import State
from redi.trainer.objectives import DDPM_BETA_END, DDPM_BETA_START, DDPM_STEPS, ddpm_schedule

if TYPE_CHECKING:
    from redi.sampler.interface import NoiseSource, Predict


@dataclass(frozen=True)
class DDPMSchedule:
    """The DiT training process: linear β over the training timesteps (ADM's "linear" at 1000).

    The tables are the trainer's (trainer.objectives.ddpm_schedule), so sampler and loss share one schedule.
    """

    num_train_timesteps: int = DDPM_STEPS
    """Training timesteps T; the network's time input is the timestep index 0…T−1."""
    beta_start: float = DDPM_BETA_START
    """β at timestep 0."""
    beta_end: float = DDPM_BETA_END
    """β at timestep T−1."""

    def betas(self) -> Tensor:
        """β_0 … β_{T−1}, float64 (T,); shared with the trainer, do not modify in place."""
        return ddpm_schedule(self.num_train_timesteps, self.beta_start, self.beta_end).betas

    def alphas_cumprod(self) -> Tensor:
        """ᾱ_0 … ᾱ_{T−1}, float64 (T,); shared with the trainer, do not modify in place."""
        return ddpm_schedule(self.num_train_timesteps, self.beta_start, self.beta_end).alphas_cumprod


DIT_SCHEDULE = DDPMSchedule()  # DiT's: 1000 timesteps, linear β 1e-4…0.02


def space_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """ADM/DiT `space_timesteps(T, "steps")`: `steps` evenly strided timesteps from 0 to T−1."""
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"DDPM sampling needs 1 to {num_train_timesteps} steps, not {steps}.")
    stride = 1.0 if steps == 1 else (num_train_timesteps - 1) / (steps - 1)
    taken, position = [], 0.0
    for _ in range(steps):  # ADM adds the float stride up step by step; round(i·stride) differs for some counts
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class RespacedDDPM:
    """The respaced process (ADM SpacedDiffusion): per respaced step, float64 (S,) arrays."""

    timesteps: list[int]  # original timestep of each respaced step, fed to the network
    log_betas: Tensor  # log β of the respaced process (learned-range upper end)
    posterior_log_variance: Tensor  # log β̃, with β̃_0 replaced by β̃_1 (ADM "clipped")
    posterior_mean_coef1: Tensor  # weight of x̂_0 in the posterior mean
    posterior_mean_coef2: Tensor  # weight of x_t in the posterior mean
    sqrt_recip_alphas_cumprod: Tensor  # 1/√ᾱ
    sqrt_recipm1_alphas_cumprod: Tensor  # √(1/ᾱ − 1)

    @classmethod
    def create(cls, schedule: DDPMSchedule, steps: int) -> RespacedDDPM:
        """Keep `steps` timesteps; β_i = 1 − ᾱ_i/ᾱ_prev so that ᾱ matches the training ᾱ there."""
        use = space_timesteps(schedule.num_train_timesteps, steps)
        alphas_cumprod = schedule.alphas_cumprod()[use]  # (S,)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])  # (S,)
        betas = 1.0 - alphas_cumprod / prev  # (S,)
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)  # β̃ (S,)
        return cls(
            timesteps=use,
            log_betas=torch.log(betas),
            posterior_log_variance=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        )

    def log_variance(self, i: int, var_pred: Tensor | None) -> Tensor | float:
        """DiT's fixed *large* variance without learned σ (log β, with β̃_1 at the first step, as
        ADM's FIXED_LARGE that DiT's `create_diffusion(learn_sigma=False)` selects), or ADM's learned
        range frac·log β + (1−frac)·log β̃."""
        if var_pred is None:
            return float(self.posterior_log_variance[0] if i == 0 else self.log_betas[i])
        frac = (var_pred + 1.0) / 2.0  # v ∈ [−1, 1] → [0, 1]
        return frac * float(self.log_betas[i]) + (1.0 - frac) * float(self.posterior_log_variance[i])

    def posterior(self, i: int, x: Tensor, pred: Tensor) -> tuple[Tensor, Tensor | float]:
        """Mean and log-variance of p(x_{i−1} | x_i) from ε (C channels) or ε and v (2C channels)."""
        c = x.shape[1]
        assert pred.shape[1] in (c, 2 * c), f"prediction has {pred.shape[1]} channels for a state of {c}"
        eps, var_pred = pred[:, :c], (pred[:, c:] if pred.shape[1] == 2 * c else None)
        x0 = float(self.sqrt_recip_alphas_cumprod[i]) * x - float(self.sqrt_recipm1_alphas_cumprod[i]) * eps
        mean = float(self.posterior_mean_coef1[i]) * x0 + float(self.posterior_mean_coef2[i]) * x  # no clipping (DiT)
        return mean, self.log_variance(i, var_pred)


def ddpm_ancestral(
    predict: Predict, state: State, steps: int, noise: NoiseSource, schedule: DDPMSchedule = DIT_SCHEDULE
) -> State:
    """DiT's p_sample_loop: ancestral sampling on `steps` respaced timesteps, no noise on the last."""
    process = RespacedDDPM.create(schedule, steps)
    for i in reversed(range(len(process.timesteps))):
        pred = predict(state, float(process.timesteps[i]))
        posteriors = [process.posterior(i, x, p) for x, p in zip(state, pred, strict=True)]
        state = tuple(
            mean if i == 0 else mean + _std(log_var) * noise.draw(x.shape[1:])
            for x, (mean, log_var) in zip(state, posteriors, strict=True)
        )
    return state


def _std(log_var: Tensor | float) -> Tensor | float:
    """exp(½·log variance) for a per-element tensor or a scalar."""
    return torch.exp(0.5 * log_var) if isinstance(log_var, Tensor) else math.exp(0.5 * log_var)

"""Samplers for the joint latent (VAE + PC channels, and REG's class token).

Time convention (SPEC §7): SiT x_t = (1−t)·x_0 + t·ε, t = 1 is pure noise, the network
predicts v = ε − x_0. DiT: DDPM with 1000 training timesteps, linear β 1e-4…0.02, the
network predicts ε (plus the variance interpolation v when it learns sigma) and takes the
original discrete timestep (as a float) as its time input.

The integrators work on a state that is a tuple of tensors, (x,) or (x, cls) for REG, each
(N, ...), and on a callback `predict(state, t, guide_t=None) -> tuple` giving the prediction
for every component at model time t, guided as at time guide_t (default t: only Heun's
corrector differs) (sampler.guidance.GuidedModel builds it from a network). Every
component is integrated the same way. The state stays in the dtype it is given (float32,
or float64); the callback casts for the network and runs it under the caller's autocast.

Seeding: sample i's randomness comes only from its own generator, seeded with
`sample_seed(seed, index) = seed · 1_000_003 + index` (distinct for indices < 1_000_003) on
the state's device. The generator first draws the initial noise (x, then cls) and then,
advanced step by step, the per-step noise of the SDE and DDPM samplers; so image i depends
only on (seed, i), whatever the batch it is drawn in.

Adaptive solvers (`ode_solve` with dopri5 & co.) choose one step sequence for the whole batch
from the batch's error norm, as SiT/ReDi's `odeint` call does: their image i depends on the
other images of its batch, within the tolerances (batches have a fixed composition, see
sampler/sample.py, so a rerun at the same batch size repeats them exactly).

Public API (what `redi sample` calls):
  sample_latents(model, labels, indices, seed, sampler, steps, guidance, autocast,
                 latent_size=, cls_dim=, dtype=, options=, guide=) -> (x (N, C, H, W), cls (N, D) | None, GuidanceStats)
  SAMPLERS, SamplerOptions, Predict, NoiseSource: sampler/interface.py (the names, options and callbacks)
  make_noise(seed, indices, shape, device) -> Tensor (N, *shape)
  PerSampleNoise(seed, indices, device, dtype).draw(shape) -> Tensor (N, *shape)
  euler_maruyama(predict, state, steps, noise, last_step="mean", last_step_size=0.04) -> State
  sde_last_step(kind, x, v, t) -> Tensor
  ode_euler(predict, state, steps) -> State;  ode_heun(predict, state, steps) -> State
  ode_solve(predict, state, solver, steps, atol, rtol) -> State      torchdiffeq's odeint
  score_from_velocity(v, x_t, t) -> Tensor
  DiT's DDPM sampler: sampler/ddpm.py
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from redi.common.errors import UserError
from redi.sampler.ddpm import DIT_SCHEDULE, DDPMSchedule, ddpm_ancestral
from redi.sampler.guidance import AutocastFactory, GuidanceConfig, GuidanceStats, GuidedModel, State
from redi.sampler.interface import ADAPTIVE_SOLVERS, SAMPLERS, NoiseSource, Predict, SamplerOptions

SEED_STRIDE = 1_000_003  # prime; sample_seed is injective for indices below it
TORCHDIFFEQ_FAILURES = ("non-finite values in state", "underflow in dt", "max_num_steps exceeded")  # its asserts


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of the sample with this index."""
    return seed * SEED_STRIDE + index


class PerSampleNoise:
    """Gaussian noise where sample i's values come only from its own generator (seed, index)."""

    def __init__(self, seed: int, indices: Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = [
            torch.Generator(device=self.device).manual_seed(sample_seed(seed, i)) for i in indices.tolist()
        ]

    def draw(self, shape: Sequence[int]) -> Tensor:
        """Next noise (N, *shape): each sample's slice advances only that sample's generator."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=self.dtype) for g in self.generators]
        )


def make_noise(seed: int, indices: Tensor, shape: Sequence[int], device: torch.device | str) -> Tensor:
    """Initial noise (N, *shape) for these indices; sample_latents' initial x at its default float32."""
    return PerSampleNoise(seed, indices, device).draw(shape)


# ---- SiT: linear interpolant, velocity prediction -------------------------------------------


def score_from_velocity(v: Tensor, x_t: Tensor, t: float) -> Tensor:
    """∇log p_t(x_t) = −E[ε|x_t]/t = −((1−t)·v + x_t)/t on the linear path (t = 1 noise)."""
    return -((1.0 - t) * v + x_t) / t


def _sde_drift(v: Tensor, x: Tensor, t: float) -> Tensor:
    """Reverse-SDE drift with diffusion w_t = 2t (REPA): v − ½·2t·score."""
    return v - t * score_from_velocity(v, x, t)


def sde_last_step(kind: str, x: Tensor, v: Tensor, t: float) -> Tensor:
    """SiT transport's deterministic last step from noise level t to 0, in our time (α_t = 1 − t, σ_t = t).

    mean: x + SDE drift·dt with dt = −t (SiT "Mean", REPA's last step); euler: x − t·v, the probability-flow
    step (SiT "Euler"); tweedie: x/α_t + σ_t²/α_t·score = E[x_0 | x_t] (SiT "Tweedie"; on the linear path
    this is x − t·v too, computed from the score as SiT does).
    """
    if kind == "mean":
        return x - _sde_drift(v, x, t) * t
    if kind == "euler":
        return x - t * v
    assert kind == "tweedie", f"no last step {kind!r}"
    return x / (1.0 - t) + t**2 / (1.0 - t) * score_from_velocity(v, x, t)


def sde_min_steps(last_step: str) -> int:
    """Fewest SDE steps: "none" needs one EM step to reach 0; "tweedie" cannot start at t = 1 (α_1 = 0)."""
    return 2 if last_step in ("none", "tweedie") else 1


def euler_maruyama(
    predict: Predict, state: State, steps: int, noise: NoiseSource, last_step: str = "mean",
    last_step_size: float = 0.04,
) -> State:
    """SiT/ReDi transport SDE (REPA's euler_maruyama_sampler for "mean"): steps − 1 EM steps from 1 to
    last_step_size, then `sde_last_step` to 0; "none": steps − 1 EM steps from 1 all the way to 0."""
    assert steps >= sde_min_steps(last_step), f"too few SDE steps ({steps}) for last step {last_step!r}"
    grid = torch.linspace(1.0, 0.0 if last_step == "none" else last_step_size, steps, dtype=torch.float64).tolist()
    for t_cur, t_next in itertools.pairwise(grid):
        dt = t_next - t_cur  # < 0
        v = predict(state, t_cur)
        state = tuple(
            x + _sde_drift(vk, x, t_cur) * dt + math.sqrt(2.0 * t_cur * abs(dt)) * noise.draw(x.shape[1:])
            for x, vk in zip(state, v, strict=True)
        )
    if last_step == "none":
        return state
    t_cur = grid[-1]
    v = predict(state, t_cur)
    return tuple(sde_last_step(last_step, x, vk, t_cur) for x, vk in zip(state, v, strict=True))


def ode_euler(predict: Predict, state: State, steps: int) -> State:
    """Probability-flow ODE dx/dt = v, Euler, `steps` uniform steps from t = 1 to 0."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for t_cur, t_next in itertools.pairwise(grid):
        v = predict(state, t_cur)
        state = tuple(x + (t_next - t_cur) * vk for x, vk in zip(state, v, strict=True))
    return state


def ode_heun(predict: Predict, state: State, steps: int) -> State:
    """Probability-flow ODE, Heun (2nd order) on every step but the last one to t = 0 (EDM/REPA)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(grid)):
        dt = t_next - t_cur
        d_cur = predict(state, t_cur)
        euler = tuple(x + dt * d for x, d in zip(state, d_cur, strict=True))
        if i < steps - 1:
            d_next = predict(euler, t_next, guide_t=t_cur)  # REPA: the corrector guides as the step's start does
            state = tuple(x + dt * 0.5 * (a + b) for x, a, b in zip(state, d_cur, d_next, strict=True))
        else:
            state = euler
    return state


def ode_solve(predict: Predict, state: State, solver: str, steps: int | None, atol: float, rtol: float) -> State:
    """Probability-flow ODE dx/dt = v from t = 1 to 0 with torchdiffeq's `odeint`, as SiT/ReDi's transport sampler.

    Adaptive solvers integrate over [1, 0] (their steps do not depend on the output grid; the last step may
    overshoot t = 0 and is interpolated back, as in SiT); fixed-grid solvers take `steps` uniform steps.
    A REG state (x, cls) is one tuple, whose error norm is torchdiffeq's: the largest RMS of the components.
    torchdiffeq hands the field its time in the state's dtype.
    """
    device = state[0].device
    if solver in ADAPTIVE_SOLVERS:
        grid = torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)
    else:
        assert steps is not None and steps >= 1, f"the fixed-grid solver {solver} needs a step count"
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)

    def field(t: Tensor, y: State) -> State:
        return predict(y, float(t))

    try:
        path = odeint(field, state, grid, method=solver, atol=atol, rtol=rtol)  # each: (len(grid), N, ...)
    except AssertionError as e:
        if not str(e).startswith(TORCHDIFFEQ_FAILURES):
            raise
        reason = str(e).split(":")[0]
        raise UserError(f"The {solver} solver stopped ({reason}): the model's velocity is not finite or too "
                        "stiff for these tolerances; try larger --atol/--rtol or a fixed-step sampler.") from None
    return tuple(p[-1] for p in path)


# ---- everything together --------------------------------------------------------------------


def sample_latents(
    model: Any,
    labels: Tensor,
    indices: Tensor,
    seed: int,
    sampler: str,
    steps: int | None,
    guidance: GuidanceConfig,
    autocast: AutocastFactory | None = None,
    *,
    latent_size: int,
    cls_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    schedule: DDPMSchedule = DIT_SCHEDULE,
    options: SamplerOptions = SamplerOptions(),
    guide: Any | None = None,
) -> tuple[Tensor, Tensor | None, GuidanceStats]:
    """Sample the joint latents of images `indices` (labels (N,) on the sampling device).

    Returns x (N, vae_channels + pca_rank, latent_size, latent_size), REG's class token
    (N, cls_dim) or None, and the network work spent. `autocast` is a factory of the
    context the network runs under (e.g. `lambda: torch.autocast("cuda", torch.bfloat16)`).
    `steps` is unused (None) with an adaptive ODE solver. `guide` is AutoGuidance's guiding network (its modes only).
    """
    cfg = model.cfg
    if sampler not in SAMPLERS:
        raise UserError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if (sampler == "ddpm") != (cfg.objective == "dit"):
        raise UserError(
            f"The {sampler} sampler does not fit a {cfg.objective} model: use ddpm for DiT, sde, ode or heun for SiT."
        )
    if options.solver is not None and sampler != "ode":
        raise UserError(f"An ODE solver ({options.solver}) needs the ode sampler, not {sampler}.")
    if options.adaptive:
        steps = None
    elif steps is None or steps < (sde_min_steps(options.last_step) if sampler == "sde" else 1):
        raise UserError(f"Too few sampling steps ({steps}) for the {sampler} sampler.")
    assert labels.shape == indices.shape and labels.ndim == 1, "labels and indices must both be (N,)"
    assert not cfg.reg_token or cls_dim is not None, "a REG model needs cls_dim (the class token width)"
    noise = PerSampleNoise(seed, indices, labels.device, dtype)
    shapes = [(cfg.vae_channels + cfg.pca_rank, latent_size, latent_size)] + ([(cls_dim,)] if cfg.reg_token else [])
    state = tuple(noise.draw(shape) for shape in shapes)  # pure noise at t = 1 / timestep T−1
    time_scale = float(schedule.num_train_timesteps) if cfg.objective == "dit" else 1.0
    predict = GuidedModel(model, labels, guidance, time_scale=time_scale, autocast=autocast, guide=guide)
    if sampler == "sde":
        state = euler_maruyama(predict, state, steps, noise, options.last_step, options.last_step_size)
    elif sampler == "ode" and options.solver is not None:
        state = ode_solve(predict, state, options.solver, steps, options.atol, options.rtol)
    elif sampler == "ode":
        state = ode_euler(predict, state, steps)
    elif sampler == "heun":
        state = ode_heun(predict, state, steps)
    else:
        state = ddpm_ancestral(predict, state, steps, noise, schedule)
    return state[0], (state[1] if len(state) > 1 else None), predict.stats

"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3 and
App. C; NVlabs/edm2 training/phema.py): power-function EMA profiles tracked during training, and the least-squares
weights that combine their snapshots into the EMA of any other length.

A power-function EMA at training time t averages the weights θ(τ) with the profile p_t(τ) = (γ + 1)·τ^γ / t^(γ+1) on
0 ≤ τ ≤ t; its length is its relative standard deviation σ_rel = √((γ + 1) / ((γ + 2)²(γ + 3))) (Eq. 123), so one
number fixes it at every t. Tracked step by step, it is the EMA with β_t = (1 − Δt/t)^(γ+1) (Eq. 127). Time is the
training images seen, as edm2's cur_nimg, and Δt the step's batch: a batch size changed on resume keeps the clock.

Every profile is linear in θ, so a profile (t, σ_rel) is approximated by Σ_i x_i·(snapshot i) where x solves the
normal equations A·x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p_out⟩ (Eq. 151, Algorithm 3), the inner products of
continuous power functions in closed form; edm2 then rescales x to sum to 1, and so do we.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from redi.common.errors import UserError
from redi.trainer.ema import make_ema, update_ema

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # edm2's PowerFunctionEMA: the two profiles it tracks
MAX_SIGMA_REL = 0.2886  # σ_rel → 1/√12 as γ → 0 (a flat average); edm2 accepts σ_rel < 0.289


def sigma_rel_of_exponent(gamma: np.ndarray | float) -> np.ndarray:
    """σ_rel of the power function τ^γ (Eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def exponent_of_sigma_rel(sigma_rel: np.ndarray | float) -> np.ndarray:
    """γ of a σ_rel: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) (Eq. 126, Algorithm 2)."""
    sigma_rel = np.float64(sigma_rel)
    inv2 = sigma_rel.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max() for s in inv2]
    return np.float64(roots).reshape(sigma_rel.shape)


def power_function_beta(sigma_rel: float, t_next: float, t_delta: float = 1.0) -> float:
    """The EMA decay that moves a profile of this σ_rel from time t_next − t_delta to t_next (Eq. 127); 0 at the first
    step, so the profile starts at the weights after it."""
    return float((1.0 - t_delta / t_next) ** (exponent_of_sigma_rel(sigma_rel) + 1.0))


def profile_inner_product(t_a: np.ndarray, sigma_a: np.ndarray, t_b: np.ndarray, sigma_b: np.ndarray) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ)·p_b(τ) dτ of two power-function profiles ending at t_a and t_b (Eq. 151, Algorithm 3):
    (γ_a + 1)(γ_b + 1)·(t_a/t_b)^(γ_b if t_a < t_b else −γ_a) / ((γ_a + γ_b + 1)·max(t_a, t_b)), broadcast."""
    g_a, g_b = exponent_of_sigma_rel(sigma_a), exponent_of_sigma_rel(sigma_b)
    ratio = np.float64(t_a) / np.float64(t_b)
    power = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio**power / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(in_t: Sequence[float], in_sigma: Sequence[float], out_t: Sequence[float] | float,
                         out_sigma: Sequence[float] | float) -> np.ndarray:
    """x (inputs, outputs): output j ≈ Σ_i x_ij·input i, each column the least-squares fit of the output profile by
    the input profiles, rescaled to sum to 1 (Algorithm 3; edm2's solve_posthoc_coefficients)."""
    in_t, in_sigma = (np.float64(v).reshape(-1) for v in np.broadcast_arrays(in_t, in_sigma))
    out_t, out_sigma = (np.float64(v).reshape(-1) for v in np.broadcast_arrays(out_t, out_sigma))
    gram = profile_inner_product(in_t[:, None], in_sigma[:, None], in_t[None, :], in_sigma[None, :])  # (n, n)
    target = profile_inner_product(in_t[:, None], in_sigma[:, None], out_t[None, :], out_sigma[None, :])  # (n, m)
    x = np.linalg.solve(gram, target)  # (n, m)
    return x / x.sum(axis=0)


def check_sigma_rels(values: Sequence[float], flag: str) -> tuple[float, ...]:
    """The σ_rel values, each in (0, 1/√12): one sentence otherwise."""
    values = tuple(float(v) for v in values)
    if not values or not all(0.0 < v < MAX_SIGMA_REL for v in values):
        raise UserError(f"{flag} takes relative standard deviations in (0, {MAX_SIGMA_REL}) (edm2: 0.05,0.10), "
                        f"not {','.join(f'{v:g}' for v in values) or 'nothing'}.")
    if len(set(values)) != len(values):
        raise UserError(f"{flag} lists a value twice ({','.join(f'{v:g}' for v in values)}).")
    return values


def parse_sigma_rels(text: str | None) -> tuple[float, ...] | None:
    """'0.05,0.10' → (0.05, 0.1); None or '' → None."""
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"σ_rel takes a comma list of numbers such as 0.05,0.10, not {text!r}.") from None


class PowerFunctionEMA:
    """The power-function EMA profiles tracked during training (edm2's PowerFunctionEMA): one frozen copy of the
    network per σ_rel, each updated after every optimiser step (skipped ones too: the weights then did not change,
    and the profile still averages over that time)."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.profiles = [make_ema(model) for _ in self.sigma_rels]
        self.images = 0
        """Training images seen: the profiles' time t."""

    def update(self, model: nn.Module, images: int, batch: int) -> None:
        """Move every profile to time `images` (seen after this step), `batch` images after the last."""
        for sigma_rel, profile in zip(self.sigma_rels, self.profiles, strict=True):
            update_ema(profile, model, power_function_beta(sigma_rel, images, batch))
        self.images = images

    def state_dict(self) -> dict[str, Any]:
        """{"sigma_rels": [...], "images": t, "profiles": [state_dict, ...]}: what a checkpoint and a snapshot hold."""
        return {"sigma_rels": list(self.sigma_rels), "images": self.images,
                "profiles": [p.state_dict() for p in self.profiles]}

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore the profiles of a checkpoint; profiles of other lengths are one sentence."""
        saved = tuple(float(s) for s in state["sigma_rels"])
        if saved != self.sigma_rels:
            raise UserError(f"{where} tracks post-hoc EMA profiles of σ_rel {','.join(f'{s:g}' for s in saved)}, not "
                            f"{','.join(f'{s:g}' for s in self.sigma_rels)}: resume with --phema-sigma-rels "
                            f"{','.join(f'{s:g}' for s in saved)}.")
        for profile, weights in zip(self.profiles, state["profiles"], strict=True):
            profile.load_state_dict(weights)
        self.images = int(state["images"])


@torch.no_grad()
def combine(weights: Sequence[dict[str, torch.Tensor]], coefficients: Sequence[float], averaged: set[str],
            into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """into + Σ_k c_k·weights_k over the `averaged` keys (float64 accumulators), the other entries (buffers) taken from
    the last `weights`; `into` None starts from zeros."""
    into = {} if into is None else into
    for sd, c in zip(weights, coefficients, strict=True):
        for key, value in sd.items():
            if key in averaged:
                acc = into.get(key)
                if acc is None:
                    acc = into[key] = torch.zeros(value.shape, dtype=torch.float64)
                acc.add_(value.double(), alpha=float(c))
            else:
                into[key] = value.clone()
    return into

"""What the samplers are, for those who pick one without running it: their names and options (the flags' choices,
checked here without torch, so SampleConfig and sample.json's settings read without it) and the callbacks the
integrators take (samplers.py, and DiT's DDPM in ddpm.py)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from redi.common.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from redi.sampler.guidance import State

SAMPLERS: tuple[str, ...] = ("sde", "ode", "heun", "ddpm")
LAST_STEPS: tuple[str, ...] = ("mean", "tweedie", "euler", "none")  # SiT transport's last SDE step (None = "none")
ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq
FIXED_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
ODE_SOLVERS: tuple[str, ...] = ADAPTIVE_SOLVERS + FIXED_SOLVERS
TOLERANCE_SOLVERS: tuple[str, ...] = (*ADAPTIVE_SOLVERS, "implicit_adams")  # its corrector iterates to atol/rtol


@dataclass(frozen=True)
class SamplerOptions:
    """A sampler's settings beyond its name and steps; defaults are SiT/ReDi's `transport` sampler's."""

    solver: str | None = None
    """ode: a torchdiffeq method run by `odeint` (dopri5: SiT/ReDi's default ODE); None → redi's fixed-step Euler."""
    atol: float = 1e-6
    """Absolute tolerance of the adaptive solvers and implicit_adams (SiT/ReDi: 1e-6)."""
    rtol: float = 1e-3
    """Relative tolerance of the adaptive solvers and implicit_adams (SiT/ReDi: 1e-3)."""
    last_step: str = "mean"
    """sde: the step from t = last_step_size to 0: mean | tweedie | euler, or none (Euler–Maruyama down to t = 0)."""
    last_step_size: float = 0.04
    """sde: where the last step starts (SiT/ReDi/REPA: 0.04)."""

    def __post_init__(self) -> None:
        """Refuse unknown names and out-of-range values with one sentence."""
        if self.solver is not None and self.solver not in ODE_SOLVERS:
            raise UserError(f"Unknown ODE solver {self.solver!r}; choose one of {', '.join(ODE_SOLVERS)}.")
        if not (math.isfinite(self.atol) and math.isfinite(self.rtol) and self.atol > 0 and self.rtol > 0):
            raise UserError(f"--atol and --rtol must be positive numbers (got {self.atol}, {self.rtol}).")
        if self.last_step not in LAST_STEPS:
            raise UserError(f"Unknown last step {self.last_step!r}; choose one of {', '.join(LAST_STEPS)}.")
        if not 0.0 < self.last_step_size < 1.0:
            raise UserError(f"--last-step-size must lie in (0, 1), not {self.last_step_size}.")

    @property
    def adaptive(self) -> bool:
        """The solver picks its own steps (no step count)."""
        return self.solver in ADAPTIVE_SOLVERS

    @property
    def uses_tolerances(self) -> bool:
        """atol/rtol change what the solver computes."""
        return self.solver in TOLERANCE_SOLVERS


class Predict(Protocol):
    """The guided network as the integrators call it (sampler.guidance.GuidedModel)."""

    def __call__(self, state: State, t: float, guide_t: float | None = None) -> State:
        """Prediction per component at model time t, with the guidance active at guide_t (default t)."""


class NoiseSource(Protocol):
    """Per-sample noise (samplers.PerSampleNoise)."""

    def draw(self, shape: Sequence[int]) -> Tensor:
        """Standard normal noise (N, *shape), one slice per sample."""

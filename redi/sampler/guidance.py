"""Guidance: the network's guided prediction `(state, t) -> prediction` for the samplers.

Branches of the network, all evaluated in ONE batched forward per step (concatenated along the batch):
  cond    model(x_t, y)                    always
  uncond  model(x_t, ∅)   ∅ = num_classes  CFG, when active
  noz     model(x_t|z=0, y)                RG, when active (z_t = x_t[:, vae_channels:] zeroed)
and, for AutoGuidance, one forward of a second network, the guide:
  guide   guide(x_t, y)                    AutoGuidance, when active (an unconditional guide gets label 0)
so a step where it is active costs two network calls, and the guide's evaluations count in the NFE.
A branch is active only when its mode is on, its scale is not 1 (scale 1 does nothing) and
t lies in the guidance interval [lo, hi] (inclusive; no interval = always). Outside the
interval only the cond branch is computed. The interval is compared with the noise level
t ∈ [0, 1] (t = 1 is noise): SiT time as is, DiT's discrete timestep divided by the number
of training timesteps (`time_scale`, 1000), e.g. DiT step 700 is t = 0.7.

Composition (p = prediction: the velocity v for SiT, ε for DiT), with w = cfg_scale,
w_r = rg_scale and w_a = ag_scale:

    p = p_c + (w − 1)·m ⊙ (p_c − p_u) + (w_a − 1)·(p_c − p_g) + (w_r − 1)·(p_c − p_noz)

(a mode uses CFG or AutoGuidance, never both: the unused scale is 1).

- CFG alone is p_u + w·(p_c − p_u) on the channels selected by the mask m (SPEC §8): the
  VAE channels only (`cfg_channels="vae"`, ReDi's default; the PC channels keep p_c) or
  all channels (`"all"`).
- RG alone is p_noz + w_r·(p_c − p_noz) on all channels: ReDi paper (000_) Eq. 13.
- Both: the sum of the two guidance terms, each taken relative to the cond branch. The
  ReDi paper defines CFG and RG separately (Eqs. 11–13) but not their combination, and the
  public ReDi code has no RG; this composition is ours. It is the score of
  p̂(x_t, z_t | y) ∝ p(x_t, z_t | y) · p(y | x_t, z_t)^(w−1) · p(z_t | x_t, y)^(w_r−1),
  i.e. CFG's label term and RG's Eq. 11 term (with p(x_t) conditioned on y), and reduces
  to each formula above when the other scale is 1.
- REG's class token `cls` is a representation channel: it is guided like the PC channels
  (CFG only when `cfg_channels="all"`; RG always), unless `cls_cfg_scale` is set: then its
  CFG weight is that scale wherever CFG is active, as REG's sampler does (a scale ≤ 0 keeps
  the cond branch; `redi sample` sets REG's default 1.5 unless told). The noz branch zeroes
  only the PC channels; `cls` is passed unchanged.
- AutoGuidance alone is p_g + w_a·(p_c − p_g) on every predicted channel (the class token
  too): Karras et al. 2024's D_w = D_bad + w·(D_good − D_bad). The denoiser is affine in the
  prediction with coefficients that do not depend on the network (SiT: D = x_t − t·v; DiT:
  D = (x_t − √(1−ᾱ)·ε)/√ᾱ), and the two weights sum to 1, so the formula holds in v or ε as it
  does in D (and in the score). With RG (`autoguidance+rg`) it is the score of
  p_good(x, z | y)·(p_good / p_bad)^(w_a−1)·p_good(z | x, y)^(w_r−1).
- DiT with learned sigma: the variance channels (the second half of `out`) always take the
  cond branch's values.

Public API:
  GuidanceConfig(mode, cfg_scale, rg_scale, cfg_channels, interval, cls_cfg_scale, ag_scale)
  check_guidance(mode, num_classes, rep_drop) -> None        raises UserError
  GuidedModel(model, labels, guidance, time_scale, autocast, guide)  callable (state, t) -> State
  GuidanceStats(model_calls, nfe)                             GuidedModel.stats
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from redi.common.choices import AUTOGUIDANCE_MODES, GUIDANCE_MODES
from redi.common.errors import UserError

State = tuple[Tensor, ...]  # (x,) or (x, cls) for REG; each component (N, ...)
GuidanceMode = Literal["none", "cfg", "rg", "cfg+rg", "autoguidance", "autoguidance+rg"]
ALL_MODES = GUIDANCE_MODES + AUTOGUIDANCE_MODES
AutocastFactory = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class GuidanceConfig:
    """Which guidance to apply, how strongly, on which channels and at which noise levels."""

    mode: GuidanceMode = "none"
    """none, cfg (classifier-free), rg (Representation Guidance), cfg+rg (three branches), autoguidance (a guiding
    network) or autoguidance+rg."""
    cfg_scale: float = 1.0
    """CFG weight w: p_u + w·(p_c − p_u); 1 means no CFG (ReDi's best table: 2.4)."""
    rg_scale: float = 1.0
    """RG weight w_r: p_noz + w_r·(p_c − p_noz); 1 means no RG (ReDi: 1.5 for B, 1.1 for XL)."""
    cfg_channels: Literal["vae", "all"] = "vae"
    """CFG on the VAE channels only (ReDi default) or on all channels (PCs and the REG token too)."""
    interval: tuple[float, float] | None = None
    """Guide only for noise level t in [lo, hi] (t = 1 is noise); None guides at every step."""
    cls_cfg_scale: float | None = None
    """REG: CFG weight of the class token where CFG is active (REG's generate.py: 1.5 by default; ≤ 0 keeps
    the cond branch there); None follows cfg_channels (`redi sample` always sets it for a REG model)."""
    ag_scale: float = 1.0
    """AutoGuidance weight w_a: p_g + w_a·(p_c − p_g) with the guide's prediction p_g; 1 means no AutoGuidance."""

    def __post_init__(self) -> None:
        if self.mode not in ALL_MODES:
            raise UserError(f"Unknown guidance mode {self.mode!r}; choose one of {', '.join(ALL_MODES)}.")
        if self.cfg_channels not in ("vae", "all"):
            raise UserError(f"cfg_channels must be 'vae' or 'all', not {self.cfg_channels!r}.")
        scales = (self.cfg_scale, self.rg_scale, self.ag_scale, 0.0 if self.cls_cfg_scale is None else self.cls_cfg_scale)
        if not all(math.isfinite(v) for v in scales):
            raise UserError(f"Guidance scales must be finite numbers (got cfg {self.cfg_scale}, rg {self.rg_scale}, "
                            f"ag {self.ag_scale}, cls {self.cls_cfg_scale}).")
        if min(self.cfg_scale, self.rg_scale, self.ag_scale) < 0:
            raise UserError(f"Guidance scales must be ≥ 0 (got cfg {self.cfg_scale}, rg {self.rg_scale}, ag {self.ag_scale}).")
        if self.interval is not None:
            lo, hi = self.interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise UserError(f"The guidance interval must satisfy 0 ≤ low ≤ high ≤ 1 (got {lo},{hi}).")

    @property
    def uses_cfg(self) -> bool:
        """True when classifier-free guidance changes the prediction somewhere."""
        return self.mode in ("cfg", "cfg+rg") and self.cfg_scale != 1.0

    @property
    def uses_rg(self) -> bool:
        """True when Representation Guidance changes the prediction somewhere."""
        return self.mode in ("rg", "cfg+rg", "autoguidance+rg") and self.rg_scale != 1.0

    @property
    def needs_guide(self) -> bool:
        """The mode guides with a second network (its scale may still be 1)."""
        return self.mode in AUTOGUIDANCE_MODES

    @property
    def uses_ag(self) -> bool:
        """True when AutoGuidance changes the prediction somewhere."""
        return self.needs_guide and self.ag_scale != 1.0

    def in_interval(self, t_unit: float) -> bool:
        """Whether noise level t ∈ [0, 1] lies in the guidance interval."""
        return self.interval is None or self.interval[0] <= t_unit <= self.interval[1]


def check_guidance(mode: str, num_classes: int, rep_drop: float, class_dropout: float = 0.1) -> None:
    """Refuse guidance the trained model cannot support (CFG without label dropout, RG without representation drop)."""
    if mode not in ALL_MODES:
        raise UserError(f"Unknown guidance mode {mode!r}; choose one of {', '.join(ALL_MODES)}.")
    if "cfg" in mode and num_classes <= 1:
        raise UserError(
            "Classifier-free guidance needs a class-conditional model, but this one was trained "
            "unconditionally (num_classes 1); use --guidance none or rg."
        )
    if "cfg" in mode and class_dropout <= 0:
        raise UserError("Classifier-free guidance needs a model trained with label dropout, but this one had class_dropout 0.")
    if "rg" in mode and rep_drop <= 0:
        raise UserError(
            "Representation Guidance needs a model trained with representation drop (--rep-drop > 0), "
            "but this one was trained with rep_drop 0."
        )


@dataclass
class GuidanceStats:
    """Network work actually spent: forward calls and per-sample network evaluations (NFE)."""

    model_calls: int = 0
    """Batched forward calls: one per sampler evaluation whatever the number of branches, two where the guide runs."""
    nfe: int = 0
    """Per-sample network evaluations: the sum over calls of the number of active branches (the guide's included)."""
    branch_evals: dict[str, int] = field(default_factory=dict)
    """How many calls included each branch (cond, uncond, noz, guide)."""


class GuidedModel:
    """The guided prediction of a network for one batch of labels, as a sampler callback."""

    def __init__(
        self,
        model: Any,
        labels: Tensor,
        guidance: GuidanceConfig,
        time_scale: float = 1.0,
        autocast: AutocastFactory | None = None,
        guide: Any | None = None,
    ):
        cfg = model.cfg
        assert not getattr(model, "training", False), "call model.eval() before sampling (label dropout is on)"
        assert not guidance.uses_rg or cfg.pca_rank > 0, "Representation Guidance needs PC channels (pca_rank > 0)"
        assert (guide is not None) == guidance.needs_guide, "AutoGuidance needs its guiding network, and only it"
        assert guide is None or not getattr(guide, "training", False), "call guide.eval() before sampling"
        self.model = model
        self.guide = guide
        self.labels = labels  # (N,) long
        self.guide_labels = labels if guide is None or guide.cfg.num_classes > 1 else torch.zeros_like(labels)
        self.guidance = guidance
        self.time_scale = time_scale  # model time / time_scale = noise level t in [0, 1]
        self.autocast = autocast or nullcontext
        self.vae_channels: int = cfg.vae_channels
        self.channels: int = cfg.vae_channels + cfg.pca_rank
        self.null_label: int = cfg.num_classes
        self.input_dtype = _input_dtype(model)
        self.stats = GuidanceStats()

    def branches(self, t: float) -> tuple[str, ...]:
        """The branches evaluated at model time t: cond, plus uncond / noz when active there."""
        active = self.guidance.in_interval(t / self.time_scale)
        return (
            ("cond",)
            + (("uncond",) if active and self.guidance.uses_cfg else ())
            + (("noz",) if active and self.guidance.uses_rg else ())
            + (("guide",) if active and self.guidance.uses_ag else ())
        )

    def __call__(self, state: State, t: float, guide_t: float | None = None) -> State:
        """Guided prediction for state at model time t, with the branches active at guide_t (default t):
        (out (N, C_out, H, W), cls_out (N, D) if REG)."""
        names = self.branches(t if guide_t is None else guide_t)
        preds = self._forward(state, t, tuple(n for n in names if n != "guide"))  # per branch: tuple like state
        if "guide" in names:
            preds["guide"] = self._forward_guide(state, t)
        self._count(names)
        others = [preds.get(name) for name in ("uncond", "noz", "guide")]
        return tuple(self._compose(k, c, *(None if o is None else o[k] for o in others)) for k, c in enumerate(preds["cond"]))

    @torch.no_grad()
    def _forward(self, state: State, t: float, names: tuple[str, ...]) -> dict[str, State]:
        """One batched forward over the active branches; returns each branch's outputs in state dtype."""
        x, cls = state[0], (state[1] if len(state) > 1 else None)
        n, dtype = x.shape[0], x.dtype
        xs, ys = [], []
        for name in names:
            if name == "noz":
                x_noz = x.clone()
                x_noz[:, self.vae_channels:] = 0  # zero z_t, as representation drop did in training
                xs.append(x_noz)
            else:
                xs.append(x)
            ys.append(torch.full_like(self.labels, self.null_label) if name == "uncond" else self.labels)
        b = len(names)
        x_in = torch.cat(xs).to(self.input_dtype)  # (B·N, C, H, W)
        y_in = torch.cat(ys)  # (B·N,)
        t_in = torch.full((b * n,), float(t), device=x.device)  # (B·N,) float32: bf16 cannot hold 999
        cls_in = None if cls is None else torch.cat([cls] * b).to(self.input_dtype)  # (B·N, D)
        with self.autocast():
            output = self.model(x_in, t_in, y_in, cls_in)
        outs = [output.out.to(dtype).chunk(b)]  # B × (N, C_out, H, W)
        if cls is not None:
            assert output.cls_out is not None, "a model fed a class token must predict its velocity (cls_out)"
            outs.append(output.cls_out.to(dtype).chunk(b))  # B × (N, D)
        return {name: tuple(o[i] for o in outs) for i, name in enumerate(names)}

    @torch.no_grad()
    def _forward_guide(self, state: State, t: float) -> State:
        """The guiding network's prediction for the same state, time and labels (its own forward)."""
        x, cls = state[0], (state[1] if len(state) > 1 else None)
        dtype, input_dtype = x.dtype, _input_dtype(self.guide)
        t_in = torch.full((x.shape[0],), float(t), device=x.device)  # (N,)
        with self.autocast():
            output = self.guide(x.to(input_dtype), t_in, self.guide_labels, None if cls is None else cls.to(input_dtype))
        return (output.out.to(dtype),) + (() if cls is None else (output.cls_out.to(dtype),))

    def _compose(self, k: int, cond: Tensor, uncond: Tensor | None, noz: Tensor | None, guide: Tensor | None) -> Tensor:
        """p_c + (w−1)·m⊙(p_c − p_u) + (w_a−1)·(p_c − p_g) + (w_r−1)·(p_c − p_noz) for state component k."""
        is_x = k == 0
        guided = self.channels if is_x else cond.shape[1]  # x: beyond this are learned-sigma channels
        if is_x:
            assert cond.shape[1] in (guided, 2 * guided), f"model output has {cond.shape[1]} channels, state {guided}"
        cfg_channels = guided if self.guidance.cfg_channels == "all" else (self.vae_channels if is_x else 0)
        cfg_scale = self.guidance.cfg_scale
        if not is_x and self.guidance.cls_cfg_scale is not None:  # REG's own weight for the class token
            cfg_channels, cfg_scale = guided, max(self.guidance.cls_cfg_scale, 0.0) or 1.0
        out = cond.clone()
        if uncond is not None:
            c = slice(0, cfg_channels)
            out[:, c] += (cfg_scale - 1.0) * (cond[:, c] - uncond[:, c])
        g = slice(0, guided)  # every predicted channel (learned-sigma channels keep the cond branch's)
        if guide is not None:
            out[:, g] += (self.guidance.ag_scale - 1.0) * (cond[:, g] - guide[:, g])
        if noz is not None:
            out[:, g] += (self.guidance.rg_scale - 1.0) * (cond[:, g] - noz[:, g])
        return out

    def _count(self, names: tuple[str, ...]) -> None:
        self.stats.model_calls += 2 if "guide" in names else 1
        self.stats.nfe += len(names)
        for name in names:
            self.stats.branch_evals[name] = self.stats.branch_evals.get(name, 0) + 1


def _input_dtype(model: Any) -> torch.dtype:
    """The dtype a network's inputs are cast to: its first floating parameter's (float32 without one)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.dtype if param is not None and param.is_floating_point() else torch.float32

"""Guidance arithmetic, branch batching, the interval and the refusals, on a recording stub model."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from redi.common.errors import UserError
from redi.sampler.guidance import GuidanceConfig, GuidedModel, check_guidance
from redi.sampler.samplers import ode_euler

VAE, PCS, CLASSES, D = 2, 3, 10, 4
F64 = torch.float64


@dataclass
class StubConfig:
    objective: str = "sit"
    vae_channels: int = VAE
    pca_rank: int = PCS
    num_classes: int = CLASSES
    reg_token: bool = False
    learn_sigma: bool = False


@dataclass
class Call:
    batch: int
    t: Tensor
    y: Tensor
    z_zeroed: Tensor  # (B,) bool: the row's PC channels are all zero


class RecordingModel(nn.Module):
    """Outputs known functions of (x, t, y, z present, cls) and records every call."""

    def __init__(self, cfg: StubConfig):
        super().__init__()
        self.cfg = cfg
        self.calls: list[Call] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None) -> SimpleNamespace:
        z_zeroed = (x[:, VAE:] == 0).flatten(1).all(1)  # (B,)
        self.calls.append(Call(x.shape[0], t.clone(), y.clone(), z_zeroed))
        channel = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None, None]  # (1, C, 1, 1)
        label = y.to(x.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        has_z = (~z_zeroed).to(x.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        out = 0.5 * x + 0.1 * label * (channel + 1) + 0.3 * t[:, None, None, None] + 0.7 * has_z * channel
        if self.cfg.learn_sigma:
            out = torch.cat([out, torch.tanh(x + label)], 1)  # (B, 2C, H, W)
        cls_out = None if cls is None else 0.9 * cls + 0.2 * label[:, :, 0, 0] - 0.4 * has_z[:, :, 0, 0]  # (B, D)
        return SimpleNamespace(out=out, cls_out=cls_out, repa=None)


def _inputs(n: int = 3, reg: bool = False) -> tuple[tuple[Tensor, ...], Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, VAE + PCS, 2, 2, generator=g)
    state = (x, torch.randn(n, D, generator=g)) if reg else (x,)
    return state, torch.arange(n) + 2


def _branch(model: RecordingModel, state: tuple[Tensor, ...], labels: Tensor, t: float, branch: str):
    """One branch evaluated on its own: cond (x, y), uncond (x, ∅) or noz (x with z = 0, y)."""
    x = state[0].clone()
    if branch == "noz":
        x[:, VAE:] = 0
    y = torch.full_like(labels, CLASSES) if branch == "uncond" else labels
    cls = state[1] if len(state) > 1 else None
    out = model(x, torch.full((x.shape[0],), t), y, cls)
    return out.out, out.cls_out


W, WR = 2.4, 1.5


@pytest.mark.parametrize("reg", [False, True], ids=["redi", "reg"])
@pytest.mark.parametrize("cfg_channels", ["vae", "all"])
@pytest.mark.parametrize("mode", ["cfg", "rg", "cfg+rg"])
def test_guided_prediction_equals_the_documented_formula(mode: str, cfg_channels: str, reg: bool) -> None:
    model = RecordingModel(StubConfig(reg_token=reg)).eval()
    state, labels = _inputs(reg=reg)
    guidance = GuidanceConfig(mode=mode, cfg_scale=W, rg_scale=WR, cfg_channels=cfg_channels)
    guided = GuidedModel(model, labels, guidance)(state, 0.6)
    (c, c_cls), (u, u_cls), (nz, nz_cls) = (_branch(model, state, labels, 0.6, b) for b in ("cond", "uncond", "noz"))

    w = W if "cfg" in mode else 1.0
    wr = WR if "rg" in mode else 1.0
    m = torch.zeros(1, VAE + PCS, 1, 1)
    m[:, : VAE if cfg_channels == "vae" else None] = 1.0
    expected = c + (w - 1) * m * (c - u) + (wr - 1) * (c - nz)
    torch.testing.assert_close(guided[0], expected)
    if mode == "cfg":  # the textbook forms, channel by channel
        torch.testing.assert_close(guided[0][:, :VAE], u[:, :VAE] + W * (c[:, :VAE] - u[:, :VAE]))
        pcs = c[:, VAE:] if cfg_channels == "vae" else u[:, VAE:] + W * (c[:, VAE:] - u[:, VAE:])
        torch.testing.assert_close(guided[0][:, VAE:], pcs)
    if mode == "rg":
        torch.testing.assert_close(guided[0], nz + WR * (c - nz))
    if reg:  # the class token is guided like the PC channels
        m_cls = 1.0 if cfg_channels == "all" else 0.0
        torch.testing.assert_close(guided[1], c_cls + (w - 1) * m_cls * (c_cls - u_cls) + (wr - 1) * (c_cls - nz_cls))
    else:
        assert len(guided) == 1


def test_all_active_branches_go_through_one_batched_call() -> None:
    model = RecordingModel(StubConfig()).eval()
    state, labels = _inputs(n=3)
    GuidedModel(model, labels, GuidanceConfig(mode="cfg+rg", cfg_scale=W, rg_scale=WR))(state, 0.5)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call.batch == 9
    assert call.y.tolist() == labels.tolist() + [CLASSES] * 3 + labels.tolist()  # cond, uncond, noz
    assert call.z_zeroed.tolist() == [False] * 6 + [True] * 3
    assert torch.all(call.t == 0.5)


def test_interval_and_unit_scales_skip_branches() -> None:
    model = RecordingModel(StubConfig()).eval()
    state, labels = _inputs(n=2)
    guided = GuidedModel(model, labels, GuidanceConfig(mode="cfg+rg", cfg_scale=W, rg_scale=WR, interval=(0.2, 0.7)))
    assert guided.branches(0.9) == ("cond",) and guided.branches(0.7) == ("cond", "uncond", "noz")
    out = guided(state, 0.9)  # outside: the plain conditional prediction, one branch computed
    torch.testing.assert_close(out[0], _branch(model, state, labels, 0.9, "cond")[0])
    assert model.calls[0].batch == 2

    assert GuidedModel(model, labels, GuidanceConfig(mode="cfg", cfg_scale=1.0)).branches(0.5) == ("cond",)
    assert GuidedModel(model, labels, GuidanceConfig(mode="cfg+rg", cfg_scale=W)).branches(0.5) == ("cond", "uncond")
    assert GuidedModel(model, labels, GuidanceConfig(mode="none", cfg_scale=W)).branches(0.5) == ("cond",)

    dit = GuidedModel(model, labels, GuidanceConfig(mode="cfg", cfg_scale=W, interval=(0.0, 0.7)), time_scale=1000)
    assert dit.branches(800.0) == ("cond",) and dit.branches(500.0) == ("cond", "uncond")


def test_stats_count_calls_and_nfe_over_a_run() -> None:
    model = RecordingModel(StubConfig()).eval()
    state, labels = _inputs(n=2)
    guided = GuidedModel(model, labels, GuidanceConfig(mode="cfg", cfg_scale=W, interval=(0.0, 0.55)))
    ode_euler(guided, state, 10)  # evaluated at t = 1.0, 0.9, …, 0.1: guided at 0.5 … 0.1
    assert guided.stats.model_calls == len(model.calls) == 10
    assert guided.stats.nfe == 15 and guided.stats.branch_evals == {"cond": 10, "uncond": 5}
    assert [c.batch for c in model.calls] == [2] * 5 + [4] * 5


def test_dit_learned_sigma_channels_take_the_conditional_branch() -> None:
    model = RecordingModel(StubConfig(objective="dit", learn_sigma=True)).eval()
    state, labels = _inputs()
    guided = GuidedModel(model, labels, GuidanceConfig(mode="cfg+rg", cfg_scale=W, rg_scale=WR), time_scale=1000)
    (eps,) = guided(state, 400.0)
    (c, _), (u, _), (nz, _) = (_branch(model, state, labels, 400.0, b) for b in ("cond", "uncond", "noz"))
    ch = VAE + PCS
    assert eps.shape[1] == 2 * ch
    torch.testing.assert_close(eps[:, ch:], c[:, ch:])
    expected = c[:, :ch] + (W - 1) * (c[:, :ch] - u[:, :ch]) * (torch.arange(ch) < VAE)[None, :, None, None]
    torch.testing.assert_close(eps[:, :ch], expected + (WR - 1) * (c[:, :ch] - nz[:, :ch]))


def test_model_runs_under_the_autocast_factory_and_in_float32() -> None:
    entered: list[int] = []

    @contextmanager
    def autocast() -> Iterator[None]:
        entered.append(1)
        yield

    model = RecordingModel(StubConfig()).eval()
    state, labels = _inputs()
    guided = GuidedModel(model, labels, GuidanceConfig(mode="cfg", cfg_scale=W), autocast=autocast)
    out = guided((state[0].double(),), 0.5)
    assert entered == [1] and out[0].dtype == torch.float64
    assert model.calls[0].t.dtype == torch.float32


@dataclass
class Case:
    mode: str
    num_classes: int
    rep_drop: float
    error: str | None = None  # expected message fragment; None: accepted


@pytest.mark.parametrize(
    "case",
    [
        Case("cfg", 1, 0.2, "class-conditional"),
        Case("cfg+rg", 1, 0.2, "class-conditional"),
        Case("rg", 1000, 0.0, "representation drop"),
        Case("cfg+rg", 1000, 0.0, "representation drop"),
        Case("bogus", 1000, 0.2, "Unknown guidance mode"),
        Case("rg", 1, 0.2),
        Case("cfg", 1000, 0.0),
        Case("none", 1, 0.0),
    ],
    ids=lambda c: f"{c.mode}-{c.num_classes}-{c.rep_drop}",
)
def test_check_guidance(case: Case) -> None:
    if case.error is None:
        check_guidance(case.mode, case.num_classes, case.rep_drop)
    else:
        with pytest.raises(UserError, match=case.error):
            check_guidance(case.mode, case.num_classes, case.rep_drop)


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "cfgg"}, {"cfg_scale": -1.0}, {"interval": (0.8, 0.2)}, {"interval": (0.0, 1.5)}, {"cfg_channels": "pc"},
     {"cfg_scale": float("nan")}, {"rg_scale": float("inf")}, {"cls_cfg_scale": float("nan")}],
)
def test_guidance_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(UserError):
        GuidanceConfig(**kwargs)


def test_cfg_refused_for_a_model_trained_without_label_dropout() -> None:
    check_guidance("cfg", 1000, 0.2, 0.1)
    with pytest.raises(UserError, match="label dropout"):
        check_guidance("cfg", 1000, 0.2, 0.0)


@pytest.mark.parametrize("cls_scale", [2.3, 0.0])
def test_reg_class_token_takes_its_own_cfg_scale(cls_scale: float) -> None:
    """REG's sampler: x gets cfg_scale, the class token cls_cfg_scale (≤ 0: the cond branch), both only where CFG is on."""
    model = RecordingModel(StubConfig(reg_token=True, pca_rank=0)).eval()
    state, labels = _inputs(reg=True)
    state = (state[0][:, :VAE], state[1])
    guided = GuidedModel(model, labels, GuidanceConfig(mode="cfg", cfg_scale=1.8, cls_cfg_scale=cls_scale, interval=(0.0, 0.7)))
    (c, c_cls), (u, u_cls) = (_branch(model, state, labels, 0.6, b) for b in ("cond", "uncond"))
    x, cls = guided(state, 0.6)
    torch.testing.assert_close(x, u + 1.8 * (c - u))
    torch.testing.assert_close(cls, u_cls + cls_scale * (c_cls - u_cls) if cls_scale > 0 else c_cls)
    x, cls = guided(state, 0.8)  # outside the interval: no guidance at all
    torch.testing.assert_close(cls, _branch(model, state, labels, 0.8, "cond")[1])


def test_heun_corrector_guides_as_the_start_of_its_step() -> None:
    """REPA's Heun decides CFG for the corrector (evaluated at t_next) with t_cur."""
    from redi.sampler.samplers import ode_heun

    model = RecordingModel(StubConfig()).eval()
    state, labels = _inputs(n=2)
    ode_heun(GuidedModel(model, labels, GuidanceConfig(mode="cfg", cfg_scale=W, interval=(0.0, 0.7))), state, 10)
    # Steps start at t = 1.0, 0.9, …, 0.1; a call is guided (batch 4) exactly when its step started at t ≤ 0.7.
    starts = [1.0 - i / 10 for i in range(10)]
    expected = [4 if s <= 0.7 + 1e-9 else 2 for s in starts for _ in range(2)][:-1]  # the last step has no corrector
    assert [call.batch for call in model.calls] == expected


# ---- AutoGuidance: a second, guiding network ------------------------------------------------


class WorseModel(RecordingModel):
    """The recording model's outputs, changed: a stand-in for a smaller or earlier network."""

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None) -> SimpleNamespace:
        out = super().forward(x, t, y, cls)
        return SimpleNamespace(out=0.8 * out.out + 0.05, cls_out=None if cls is None else 0.6 * out.cls_out, repa=None)


WA = 2.1


@pytest.mark.parametrize("reg", [False, True], ids=["redi", "reg"])
@pytest.mark.parametrize("mode", ["autoguidance", "autoguidance+rg"])
def test_autoguidance_equals_the_documented_formula_with_one_call_per_network(mode: str, reg: bool) -> None:
    model, guide = RecordingModel(StubConfig(reg_token=reg)).eval(), WorseModel(StubConfig(reg_token=reg)).eval()
    state, labels = _inputs(reg=reg)
    guidance = GuidanceConfig(mode=mode, ag_scale=WA, rg_scale=WR if "rg" in mode else 1.0)
    guided = GuidedModel(model, labels, guidance, guide=guide)
    out = guided(state, 0.6)
    assert len(model.calls) == len(guide.calls) == 1  # the good network's branches batched, the guide apart
    assert model.calls[0].batch == (2 if "rg" in mode else 1) * 3 and guide.calls[0].batch == 3
    assert guide.calls[0].y.tolist() == labels.tolist() and torch.all(guide.calls[0].t == 0.6)
    assert guided.stats.model_calls == 2 and guided.stats.nfe == (3 if "rg" in mode else 2)
    (c, c_cls), (nz, nz_cls) = (_branch(model, state, labels, 0.6, b) for b in ("cond", "noz"))
    g, g_cls = _branch(guide, state, labels, 0.6, "cond")
    wr = WR if "rg" in mode else 1.0
    torch.testing.assert_close(out[0], c + (WA - 1) * (c - g) + (wr - 1) * (c - nz))  # every channel, PCs included
    if mode == "autoguidance":
        torch.testing.assert_close(out[0], g + WA * (c - g))  # D_w = D_bad + w·(D_good − D_bad), in v
    if reg:
        torch.testing.assert_close(out[1], c_cls + (WA - 1) * (c_cls - g_cls) + (wr - 1) * (c_cls - nz_cls))


def test_autoguidance_at_scale_one_is_the_good_model_and_never_runs_the_guide() -> None:
    model, guide = RecordingModel(StubConfig()).eval(), WorseModel(StubConfig()).eval()
    state, labels = _inputs()
    guided = GuidedModel(model, labels, GuidanceConfig(mode="autoguidance", ag_scale=1.0), guide=guide)
    (out,) = ode_euler(guided, state, 4)
    (plain,) = ode_euler(GuidedModel(model, labels, GuidanceConfig()), state, 4)
    assert torch.equal(out, plain) and guide.calls == []
    assert guided.stats.nfe == guided.stats.model_calls == 4


def test_autoguidance_counts_both_networks_inside_its_interval_and_feeds_an_unconditional_guide_label_0() -> None:
    model, guide = RecordingModel(StubConfig()).eval(), WorseModel(StubConfig(num_classes=1)).eval()
    state, labels = _inputs(n=2)
    guided = GuidedModel(model, labels, GuidanceConfig(mode="autoguidance", ag_scale=WA, interval=(0.0, 0.55)), guide=guide)
    ode_euler(guided, state, 10)  # evaluated at t = 1.0, 0.9, …, 0.1: guided at 0.5 … 0.1
    assert len(model.calls) == 10 and len(guide.calls) == 5
    assert guided.stats.model_calls == 15 and guided.stats.nfe == 15
    assert guided.stats.branch_evals == {"cond": 10, "guide": 5}
    assert all(c.y.tolist() == [0, 0] for c in guide.calls)


class GaussianVelocity(nn.Module):
    """The exact SiT velocity of data N(μ, s²) per element (x_t = (1 − t)·x_0 + t·ε): a network known analytically."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.cfg, self.mean, self.std = StubConfig(), mean, std
        self.dtype_anchor = nn.Parameter(torch.zeros((), dtype=F64))  # GuidedModel feeds inputs in a network's dtype

    def variance(self, t: float) -> float:
        return (1 - t) ** 2 * self.std**2 + t**2  # of x_t

    def denoised(self, x: Tensor, t: float) -> Tensor:
        """E[x_0 | x_t = x]: the Gaussian posterior mean."""
        return self.mean + (1 - t) * self.std**2 * (x - (1 - t) * self.mean) / self.variance(t)

    def score(self, x: Tensor, t: float) -> Tensor:
        return -(x - (1 - t) * self.mean) / self.variance(t)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None) -> SimpleNamespace:
        tt = float(t[0])
        v = (x - self.denoised(x, tt)) / tt  # x_t = x_0 + t·v
        return SimpleNamespace(out=v, cls_out=None, repa=None)


def test_autoguidance_of_closed_form_gaussians_gives_the_guided_denoiser_score_and_density() -> None:
    """Good model: data N(1, 0.5²); bad: the same data learned too wide, N(1.2, 0.9²). The guided velocity must be the
    field of D_w = D_bad + w·(D_good − D_bad) and of the score of p_good^w / p_bad^(w−1), computed in closed form."""
    good, bad = GaussianVelocity(1.0, 0.5).eval(), GaussianVelocity(1.2, 0.9).eval()
    x = torch.randn(4, VAE + PCS, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    guided = GuidedModel(good, torch.zeros(4, dtype=torch.long), GuidanceConfig(mode="autoguidance", ag_scale=WA), guide=bad)
    for t in (0.875, 0.5, 0.25):  # float32 holds them exactly (the network's time input)
        (v,) = guided((x,), t)
        d_w = bad.denoised(x, t) + WA * (good.denoised(x, t) - bad.denoised(x, t))
        torch.testing.assert_close(x - t * v, d_w, rtol=1e-12, atol=1e-12)  # the denoiser of the guided velocity
        score_w = WA * good.score(x, t) - (WA - 1) * bad.score(x, t)  # ∇log p_good^w p_bad^(1−w)
        torch.testing.assert_close(-((1 - t) * v + x) / t, score_w, rtol=1e-12, atol=1e-12)
        # that density is the Gaussian of precision w/σ_g² − (w − 1)/σ_b² and the matching mean: its score in closed form
        var_g, var_b = good.variance(t), bad.variance(t)
        precision = WA / var_g - (WA - 1) / var_b
        mean = (WA * (1 - t) * good.mean / var_g - (WA - 1) * (1 - t) * bad.mean / var_b) / precision
        torch.testing.assert_close(score_w, -precision * (x - mean), rtol=1e-12, atol=1e-12)


def test_autoguidance_config_and_refusals() -> None:
    assert GuidanceConfig(mode="autoguidance", ag_scale=2.0).uses_ag
    assert not GuidanceConfig(mode="autoguidance", ag_scale=1.0).uses_ag and GuidanceConfig(mode="autoguidance").needs_guide
    assert not GuidanceConfig(mode="cfg", cfg_scale=2.0, ag_scale=2.0).uses_ag
    with pytest.raises(UserError, match="≥ 0"):
        GuidanceConfig(mode="autoguidance", ag_scale=-1.0)
    with pytest.raises(AssertionError, match="guiding network"):
        GuidedModel(RecordingModel(StubConfig()).eval(), torch.zeros(1, dtype=torch.long), GuidanceConfig(mode="autoguidance"))

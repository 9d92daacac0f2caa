"""Samplers against analytic models: Gaussian and Gaussian-mixture data with exact v / ε fields."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from redi.common.errors import UserError
from redi.sampler.guidance import GuidanceConfig
from redi.sampler.ddpm import DDPMSchedule, RespacedDDPM, ddpm_ancestral, space_timesteps
from redi.sampler.interface import ADAPTIVE_SOLVERS, FIXED_SOLVERS, SamplerOptions
from redi.sampler.samplers import (
    PerSampleNoise,
    euler_maruyama,
    make_noise,
    ode_euler,
    ode_heun,
    ode_solve,
    sample_latents,
    score_from_velocity,
    sde_last_step,
)

F64 = torch.float64


class BatchNoise:
    """One generator for the whole batch (fast; the distribution tests need no per-sample seeds)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.g = torch.Generator().manual_seed(seed)

    def draw(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn((self.n, *shape), generator=self.g, dtype=F64)


@dataclass(frozen=True)
class Mixture:
    """Diagonal Gaussian mixture data x_0 ~ Σ_k w_k N(μ_k, diag(s_k²)) with its exact SiT velocity."""

    weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    stds: Tensor  # (K, d)

    @classmethod
    def of(cls, weights: list[float], means: list[list[float]], stds: list[list[float]]) -> Mixture:
        return cls(torch.tensor(weights, dtype=F64), torch.tensor(means, dtype=F64), torch.tensor(stds, dtype=F64))

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> Tensor:
        second = sum(w * (torch.diag(s**2) + torch.outer(m, m)) for w, m, s in zip(self.weights, self.means, self.stds, strict=True))
        return second - torch.outer(self.mean(), self.mean())

    def velocity(self, state: tuple[Tensor, ...], t: float, guide_t: float | None = None) -> tuple[Tensor, ...]:
        """v(x, t) = E[ε − x_0 | x_t = x] for x_t = (1−t)x_0 + tε, mixing the per-component fields."""
        x = state[0][:, None, :]  # (N, 1, d)
        var = (1 - t) ** 2 * self.stds**2 + t**2  # (K, d) marginal variance of x_t per component
        r = x - (1 - t) * self.means  # (N, K, d)
        log_p = (-0.5 * r**2 / var - 0.5 * torch.log(var)).sum(-1) + torch.log(self.weights)  # (N, K)
        resp = torch.softmax(log_p, -1)[..., None]  # (N, K, 1)
        e_eps = t * r / var  # E[ε | x_t, k]
        e_x0 = self.means + (1 - t) * self.stds**2 * r / var  # E[x_0 | x_t, k]
        return ((resp * (e_eps - e_x0)).sum(1),)  # (N, d)


GAUSS = Mixture.of([1.0], [[1.0, -0.5]], [[0.5, 2.0]])
MIX = Mixture.of([0.3, 0.7], [[-2.0, 0.0], [1.5, 1.0]], [[0.5, 0.8], [0.7, 0.4]])


def assert_moments(x: Tensor, mean: Tensor, cov: Tensor, bias: float) -> None:
    """Sample mean/cov equal the target within 5 standard errors plus `bias`·scale (discretisation)."""
    n = x.shape[0]
    sd = cov.diagonal().sqrt()
    assert ((x.mean(0) - mean).abs() <= 5 * sd / n**0.5 + bias * sd).all(), (x.mean(0), mean)
    scale = torch.outer(sd, sd)
    tol = 5 * ((scale**2 + cov**2) / n).sqrt() + bias * scale
    assert ((torch.cov(x.T) - cov).abs() <= tol).all(), (torch.cov(x.T), cov)


def test_score_from_velocity_is_the_gaussian_score() -> None:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    for t in (0.9, 0.5, 0.1):
        (v,) = GAUSS.velocity((x,), t)
        var = (1 - t) ** 2 * GAUSS.stds[0] ** 2 + t**2
        closed_form = -(x - (1 - t) * GAUSS.means[0]) / var  # ∇log N(x; (1−t)μ, var)
        torch.testing.assert_close(score_from_velocity(v, x, t), closed_form, rtol=1e-10, atol=1e-10)


N = 8000


@pytest.mark.parametrize("data", [GAUSS, MIX], ids=["gauss", "mixture"])
@pytest.mark.parametrize("method", ["sde", "euler", "heun"])
def test_sit_samplers_reproduce_the_data_distribution(data: Mixture, method: str) -> None:
    x1 = BatchNoise(N, 0).draw((2,))
    if method == "sde":
        (x0,) = euler_maruyama(data.velocity, (x1,), 100, BatchNoise(N, 1))
    elif method == "euler":
        (x0,) = ode_euler(data.velocity, (x1,), 100)
    else:
        (x0,) = ode_heun(data.velocity, (x1,), 40)
    assert_moments(x0, data.mean(), data.cov(), bias=0.01 if method == "heun" else 0.04)
    if data is MIX:  # the modes keep their weights (component 0 sits at x < 0)
        assert abs((x0[:, 0] < -0.25).double().mean().item() - 0.3) < 0.02


class Counted:
    """A field that counts its evaluations and the times it was evaluated at."""

    def __init__(self, field):
        self.field, self.times = field, []

    def __call__(self, state: tuple[Tensor, ...], t: float, guide_t: float | None = None) -> tuple[Tensor, ...]:
        self.times.append(t)
        return self.field(state, t)


@pytest.mark.parametrize("data", [GAUSS, MIX], ids=["gauss", "mixture"])
def test_dopri5_reaches_the_closed_form(data: Mixture) -> None:
    """SiT/ReDi's default ODE: dopri5 at atol 1e-6, rtol 1e-3, adaptively from t = 1 to 0."""
    x1 = BatchNoise(N, 0).draw((2,))
    field = Counted(data.velocity)
    (x0,) = ode_solve(field, (x1,), "dopri5", None, atol=1e-6, rtol=1e-3)
    assert_moments(x0, data.mean(), data.cov(), bias=0.005)
    if data is GAUSS:  # the flow of Gaussian data is affine: x_0 = μ + s ⊙ x_1, sample by sample
        exact = GAUSS.means[0] + GAUSS.stds[0] * x1
        rms = lambda v: v.pow(2).mean().sqrt().item()  # torchdiffeq controls the batch's RMS error
        assert rms(x0 - exact) <= 1e-3 * rms(exact) + 1e-6
        (tight,) = ode_solve(data.velocity, (x1,), "dopri5", None, atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(tight, exact, rtol=0, atol=1e-5)
    else:
        assert abs((x0[:, 0] < -0.25).double().mean().item() - 0.3) < 0.02
    assert 6 < len(field.times) < 200 and field.times[0] == 1.0  # adaptive: a few dozen evaluations


def test_torchdiffeq_fixed_grid_euler_equals_ode_euler() -> None:
    x1 = BatchNoise(64, 9).draw((2,))
    ours, theirs = Counted(MIX.velocity), Counted(MIX.velocity)
    (a,) = ode_euler(ours, (x1,), 25)
    (b,) = ode_solve(theirs, (x1,), "euler", 25, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert theirs.times == pytest.approx(ours.times, abs=1e-12) and len(ours.times) == 25


def test_every_offered_solver_runs() -> None:
    x1 = BatchNoise(256, 10).draw((2,))
    for solver in ADAPTIVE_SOLVERS + FIXED_SOLVERS:
        (x0,) = ode_solve(GAUSS.velocity, (x1,), solver, 20, atol=1e-5, rtol=1e-3)
        tol = 0.5 if solver == "euler" else 0.05  # first order at 20 steps
        torch.testing.assert_close(x0, GAUSS.means[0] + GAUSS.stds[0] * x1, rtol=0, atol=tol, msg=solver)


def test_tweedie_last_step_is_its_formula_and_the_posterior_mean() -> None:
    """SiT: x/α_t + σ_t²/α_t · score (α_t = 1 − t, σ_t = t here); for Gaussian data that is E[x_0 | x_t]."""
    x = BatchNoise(16, 11).draw((2,)) * 0.3
    t = 0.04
    (v,) = GAUSS.velocity((x,), t)
    score = -((1 - t) * v + x) / t
    torch.testing.assert_close(sde_last_step("tweedie", x, v, t), x / (1 - t) + t**2 / (1 - t) * score)
    mu, s2 = GAUSS.means[0], GAUSS.stds[0] ** 2
    posterior_mean = mu + (1 - t) * s2 / ((1 - t) ** 2 * s2 + t**2) * (x - (1 - t) * mu)  # Gaussian conditioning
    torch.testing.assert_close(sde_last_step("tweedie", x, v, t), posterior_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde_last_step("euler", x, v, t), x - t * v)
    torch.testing.assert_close(sde_last_step("mean", x, v, t), x - (v - t * score) * t)


@pytest.mark.parametrize("last_step", ["mean", "tweedie", "euler", "none"])
def test_sde_last_step_options(last_step: str) -> None:
    """SiT transport: EM from t = 1 to last_step_size in steps − 1 steps, then the last step; none: EM to 0."""
    field = Counted(MIX.velocity)
    (x0,) = euler_maruyama(field, (BatchNoise(N, 2).draw((2,)),), 100, BatchNoise(N, 3), last_step, 0.05)
    end = 0.0 if last_step == "none" else 0.05
    grid = torch.linspace(1.0, end, 100, dtype=F64).tolist()
    assert field.times == (grid[:-1] if last_step == "none" else grid)
    assert_moments(x0, MIX.mean(), MIX.cov(), bias=0.05)


def _ks(a: Tensor, b: Tensor) -> float:
    """Two-sample Kolmogorov–Smirnov statistic of 1-D samples."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def test_sde_and_ode_agree_in_distribution() -> None:
    (sde,) = euler_maruyama(MIX.velocity, (BatchNoise(N, 2).draw((2,)),), 100, BatchNoise(N, 3))
    (ode,) = ode_heun(MIX.velocity, (BatchNoise(N, 4).draw((2,)),), 40)
    for d in range(2):
        assert _ks(sde[:, d], ode[:, d]) < 0.03  # 1.5× the 0.1% critical value for n = m = 8000


SCHEDULE = DDPMSchedule()
ALPHAS_CUMPROD = torch.cumprod(1 - SCHEDULE.betas(), 0)
MU, SD = GAUSS.means[0], GAUSS.stds[0]


def gaussian_eps(x: Tensor, timestep: float) -> tuple[Tensor, Tensor]:
    """E[ε | x_t] and Var[x_0 | x_t] for x_t = √ᾱ x_0 + √(1−ᾱ) ε, x_0 ~ N(μ, diag(s²))."""
    a = ALPHAS_CUMPROD[int(timestep)]
    var = a * SD**2 + 1 - a
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / var, SD**2 * (1 - a) / var


def test_space_timesteps_follow_adm_and_keep_alphas_cumprod() -> None:
    def adm(num_timesteps: int, count: int) -> list[int]:  # guided-diffusion respace.space_timesteps, one section
        stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
        cur, taken = 0.0, []
        for _ in range(count):
            taken.append(round(cur))
            cur += stride
        return sorted(set(taken))

    for count in (21, 27, 100, 250, 333):
        assert space_timesteps(1000, count) == adm(1000, count), count
    assert 499 in space_timesteps(1000, 21)  # round(10 · 49.95) would give 500
    use = space_timesteps(1000, 250)
    assert len(use) == 250 and use[:3] == [0, 4, 8] and use[-1] == 999
    assert space_timesteps(1000, 1000) == list(range(1000))
    process = RespacedDDPM.create(SCHEDULE, 250)
    respaced_cumprod = torch.cumprod(1 - process.log_betas.exp(), 0)
    torch.testing.assert_close(respaced_cumprod, ALPHAS_CUMPROD[use])
    with pytest.raises(UserError):
        space_timesteps(1000, 1001)


def test_ddpm_fixed_large_variance_reproduces_gaussian() -> None:
    def predict(state: tuple[Tensor, ...], t: float) -> tuple[Tensor, ...]:
        return (gaussian_eps(state[0], t)[0],)

    (x0,) = ddpm_ancestral(predict, (BatchNoise(N, 5).draw((2,)),), 250, BatchNoise(N, 6))
    # β bounds the true reverse variance from above (β̃ from below): within a few percent at 250 steps.
    assert_moments(x0, MU, torch.diag(SD**2), bias=0.08)


def test_ddpm_learned_range_with_the_optimal_variance_is_exact_in_few_steps() -> None:
    steps = 10
    process = RespacedDDPM.create(SCHEDULE, steps)

    def predict(state: tuple[Tensor, ...], t: float) -> tuple[Tensor, ...]:
        """ε plus the v whose learned-range variance is the true Var[x_{t−1}|x_t] = β̃ + coef1²·Var[x_0|x_t]."""
        i = process.timesteps.index(int(t))
        eps, var_x0 = gaussian_eps(state[0], t)
        lo, hi = process.posterior_log_variance[i], process.log_betas[i]
        true_log_var = torch.log(lo.exp() + process.posterior_mean_coef1[i] ** 2 * var_x0)
        v = 2 * (true_log_var - lo) / (hi - lo) - 1  # inverse of frac = (v+1)/2
        return (torch.cat([eps, v.expand_as(eps)], 1),)  # (N, 2d): ε then v

    (x0,) = ddpm_ancestral(predict, (BatchNoise(N, 7).draw((2,)),), steps, BatchNoise(N, 8))
    assert_moments(x0, MU, torch.diag(SD**2), bias=0.0)


def test_learned_range_endpoints() -> None:
    process = RespacedDDPM.create(SCHEDULE, 250)
    ones = torch.ones(3, dtype=F64)
    assert torch.allclose(process.log_variance(7, -ones), process.posterior_log_variance[7].expand(3))
    assert torch.allclose(process.log_variance(7, ones), process.log_betas[7].expand(3))
    # Without learned σ: DiT's fixed large variance, β (β̃_1 at the first step).
    assert process.log_variance(7, None) == pytest.approx(float(process.log_betas[7]))
    assert process.log_variance(0, None) == pytest.approx(float(process.posterior_log_variance[0]))


# ---- sample_latents: seeding, model calls -----------------------------------------------------


@dataclass
class StubConfig:
    objective: str = "sit"
    vae_channels: int = 2
    pca_rank: int = 1
    num_classes: int = 5
    reg_token: bool = False
    learn_sigma: bool = False


class ElementwiseModel(nn.Module):
    """A per-sample network (no cross-sample ops): its outputs depend on x, t, y and cls only."""

    def __init__(self, cfg: StubConfig):
        super().__init__()
        self.cfg = cfg
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None) -> SimpleNamespace:
        self.calls += 1
        scale = self.cfg.num_classes * (2 if self.cfg.objective == "sit" else 2000)
        cond = (y.float() + 1)[:, None, None, None] / scale + t[:, None, None, None] / scale  # (N, 1, 1, 1)
        out = 0.5 * torch.tanh(x) + cond  # (N, C, H, W)
        if self.cfg.learn_sigma:
            out = torch.cat([out, torch.tanh(x)], 1)  # (N, 2C, H, W): ε, then v ∈ (−1, 1)
        cls_out = None if cls is None else 0.5 * torch.tanh(cls) + cond[:, :, 0, 0]  # (N, D)
        return SimpleNamespace(out=out, cls_out=cls_out, repa=None)


def _sample(model: ElementwiseModel, sampler: str, idx: list[int], guidance: GuidanceConfig, seed: int = 3):
    indices = torch.tensor(idx)
    x, cls, stats = sample_latents(
        model, indices % 5, indices, seed, sampler, 6, guidance, latent_size=2,
        cls_dim=4 if model.cfg.reg_token else None,
    )
    return x, cls, stats


@pytest.mark.parametrize(
    "cfg,sampler",
    [
        (StubConfig(), "sde"),
        (StubConfig(reg_token=True), "sde"),
        (StubConfig(objective="dit", learn_sigma=True), "ddpm"),
        (StubConfig(objective="dit"), "ddpm"),
    ],
    ids=["sde", "sde-reg", "ddpm-learned-sigma", "ddpm-fixed"],
)
def test_samples_depend_only_on_seed_and_index(cfg: StubConfig, sampler: str) -> None:
    model = ElementwiseModel(cfg).eval()
    guidance = GuidanceConfig(mode="cfg+rg", cfg_scale=2.0, rg_scale=1.5, interval=(0.0, 0.7))
    full_x, full_cls, _ = _sample(model, sampler, list(range(8)), guidance)
    for batch in (1, 3):
        parts = [_sample(model, sampler, list(range(s, min(s + batch, 8))), guidance) for s in range(0, 8, batch)]
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        if cfg.reg_token:
            assert torch.equal(torch.cat([p[1] for p in parts]), full_cls)
    other_seed, _, _ = _sample(model, sampler, list(range(8)), guidance, seed=4)
    assert not torch.allclose(other_seed, full_x)
    assert full_x.shape == (8, 3, 2, 2) and (full_cls is None) != cfg.reg_token


def test_make_noise_is_the_initial_state_and_per_index() -> None:
    a = make_noise(7, torch.tensor([0, 1, 2]), (3, 2, 2), "cpu")
    b = make_noise(7, torch.tensor([2, 0]), (3, 2, 2), "cpu")
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    noise = PerSampleNoise(7, torch.tensor([0, 1, 2]), "cpu")
    assert torch.equal(noise.draw((3, 2, 2)), a) and not torch.equal(noise.draw((3, 2, 2)), a)

    class Identity(ElementwiseModel):
        def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None) -> SimpleNamespace:
            return SimpleNamespace(out=torch.zeros_like(x), cls_out=None, repa=None)  # v = 0: x stays x_1

    x, _, _ = sample_latents(
        Identity(StubConfig()).eval(), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), 7, "ode", 4,
        GuidanceConfig(), latent_size=2,
    )
    assert torch.equal(x, a)


@pytest.mark.parametrize(
    "sampler,steps,options,calls",
    [("sde", 6, SamplerOptions(), 6), ("sde", 6, SamplerOptions(last_step="none"), 5), ("ode", 6, SamplerOptions(), 6),
     ("heun", 6, SamplerOptions(), 11), ("ode", 6, SamplerOptions(solver="rk4"), 24),
     ("ode", None, SamplerOptions(solver="dopri5"), None)],
)
def test_sit_samplers_count_network_calls(sampler: str, steps: int | None, options: SamplerOptions, calls: int | None) -> None:
    model = ElementwiseModel(StubConfig()).eval()
    _, _, stats = sample_latents(
        model, torch.zeros(2, dtype=torch.long), torch.arange(2), 0, sampler, steps, GuidanceConfig(), latent_size=2,
        options=options,
    )
    assert model.calls == stats.model_calls == stats.nfe == (calls or model.calls)
    if options.adaptive:
        assert model.calls > 6  # dopri5: 6 stages a step, plus the initial-step selection: counted as they happen


@pytest.mark.parametrize("reg", [False, True], ids=["sit", "reg"])
def test_torchdiffeq_euler_guides_like_our_euler(reg: bool) -> None:
    """Guidance (CFG and RG, with an interval) is inside the vector field, exactly as for the fixed-step loop."""
    model = ElementwiseModel(StubConfig(reg_token=reg)).eval()
    guidance = GuidanceConfig(mode="cfg+rg", cfg_scale=2.0, rg_scale=1.5, interval=(0.0, 0.7), cls_cfg_scale=1.5 if reg else None)
    run = lambda options: sample_latents(
        model, torch.arange(4) % 5, torch.arange(4), 1, "ode", 10, guidance, latent_size=2,
        cls_dim=4 if reg else None, options=options)
    x, cls, stats = run(SamplerOptions())
    x2, cls2, stats2 = run(SamplerOptions(solver="euler"))
    torch.testing.assert_close(x2, x, rtol=0, atol=1e-6)
    if reg:
        torch.testing.assert_close(cls2, cls, rtol=0, atol=1e-6)
    assert stats2 == stats and stats.branch_evals == {"cond": 10, "uncond": 7, "noz": 7}
    _, _, adaptive = run(SamplerOptions(solver="dopri5"))
    assert adaptive.branch_evals["uncond"] < adaptive.branch_evals["cond"]  # outside [0, 0.7]: the cond branch only


def test_a_failing_adaptive_solve_is_one_sentence() -> None:
    def blows_up(state: tuple[Tensor, ...], t: float, guide_t: float | None = None) -> tuple[Tensor, ...]:
        return (torch.full_like(state[0], float("nan")),)

    with pytest.raises(UserError, match="dopri5 solver stopped"):
        ode_solve(blows_up, (torch.zeros(2, 3),), "dopri5", None, 1e-6, 1e-3)


def test_sample_latents_float64_and_sampler_checks() -> None:
    model = ElementwiseModel(StubConfig()).eval()
    x, _, _ = sample_latents(
        model, torch.zeros(2, dtype=torch.long), torch.arange(2), 0, "ode", 3, GuidanceConfig(), latent_size=2,
        dtype=F64,
    )
    assert x.dtype == F64
    with pytest.raises(UserError, match="ddpm for DiT"):
        _sample(model, "ddpm", [0], GuidanceConfig())
    with pytest.raises(UserError, match="ddpm for DiT"):
        _sample(ElementwiseModel(StubConfig(objective="dit")).eval(), "sde", [0], GuidanceConfig())
    with pytest.raises(UserError, match="Unknown sampler"):
        _sample(model, "dpm++", [0], GuidanceConfig())
    with pytest.raises(UserError, match="needs the ode sampler"):
        sample_latents(model, torch.zeros(1, dtype=torch.long), torch.arange(1), 0, "sde", 3, GuidanceConfig(),
                       latent_size=2, options=SamplerOptions(solver="dopri5"))
    with pytest.raises(UserError, match="Too few"):
        sample_latents(model, torch.zeros(1, dtype=torch.long), torch.arange(1), 0, "sde", 1, GuidanceConfig(),
                       latent_size=2, options=SamplerOptions(last_step="tweedie"))
    for bad in (dict(solver="lsoda"), dict(atol=0.0), dict(rtol=float("nan")), dict(last_step="Mean"),
                dict(last_step_size=1.0)):
        with pytest.raises(UserError):
            SamplerOptions(**bad)

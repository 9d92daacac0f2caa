"""The losses against hand computations on tiny tensors, with a stand-in model of known output."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from redi.common.errors import UserError
from redi.pipeline.latent_norm import LatentNorm
from redi.trainer.models import ModelConfig, ModelOutput, build_model
from redi.trainer.objectives import (
    LossConfig,
    TrainBatch,
    check_batch,
    check_compatible,
    compute_loss,
    discretized_gaussian_log_likelihood,
    prepare_batch,
    sample_time,
)

N, SIDE, D, L = 8, 4, 6, 4  # batch, latent side, encoder width, patch tokens ((4/2)²)


class StandIn(nn.Module):
    """Same forward signature as DiffusionTransformer; output 0.5·x + 0.1·t + 0.01·y; records its inputs."""

    def __init__(self, cfg: ModelConfig, repa_out: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.repa_out = repa_out
        self.fixed_out: torch.Tensor | None = None  # when set, returned as `out` whatever the input
        self.seen: dict[str, torch.Tensor | None] = {}

    def forward(self, x, t, y, cls=None) -> ModelOutput:
        self.seen = dict(x=x.clone(), t=t.clone(), y=y.clone(), cls=None if cls is None else cls.clone())
        out = 0.5 * x + 0.1 * t.view(-1, 1, 1, 1) + 0.01 * y.float().view(-1, 1, 1, 1)
        if self.fixed_out is not None:
            out = self.fixed_out
        return ModelOutput(
            out=out,
            cls_out=None if cls is None else 0.5 * cls,
            repa=self.repa_out if self.cfg.repa_depth else None,
        )


def model_config(method: str, objective: str = "sit", class_dropout: float = 0.0, **extra) -> ModelConfig:
    """The tiny model config a method needs."""
    pcs = method in ("redi", "redi+repa")
    repa = method in ("repa", "reg", "redi+repa")
    return ModelConfig(
        size="debug",
        objective=objective,
        input_size=SIDE,
        pca_rank=2 if pcs else 0,
        num_classes=10,
        class_dropout=class_dropout,
        repa_depth=1 if repa else 0,
        repa_dim=D,
        reg_token=method == "reg",
        **extra,
    )


def make_batch(cfg: ModelConfig, seed: int = 1) -> TrainBatch:
    """Random data of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(
        x0=torch.randn(N, cfg.in_channels, SIDE, SIDE, generator=g),
        y=torch.randint(0, 10, (N,), generator=g),
        cls=torch.randn(N, D, generator=g),
        patch_tokens=torch.randn(N, L, D, generator=g),
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors, by hand."""
    return float((a * b).sum() / (a.norm() * b.norm()))


def hand_sit_loss(model: StandIn, batch: TrainBatch, cfg: LossConfig, seed: int) -> tuple[float, list[bool]]:
    """The expected SiT loss, sample by sample, re-drawing the same random numbers; also the drop decisions."""
    mcfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    y = batch.y.clone()
    if cfg.class_dropout > 0:
        y[torch.rand(N, generator=g) < cfg.class_dropout] = mcfg.num_classes
    drop = [False] * N
    if cfg.rep_drop > 0:
        if cfg.rep_drop_mode == "sample":
            drop = (torch.rand(N, generator=g) < cfg.rep_drop).tolist()
        else:
            drop = [bool(torch.rand(1, generator=g) < cfg.rep_drop)] * N
    t = torch.rand(N, generator=g) if cfg.weighting == "uniform" else 1 / (1 + torch.exp(-torch.randn(N, generator=g)))
    eps = torch.randn(batch.x0.shape, generator=g)
    eps_c = torch.randn(N, D, generator=g) if cfg.uses_reg else None
    total = 0.0
    for i in range(N):
        x0 = batch.x0[i].clone()
        if drop[i] and cfg.rep_drop_target == "clean":
            x0[4:] = 0
        xt = (1 - t[i]) * x0 + t[i] * eps[i]
        if drop[i] and cfg.rep_drop_target == "noisy":
            xt[4:] = 0
        pred = 0.5 * xt + 0.1 * t[i] + 0.01 * float(y[i])
        err = (pred - (eps[i] - x0)) ** 2
        loss = float(err[:4].mean())
        if cfg.uses_pcs:
            loss += (0.0 if drop[i] else cfg.lambda_z) * float(err[4:].mean())
        if cfg.uses_repa:  # REG aligns 1 + L rows: its projected class token with the DINOv2 CLS, then the patches
            targets = ([batch.cls[i]] if cfg.uses_reg else []) + list(batch.patch_tokens[i])
            loss -= cfg.repa_weight * sum(cosine(p, z) for p, z in zip(model.repa_out[i], targets, strict=True)) / len(targets)
        if cfg.uses_reg:
            c = batch.cls[i]
            cls_t = (1 - t[i]) * c + t[i] * eps_c[i]
            loss += cfg.cls_weight * float(((0.5 * cls_t - (eps_c[i] - c)) ** 2).mean())
        total += loss
    return total / N, drop


def stand_in(method: str, class_dropout: float = 0.0, objective: str = "sit", **extra) -> StandIn:
    """A stand-in model for a method, with a fixed random REPA output (REG: 1 + L rows, its class token first)."""
    rows = L + int(method == "reg")
    repa_out = torch.randn(N, rows, D, generator=torch.Generator().manual_seed(7))
    return StandIn(model_config(method, objective, class_dropout, **extra), repa_out)


@pytest.mark.parametrize(
    "method,lambda_z,class_dropout,weighting",
    [("baseline", 1.0, 0.0, "uniform"), ("redi", 0.7, 0.3, "uniform"), ("repa", 1.0, 0.0, "lognormal"),
     ("reg", 1.0, 0.3, "uniform"), ("reg", 1.0, 0.0, "lognormal"), ("redi+repa", 1.0, 0.0, "uniform")],
)
def test_sit_loss_matches_hand_computation(method, lambda_z, class_dropout, weighting):
    model = stand_in(method, class_dropout)
    cfg = LossConfig(method=method, lambda_z=lambda_z, class_dropout=class_dropout, weighting=weighting)
    batch = make_batch(model.cfg)
    result = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(3))
    expected, _ = hand_sit_loss(model, batch, cfg, seed=3)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    optional = [("pcs", cfg.uses_pcs), ("repa", cfg.uses_repa), ("cls", cfg.uses_reg)]
    wanted = {"vae"} | {name for name, on in optional if on}
    assert set(result.terms) == wanted
    assert all(not term.requires_grad and term.ndim == 0 for term in result.terms.values())


def test_reg_aligns_its_class_token_with_the_dinov2_cls_among_1_plus_l_rows():
    """REG train.py/loss.py: target [CLS; patches], projector on all 1 + L tokens, −cos averaged over the 1 + L rows."""
    model = stand_in("reg")
    batch = make_batch(model.cfg)
    align = compute_loss(model, model.cfg, batch, LossConfig(method="reg", class_dropout=0.0), torch.Generator()).terms["repa"]
    p, cls, tokens = model.repa_out, batch.cls, batch.patch_tokens  # (N, 1 + L, D), (N, D), (N, L, D)
    rows = [[cosine(p[i, 0], cls[i])] + [cosine(p[i, 1 + k], tokens[i, k]) for k in range(L)] for i in range(N)]
    assert align.item() == pytest.approx(-sum(sum(r) / (1 + L) for r in rows) / N, rel=1e-6)
    patch_only = -sum(sum(r[1:]) / L for r in rows) / N  # what redi computed before: the CLS row left out
    assert abs(align.item() - patch_only) > 1e-3


def test_repa_still_aligns_the_patches_only():
    model = stand_in("repa")
    batch = make_batch(model.cfg)
    align = compute_loss(model, model.cfg, batch, LossConfig(method="repa", class_dropout=0.0), torch.Generator()).terms["repa"]
    expected = -sum(cosine(model.repa_out[i, k], batch.patch_tokens[i, k]) for i in range(N) for k in range(L)) / (N * L)
    assert align.item() == pytest.approx(expected, rel=1e-6)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_lognormal_weighting_draws_t_from_the_logit_normal_law():
    """REPA loss.py: σ = exp(n), n ~ N(0, 1), t = σ/(1 + σ); so P(t ≤ u) = Φ(ln(u / (1 − u))) (a one-sample KS test)."""
    n = 4000
    t = sample_time(n, "lognormal", torch.device("cpu"), torch.Generator().manual_seed(0)).double().sort().values
    cdf = torch.tensor([_normal_cdf(math.log(u / (1 - u))) for u in t.tolist()], dtype=torch.float64)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = max((ranks / n - cdf).max().item(), (cdf - (ranks - 1) / n).max().item())
    assert ks < 1.63 / math.sqrt(n)  # the 1% critical value
    uniform = sample_time(n, "uniform", torch.device("cpu"), torch.Generator().manual_seed(0)).double().sort().values
    cdf_u = torch.tensor([_normal_cdf(math.log(u / (1 - u))) for u in uniform.tolist()], dtype=torch.float64)
    assert (ranks / n - cdf_u).abs().max().item() > 5 / math.sqrt(n)  # the test tells the two laws apart
    with pytest.raises(UserError, match="weighting"):
        LossConfig(method="baseline", weighting="cosine")
    dit = stand_in("baseline", objective="dit")
    with pytest.raises(UserError, match="SiT"):
        check_compatible(dit.cfg, LossConfig(method="baseline", class_dropout=0.0, weighting="lognormal"))


def test_label_dropout_uses_the_null_label():
    model = stand_in("baseline", class_dropout=0.5)
    batch = make_batch(model.cfg)
    compute_loss(model, model.cfg, batch, LossConfig(method="baseline", class_dropout=0.5), torch.Generator().manual_seed(0))
    dropped = torch.rand(N, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < dropped.sum() < N
    assert torch.equal(model.seen["y"], torch.where(dropped, 10, batch.y))


def test_unconditional_model_still_drops_labels_to_its_null_row():
    """SPEC §6 / ReDi: unconditional = num_classes 1 and nothing else changes, label dropout included."""
    cfg = ModelConfig(size="debug", objective="sit", input_size=SIDE, num_classes=1, class_dropout=0.5)
    model = StandIn(cfg)
    batch = make_batch(cfg)
    batch.y.zero_()
    compute_loss(model, model.cfg, batch, LossConfig(method="baseline", class_dropout=0.5), torch.Generator().manual_seed(0))
    dropped = torch.rand(N, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < dropped.sum() < N
    assert torch.equal(model.seen["y"], dropped.long())  # label 0, or the null label 1


def test_per_sample_representation_drop_zeroes_z_t_and_the_pc_loss():
    model = stand_in("redi")
    cfg = LossConfig(method="redi", rep_drop=0.5, class_dropout=0.0)
    batch = make_batch(model.cfg)
    result = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(5))
    expected, drop = hand_sit_loss(model, batch, cfg, seed=5)
    assert 0 < sum(drop) < N, "the seed should drop some samples and keep others"
    z_in = model.seen["x"][:, 4:]
    for i in range(N):
        assert (torch.count_nonzero(z_in[i]) == 0) == drop[i]
    assert torch.count_nonzero(model.seen["x"][:, :4]) == model.seen["x"][:, :4].numel()
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)


def test_clean_representation_drop_shows_noise_and_drops_the_pc_loss():
    model = stand_in("redi")
    cfg = LossConfig(method="redi", rep_drop=0.5, rep_drop_target="clean", class_dropout=0.0)
    batch = make_batch(model.cfg)
    result = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(5))
    expected, drop = hand_sit_loss(model, batch, cfg, seed=5)
    g = torch.Generator().manual_seed(5)
    torch.rand(N, generator=g)  # the drop draws
    t = torch.rand(N, generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    for i in [i for i in range(N) if drop[i]]:
        assert torch.allclose(model.seen["x"][i, 4:], t[i] * eps[i, 4:])  # z_0 = 0, so z_t = t·ε
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)


def test_per_batch_representation_drop_is_all_or_none():
    model = stand_in("redi")
    cfg = LossConfig(method="redi", rep_drop=0.5, rep_drop_mode="batch", class_dropout=0.0)
    batch = make_batch(model.cfg)
    outcomes = set()
    for seed in range(8):
        result = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(seed))
        zeroed = [bool(torch.count_nonzero(model.seen["x"][i, 4:]) == 0) for i in range(N)]
        assert len(set(zeroed)) == 1
        outcomes.add(zeroed[0])
        expected, _ = hand_sit_loss(model, batch, cfg, seed=seed)
        assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert outcomes == {True, False}


def dit_alphas_cumprod() -> np.ndarray:
    """DiT's ᾱ_t for the linear β schedule, in numpy float64."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


@pytest.mark.parametrize("method", ["baseline", "redi"])
def test_dit_eps_loss_matches_hand_computation(method):
    model = stand_in(method, objective="dit")
    cfg = LossConfig(method=method, lambda_z=0.5, class_dropout=0.0)
    batch = make_batch(model.cfg)
    result = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (N,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    ab = dit_alphas_cumprod()
    assert torch.equal(model.seen["t"], t.float())
    total = 0.0
    for i in range(N):
        a = float(ab[int(t[i])])
        xt = math.sqrt(a) * batch.x0[i] + math.sqrt(1 - a) * eps[i]
        assert torch.allclose(model.seen["x"][i], xt, atol=1e-6)
        err = (0.5 * xt + 0.1 * float(t[i]) + 0.01 * float(batch.y[i]) - eps[i]) ** 2
        total += float(err[:4].mean()) + (0.5 * float(err[4:].mean()) if method == "redi" else 0.0)
    assert result.loss.item() == pytest.approx(total / N, rel=1e-5)


def test_dit_learned_sigma_adds_the_vlb_term():
    model = stand_in("baseline", objective="dit", learn_sigma=True)
    cfg = LossConfig(method="baseline", class_dropout=0.0)
    batch = make_batch(model.cfg)
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (N,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    assert bool((t > 0).all())
    model.fixed_out = torch.cat([eps, torch.ones_like(eps)], dim=1)  # exact ε and variance β_t
    result = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(4))
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = dit_alphas_cumprod()
    expected = 0.0
    for step in t.tolist():
        posterior_var = betas[step] * (1 - ab[step - 1]) / (1 - ab[step])
        ratio = posterior_var / betas[step]
        expected += 0.5 * (-1 + math.log(1 / ratio) + ratio) / math.log(2)  # KL(N(μ, σ²_post) ‖ N(μ, β_t)), bits
    assert result.terms["vae"].item() == pytest.approx(0.0, abs=1e-9)
    assert result.terms["vb"].item() == pytest.approx(expected / N, rel=1e-3)
    assert result.loss.item() == pytest.approx(expected / N, rel=1e-3)


def test_discretized_gaussian_log_likelihood_at_the_bin_centre():
    x = torch.tensor([0.0])
    unit = discretized_gaussian_log_likelihood(x, torch.tensor([0.0]), torch.tensor([0.0]))
    assert unit.item() == pytest.approx(math.log(2 / 255 / math.sqrt(2 * math.pi)), rel=1e-3)
    sharp = discretized_gaussian_log_likelihood(x, torch.tensor([0.0]), torch.tensor([math.log(1e-4)]))
    assert sharp.item() == pytest.approx(0.0, abs=1e-6)


def test_prepare_batch_samples_scales_and_upsamples():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(2, 4, 4, 4, generator=g), torch.rand(2, 4, 4, 4, generator=g)
    pcs = torch.randn(2, 5, 2, 2, generator=g)
    pcs[:, 1] = 3.0  # a constant map stays constant under bilinear upsampling
    norm = LatentNorm("config", (0.1, 0.2, -0.1, 0.0), (0.5, 0.5, 2.0, 1.0))  # z' = (z − shift) · scale per channel
    x0 = prepare_batch(torch.cat([mean, std], 1).half(), pcs.half(), r=2, norm=norm, generator=torch.Generator().manual_seed(9))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    assert x0.shape == (2, 6, 4, 4) and x0.dtype == torch.float32
    shift, scale = torch.tensor(norm.shift).view(1, 4, 1, 1), torch.tensor(norm.scale).view(1, 4, 1, 1)
    assert torch.allclose(x0[:, :4], (mean.half().float() + std.half().float() * eps - shift) * scale)
    assert torch.all(x0[:, 5] == 3.0)
    # bilinear, align_corners=False: output pixel 1 lies at source coordinate 0.25 → 0.75·p0 + 0.25·p1
    p = pcs.half().float()[0, 0]
    assert x0[0, 4, 0, 1].item() == pytest.approx(0.75 * p[0, 0].item() + 0.25 * p[0, 1].item(), rel=1e-5)
    assert prepare_batch(torch.cat([mean, std], 1), None, r=0, norm=norm).shape == (2, 4, 4, 4)
    with pytest.raises(UserError, match="rank 6"):
        prepare_batch(torch.cat([mean, std], 1), pcs, r=6, norm=norm)


def test_incompatible_settings_raise_user_errors():
    baseline = stand_in("baseline")
    with pytest.raises(UserError, match="PCA rank"):
        check_compatible(baseline.cfg, LossConfig(method="redi", class_dropout=0.0))
    with pytest.raises(UserError, match="REPA projector"):
        check_compatible(baseline.cfg, LossConfig(method="repa", class_dropout=0.0))
    with pytest.raises(UserError, match="representation drop"):
        LossConfig(method="repa", rep_drop=0.2)
    model = stand_in("repa")
    batch = make_batch(model.cfg)
    batch.patch_tokens = torch.randn(N, 9, D)
    with pytest.raises(UserError, match="token grids"):
        check_batch(model.cfg, LossConfig(method="repa", class_dropout=0.0), batch)
    batch.patch_tokens = None
    with pytest.raises(UserError, match="patch tokens"):
        check_batch(model.cfg, LossConfig(method="repa", class_dropout=0.0), batch)


@pytest.mark.parametrize("method", ["baseline", "redi", "repa", "reg", "redi+repa"])
def test_real_model_trains_with_every_method(method):
    mcfg = model_config(method, class_dropout=0.1, **({"fusion": "separate"} if method == "redi" else {}))
    torch.manual_seed(0)
    model = build_model(mcfg)
    cfg = LossConfig(method=method, rep_drop=0.2 if method == "redi" else 0.0)
    batch = make_batch(mcfg)
    first = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(0))
    again = compute_loss(model, model.cfg, batch, cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(first.loss) and first.loss.item() == again.loss.item()  # deterministic given the generator
    first.loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    if mcfg.repa_depth:
        assert model.projector[0].weight.grad.abs().sum() > 0

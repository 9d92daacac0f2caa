"""Training losses: SiT flow matching or DiT DDPM, with ReDi PC channels, representation drop, REPA and REG.

Random draws, all from `generator` (on the batch's device) and in this order, so a resumed run
repeats them exactly: label-dropout uniforms (N,) when class_dropout > 0; representation-drop
uniforms ((N,) per sample, (1,) per batch) when the method trains PC channels and rep_drop > 0;
the time t (N,) (uniforms, or normals for lognormal weighting); the noise ε like x0; the
class-token noise ε_c (N, D) for REG.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redi.common.errors import UserError
from redi.pipeline.latent_norm import LatentNorm
from redi.trainer.models import ModelConfig

METHODS = ("baseline", "redi", "repa", "reg", "redi+repa")
PCS_METHODS = ("redi", "redi+repa")  # generate PC channels jointly with the latent
REPA_METHODS = ("repa", "reg", "redi+repa")  # align hidden states with the DINOv2 patch tokens (REG: and CLS)
REP_DROP_MODES = ("sample", "batch")
REP_DROP_TARGETS = ("noisy", "clean")
WEIGHTINGS = ("uniform", "lognormal")  # REPA loss.py: how the SiT time t is drawn
DDPM_STEPS = 1000  # DiT: 1000 discrete steps
DDPM_BETA_START = 1e-4  # DiT: linear β schedule from 1e-4 …
DDPM_BETA_END = 0.02  # … to 0.02


class MethodParts:
    """What the `method` name switches on; a base of every config that carries one."""

    method: str

    @property
    def uses_pcs(self) -> bool:
        """The input carries PC channels with their own loss (ReDi)."""
        return self.method in PCS_METHODS

    @property
    def uses_repa(self) -> bool:
        """The REPA alignment loss applies (REG aligns too)."""
        return self.method in REPA_METHODS

    @property
    def uses_reg(self) -> bool:
        """A noised DINOv2 class token is entangled with the latent (REG)."""
        return self.method == "reg"


@dataclass(frozen=True)
class LossConfig(MethodParts):
    """Which terms make up the loss and their weights."""

    method: str
    """"baseline" | "redi" | "repa" | "reg" | "redi+repa"."""
    lambda_z: float = 1.0
    """Weight of the PC-channel loss (redi)."""
    rep_drop: float = 0.0
    """p_drop of representation drop, for Representation Guidance (redi); 0 = never."""
    rep_drop_mode: str = "sample"
    """"sample": one draw per sample (paper) | "batch": one draw per batch (reference)."""
    rep_drop_target: str = "noisy"
    """"noisy": zero z_t, the model sees zeros (paper) | "clean": zero z_0, the model sees t·ε there (reference)."""
    repa_weight: float = 0.5
    """Weight of the REPA alignment loss."""
    cls_weight: float = 0.03
    """Weight of REG's class-token velocity loss."""
    class_dropout: float = 0.1
    """Probability of replacing a label by the null label (classifier-free guidance)."""
    weighting: str = "uniform"
    """SiT time draw: "uniform" t ~ U(0, 1) | "lognormal" t = σ/(1 + σ), ln σ ~ N(0, 1) (REPA `--weighting`)."""

    def __post_init__(self) -> None:
        """Refuse unknown names and out-of-range values with one clear sentence."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"unknown time weighting {self.weighting!r}; choose uniform or lognormal")
        if self.rep_drop_mode not in REP_DROP_MODES:
            raise UserError(f"unknown representation-drop mode {self.rep_drop_mode!r}; choose sample or batch")
        if self.rep_drop_target not in REP_DROP_TARGETS:
            raise UserError(f"unknown representation-drop target {self.rep_drop_target!r}; choose noisy or clean")
        if not 0.0 <= self.rep_drop < 1.0:
            raise UserError(f"representation drop {self.rep_drop} must lie in [0, 1)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise UserError(f"class dropout {self.class_dropout} must lie in [0, 1)")
        if min(self.lambda_z, self.repa_weight, self.cls_weight) < 0:
            raise UserError("loss weights must not be negative")
        if self.rep_drop > 0 and not self.uses_pcs:
            raise UserError(f"representation drop needs PC channels, which method {self.method!r} does not train")



@dataclass
class TrainBatch:
    """One training batch, already on the device, float32."""

    x0: Tensor
    """(N, V + r, H, W): scaled VAE latent sample, then the upsampled PCs."""
    y: Tensor
    """(N,) long class labels."""
    cls: Tensor | None = None
    """(N, D) clean DINOv2 CLS token (REG)."""
    patch_tokens: Tensor | None = None
    """(N, P, D) full DINOv2 patch tokens (REPA/REG alignment targets)."""


@dataclass
class LossOutput:
    """The total loss and its parts."""

    loss: Tensor
    """Scalar to backpropagate."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars: "vae", "pcs" (unweighted, all samples), "vb" (learned σ), "repa", "cls"."""


@dataclass(frozen=True)
class DDPMSchedule:
    """DDPM tables (float64, CPU) for the linear β schedule, as in DiT/ADM."""

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @property
    def num_steps(self) -> int:
        """Number of discrete diffusion steps."""
        return self.betas.shape[0]


@functools.cache
def ddpm_schedule(
    num_steps: int = DDPM_STEPS, beta_start: float = DDPM_BETA_START, beta_end: float = DDPM_BETA_END
) -> DDPMSchedule:
    """The DDPM schedule tables, computed once in float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return DDPMSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
        sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    )


def extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] as float32 on t's device, shaped (N, 1, …) to broadcast over an ndim-dimensional tensor."""
    return table.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Fast approximation of the standard normal CDF (ADM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised to 256 bins (ADM), element-wise, in nats."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms(
    schedule: DDPMSchedule, x0: Tensor, xt: Tensor, t: Tensor, eps_pred: Tensor, var_values: Tensor
) -> Tensor:
    """DiT's L_vlb element-wise in bits: KL(q(x_{t-1}|x_t, x_0) ‖ p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0.

    eps_pred should be detached (DiT's hybrid loss trains the mean by the MSE only); var_values in
    [-1, 1] interpolate the log variance between the posterior's (clipped) and β_t.
    """
    at = functools.partial(extract, t=t, ndim=x0.ndim)
    true_mean = at(schedule.posterior_mean_coef1) * x0 + at(schedule.posterior_mean_coef2) * xt  # (N, C, H, W)
    true_logvar = at(schedule.posterior_log_variance_clipped)  # (N, 1, 1, 1)
    pred_x0 = at(schedule.sqrt_recip_alphas_cumprod) * xt - at(schedule.sqrt_recipm1_alphas_cumprod) * eps_pred
    model_mean = at(schedule.posterior_mean_coef1) * pred_x0 + at(schedule.posterior_mean_coef2) * xt
    frac = (var_values + 1.0) / 2.0  # (N, C, H, W)
    model_logvar = frac * at(schedule.betas.log()) + (1.0 - frac) * true_logvar  # (N, C, H, W)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar) / math.log(2.0)
    return torch.where((t == 0).view(-1, 1, 1, 1), nll, kl)  # (N, C, H, W)


def prepare_batch(
    moments: Tensor,
    pcs: Tensor | None,
    r: int,
    norm: LatentNorm,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latent sample and PCs → x0 (N, V + r, h, h) = [norm(mean + std·ε), bilinear-upsampled pcs[:, :r]].

    moments: (N, 2V, h, h), posterior mean then std; pcs: (N, K, p, p) with K ≥ r (None when r = 0);
    norm: the shards' latent normalisation, (z − shift) · scale per channel.
    """
    mean, std = moments.float().chunk(2, dim=1)  # 2 × (N, V, h, h)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)  # (N, V, h, h)
    z = norm.apply(mean + std * eps)  # (N, V, h, h)
    if r == 0:
        return z
    if pcs is None or r > pcs.shape[1]:
        have = 0 if pcs is None else pcs.shape[1]
        raise UserError(f"PCA rank {r} is larger than the {have} principal components stored in the shards")
    return torch.cat([z, upsample_pcs(pcs, r, z.shape[-1])], dim=1)  # (N, V + r, h, h)


def upsample_pcs(pcs: Tensor, r: int, side: int) -> Tensor:
    """(N, K, p, p) PCs → their first r bilinearly upsampled (align_corners=False) to the latent side: (N, r, side, side),
    float32 (SPEC §5): the PC channels the trainer feeds the model."""
    return F.interpolate(pcs[:, :r].float(), size=(side, side), mode="bilinear", align_corners=False)


def check_compatible(model_cfg: ModelConfig, cfg: LossConfig) -> None:
    """Raise a UserError when the network cannot be trained with this method."""
    if cfg.uses_pcs != (model_cfg.pca_rank > 0):
        need = "a PCA rank above 0" if cfg.uses_pcs else "PCA rank 0"
        raise UserError(f"method {cfg.method!r} needs {need}, but the model has pca_rank {model_cfg.pca_rank}")
    if cfg.uses_repa != (model_cfg.repa_depth > 0):
        need = "a REPA projector (repa_depth > 0)" if cfg.uses_repa else "no REPA projector (repa_depth 0)"
        raise UserError(f"method {cfg.method!r} needs {need}, but the model has repa_depth {model_cfg.repa_depth}")
    if cfg.uses_reg != model_cfg.reg_token:
        raise UserError(f"method {cfg.method!r} and the model's reg_token={model_cfg.reg_token} do not match")
    if cfg.uses_reg and model_cfg.objective != "sit":
        raise UserError("REG is defined for the SiT (flow) objective only")
    if cfg.weighting != "uniform" and model_cfg.objective != "sit":
        raise UserError(f"{cfg.weighting} time weighting is defined for the SiT (flow) objective only")
    if cfg.class_dropout != model_cfg.class_dropout:
        raise UserError(
            f"label dropout {cfg.class_dropout} differs from the {model_cfg.class_dropout} the model config records"
        )


def drop_labels(y: Tensor, num_classes: int, p: float, generator: torch.Generator | None) -> Tensor:
    """Replace each label by the null label num_classes with probability p (unconditional models too, as the
    ReDi reference: its num_classes = 1 model keeps label dropout)."""
    if p == 0.0:
        return y
    drop = torch.rand(y.shape[0], generator=generator, device=y.device) < p  # (N,)
    return torch.where(drop, torch.full_like(y, num_classes), y)  # (N,)


def representation_drop(n: int, cfg: LossConfig, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """(N,) bool: the samples whose representation is dropped (per sample, or all-or-none per batch)."""
    if not cfg.uses_pcs or cfg.rep_drop == 0.0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    draws = n if cfg.rep_drop_mode == "sample" else 1
    return (torch.rand(draws, generator=generator, device=device) < cfg.rep_drop).expand(n)  # (N,)


def sample_time(n: int, weighting: str, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """(N,) SiT times in [0, 1], t = 1 noise: uniform, or REPA's lognormal t = σ/(1 + σ) with ln σ ~ N(0, 1)."""
    if weighting == "uniform":
        return torch.rand(n, generator=generator, device=device)  # (N,)
    sigma = torch.randn(n, generator=generator, device=device).exp()  # (N,) EDM's log-normal noise level
    return sigma / (1 + sigma)  # (N,): the linear path's t at noise-to-signal ratio σ


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """(N, T, D) projections and (N, T, D) encoder tokens → (N,) minus the mean cosine similarity over the T rows."""
    cos = (F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)  # (N, T)
    return -cos.mean(dim=1)  # (N,)


def alignment_target(batch: TrainBatch, reg: bool) -> Tensor:
    """(N, L, D) DINOv2 patch tokens, or REG's (N, 1 + L, D) [CLS; patch tokens] (REG `train.py`)."""
    tokens = batch.patch_tokens.float()  # (N, L, D)
    return torch.cat([batch.cls.float().unsqueeze(1), tokens], dim=1) if reg else tokens  # (N, [1+]L, D)


def check_batch(model_cfg: ModelConfig, cfg: LossConfig, batch: TrainBatch) -> None:
    """Raise a UserError when the batch lacks what the method needs or does not fit the model."""
    if tuple(batch.x0.shape[1:]) != (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size):
        raise UserError(
            f"batch of shape {tuple(batch.x0.shape[1:])} does not fit the model's input "
            f"({model_cfg.in_channels}, {model_cfg.input_size}, {model_cfg.input_size})"
        )
    if cfg.uses_repa:
        if batch.patch_tokens is None:
            raise UserError("REPA/REG alignment needs the full patch tokens: build the shards with --patch-tokens")
        n_tokens, dim = batch.patch_tokens.shape[1:]
        if (n_tokens, dim) != (model_cfg.num_patches, model_cfg.repa_dim):
            raise UserError(
                f"the encoder gives {n_tokens} patch tokens of width {dim}, but the model aligns "
                f"{model_cfg.num_patches} tokens of width {model_cfg.repa_dim}: the two token grids must match"
            )
    if cfg.uses_reg and (batch.cls is None or batch.cls.shape[1] != model_cfg.repa_dim):
        raise UserError(f"REG needs the encoder's global token of width {model_cfg.repa_dim} in every batch")


def compute_loss(
    model: nn.Module, model_cfg: ModelConfig, batch: TrainBatch, cfg: LossConfig, generator: torch.Generator | None = None
) -> LossOutput:
    """One training loss: denoising (per channel group, λ_z on the PCs) + REPA alignment + REG class-token velocity.

    Representation drop sets λ_z = 0 for a dropped sample in both target modes. "noisy" (the
    paper) zeroes the model's z_t input; "clean" (the ReDi reference, which zeroes the clean PCs
    and sets λ = 0) zeroes z_0 before noising, so the model sees pure noise t·ε there. Either way
    no gradient comes from a dropped sample's PC channels, and the model learns p(x) without z.

    `model` (any wrapper of a network of `model_cfg`) and `batch` must have passed check_compatible and check_batch,
    which the training loop runs once.
    """
    x0, device = batch.x0.float(), batch.x0.device
    n, v, c_in = x0.shape[0], model_cfg.vae_channels, model_cfg.in_channels
    y = drop_labels(batch.y, model_cfg.num_classes, cfg.class_dropout, generator)  # (N,)
    dropped = representation_drop(n, cfg, device, generator)  # (N,) bool
    lambda_z = torch.where(dropped, 0.0, cfg.lambda_z)  # (N,)
    keep_z = (~dropped).float().view(n, 1, 1, 1)  # (N, 1, 1, 1)
    if cfg.rep_drop_target == "clean":
        x0 = torch.cat([x0[:, :v], x0[:, v:] * keep_z], dim=1)  # (N, V + r, H, W): z_0 zeroed where dropped
    schedule = ddpm_schedule()
    if model_cfg.objective == "sit":
        t = sample_time(n, cfg.weighting, device, generator)  # (N,) in [0, 1], t = 1 is noise
        eps = torch.randn(x0.shape, generator=generator, device=device)  # (N, V + r, H, W)
        t4 = t.view(n, 1, 1, 1)
        xt = (1.0 - t4) * x0 + t4 * eps  # (N, V + r, H, W)
        target = eps - x0  # velocity
        t_model = t
    else:
        t = torch.randint(0, schedule.num_steps, (n,), generator=generator, device=device)  # (N,) long
        eps = torch.randn(x0.shape, generator=generator, device=device)  # (N, V + r, H, W)
        signal = extract(schedule.sqrt_alphas_cumprod, t, 4)  # (N, 1, 1, 1)
        noise = extract(schedule.sqrt_one_minus_alphas_cumprod, t, 4)  # (N, 1, 1, 1)
        xt = signal * x0 + noise * eps  # (N, V + r, H, W)
        target = eps  # ε-prediction
        t_model = t.float()
    if cfg.rep_drop_target == "noisy":
        xt = torch.cat([xt[:, :v], xt[:, v:] * keep_z], dim=1)  # (N, V + r, H, W): z_t zeroed where dropped
    cls_t = cls_target = None
    if cfg.uses_reg:
        cls = batch.cls.float()  # (N, D)
        eps_cls = torch.randn(cls.shape, generator=generator, device=device)  # (N, D)
        cls_t = (1.0 - t.view(n, 1)) * cls + t.view(n, 1) * eps_cls  # (N, D): same t as the latent
        cls_target = eps_cls - cls  # (N, D)

    output = model(xt, t_model, y, cls_t)
    pred = output.out.float()  # (N, out_channels, H, W)
    err = (pred[:, :c_in] - target) ** 2  # (N, V + r, H, W)
    vae_loss = err[:, :v].mean(dim=(1, 2, 3))  # (N,)
    per_sample = vae_loss
    terms = {"vae": vae_loss.mean()}
    if cfg.uses_pcs:
        pcs_loss = err[:, v:].mean(dim=(1, 2, 3))  # (N,)
        per_sample = per_sample + lambda_z * pcs_loss
        terms["pcs"] = pcs_loss.mean()
    if model_cfg.learn_sigma:
        vb = vb_terms(schedule, x0, xt, t, pred[:, :c_in].detach(), pred[:, c_in:])  # (N, V + r, H, W)
        vb_sample = vb[:, :v].mean(dim=(1, 2, 3))  # (N,)
        if cfg.uses_pcs:
            vb_sample = vb_sample + lambda_z * vb[:, v:].mean(dim=(1, 2, 3))
        per_sample = per_sample + vb_sample
        terms["vb"] = vb_sample.mean()
    loss = per_sample.mean()
    if cfg.uses_repa:
        align = repa_loss(output.repa.float(), alignment_target(batch, cfg.uses_reg)).mean()  # REG: 1 + L rows
        loss = loss + cfg.repa_weight * align
        terms["repa"] = align
    if cfg.uses_reg:
        cls_loss = ((output.cls_out.float() - cls_target) ** 2).mean()
        loss = loss + cfg.cls_weight * cls_loss
        terms["cls"] = cls_loss
    return LossOutput(loss=loss, terms={name: value.detach() for name, value in terms.items()})

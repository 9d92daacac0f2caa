"""Latent spaces for `redi encode`: the VAE families, what a VAE config implies, and the moments stored.

The family is read from the config's `_class_name` (diffusers; a config without one is an
AutoencoderKL, as the plain tiny-random config):
- `AutoencoderKL` (SD-VAE, SDXL, SD3, FLUX.1; 4 or 16 channels): its posterior mean and std;
- `AutoencoderDC` (DC-AE): deterministic, so its latent and a std of 0, in the same (2C, h, h) layout.
Channels, the downsampling factor and the config normalisation (`scaling_factor`, `shift_factor`,
per-channel `latents_mean`/`latents_std`, used only when both are given, as diffusers' pipelines do) come from the
config, the class's defaults filling what it leaves out (sd-vae-ft-ema's config names no scaling factor:
AutoencoderKL's default, 0.18215, is SD-VAE's). The diffusion model's token grid follows: latent side R/f,
patch 2 on f8 latents and 1 from f16 on.
docs/ENCODERS.md tabulates the families.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

if TYPE_CHECKING:  # diffusers and torch take seconds to import: they load when a VAE is built, loaded, inspected or run
    import torch
    from diffusers.models.modeling_utils import ModelMixin

from redi.common.errors import UserError
from redi.common.schema import Range
from redi.pipeline.latent_norm import LatentNorm

TOKEN_PIXELS = 16  # default patch: one token per 16×16 image pixels where latents allow (DiT's /2 on f8), else 1


def gaussian_moments(vae: ModelMixin, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL: (N, 3, R, R) in [-1, 1] → (N, 2C, h, h) posterior mean, then std = exp(½·logvar)."""
    import torch

    posterior = vae.encode(x).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1)


def deterministic_moments(vae: ModelMixin, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderDC: (N, 3, R, R) in [-1, 1] → (N, 2C, h, h) the latent, then a std of 0 (sampling returns it)."""
    import torch

    latent = vae.encode(x).latent  # (N, C, h, h)
    return torch.cat([latent, torch.zeros_like(latent)], dim=1)


@dataclass(frozen=True)
class VaeFamily:
    """One diffusers autoencoder class: how to read its config and what its encoder gives."""

    name: str  # the diffusers class, e.g. AutoencoderKL
    examples: str  # words for messages: the models of this class
    blocks_key: str  # the config list with one entry per resolution level (levels − 1 halvings)
    moments: Callable[[ModelMixin, torch.Tensor], torch.Tensor]
    deterministic: bool  # no posterior: the stored std is 0

    @property
    def model_class(self) -> type[ModelMixin]:
        return getattr(importlib.import_module("diffusers"), self.name)

    def setting(self, config: dict[str, Any], key: str) -> Any:
        """A config value, the class's default where the config leaves it out, None where the class has no such field."""
        parameter = inspect.signature(self.model_class.__init__).parameters.get(key)
        return config.get(key, parameter.default) if parameter is not None else None


FAMILIES = (
    VaeFamily("AutoencoderKL", "SD-VAE, SDXL, SD3, FLUX.1", "block_out_channels", gaussian_moments, False),
    VaeFamily("AutoencoderDC", "DC-AE", "encoder_block_out_channels", deterministic_moments, True),
)


def supported() -> str:
    """The supported VAE classes, for messages."""
    return ", ".join(f"{f.name} ({f.examples})" for f in FAMILIES)


def family_of(config: dict[str, Any]) -> VaeFamily:
    """The family named by a diffusers config's `_class_name`; another class is one sentence listing ours."""
    name = config.get("_class_name") or FAMILIES[0].name
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"The --vae config is a {name!r}; the supported VAE classes are: {supported()}.")


def model_class(config: dict[str, Any]) -> type[ModelMixin]:
    return family_of(config).model_class


def build(config: dict[str, Any]) -> ModelMixin:
    """A randomly initialised VAE of `config`'s class."""
    return family_of(config).model_class.from_config(config)


def from_pretrained(config: dict[str, Any], source: str, **hub: Any) -> ModelMixin:
    """The pretrained VAE of `source` (a directory or hub id holding `config`)."""
    return family_of(config).model_class.from_pretrained(source, **hub)


def hub_config(name: str, revision: str, offline: bool) -> dict[str, Any]:
    """The config.json of a hub VAE, without its weights."""
    return dict(FAMILIES[0].model_class.load_config(name, revision=revision, local_files_only=offline))


@dataclass(frozen=True)
class LatentSpace:
    """What a VAE's latents are: the manifest records it, shards.json carries it to the trainer and sampler."""

    vae_class: str  # "AutoencoderKL" | "AutoencoderDC"
    channels: Annotated[int, Range(1)]  # C
    downsampling: Annotated[int, Range(1)]  # f: latent side = R / f
    deterministic: bool  # the stored std is 0 (AutoencoderDC)
    scaling_factor: Annotated[float, Range(0, lo_open=True)]  # the config normalisation: z' = (z − shift) · scaling_factor
    shift_factor: Annotated[float | None, Range()]  # FLUX.1, SD3; None: no shift
    latents_mean: tuple[Annotated[float, Range()], ...] | None = None  # per-channel config statistics (some KL configs)
    latents_std: tuple[Annotated[float, Range(0, lo_open=True)], ...] | None = None

    @property
    def default_patch(self) -> int:
        """The diffusion model's default patch: 2 on f8 latents (DiT/SiT "/2"), 1 on f16 and f32."""
        return max(1, TOKEN_PIXELS // self.downsampling)

    def side(self, resolution: int) -> int:
        """h: latents per side at crop side R."""
        if resolution % self.downsampling:
            raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {self.downsampling}.")
        return resolution // self.downsampling

    def token_grid(self, resolution: int, patch: int | None = None) -> int:
        """G: the diffusion model's tokens per side, h / patch (REPA: 16 at 256 and 32 at 512 with SD-VAE, patch 2)."""
        side, patch = self.side(resolution), patch or self.default_patch
        if side % patch:
            raise UserError(f"The {side}×{side} latents at --resolution {resolution} do not split into patches of {patch}.")
        return side // patch

    def config_norm(self) -> LatentNorm:
        """diffusers' normalisation: shift = shift_factor or latents_mean, scale = scaling_factor [/ latents_std]."""
        shift = self.latents_mean or (self.shift_factor or 0.0,) * self.channels
        std = self.latents_std or (1.0,) * self.channels
        return LatentNorm("config", tuple(map(float, shift)), tuple(self.scaling_factor / s for s in std))

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LatentSpace:
        tuples = {k: tuple(record[k]) for k in ("latents_mean", "latents_std") if record.get(k) is not None}
        return cls(**{**record, **tuples})


def latent_space(config: dict[str, Any]) -> LatentSpace:
    """The latent space of a VAE config (the class's defaults fill what it leaves out)."""
    family = family_of(config)
    channels, blocks, scale, shift, mean, std = (family.setting(config, k) for k in (
        "latent_channels", family.blocks_key, "scaling_factor", "shift_factor", "latents_mean", "latents_std"))
    if (mean is None) != (std is None):  # diffusers' pipelines apply the per-channel statistics only when the config
        mean = std = None  # has both (SDXL's: `if has_latents_mean and has_latents_std: … else: latents / scaling_factor`)
    if mean is not None and shift is not None:
        raise UserError("The --vae config names both shift_factor and latents_mean; redi cannot tell which shift to use.")
    try:
        return LatentSpace(family.name, int(channels), 2 ** (len(blocks) - 1), family.deterministic, float(scale),
                           None if shift is None else float(shift), None if mean is None else tuple(map(float, mean)),
                           None if std is None else tuple(map(float, std)))
    except (TypeError, ValueError):
        raise UserError(f"The --vae config is not a valid {family.name} config (latent_channels, {family.blocks_key}, "
                        "scaling_factor).") from None


def legacy_space(channels: int, side: int, resolution: int) -> LatentSpace:
    """The latent space of data written before redi recorded it: SD-VAE's (the only normalisation redi then
    applied), with the channels and the side of the stored latents."""
    return replace(latent_space(sd_vae_config()), channels=int(channels), downsampling=int(resolution) // int(side))


def manifest_space(params: dict[str, Any]) -> LatentSpace | None:
    """The latent space a latents/ manifest's checked `params` record (or, before the record, `legacy_space` of its
    moments); None when they say neither."""
    if params.get("latent_space") is not None:
        return LatentSpace.from_record(params["latent_space"])
    shape = (params.get("arrays") or {}).get("moments", ())
    return legacy_space(shape[0] // 2, shape[1], params["resolution"]) if len(shape) == 3 else None


def vae_moments(vae: ModelMixin, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, R, R, 3) images → float32 (N, 2C, R/f, R/f) moments: mean (or latent), then std (or 0)."""
    x = images.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1  # (N, 3, R, R) in [-1, 1]
    family = next(f for f in FAMILIES if isinstance(vae, f.model_class))
    return family.moments(vae, x).float()


def tiny_sd_config() -> dict[str, Any]:
    """AutoencoderKL with 4 blocks (3 downsamplings → latents 4×R/8×R/8) and 8 channels per block."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
        "block_out_channels": [8, 8, 8, 8], "sample_size": 256,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def sd_vae_config() -> dict[str, Any]:
    """The real `sd-vae-ft-ema` architecture (its config.json names no scaling factor: AutoencoderKL's 0.18215)."""
    return {**tiny_sd_config(), "layers_per_block": 2, "norm_num_groups": 32, "block_out_channels": [128, 256, 512, 512]}


def flux_vae_config() -> dict[str, Any]:
    """The real FLUX.1 VAE (`black-forest-labs/FLUX.1-dev`, subfolder vae): 16 channels, f8, scale and shift."""
    return {**sd_vae_config(), "_class_name": "AutoencoderKL", "latent_channels": 16, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def tiny_flux_config() -> dict[str, Any]:
    """FLUX.1's latent space (16 channels, f8, its scale and shift) with 8 channels per block."""
    return {**flux_vae_config(), "layers_per_block": 1, "norm_num_groups": 4, "block_out_channels": [8, 8, 8, 8]}


def dc_ae_f32c32_config() -> dict[str, Any]:
    """The real DC-AE f32c32 (`mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers`): 32 channels, f32."""
    blocks = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    scales: list[list[int]] = [[], [], [], [5], [5], [5]]
    widths = [128, 256, 512, 512, 1024, 1024]
    return {
        "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
        "encoder_block_types": blocks, "decoder_block_types": blocks, "encoder_block_out_channels": widths,
        "decoder_block_out_channels": widths, "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
        "decoder_layers_per_block": [3] * 6, "encoder_qkv_multiscales": scales, "decoder_qkv_multiscales": scales,
        "downsample_block_type": "Conv", "upsample_block_type": "interpolate", "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    }


def tiny_dc_config() -> dict[str, Any]:
    """DC-AE f32c32's latent space (32 channels, f32) with its block types, one layer each and widths 8…64."""
    widths = [8, 8, 16, 16, 32, 64]  # the last width holds a whole number of latent channels (output shortcut)
    return {**dc_ae_f32c32_config(), "attention_head_dim": 8, "encoder_block_out_channels": widths,
            "decoder_block_out_channels": widths, "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6}


def tiny_configs() -> dict[str, Callable[[], dict[str, Any]]]:
    """`tiny-random` and `tiny-random:sd` (the same 4-channel f8 AutoencoderKL), `:flux` (16 channels, shift),
    `:dc` (AutoencoderDC, f32)."""
    return {"": tiny_sd_config, "sd": tiny_sd_config, "flux": tiny_flux_config, "dc": tiny_dc_config}


# The real architectures `redi bench encode` measures at random weights (no download).
ARCHITECTURES: dict[str, Callable[[], dict[str, Any]]] = {
    "sd-vae": sd_vae_config, "flux-vae": flux_vae_config, "dc-ae-f32c32": dc_ae_f32c32_config,
}

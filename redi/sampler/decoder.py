"""The VAE decoder of `redi sample`: the one the checkpoint's shards were encoded with, and the run's latent normalisation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from redi.common.errors import UserError
from redi.pipeline.encoders import TINY_RANDOM, VAE, load, resolve
from redi.pipeline.latent_norm import LatentNorm
from redi.pipeline.vaes import LatentSpace, latent_space
from redi.trainer.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoder:
    """The VAE that turns sampled latents into images: image = vae.decode(norm⁻¹(x[:, :V]))."""

    vae: torch.nn.Module
    identity: dict[str, Any]
    norm: LatentNorm
    """The run's latent normalisation, z' = (z − shift)·scale per channel."""

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, V, h, h) sampled VAE channels → (N, 3, H, W) images in ≈[−1, 1], float32 (no autocast)."""
        z = self.norm.invert(latents.float())  # (N, V, h, h): undo the trainer's normalisation
        return self.vae.decode(z).sample  # (N, 3, H, W)


def load_decoder(ckpt: Checkpoint, override: str | None, device: torch.device, force: bool = False) -> Decoder:
    """The VAE recorded in the checkpoint, or `override` if it has the run's latent space (class, channels,
    downsampling; `force`: any class and downsampling, with a warning), and the run's latent normalisation."""
    recorded = ckpt.shards.vae
    if override is not None:
        ref = resolve(VAE, override)
    elif not recorded.get("id"):
        raise UserError(f"{ckpt.path} records no VAE; pass --vae ID|DIR to decode.")
    elif recorded.get("kind") in (TINY_RANDOM, "local"):
        ref = resolve(VAE, recorded["id"])  # tiny-random[:KEY] or a directory
        if recorded.get("kind") == "local" and ref.identity.get("hash") != recorded.get("revision"):
            raise UserError(
                f"The VAE directory {recorded['id']} changed since the latents were encoded; "
                f"pass --vae {recorded['id']} to decode with it anyway."
            )
    else:
        ref = resolve(VAE, recorded["id"], recorded.get("revision") or "main")
    space, channels = latent_space(ref.config), ckpt.model_config.vae_channels
    if space.channels != channels:
        raise UserError(f"The VAE {ref.identity['id']} has {space.channels} latent channels, the model {channels}.")
    if (trained := ckpt.shards.space) is not None and _described(space) != _described(trained):
        what = f"The VAE {ref.identity['id']} has another latent space ({_described(space)}) than the run's ({_described(trained)})"
        if not force:
            raise UserError(f"{what}: its decoder would misread the latents; pass --force-vae to decode with it anyway.")
        log.warning(f"{what}; decoding with it as --force-vae asks.")
    return Decoder(load(ref, device), ref.identity, ckpt.shards.norm)


def _described(space: LatentSpace) -> str:
    """What a latent space must share with the run's to decode its samples: class, channels, downsampling."""
    return f"{space.vae_class}, {space.channels} channels, f{space.downsampling}"

"""The VAE decoder of `redi sample`: the one the checkpoint's shards were encoded with, and its latent scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.errors import UserError
from pipeline.encoders import TINY_RANDOM, load_vae
from trainer.checkpoint import Checkpoint


@dataclass(frozen=True)
class Decoder:
    """The VAE that turns sampled latents into images: image = vae.decode((x[:, :V] − shift) / scale)."""

    vae: torch.nn.Module
    identity: dict[str, Any]
    scale: float
    shift: float

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, V, h, h) sampled VAE channels → (N, 3, H, W) images in ≈[−1, 1], float32 (no autocast)."""
        z = (latents.float() - self.shift) / self.scale  # undo z = latent·scale + shift of training
        return self.vae.decode(z).sample  # (N, 3, H, W)


def load_decoder(ckpt: Checkpoint, override: str | None, device: torch.device) -> Decoder:
    """The VAE recorded in the checkpoint (or `override`), checked against the model's latent channels."""
    recorded = ckpt.shards.vae
    if override is not None:
        vae, identity = load_vae(override, device=device)
    elif not recorded.get("id"):
        raise UserError(f"{ckpt.path} records no VAE; pass --vae ID|DIR to decode.")
    elif recorded.get("kind") == TINY_RANDOM:
        vae, identity = load_vae(TINY_RANDOM, device=device)
    elif recorded.get("kind") == "local":
        vae, identity = load_vae(recorded["id"], device=device)
        if identity.get("hash") != recorded.get("revision"):
            raise UserError(
                f"The VAE directory {recorded['id']} changed since the latents were encoded; "
                f"pass --vae {recorded['id']} to decode with it anyway."
            )
    else:
        vae, identity = load_vae(recorded["id"], revision=recorded.get("revision") or "main", device=device)
    channels = int(vae.config.latent_channels)
    if channels != ckpt.model_config.vae_channels:
        raise UserError(f"The VAE {identity['id']} has {channels} latent channels, the model {ckpt.model_config.vae_channels}.")
    scale, shift = ckpt.shards.vae_scale, ckpt.shards.vae_shift
    return Decoder(vae, identity, float(recorded.get("scale") if scale is None else scale),
                   float(recorded.get("shift", 0.0) if shift is None else shift))


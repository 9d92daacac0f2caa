"""Latent normalisation: the map the trainer applies to each latent sample and the sampler inverts before decoding.

z' = (z − shift_c) · scale_c for every latent channel c, recorded in shards.json and in every checkpoint:
- `config`: the VAE config's, diffusers' convention (shift = shift_factor or latents_mean, scale =
  scaling_factor or scaling_factor / latents_std): for SD-VAE z' = 0.18215 · z, for FLUX.1
  z' = 0.3611 · (z − 0.1159);
- `channel`: measured over the training latents in one streaming pass, as LightningDiT's latent
  statistics: shift = mean_c, scale = 1 / std_c, so z' has zero mean and unit variance per channel.
  The statistics are those of the samples z = mean + std·ε the trainer draws, computed exactly from the
  stored moments: mean_c = E[mean], std_c² = Var[mean] + E[std²] (over images and positions).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from redi.common.choices import LATENT_NORMS
from redi.common.errors import UserError
from redi.common.schema import OneOf

if TYPE_CHECKING:  # the record reads without torch (redi info); the map on tensors imports it
    import torch

KINDS = LATENT_NORMS


@dataclass(frozen=True)
class LatentNorm:
    """z' = (z − shift) · scale, per channel."""

    kind: Annotated[str, OneOf(KINDS)]  # "config" | "channel"
    shift: tuple[float, ...]  # (C,)
    scale: tuple[float, ...]  # (C,)

    def __post_init__(self) -> None:  # ValueError: a damaged record reads as a damaged file
        if self.kind not in KINDS or len(self.shift) != len(self.scale) or not all(map(math.isfinite, self.shift + self.scale)):
            raise ValueError(f"not a latent normalisation: {self.kind!r}, {len(self.shift)} shifts, {len(self.scale)} scales")
        if 0.0 in self.scale:
            raise ValueError("a latent normalisation scale of 0 cannot be inverted")

    @property
    def channels(self) -> int:
        return len(self.scale)

    def describe(self) -> str:
        """The map in words: in numbers when one scale and shift serve every channel."""
        source = "from the VAE config" if self.kind == "config" else "measured over these latents"
        if len(set(self.scale)) == 1 and len(set(self.shift)) == 1:
            z = f"(z − {self.shift[0]:g})" if self.shift[0] else "z"
            return f"z' = {self.scale[0]:g} · {z} ({source})"
        if self.kind == "channel":
            return f"z' = (z − mean_c) / std_c for each of {self.channels} channels ({source})"
        return f"z' = (z − shift_c) · scale_c for each of {self.channels} channels ({source})"

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        return _channel_view(values, z.device)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) VAE latents → the model's space (the trainer)."""
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) from the model's space → VAE latents (the sampler, before decoding)."""
        return z / self._view(self.scale, z) + self._view(self.shift, z)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LatentNorm:
        return cls(str(record["kind"]), tuple(map(float, record["shift"])), tuple(map(float, record["scale"])))

    @classmethod
    def legacy(cls, scale: float, shift: float, channels: int) -> LatentNorm:
        """What shards.json and checkpoints written before this record meant: z' = z · scale + shift."""
        return cls("config", (-shift / scale if shift else 0.0,) * channels, (float(scale),) * channels)


@functools.cache
def _channel_view(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) float32 on `device`, made once: the trainer applies the map every micro-batch, and a fresh tensor
    there would be a host-to-device copy per step."""
    import torch

    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


class ChannelStats:
    """Per-channel statistics of latent samples, accumulated in float64 from stored moments, batch by batch."""

    def __init__(self, channels: int):
        self.count = 0  # values per channel: images × h × w
        self.sums = np.zeros((3, channels))  # Σ mean, Σ mean², Σ std² per channel

    def update(self, moments: np.ndarray) -> None:
        """Add (n, 2C, h, w) moments: posterior mean, then std."""
        mean, std = np.split(moments.astype(np.float64), 2, axis=1)  # 2 × (n, C, h, w)
        self.count += mean.shape[0] * mean.shape[2] * mean.shape[3]
        self.sums += np.stack([mean.sum((0, 2, 3)), (mean * mean).sum((0, 2, 3)), (std * std).sum((0, 2, 3))])

    def norm(self) -> LatentNorm:
        """shift = mean_c and scale = 1 / std_c of the latent samples."""
        mean, square, variance = self.sums / max(self.count, 1)
        std = np.sqrt(np.maximum(square - mean * mean, 0.0) + variance)
        if not (std > 0).all():
            raise UserError(f"Latent channel {int(np.argmin(std))} is constant over the dataset: --latent-norm channel "
                            "cannot scale it; use --latent-norm config.")
        return LatentNorm("channel", tuple(map(float, mean)), tuple(map(float, 1.0 / std)))

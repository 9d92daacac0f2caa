"""Has a model learned its data? FD-PC and the nearest-neighbour check, in the space of the PCs (docs/METHOD.md).

Both sides are compared on the token grid (p×p), the grid the PCs were projected on:
- generated PCs (N, r, h, h), the model's PC channels at the latent side h, are averaged over each f×f block
  (f = h/p);
- the training PCs (M, K, p, p) of the shards go through the same map: their first r upsampled as the trainer feeds
  them (`trainer.objectives.upsample_pcs`), then averaged over each f×f block. So a model that generates exactly
  what it was trained on scores 0.

FD-PC: the Fréchet distance (`metrics.frechet_distance`, FID's formula) between Gaussians fitted to every k×k window
of tokens of each map (k = 3 by default: r·9 values per window, (p − k + 1)² windows per map). A window sees a
token with its neighbours, so noise whose every token has the training PCs' mean and variance still scores far
from the data (k = 1, one token per vector, would not tell them apart).

Nearest neighbours: the mean L2 distance from each generated map (r×p×p on the token grid) to its nearest training
map, beside the same distance for noise maps (each PC Gaussian with the training maps' per-PC mean and std, every
token independent) and for each training map to its nearest other one. A model that learned more than the PCs'
scale lies closer than the noise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from redi.common.errors import UserError
from redi.sampler.metrics import feature_statistics, frechet_distance
from redi.trainer.objectives import upsample_pcs

FD_WINDOW = 3  # tokens per side of the windows FD-PC compares
NOISE_SEED = 0  # the noise maps of the nearest-neighbour check


def on_token_grid(pcs: np.ndarray | torch.Tensor, grid: int) -> np.ndarray:
    """(N, r, h, h) PC maps at the latent side → (N, r, p, p) float64 on the token grid: the mean of each f×f block."""
    maps = torch.as_tensor(np.asarray(pcs), dtype=torch.float64)  # (N, r, h, h)
    assert maps.shape[-1] % grid == 0, f"a {maps.shape[-1]}-wide map does not pool onto a {grid}-token grid"
    return F.avg_pool2d(maps, maps.shape[-1] // grid).numpy()  # (N, r, p, p)


def training_maps(pcs: np.ndarray, rank: int, latent_side: int) -> np.ndarray:
    """The shards' PCs (M, K, p, p) as the model sees its first `rank` (upsampled to the latent side), back on the token
    grid: (M, rank, p, p) float64."""
    up = upsample_pcs(torch.from_numpy(np.asarray(pcs, dtype=np.float32)), rank, latent_side)  # (M, r, h, h)
    return on_token_grid(up, pcs.shape[-1])


def windows(maps: np.ndarray, k: int = FD_WINDOW) -> np.ndarray:
    """(N, r, p, p) → (N·(p − k + 1)², r·k·k): every k×k window of tokens of every map, flattened."""
    _, r, p, _ = maps.shape
    if not 1 <= k <= p:
        raise UserError(f"A {k}×{k} window does not fit the {p}×{p} token grid: pass --window 1 to {p}.")
    cols = F.unfold(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64)), k)  # (N, r·k·k, windows)
    return cols.transpose(1, 2).reshape(-1, r * k * k).numpy()


def fd_windows(generated: np.ndarray, training: np.ndarray, k: int = FD_WINDOW) -> float:
    """The Fréchet distance between the k×k windows of (N, C, s, s) generated maps and of (M, C, s, s) training maps:
    FD-PC on the PCs' token grid, FD-latent on the latents."""
    assert generated.shape[1:] == training.shape[1:], f"maps of different shapes: {generated.shape} vs {training.shape}"
    return frechet_distance(feature_statistics(windows(generated, k)), feature_statistics(windows(training, k)))


@dataclass(frozen=True)
class NearestNeighbours:
    """Mean L2 distance to the nearest training map (on the token grid)."""

    generated: float
    """From each generated map."""
    noise: float
    """From noise maps of the training PCs' per-PC mean and std, every token independent."""
    training: float
    """From each training map to its nearest other training map (leave one out)."""

    @property
    def closer_than_noise(self) -> bool:
        return self.generated < self.noise


def _nearest(queries: np.ndarray, refs: np.ndarray, leave_one_out: bool = False) -> float:
    """Mean over queries (N, D) of the L2 distance to the nearest row of refs (M, D); the query itself excluded when
    queries are refs."""
    q, r = torch.from_numpy(queries), torch.from_numpy(refs)
    d = torch.cdist(q, r)  # (N, M)
    if leave_one_out:
        d.fill_diagonal_(float("inf"))
    return float(d.min(dim=1).values.mean())


def nearest_neighbours(generated: np.ndarray, training: np.ndarray, seed: int = NOISE_SEED) -> NearestNeighbours:
    """The nearest-neighbour check of (N, r, p, p) generated maps against (M, r, p, p) training maps."""
    mean = training.mean(axis=(0, 2, 3), keepdims=True)  # (1, r, 1, 1)
    std = training.std(axis=(0, 2, 3), keepdims=True)  # (1, r, 1, 1)
    noise = mean + std * np.random.default_rng(seed).standard_normal(generated.shape)  # (N, r, p, p)
    flat = [m.reshape(len(m), -1).astype(np.float64) for m in (generated, noise, training)]
    return NearestNeighbours(generated=_nearest(flat[0], flat[2]), noise=_nearest(flat[1], flat[2]),
                             training=_nearest(flat[2], flat[2], leave_one_out=True) if len(training) > 1 else float("nan"))


@dataclass(frozen=True)
class PCScore:
    """FD-PC and the nearest-neighbour check of one set of generated PCs."""

    fd_pc: float
    nearest: NearestNeighbours
    num_generated: int
    num_training: int
    rank: int
    window: int

    def figures(self) -> dict[str, float]:
        """The numbers a report prints: fd_pc and the three nearest-neighbour distances."""
        return {"fd_pc": self.fd_pc, **{f"nn_{k}": v for k, v in asdict(self.nearest).items()}}

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"closer_than_noise": self.nearest.closer_than_noise}


def score_pcs(generated: np.ndarray | torch.Tensor, training_pcs: np.ndarray, k: int = FD_WINDOW) -> PCScore:
    """FD-PC and nearest neighbours of generated PCs (N, r, h, h) against the shards' PCs (M, K ≥ r, p, p)."""
    gen = np.asarray(generated, dtype=np.float32)
    rank, side, grid = gen.shape[1], gen.shape[-1], training_pcs.shape[-1]
    train = training_maps(training_pcs, rank, side)  # (M, r, p, p)
    gen_maps = on_token_grid(gen, grid)  # (N, r, p, p)
    return PCScore(fd_pc=fd_windows(gen_maps, train, k), nearest=nearest_neighbours(gen_maps, train),
                   num_generated=len(gen), num_training=len(train), rank=rank, window=k)


def fd_latent(generated: np.ndarray | torch.Tensor, moments: np.ndarray, seed: int = NOISE_SEED, k: int = FD_WINDOW) -> float:
    """FD-latent: `fd_windows` of generated VAE latents (N, C, h, h), in the VAE's own space (the sampler's inverse
    normalisation applied), against one draw of the training latents z = mean + std·ε (the shards' moments
    (M, 2C, h, h), ε from `seed`)."""
    mean, std = np.split(np.asarray(moments, dtype=np.float64), 2, axis=1)  # 2 × (M, C, h, h)
    z = mean + std * np.random.default_rng(seed).standard_normal(mean.shape)  # (M, C, h, h)
    return fd_windows(np.asarray(generated, dtype=np.float64), z, k)


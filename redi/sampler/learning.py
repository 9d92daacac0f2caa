"""How far a run has learned its data: a checkpoint's network (its untrained start, its EMA or its raw weights) sampled
in-process and scored against the training data in PC space (FD-PC, nearest neighbours) and in latent space
(FD-latent), as `redi bench learn` and the learning tests measure it (docs/METHOD.md).

The latents are scored in the VAE's own space: the sampler's inverse of the run's normalisation (the one the decoder
applies, from the checkpoint's record) against the training latents z = mean + std·ε, so a normalisation that the
sampler did not invert exactly shows up here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from redi.pipeline.readers import read_first
from redi.sampler.guidance import GuidanceConfig
from redi.sampler.labels import class_labels
from redi.sampler.pc_metrics import FD_WINDOW, NearestNeighbours, fd_latent, score_pcs
from redi.sampler.sample import sampling_network
from redi.sampler.samplers import sample_latents
from redi.trainer.checkpoint import Checkpoint
from redi.trainer.config import resolve_shards_dir


@dataclass(frozen=True)
class TrainingSet:
    """The shards' first samples: what generated PCs and latents are compared with."""

    moments: np.ndarray
    """(M, 2C, h, h) float32 posterior means, then stds."""
    pcs: np.ndarray
    """(M, K, p, p) float32 principal components on the token grid."""

    @classmethod
    def read(cls, data: str, num: int = 10_000) -> TrainingSet:
        """The first `num` samples of the shards of `data` (a data root or its shards/, local or a URL)."""
        _, _, arrays = read_first(str(resolve_shards_dir(data)), num, ("moments", "pcs"))
        return cls(arrays["moments"].astype(np.float32), arrays["pcs"].astype(np.float32))


@dataclass(frozen=True)
class LearningScore:
    """One network's samples against the training set."""

    weights: str
    """init (the untrained network), ema or model."""
    fd_latent: float
    """FD-latent of the generated VAE channels (pc_metrics.fd_latent)."""
    fd_pc: float | None
    """FD-PC of the generated PC channels; None for a model without them."""
    nearest: NearestNeighbours | None
    """The nearest-neighbour check of the generated PCs; None without them."""
    latent_mean: tuple[float, ...]
    """Per channel, of the generated latents in the VAE's space."""
    latent_std: tuple[float, ...]
    """Per channel, of the generated latents in the VAE's space."""


@torch.no_grad()
def score_checkpoint(ckpt: Checkpoint, weights: str, training: TrainingSet, num: int = 64, sampler: str = "ode",
                     steps: int = 50, guidance: GuidanceConfig | None = None, seed: int = 0,
                     window: int = FD_WINDOW) -> LearningScore:
    """Sample `num` joint latents of the checkpoint's `weights` on the CPU (images 0…num−1 of `seed`, random labels, as
    `redi sample --sampler SAMPLER --steps STEPS` draws them) and score them against `training`."""
    mc = ckpt.model_config
    model = sampling_network(ckpt, weights, torch.device("cpu"))
    labels = torch.from_numpy(class_labels(num, seed, "random", mc.num_classes))  # (N,)
    x, _, _ = sample_latents(model, labels, torch.arange(num), seed, sampler, steps, guidance or GuidanceConfig(),
                             latent_size=mc.input_size,
                             cls_dim=mc.repa_dim if mc.reg_token else None)  # (N, V + r, h, h)
    z = ckpt.shards.norm.invert(x[:, : mc.vae_channels])  # (N, V, h, h): what the decoder decodes
    pcs = score_pcs(x[:, mc.vae_channels :].numpy(), training.pcs, window) if mc.pca_rank else None
    return LearningScore(weights=weights, fd_latent=fd_latent(z.numpy(), training.moments, k=window),
                         fd_pc=pcs.fd_pc if pcs else None, nearest=pcs.nearest if pcs else None,
                         latent_mean=tuple(z.mean(dim=(0, 2, 3)).tolist()), latent_std=tuple(z.std(dim=(0, 2, 3)).tolist()))

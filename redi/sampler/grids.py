"""Sampling during training: the run's sampler (shared by the sample grids and the in-training FID) and the grids.

Everything is fixed for the whole run, so grids of different steps differ by the weights only: image i's noise comes
from (seed, i) and its label from (seed, i) (or the balanced draw of the eval), exactly as `redi sample` draws them,
with the EMA weights, the run's default guidance and a short sampler (ODE Euler for SiT, DDPM for DiT, 50 steps by
default), decoded with the run's VAE. A resumed run draws the same grid for the same step, pixel for pixel. The same
settings given to `redi sample --ckpt RUN/checkpoints/step-N.pt` give the same images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redi.common.errors import UserError
from redi.sampler.labels import class_labels
from redi.sampler.outputs import captioned_grid, to_uint8, write_picture
from redi.sampler.decoder import Decoder, load_decoder
from redi.sampler.config import SampleConfig
from redi.sampler.sample import SamplingPlan, autocast_factory, sample_decoded, sampling_network
from redi.sampler.settings import SamplerChoice, describe_settings, resolve_guidance, resolve_sampler, sample_settings
from redi.trainer.checkpoint import Checkpoint, checkpoint_path
from redi.trainer.config import TrainConfig

PREVIEW_DIR = "samples"  # RUN/samples/step-{step:07d}.png (beside `redi sample`'s RUN/samples/NAME/ directories)
RUN_SAMPLERS = {"sit": "ode", "dit": "ddpm"}  # short and deterministic: a grid changes with the weights only


def grid_path(run: Path, step: int) -> Path:
    return Path(run) / PREVIEW_DIR / f"step-{step:07d}.png"


def default_guidance(cfg: TrainConfig) -> str:
    """The run's default guidance: RG for a model trained with representation drop (ReDi's sampling), else none."""
    return "rg" if cfg.uses_pcs and cfg.rep_drop > 0 else "none"


@dataclass(frozen=True)
class RunSampler:
    """One set of in-training samples (a grid, or the FID's images): settings resolved once, at the start of the run."""

    config: SampleConfig
    """The `redi sample` settings that give the same images from a checkpoint of this run."""
    choice: SamplerChoice
    plan: SamplingPlan
    decoder: Decoder
    labels: np.ndarray
    """(num,) int64: the label of every index, fixed for the run."""
    settings: dict[str, Any]
    """What `redi sample` records of its settings (sample.json), the checkpoint's step and hash left out."""

    @classmethod
    def build(cls, cfg: TrainConfig, ckpt: Checkpoint, device: torch.device, num: int, labels: str = "random",
              batch_size: int = 64) -> RunSampler:
        """The run's sampler for `num` images; an unloadable VAE or an impossible setting is refused now, not at step N."""
        mc = ckpt.model_config
        sample_cfg = SampleConfig(ckpt=checkpoint_path(cfg.run, ckpt.step), guidance=cfg.sample_guidance or default_guidance(cfg),
                                  sampler=RUN_SAMPLERS[mc.objective], steps=cfg.sample_steps, num=num, seed=cfg.seed,
                                  batch_size=batch_size, labels=labels, device=str(device))
        try:
            choice, guidance = resolve_sampler(sample_cfg, mc.objective), resolve_guidance(sample_cfg, ckpt)
        except UserError as e:
            raise UserError(f"{e} (the run's sample grids and evaluations: --sample-guidance, --sample-steps)") from None
        precision = "bf16" if device.type == "cuda" else "fp32"  # redi sample's default
        decoder = load_decoder(ckpt, None, device)
        plan = SamplingPlan(choice.name, choice.steps, cfg.seed, guidance, autocast_factory(device, precision),
                            sample_cfg.quantize, choice.options)
        settings = sample_settings(sample_cfg, ckpt, choice, guidance, decoder, precision)
        settings["checkpoint"] = {"sha256": None, "step": None, "weights": "ema"}  # filled per step
        labels_ = class_labels(num, cfg.seed, labels, mc.num_classes)
        return cls(sample_cfg, choice, plan, decoder, labels_, settings)

    def network(self, ckpt: Checkpoint) -> torch.nn.Module:
        """The sampling network of the checkpoint's EMA weights (in memory: the training state), as `redi sample`
        builds it (without the REPA projector)."""
        return sampling_network(ckpt, "ema", self.decoder.vae.device)

    def pixels(self, model: torch.nn.Module, batch: list[int]) -> tuple[np.ndarray, int]:
        """uint8 (B, H, W, 3) images of the global indices `batch`, and the network evaluations per image."""
        _, decoded, stats = sample_decoded(model, self.decoder, self.plan, batch, self.labels)  # (B, 3, H, W)
        return to_uint8(decoded, self.plan.quantize), stats.nfe

    def record(self, step: int) -> dict[str, Any]:
        """The settings with this step's checkpoint, as sample.json would hold them."""
        return self.settings | {"checkpoint": {"sha256": None, "step": step, "weights": "ema"}}


def write_grid(run: Path, step: int, sampler: RunSampler, ckpt: Checkpoint) -> tuple[Path, np.ndarray, float]:
    """RUN/samples/step-{step:07d}.png of the EMA weights at `step` (written atomically); the grid and its seconds."""
    start = time.perf_counter()
    model = sampler.network(ckpt)
    num = len(sampler.labels)
    images = np.concatenate([sampler.pixels(model, list(range(s, min(s + sampler.config.batch_size, num))))[0]
                             for s in range(0, num, sampler.config.batch_size)])  # (N, H, W, 3)
    conditional = ckpt.model_config.num_classes > 1
    grid = captioned_grid(images, describe_settings(sampler.record(step)), sampler.labels if conditional else None)
    write_picture(grid_path(run, step), grid)
    return grid_path(run, step), grid, time.perf_counter() - start

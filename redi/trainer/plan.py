"""A TrainConfig resolved against its shards: the network, the loss and the batch plan, with every refusal that
depends on the data made here, once, before the run directory is written (`redi train` and its `--dry-run`)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redi.common.errors import UserError
from redi.pipeline.shard_info import ShardInfo, read_shard_info
from redi.trainer.checkpoint import RunConfig, ShardSummary, list_checkpoints
from redi.trainer.config import TrainConfig, resolve_shards_dir
from redi.trainer.flops import train_flops_per_image
from redi.trainer.models import ModelConfig, build_model
from redi.trainer.objectives import LossConfig, check_compatible
from redi.trainer.resume import as_recorded, load_record, refuse_another_run

FLOAT32_COPIES = 5  # weights, EMA, gradients and AdamW's two moments, float32 each


@dataclass(frozen=True)
class TrainPlan:
    """What the loop runs: the config with its data-dependent values filled, and what follows from it."""

    cfg: TrainConfig
    """resolution from the shards; max_steps from --epochs."""
    model: ModelConfig
    loss: LossConfig
    shards: ShardSummary
    accum: int
    """Micro-batches per rank in one optimiser step."""
    micro: int
    """Samples per rank in one forward pass."""
    epochs: float | None = None
    """--epochs as asked (max_steps follows from it: `epoch_steps`)."""

    def resumed(self, step: int, seen: int) -> TrainPlan:
        """The plan of a run resuming at `step` after `seen` images: --epochs counts the images of every stretch at its
        own batch size, and only the rest at this batch size."""
        if self.epochs is None or self.shards.num_samples is None:
            return self
        steps = epoch_steps(self.epochs, self.shards.num_samples, self.cfg.batch_size, step, seen)
        return dataclasses.replace(self, cfg=self.cfg.replace(max_steps=steps))

    def run_config(self, world_size: int) -> RunConfig:
        """config.json of the run."""
        return RunConfig(train=self.cfg.to_json(), model_config=self.model, shards=self.shards, world_size=world_size)


def resolve(cfg: TrainConfig, info: ShardInfo, world_size: int = 1) -> TrainPlan:
    """`cfg` on the shards `info` describes, over `world_size` ranks; the refusals as one sentence each."""
    cfg, epochs = cfg.replace(resolution=info.resolution).with_patch(info.patch_size), cfg.epochs
    if epochs is not None:
        cfg = cfg.replace(max_steps=epoch_steps(epochs, info.num_samples, cfg.batch_size), epochs=None)
    model, loss = model_config(cfg, info), loss_config(cfg)
    check_compatible(model, loss)
    accum, micro = batch_plan(cfg, world_size)
    return TrainPlan(cfg=cfg, model=model, loss=loss, shards=ShardSummary.of(info), accum=accum, micro=micro,
                     epochs=epochs)


def epoch_steps(epochs: float, num_samples: int, batch_size: int, step: int = 0, seen: int = 0) -> int:
    """max_steps for `epochs` passes over `num_samples` images: a run at `step` that has seen `seen` images trains the
    rest at `batch_size` (none when it has seen them all already: it stops where it is)."""
    left = max(0.0, epochs * num_samples - seen)
    return max(1, step + round(left / batch_size))


def describe(cfg: TrainConfig, given: Collection[str] | None = None) -> dict[str, Any]:
    """The resolved configuration (config.json's names) and the network's size, without touching a GPU (`--dry-run`);
    for an existing run, the settings its resume would train with (`given`: as `train`'s), or its refusal."""
    record = load_record(cfg.run)
    plan = resolve(as_recorded(cfg, record, given), read_shard_info(resolve_shards_dir(cfg.shards)))
    if record is not None:
        refuse_another_run(Path(cfg.run), record, plan.cfg)
        step = max((s for s, _ in list_checkpoints(Path(cfg.run))), default=0)  # the newest, if it loads
        plan = plan.resumed(step, record.samples_before(step))
    return {"train": plan.cfg.to_json(), "model_config": dataclasses.asdict(plan.model), "shards": plan.shards.to_json(),
            "parameters": parameter_count(plan.model), "train_gflops_per_image": train_flops_per_image(plan.model) / 1e9,
            "micro_batches_per_step": plan.accum}


def model_config(cfg: TrainConfig, info: ShardInfo) -> ModelConfig:
    """The network for this method on these shards; data-dependent checks give one clear sentence."""
    rank = cfg.pca_rank if cfg.uses_pcs else 0
    if rank > info.pcs:
        raise UserError(f"--pca-rank {rank} is larger than the {info.pcs} components stored in the shards: rebuild them with `redi shards --pcs {rank}`.")
    if cfg.uses_repa and not info.has_patch_tokens:
        raise UserError(f"--method {cfg.method} aligns with the encoder's patch tokens, which these shards lack: rebuild them with `redi shards --patch-tokens`.")
    if cfg.method == "reg" and "cls" not in info.fields:
        raise UserError("--method reg needs the encoder's global token, and these shards' encoder has none (no CLS token "
                        "or pooled output, e.g. I-JEPA): use --method repa or an encoder with one (docs/ENCODERS.md).")
    side, patch = info.latent_shape[1], cfg.patch_size or info.patch_size
    if cfg.uses_repa and side != patch * info.grid:
        fits = f"--model {cfg.model.partition('/')[0]}/{side // info.grid}, or " if side % info.grid == 0 else ""
        raise UserError(f"--method {cfg.method} aligns the model's {side // patch}×{side // patch} tokens ({side}×{side} "
                        f"latents in patches of {patch}) with the encoder's {info.grid}×{info.grid} patches: use {fits}"
                        f"features made for patch {patch} (`redi features --patch-size {patch} --force`, then pca and shards).")
    return ModelConfig(
        size=cfg.size, objective=cfg.objective, input_size=side, patch_size=patch, vae_channels=info.latent_shape[0],
        pca_rank=rank, fusion=cfg.fusion, num_classes=1 if cfg.unconditional else info.num_classes,
        class_dropout=cfg.class_dropout, repa_depth=cfg.resolved_repa_depth, repa_dim=info.feature_dim,
        projector_dim=cfg.projector_dim,
        reg_token=cfg.method == "reg", learn_sigma=cfg.learn_sigma,
    )


def loss_config(cfg: TrainConfig) -> LossConfig:
    return LossConfig(
        method=cfg.method, lambda_z=cfg.lambda_z, rep_drop=cfg.rep_drop if cfg.uses_pcs else 0.0,
        rep_drop_mode=cfg.rep_drop_mode, rep_drop_target=cfg.rep_drop_target, repa_weight=cfg.repa_weight,
        cls_weight=cfg.cls_weight, class_dropout=cfg.class_dropout, weighting=cfg.weighting,
    )


def batch_plan(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(accumulation steps, per-rank micro-batch) that make up the global batch exactly."""
    per_rank, rest = divmod(cfg.batch_size, world_size)
    micro = cfg.micro_batch or per_rank
    if rest or per_rank % micro:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of {world_size} ranks × --micro-batch {micro}.")
    return per_rank // micro, micro


def parameter_count(model_cfg: ModelConfig) -> int:
    """Parameters of the network, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model_cfg).parameters())


def check_fits(model_cfg: ModelConfig, info: ShardInfo, dev: torch.device) -> None:
    """Refuse, before allocating, a network whose training state exceeds the device's whole memory
    (e.g. a class embedding sized by a label of 2e9 in the shards)."""
    params = parameter_count(model_cfg)
    need = params * 4 * FLOAT32_COPIES
    if dev.type == "cuda":
        have = torch.cuda.get_device_properties(dev).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        labels = f", for {model_cfg.num_classes:,} classes: the largest label in {info.root} is {info.num_classes - 1:,}"
        raise UserError(
            f"Training this network needs at least {need / 2**30:,.1f} GiB ({params:,} parameters"
            f"{labels if model_cfg.num_classes > 1 else ''}), more than the {have / 2**30:,.1f} GiB of {dev}: "
            f"{'check the labels, or ' if model_cfg.num_classes > 1 else ''}pick a smaller --model.")

"""The training loop: shards in, checkpoints and metrics out. Read it top to bottom.

Data parallelism is over V = batch_size / micro_batch *virtual ranks*: micro-batch k of rank r
reads the sample stream of virtual rank r·accum + k (from sample step·micro_batch on, so resuming
needs only the step) and draws its noise, times, label and representation drops from a generator
seeded by (seed, step, virtual rank). So a resumed run repeats the uninterrupted one exactly, and
W processes equal one process accumulating W micro-batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from common.atomic import atomic_write_bytes, atomic_write_json, remove_temporaries
from common.distributed import DistInfo, all_reduce_mean, barrier, process_group
from common.errors import UserError
from common.lock import exclusive
from common.runtime import loader_workers
from pipeline.readers import ShardInfo, make_loader, read_shard_info
from pipeline.remote import Location, read_if_exists
from trainer.checkpoint import BackgroundCheckpointer, load_checkpoint, load_newest_readable
from trainer.config import TrainConfig, architecture_mismatch, resolve_shards_dir
from trainer.ema import make_ema, update_ema
from trainer.flops import train_flops_per_image
from trainer.metrics import MetricsLog, peak_flops
from trainer.models import ModelConfig, build_model
from trainer.objectives import LossConfig, TrainBatch, check_compatible, compute_loss, prepare_batch
from trainer.progress import TrainProgress
from trainer.stop import StopRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run: Path
    step: int
    steps_run: int
    skipped_steps: int
    last_loss: float
    seconds: float
    images_per_s: float
    stopped_by: int = 0  # the signal that ended the run early (after a checkpoint), 0 if it ran to max_steps


def train(cfg: TrainConfig, device: str | None = None, on_step: Callable[[], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg` until cfg.max_steps; `on_step` runs after each step (profilers).

    One job at a time per run directory: rank 0 holds RUN/.lock while it trains. A stop signal from the
    start on (even during the set-up) ends the run after a step, with a checkpoint.
    """
    run = Path(cfg.run)
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory.")
    is_rank0 = os.environ.get("RANK", "0") == "0"
    with StopRequest() as stop, exclusive(run / ".lock", f"the run {run}") if is_rank0 else contextlib.nullcontext():
        if is_rank0:
            remove_temporaries(run)  # e.g. a checkpoint whose write was killed: gigabytes nothing else deletes
        with process_group(device) as dist_info:
            return run_training(cfg, dist_info, on_step, stop)


def run_training(cfg: TrainConfig, dist_info: DistInfo, on_step: Callable[[], None] | None, stop: StopRequest) -> TrainResult:
    """The training loop itself (see `train`); `stop` records the stop signals."""
    dev = dist_info.device
    shards = resolve_shards_dir(cfg.shards)
    info = read_shard_info(shards)
    cfg = cfg.replace(resolution=info.resolution)
    if cfg.epochs is not None:
        cfg = cfg.replace(max_steps=max(1, round(cfg.epochs * info.num_samples / cfg.batch_size)), epochs=None)
    model_cfg = model_config(cfg, info)
    loss_cfg = loss_config(cfg)
    check_compatible(model_cfg, loss_cfg)  # every refusal before the run directory is written
    check_fits(model_cfg, info, dist_info.device)
    accum, micro = batch_plan(cfg, dist_info.world_size)
    run = Path(cfg.run)
    prepare_run_dir(run, cfg, model_cfg, info, dist_info)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(model_cfg).to(dev)
    ema = make_ema(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        fused=dev.type == "cuda",
    )
    step = 0
    if (ckpt := load_newest_readable(run, dev)) is not None:
        if cfg.init is not None and dist_info.is_main:
            log.warning(f"--init {cfg.init} is ignored: {run} resumes from its own step-{ckpt['step']} checkpoint.")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    elif cfg.init is not None:
        load_initial_weights(Path(cfg.init), model, ema, model_cfg, dev)
    net = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None) if dist_info.world_size > 1 else model
    net.cfg = model_cfg  # compute_loss reads the model's config through any wrapper
    if cfg.compile:
        net = torch.compile(net)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" and cfg.precision == "bf16" else contextlib.nullcontext()

    batches = micro_batch_streams(shards, cfg, dist_info, accum, micro, step)
    metrics = MetricsLog(run / "metrics.jsonl", resume_step=step) if dist_info.is_main else None
    flops_per_image, peak = train_flops_per_image(model_cfg), peak_flops(dev)
    gen = torch.Generator(device=dev)
    bad_in_a_row, skipped, loss_value = 0, 0, math.nan
    progress = TrainProgress(cfg.max_steps, step, enabled=dist_info.is_main)
    start_step, started = step, time.perf_counter()
    timer = time.perf_counter()

    stopped_by = 0
    with BackgroundCheckpointer() as checkpointer:  # on a stop signal: finish the step, checkpoint, return
        while step < cfg.max_steps:
            model.train()
            sums: dict[str, torch.Tensor] = {}
            for k in range(accum):
                raw = next(batches[k])
                virtual_rank, virtual_world = dist_info.rank * accum + k, dist_info.world_size * accum
                gen.manual_seed(micro_seed(cfg.seed, step * virtual_world + virtual_rank))
                batch = to_train_batch(raw, cfg, info, dev, gen)
                sync = contextlib.nullcontext() if k == accum - 1 or dist_info.world_size == 1 else model_no_sync(net)
                with sync, autocast:
                    out = compute_loss(net, batch, loss_cfg, gen)
                    (out.loss / accum).backward()
                for name, value in {"loss": out.loss.detach(), **out.terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.float() / accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # inf: norm only
            stopped_by = stop.agreed(dev)  # (DDP: an all-reduce) read at the step's one host sync, just below
            if torch.isfinite(grad_norm):  # the same on every rank (DDP averaged the gradients); the host sync
                bad_in_a_row = 0
                opt.step()
                update_ema(ema, model, cfg.ema_decay)
            else:  # skip the update; the logged loss shows it
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise UserError(f"The loss was not finite for {bad_in_a_row} steps in a row at step {step}: lower --lr or check the data.")
            opt.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step()

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed, timer = time.perf_counter() - timer, time.perf_counter()
                steps_done = min(cfg.log_every, step - progress.last_step)
                images_per_s = steps_done * cfg.batch_size / elapsed
                losses = all_reduce_mean(torch.stack(list(sums.values())))  # one all-reduce, on logging steps only
                row = dict(zip(sums, losses.tolist(), strict=True)) | {
                    "step": step, "grad_norm": float(grad_norm), "lr": cfg.lr, "skipped_steps": skipped,
                    "steps_per_s": steps_done / elapsed, "images_per_s": images_per_s,
                    "mfu": flops_per_image * images_per_s / (peak * dist_info.world_size) if peak else None,
                }
                loss_value = row["loss"]
                if metrics is not None:
                    metrics.write(row)
                progress.update(row)
            if dist_info.is_main and (stopped_by or step % cfg.save_every == 0 or step % cfg.ckpt_every == 0
                                      or step == cfg.max_steps):
                state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                         "config": cfg.to_json(), "model_config": dataclasses.asdict(model_cfg), "shards": shard_summary(info)}
                checkpointer.save(run, step, state, keep=cfg.keep, milestone_every=cfg.ckpt_every)
            if stopped_by:
                break
        checkpointer.wait()  # the last checkpoint is on disk before any rank leaves (torchrun stops the others)
        barrier()
    progress.close()
    seconds = time.perf_counter() - started
    return TrainResult(run=run, step=step, steps_run=step - start_step, skipped_steps=skipped, last_loss=loss_value,
                       seconds=seconds, images_per_s=(step - start_step) * cfg.batch_size / max(seconds, 1e-9),
                       stopped_by=stopped_by)


def load_initial_weights(path: Path, model: torch.nn.Module, ema: torch.nn.Module, model_cfg: ModelConfig,
                         dev: torch.device) -> None:
    """Start from another run's (or a converted public checkpoint's) weights: EMA into both, as fine-tuning does."""
    init = load_checkpoint(path, map_location=dev)
    wanted = dataclasses.asdict(model_cfg)
    saved = init.get("model_config", {})
    if changed := sorted(k for k in wanted if k != "class_dropout" and saved.get(k) != wanted[k]):
        raise UserError(f"--init {path} holds a different network ({', '.join(changed)}); match --model/--method/--pca-rank to it.")
    weights = init["ema"] if init.get("ema") is not None else init["model"]
    model.load_state_dict(weights)
    ema.load_state_dict(weights)


def describe(cfg: TrainConfig) -> dict:
    """The resolved configuration and parameter count, without touching a GPU (`--dry-run`)."""
    info = read_shard_info(resolve_shards_dir(cfg.shards))
    cfg = cfg.replace(resolution=info.resolution)
    model_cfg = model_config(cfg, info)
    params = parameter_count(model_cfg)
    return {"train": cfg.to_json(), "model": dataclasses.asdict(model_cfg), "parameters": params,
            "train_gflops_per_image": train_flops_per_image(model_cfg) / 1e9, "shards": shard_summary(info)}


def parameter_count(model_cfg: ModelConfig) -> int:
    """Parameters of the network, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model_cfg).parameters())


FLOAT32_COPIES = 5  # weights, EMA, gradients and AdamW's two moments, float32 each


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


def shard_summary(info: ShardInfo) -> dict:
    """What a checkpoint records of its shards (plain types, so weights_only loading accepts it)."""
    return {
        "root": str(info.root), "shards_json_sha256": info.sha256,  # str(): a URL without its credentials
        "vae": info.raw["vae"], "encoder": info.raw.get("encoder", {}),
        "num_samples": info.num_samples, "num_classes": info.num_classes, "resolution": info.resolution,
        "latent_shape": list(info.latent_shape), "pcs": info.pcs, "grid": info.grid, "feature_dim": info.feature_dim,
        "vae_scale": info.vae_scale, "vae_shift": info.vae_shift, "pca_sha256": info.pca_sha256,
    }


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
    return ModelConfig(
        size=cfg.size, objective=cfg.objective, input_size=info.latent_shape[1], vae_channels=info.latent_shape[0],
        pca_rank=rank, fusion=cfg.fusion, num_classes=1 if cfg.unconditional else info.num_classes,
        class_dropout=cfg.class_dropout, repa_depth=cfg.resolved_repa_depth, repa_dim=info.feature_dim,
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


def data_fields(cfg: TrainConfig) -> tuple[str, ...]:
    fields = ("moments",) + (("pcs",) if cfg.uses_pcs else ()) + (("cls",) if cfg.method == "reg" else ())
    return fields + (("patch_tokens",) if cfg.uses_repa else ())


def micro_batch_streams(shards: Location, cfg: TrainConfig, dist_info: DistInfo, accum: int, micro: int,
                        step: int) -> list[Iterator[dict]]:
    """One batch iterator per accumulation step k: virtual rank r·accum + k's stream, from sample step·micro on."""
    loaders = [
        make_loader(
            shards, batch_size=micro, rank=dist_info.rank * accum + k, world_size=dist_info.world_size * accum,
            seed=cfg.seed, cursor=step * micro, fields=data_fields(cfg), format=cfg.data_format,
            num_workers=loader_workers(cfg.num_workers, loaders=accum), pin_memory=dist_info.device.type == "cuda",
            read_ahead=cfg.read_ahead,
        )
        for k in range(accum)
    ]
    return [iter(loader) for loader in loaders]


def micro_seed(seed: int, micro_index: int) -> int:
    """Seed of one micro-batch's generator: a function of the run seed and its global position only."""
    return (seed * 1_000_003 + micro_index) % (2**63)


def to_train_batch(raw: dict, cfg: TrainConfig, info: ShardInfo, dev: torch.device, gen: torch.Generator) -> TrainBatch:
    """Shard batch (float16 on the host) → device batch with a fresh latent sample and upsampled PCs."""
    moments = raw["moments"].to(dev, non_blocking=True)  # (N, 2V, h, h)
    pcs = raw["pcs"].to(dev, non_blocking=True) if "pcs" in raw else None  # (N, K, p, p)
    x0 = prepare_batch(moments, pcs, cfg.pca_rank if cfg.uses_pcs else 0, info.vae_scale, info.vae_shift, gen)
    label = raw["label"].to(dev, non_blocking=True)
    if cfg.unconditional:
        label = torch.zeros_like(label)
    cls = raw["cls"].to(dev, non_blocking=True).float() if "cls" in raw else None
    tokens = raw["patch_tokens"].to(dev, non_blocking=True).float() if "patch_tokens" in raw else None
    return TrainBatch(x0=x0, y=label, cls=cls, patch_tokens=tokens)


def model_no_sync(net: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's no_sync through an optional torch.compile wrapper (skip the all-reduce on accumulation steps)."""
    inner = getattr(net, "_orig_mod", net)
    return inner.no_sync() if isinstance(inner, DistributedDataParallel) else contextlib.nullcontext()


# What a resumed run's shards must share with the ones it started on (a copy elsewhere is fine).
SAME_DATA_FIELDS = ("vae", "encoder", "num_samples", "num_classes", "resolution", "latent_shape", "pcs", "feature_dim",
                    "vae_scale", "vae_shift", "pca_sha256")


def prepare_run_dir(run: Path, cfg: TrainConfig, model_cfg: ModelConfig, info: ShardInfo, dist_info: DistInfo) -> None:
    """Write config.json for a new run; refuse an existing run whose architecture differs."""
    path = run / "config.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            saved_train, saved_shards = saved["train"], saved["shards"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(f"{path} is damaged: restore it from a checkpoint's `config` or use another --run directory.") from None
        if changed := architecture_mismatch(saved_train, cfg):
            raise UserError(f"{run} holds a run with a different architecture ({', '.join(changed)}): use another --run directory.")
        now = shard_summary(info)
        if changed := [k for k in SAME_DATA_FIELDS if saved_shards.get(k) != now[k]]:
            raise UserError(f"{run} was trained on other data than {info.root} ({', '.join(changed)} differ): "
                            "resume it on its own shards, or use another --run directory.")
    if dist_info.is_main:
        if (pca := read_if_exists(info.root.parent / "pca.safetensors")) is not None:  # the shards' projection
            atomic_write_bytes(run / "pca.safetensors", pca)
        atomic_write_json(path, {"train": cfg.to_json(), "model": dataclasses.asdict(model_cfg), "shards": shard_summary(info),
                                 "world_size": dist_info.world_size})
    barrier()

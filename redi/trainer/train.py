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
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from redi.common.distributed import DistInfo, all_reduce_mean, barrier, process_group
from redi.common.errors import UserError
from redi.common.runtime import loader_workers
from redi.pipeline.readers import make_loader
from redi.pipeline.shard_info import ShardInfo, read_shard_info, shards_pca
from redi.pipeline.remote import Location
from redi.trainer.checkpoint import BackgroundCheckpointer
from redi.trainer.config import TrainConfig, resolve_shards_dir
from redi.trainer.flops import train_flops_per_image
from redi.trainer.metrics import peak_flops
from redi.trainer.objectives import LossConfig, TrainBatch, check_batch, compute_loss, prepare_batch
from redi.trainer.plan import TrainPlan, check_fits, resolve
from redi.trainer.progress import TrainProgress
from redi.trainer.resume import as_recorded, load_record, note_resume
from redi.trainer.run_dir import prepare_run_dir, run_lock
from redi.trainer.state import initial_state
from redi.trainer.stop import BatchStream, StopRequest, StopWaiting
from redi.trainer.watch import RunLog, WatchFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run: Path
    step: int
    max_steps: int  # where the run stops (--epochs resolved)
    steps_run: int
    skipped_steps: int
    last_loss: float
    seconds: float
    images_per_s: float
    stopped_by: int = 0  # the signal that ended the run early (after a checkpoint), 0 if it ran to max_steps
    watch_seconds: float = 0.0  # spent on sample grids and evaluations (left out of images_per_s)
    data_stalled: bool = False  # the stop came and the next step's data did not (STOP_GRACE_S): step is the last finished one


def train(cfg: TrainConfig, device: str | None = None, on_step: Callable[[], None] | None = None,
          watch: WatchFactory = RunLog, given: Collection[str] | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg` until cfg.max_steps; `on_step` runs after each step (profilers).

    An existing run resumes with its recorded settings except the fields in `given` (the flags the user typed; None:
    every field of `cfg` is meant): trainer/resume.py.

    `watch` logs the run: RunLog writes metrics.jsonl and the tracker; `redi train` passes sampler.watch.RunWatch,
    which also draws the --sample-every grids and the --eval-every FID.

    One job at a time per run directory: rank 0 holds RUN/.lock while it trains. A stop signal from the
    start on (even during the set-up) ends the run after a step, with a checkpoint; when that step's data does not come
    within STOP_GRACE_S of the signal (a stalled server), after the last finished step.
    """
    with StopRequest() as stop, run_lock(Path(cfg.run)), process_group(device) as dist_info:
        return run_training(cfg, dist_info, on_step, stop, watch, given)


def run_training(cfg: TrainConfig, dist_info: DistInfo, on_step: Callable[[], None] | None, stop: StopRequest,
                 watch_factory: WatchFactory = RunLog, given: Collection[str] | None = None) -> TrainResult:
    """The training loop itself (see `train`); `stop` records the stop signals."""
    record = load_record(cfg.run)  # None: a new run
    cfg = as_recorded(cfg, record, given)
    dev, shards = dist_info.device, resolve_shards_dir(cfg.shards)
    cfg = precision_that_runs(cfg, dev, given)
    info = read_shard_info(shards)
    plan = resolve(cfg, info, dist_info.world_size)  # every refusal before the run directory is written
    cfg, run = plan.cfg, Path(plan.cfg.run)
    check_fits(plan.model, info, dev)
    pca = shards_pca(info)  # the PCA beside the shards, refused unless it is the one they were projected with
    prepare_run_dir(run, plan, pca, dist_info, record)
    state = initial_state(plan, run, dev)
    model, step, start_step = state.model, state.step, state.step
    seen = record.samples_before(step) if record is not None else step * cfg.batch_size
    if record is not None:
        plan = plan.resumed(step, seen)  # --epochs: the images already seen, at the batch sizes they were seen at
        cfg = plan.cfg
        if dist_info.is_main:
            note_resume(run, record, plan.cfg, step, dist_info.world_size)
    net = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None) if dist_info.world_size > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" and cfg.precision == "bf16" else contextlib.nullcontext()

    watch = watch_factory(plan, dist_info, state)  # metrics.jsonl, the tracker (+ grids, FID: sampler/watch.py)
    meter = SpeedMeter(cfg.batch_size, train_flops_per_image(plan.model), peak_flops(dev), dist_info.world_size, step)
    gen = torch.Generator(device=dev)
    bad_in_a_row, skipped, loss_value, stopped_by, stalled, saved = 0, 0, math.nan, 0, False, start_step
    progress = TrainProgress(cfg.max_steps, step, enabled=dist_info.is_main)
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}  # each loss term summed over the steps since the last logged one (on the device)
    summed_steps = 0
    # On a stop signal: finish the step (or, its data stalled, give it up), checkpoint, return.
    with BackgroundCheckpointer() as checkpointer, watch, contextlib.ExitStack() as reading:
        batches = [reading.enter_context(BatchStream(it, dev))
                   for it in micro_batch_streams(shards, cfg, dist_info, plan.accum, plan.micro, seen)]
        while step < cfg.max_steps:
            model.train()
            loss_cfg = aligned_loss(plan, step)
            for k in range(plan.accum):
                virtual_rank, virtual_world = dist_info.rank * plan.accum + k, dist_info.world_size * plan.accum
                gen.manual_seed(micro_seed(cfg.seed, step * virtual_world + virtual_rank))
                try:
                    raw = batches[k].next(stop)
                except StopWaiting:  # stopped, and this step's data did not come: the last finished step is the stop's
                    stalled = True
                    break
                batch = to_train_batch(raw, cfg, info, dev, gen)
                if step == start_step and k == 0:
                    check_batch(plan.model, plan.loss, batch)  # the shards' shapes, once
                sync = contextlib.nullcontext() if k == plan.accum - 1 or dist_info.world_size == 1 else model_no_sync(net)
                with sync, autocast:
                    out = compute_loss(net, plan.model, batch, loss_cfg, gen)
                    (out.loss / plan.accum).backward()
                for name, value in {"loss": out.loss.detach(), **out.terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.float() / plan.accum
            if stalled:  # no other rank is waited for: one may be stuck in a collective that this one will never join
                stopped_by = stop.signum
                if dist_info.is_main and step > saved:
                    checkpointer.save(run, step, state.checkpoint(plan).to_state(), keep=cfg.keep, milestone_every=cfg.ckpt_every)
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # inf: norm only
            stopped_by = stop.agreed(dev)  # (DDP: an all-reduce) read at the step's one host sync, just below
            if torch.isfinite(grad_norm):  # the same on every rank (DDP averaged the gradients); the host sync
                bad_in_a_row = 0
                state.update(cfg.ema_decay)
            else:  # skip the update; the logged loss shows it
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise UserError(f"The loss was not finite for {bad_in_a_row} steps in a row at step {step}: lower --lr or check the data.")
            state.opt.zero_grad(set_to_none=True)
            step = state.step = step + 1
            summed_steps += 1
            if state.phema is not None:  # every step, a skipped one too: the profile averages over time
                state.phema.update(model, state.phema.images + cfg.batch_size, cfg.batch_size)
            if on_step is not None:
                on_step()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                # the mean over the steps since the last log (SiT's running loss): one all-reduce, on logging steps only
                losses = all_reduce_mean(torch.stack(list(sums.values()))) / summed_steps
                row = dict(zip(sums, losses.tolist(), strict=True)) | {
                    "step": step, "grad_norm": float(grad_norm), "lr": cfg.lr, "skipped_steps": skipped} | meter.speeds(step)
                sums, summed_steps = {}, 0
                if plan.loss.uses_repa:
                    row["align_weight"] = loss_cfg.repa_weight  # the alignment weight in effect (--align-until)
                loss_value = row["loss"]
                watch.log(row)
                progress.update(row)
            save = stopped_by or step % cfg.save_every == 0 or step % cfg.ckpt_every == 0 or step == cfg.max_steps
            snapshot = state.phema is not None and (step % cfg.phema_every == 0 or step == cfg.max_steps)
            if dist_info.is_main and (save or snapshot):
                checkpointer.save(run, step, state.checkpoint(plan).to_state() if save else {"phema": state.phema.state_dict()},
                                  keep=cfg.keep, milestone_every=cfg.ckpt_every, checkpoint=save, phema_snapshot=snapshot)
                saved = step if save else saved
            if stopped_by:
                break
            meter.since += watch.after_step(state)  # grids and evaluations are left out of images/s
        checkpointer.wait()  # the last checkpoint is on disk before any rank leaves (torchrun stops the others)
        if not stalled:
            barrier()
    progress.close()
    seconds = time.perf_counter() - started
    training = max(seconds - watch.seconds, 1e-9)
    return TrainResult(run=run, step=step, max_steps=cfg.max_steps, steps_run=step - start_step, skipped_steps=skipped, last_loss=loss_value,
                       seconds=seconds, images_per_s=(step - start_step) * cfg.batch_size / training,
                       stopped_by=stopped_by, watch_seconds=watch.seconds, data_stalled=stalled)


def aligned_loss(plan: TrainPlan, step: int) -> LossConfig:
    """The loss of optimiser step `step` (0-based): --repa-weight scaled as --align-until and --align-fade say."""
    factor = plan.cfg.align_factor(step)
    return plan.loss if factor == 1.0 else dataclasses.replace(plan.loss, repa_weight=plan.loss.repa_weight * factor)


def precision_that_runs(cfg: TrainConfig, dev: torch.device, given: Collection[str] | None) -> TrainConfig:
    """The config with the precision the loop runs at, as config.json records it: bf16 autocast is a GPU's, and
    a CPU trains in float32 whatever was asked (said once when the flag asked for bf16)."""
    if dev.type == "cuda" or cfg.precision == "fp32":
        return cfg
    if given is not None and "precision" in given:
        log.warning(f"--precision {cfg.precision} applies on a GPU; on {dev} the run trains in fp32 (config.json says so).")
    return cfg.replace(precision="fp32")


@dataclass
class SpeedMeter:
    """steps/s, images/s and MFU over the steps since the last logged one."""

    batch_size: int
    flops_per_image: float
    peak: float | None
    """One device's peak FLOP/s; None where unknown (CPU): no MFU."""
    world_size: int
    last_step: int
    since: float = dataclasses.field(default_factory=time.perf_counter)

    def speeds(self, step: int) -> dict[str, float | None]:
        now = time.perf_counter()
        elapsed, steps = now - self.since, step - self.last_step
        self.since, self.last_step = now, step
        images_per_s = steps * self.batch_size / elapsed
        mfu = self.flops_per_image * images_per_s / (self.peak * self.world_size) if self.peak else None
        return {"steps_per_s": steps / elapsed, "images_per_s": images_per_s, "mfu": mfu}


def data_fields(cfg: TrainConfig) -> tuple[str, ...]:
    fields = ("moments",) + (("pcs",) if cfg.uses_pcs else ()) + (("cls",) if cfg.method == "reg" else ())
    return fields + (("patch_tokens",) if cfg.uses_repa else ())


def micro_batch_streams(shards: Location, cfg: TrainConfig, dist_info: DistInfo, accum: int, micro: int,
                        seen: int) -> list[Iterator[dict]]:
    """One batch iterator per accumulation step k: virtual rank r·accum + k's stream, from its share of the `seen`
    samples on (step·micro while the batch size never changed)."""
    cursor = seen // (dist_info.world_size * accum)
    loaders = [
        make_loader(
            shards, batch_size=micro, rank=dist_info.rank * accum + k, world_size=dist_info.world_size * accum,
            seed=cfg.seed, cursor=cursor, fields=data_fields(cfg), format=cfg.data_format,
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
    x0 = prepare_batch(moments, pcs, cfg.pca_rank if cfg.uses_pcs else 0, info.latent_norm, gen)
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

"""`redi sample`: a checkpoint in; per-image PNGs, a grid, the generated PCs, an ADM .npz and sample.json out.

Everything the sampler needs comes from the checkpoint (trainer/checkpoint.py): the network
(`model_config`), the method and representation drop (`train`), the latent scale and the VAE
(`shards`); the shards themselves are not read.

Reproducibility. Image i's noise comes from its own generator seeded by (seed, i) and its random
label from (seed, i) too, so image i does not depend on which batch or process draws it. Work is
cut into batches of fixed composition, batch b = indices [b·B, (b+1)·B) ∩ [0, N), and rank r of
W runs the batches with b % W == r. A resumed run redoes only the batches that miss an image and
writes only the missing files; since every batch is recomputed with the same composition, a
resumed or multi-process run gives the same bits as one uninterrupted process at the same batch
size B. Between different batch sizes the pixels agree up to floating-point rounding:
batched kernels (GEMM, convolutions) may round a row differently for another batch shape
(PyTorch's numerical-accuracy notes), which moves a rare pixel by one grey level. An adaptive
ODE solver (`--solver dopri5`) picks one step sequence per batch, as SiT/ReDi's does, so there
images of another batch size agree only within the solver's tolerances.

Multi-process: under torchrun each rank samples its batches on its own GPU, then after an
all-reduce rank 0 assembles the grid, the PC picture and the .npz from the per-image files.
Processes launched independently (`rank`/`world_size` in the config) share the output directory
the same way; whichever rank-0 run finds every image present assembles the outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from redi.common.atomic import atomic_write_json, remove_temporaries
from redi.common.display import counting
from redi.common.distributed import process_group
from redi.common.errors import UserError
from redi.common.runtime import resolve_device
from redi.sampler.config import SampleConfig
from redi.sampler.decoder import Decoder, load_decoder
from redi.sampler.guidance import AutocastFactory, GuidanceConfig, GuidanceStats
from redi.sampler.labels import class_labels
from redi.sampler.outputs import (
    ERRORS_JSONL, GRID_MAX, SAMPLE_JSON, BatchWriter, assemble, default_out, is_assembled, is_done, out_lock, prepare_out,
    write_errors,
)
from redi.sampler.report import SampleResult, Work, final_report
from redi.sampler.interface import SamplerOptions
from redi.sampler.samplers import sample_latents
from redi.sampler.settings import describe_settings, resolve_guidance, resolve_guide, resolve_sampler, sample_settings
from redi.trainer.checkpoint import Checkpoint, resolve_checkpoint
from redi.trainer.models import DiffusionTransformer, build_model, initial_network

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp32": None}  # --precision
NONFINITE_REASON = ("the sample or its decoded image is not finite (NaN or inf), so no image was written: "
                    "lower --cfg-scale or --rg-scale, or check the checkpoint")


def sampling_network(ckpt: Checkpoint, weights: str, device: torch.device) -> DiffusionTransformer:
    """The network with the chosen weights in eval mode, float32, without the REPA projector (it only serves the
    training loss)."""
    model = build_model(dataclasses.replace(ckpt.model_config, repa_depth=0))
    state = untrained_weights(ckpt) if weights == "init" else ckpt.weights(weights)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("projector.")})
    return model.to(device).eval().requires_grad_(False)


def untrained_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights the checkpoint's run started from: its network rebuilt from the run's seed, with the REPA projector
    (whose initialisation draws come before the embeddings'); the global RNG is left as it was."""
    if ckpt.origin is not None or ckpt.train.get("init"):
        raise UserError(f"{ckpt.path} comes from a run that started from other weights (--init or `redi convert`): "
                        "--weights init rebuilds only a run's seeded initialisation.")
    with torch.random.fork_rng(devices=[]):
        return initial_network(ckpt.model_config, int(ckpt.train["seed"])).state_dict()


def batches_of(num: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches: batch b = [b·B, (b+1)·B) ∩ [0, N) for every b with b % world_size == rank."""
    starts = range(rank * batch_size, num, world_size * batch_size)
    return [list(range(s, min(s + batch_size, num))) for s in starts]


@contextlib.contextmanager
def sample_ranks(cfg: SampleConfig) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device): the explicit split, else torchrun's process group or one process."""
    if cfg.world_size is not None:
        assert cfg.rank is not None, "SampleConfig gives rank and world_size together"
        yield cfg.rank, cfg.world_size, resolve_device(cfg.device)
        return
    with process_group(cfg.device) as job:
        yield job.rank, job.world_size, job.device


def autocast_factory(device: torch.device, precision: str) -> AutocastFactory | None:
    """The network's autocast context factory for sample_latents (None: plain float32)."""
    dtype = AUTOCAST_DTYPES[precision]
    return None if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype))


@dataclass(frozen=True)
class SamplingPlan:
    """How every batch is sampled."""

    sampler: str
    steps: int | None
    seed: int
    guidance: GuidanceConfig
    autocast: AutocastFactory | None
    """Context factory the network runs under (bf16 autocast), None for float32."""
    quantize: str = "nearest"
    """How decoded pixels become uint8 (sampler.outputs.QUANTIZE)."""
    options: SamplerOptions = field(default_factory=SamplerOptions)
    """ODE solver and SDE last step."""
    guide: DiffusionTransformer | None = None
    """AutoGuidance's guiding network (eval mode, on the sampling device), for its modes only."""


def run_sample(cfg: SampleConfig) -> SampleResult:
    """Sample this process's missing images, then (rank 0, once every image exists) assemble the outputs."""
    ckpt = Checkpoint.load(resolve_checkpoint(cfg.run, cfg.ckpt).resolve())
    mc = ckpt.model_config
    sampler, guidance = resolve_sampler(cfg, mc.objective), resolve_guidance(cfg, ckpt)
    guide_ckpt = resolve_guide(cfg, ckpt)
    labels = class_labels(cfg.num, cfg.seed, cfg.labels, mc.num_classes)
    grid_count, has_pcs = min(cfg.num, GRID_MAX), mc.pca_rank > 0
    with sample_ranks(cfg) as (rank, world, device), contextlib.ExitStack() as held:
        precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
        decoder = load_decoder(ckpt, cfg.vae, device, cfg.force_vae)
        settings = sample_settings(cfg, ckpt, sampler, guidance, decoder, precision, guide_ckpt)
        out = Path(cfg.out) if cfg.out is not None else default_out(ckpt, cfg.run, sampler, guidance, cfg, guide_ckpt)
        held.enter_context(out_lock(out, cfg, rank))
        if rank == 0 and cfg.world_size is None:  # the job's lock holder, before any rank writes
            remove_temporaries(out)
        prepare_out(out, settings, ckpt.path, cfg.force, writes=rank == 0 or cfg.world_size is not None)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has checked (and with --force cleared) the directory

        def done(i: int) -> bool:
            return is_done(out, i, has_pcs and i < grid_count)

        mine = batches_of(cfg.num, cfg.batch_size, rank, world)
        todo = [b for b in mine if not all(done(i) for i in b)]
        to_generate = sum(1 for b in todo for i in b if not done(i))
        guide = None if guide_ckpt is None else sampling_network(guide_ckpt, cfg.guide_weights, device)
        plan = SamplingPlan(sampler.name, sampler.steps, cfg.seed, guidance, autocast_factory(device, precision),
                            cfg.quantize, sampler.options, guide)
        bar = counting("sampling" + (" [yellow](tiny-random VAE)[/]" if settings["tiny_random"] else ""), to_generate,
                       enabled=rank == 0)
        model = sampling_network(ckpt, cfg.weights, device)
        work = sample_batches(model, decoder, plan, todo, labels, out, done, grid_count, bar).reduce(device)
        present = int(Work(images=sum(len(b) for b in mine) - to_generate).reduce(device).images)
        missing = sum(1 for i in range(cfg.num) if not done(i)) if rank == 0 else 0
        if rank == 0 and work.nonfinite:
            write_errors(out / ERRORS_JSONL, work.nonfinite, NONFINITE_REASON)
        if rank == 0:
            report = json.loads((out / SAMPLE_JSON).read_bytes())  # a dict: prepare_out checked it or wrote it
            every_run = work.after(Work.from_record(report.get("work")))  # the record survives any rerun
            if work.batches:  # before assembling, which a full disk or a kill can interrupt
                atomic_write_json(out / SAMPLE_JSON, report | {"complete": False, "work": every_run.record()})
        if rank == 0 and missing == 0:
            (out / ERRORS_JSONL).unlink(missing_ok=True)  # every image is there now
            if work.images or not is_assembled(out, cfg.num, has_pcs):  # e.g. samples.npz deleted
                assemble(out, cfg.num, labels, grid_count, has_pcs, describe_settings(settings), mc.num_classes > 1,
                         counting("assembling", cfg.num))
                atomic_write_json(out / SAMPLE_JSON, final_report(settings, ckpt, cfg, every_run, world, device, has_pcs))
    return SampleResult(
        out=out, num=cfg.num, present=present, work=work, rank=rank, world_size=world, device=str(device),
        sampler=sampler, guidance=guidance.mode, missing=missing, assembled=rank == 0 and missing == 0,
        has_pcs=has_pcs, tiny_random=settings["tiny_random"],
    )


def sample_batches(
    model: DiffusionTransformer, decoder: Decoder, plan: SamplingPlan, todo: list[list[int]], labels: np.ndarray,
    out: Path, done: Callable[[int], bool], grid_count: int,
    bar: contextlib.AbstractContextManager[Callable[[int], None]],
) -> Work:
    """Sample, decode and write each batch in `todo` (outputs.BatchWriter: only missing files, PCs before the PNG)."""
    mc = model.cfg
    work = Work()
    start = time.perf_counter()
    with bar as advance, BatchWriter(out, done, grid_count, plan.quantize) as writer:
        for batch in todo:
            x, decoded, stats = sample_decoded(model, decoder, plan, batch, labels)  # (B, V + r, h, h), (B, 3, H, W)
            written, nonfinite = writer.write_batch(batch, x, decoded, mc.vae_channels if mc.pca_rank else None)
            work.nonfinite += nonfinite
            work.images += written
            work.batches += 1
            work.model_calls += stats.model_calls
            work.nfe += stats.nfe * len(batch)
            work.guide_nfe += stats.branch_evals.get("guide", 0) * len(batch)
            work.sampled += len(batch)
            work.nfe_per_image = max(work.nfe_per_image, stats.nfe)
            advance(written)
    work.seconds = time.perf_counter() - start
    return work


def sample_decoded(model: DiffusionTransformer, decoder: Decoder, plan: SamplingPlan, batch: list[int],
                   labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, GuidanceStats]:
    """Sample the global indices `batch` (labels[batch]) and decode them: x (B, V + r, h, h), images (B, 3, H, W)
    in ≈[−1, 1], and the network work spent."""
    mc = model.cfg
    y = torch.from_numpy(labels[batch]).to(next(model.parameters()).device)  # (B,)
    x, _, stats = sample_latents(
        model, y, torch.tensor(batch, dtype=torch.long), plan.seed, plan.sampler, plan.steps, plan.guidance,
        plan.autocast, latent_size=mc.input_size, cls_dim=mc.repa_dim if mc.reg_token else None, options=plan.options,
        guide=plan.guide,
    )  # x (B, V + r, h, h)
    return x, decoder(x[:, : mc.vae_channels]), stats

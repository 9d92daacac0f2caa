"""The `encode` (VAE moments) and `features` (representation tokens) stages: one chunked, cached, resumable runner.

The two stages differ only in the frozen model and the per-batch map (`StageKind`), so one
run can serve both: `run_stages` decodes each image once and feeds every stage that still
needs its chunk, while each stage keeps its own manifest and ledger. Images
are split into chunks of `chunk_size` consecutive indices; a chunk is decoded by DataLoader
workers, encoded in batches of `batch_size` (always the same batches for the same chunk),
written as one Zarr chunk per array (zarr's LocalStore writes each chunk file atomically),
and only then committed (`progress/CCCCCC.json`). A killed run therefore resumes at the
first uncommitted chunk and ends with arrays bitwise equal to an uninterrupted run. Under
`torchrun` rank r takes the pending chunks c with c % world == r.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
import zarr
from rich.markup import escape
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from redi.common.display import counting
from redi.common.distributed import barrier, process_group
from redi.common.errors import UserError
from redi.common.flags import OneOf
from redi.common.runtime import loader_worker_init, loader_workers
from redi.common.schema import Range, check_ranges
from redi.pipeline.encoders import ENCODER, VAE, EncoderFamily, EncoderRef, load, resolve, sidecar
from redi.pipeline.images import ImageSource, load_cropped, open_source
from redi.pipeline.representations import encode_features, feature_spec, fit_positions
from redi.pipeline.stage import ChunkError, Manifest, StageDir, StageState, describe_identity, open_arrays, read_manifest
from redi.pipeline.vaes import LatentSpace, latent_space, manifest_space, sd_vae_config, vae_moments

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORE_DTYPES = ("float16", "float32")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeConfig:
    """One `encode` or `features` run; the CLI builds it from flags."""

    source: str | Path
    """Images: a folder (ImageFolder or flat), an edm2 .zip with dataset.json, a WebDataset .tar, a folder of .tar
    files or a quoted glob of them."""
    data: Path
    """Data root: the stage writes DATA/latents or DATA/features."""
    model: str
    """The VAE or the representation encoder: hub id, local directory or tiny-random."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of the model; recorded in the manifest."""
    resolution: Annotated[int, Range(1)] = 256
    """ADM centre-crop side R in pixels: a multiple of the VAE's downsampling times the patch size, of 16 for SD-VAE
    (the papers use 256 or 512)."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per forward pass (recorded: batches shape the numerics)."""
    device: str = "auto"
    """Where the encoder runs: auto (cuda if available, else cpu), cpu, cuda or cuda:N (torchrun ranks: their GPU)."""
    precision: Annotated[str | None, OneOf(tuple(PRECISIONS))] = None
    """Autocast; default fp32, as the reference preprocessing (bf16: faster on a GPU, less exact).

    fp32 runs the convolutions in TF32 on a GPU, torch's default, as the references."""
    chunk_size: Annotated[int, Range(1)] = 256
    """Images per committed unit (what a killed run redoes) and per Zarr chunk."""
    workers: Annotated[int | None, Range(0)] = None
    """DataLoader processes decoding and cropping images (0: none); default: one per core, at most 4."""
    dtype: Annotated[str, OneOf(STORE_DTYPES)] = "float16"
    """Storage dtype of the output arrays."""
    force: bool = False
    """Delete and redo a stage that was made with different settings."""
    patch_size: Annotated[int | None, Range(1)] = None
    """Features: the diffusion model's patch size their token grid is made for; default: 2 on f8 latents, 1 on f16, f32.

    The grid is the latent side (of DATA/latents, or of the default VAE) over this patch."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision}).")
        if self.dtype not in STORE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)} (got {self.dtype}).")


Forward = Callable[[torch.nn.Module, torch.Tensor], dict[str, torch.Tensor]]  # uint8 (B, R, R, 3) → name → (B, ...)


@dataclass(frozen=True)
class StagePlan:
    """What a stage computes with one encoder at one resolution."""

    shapes: dict[str, tuple[int, ...]]  # per-image array shapes
    record: dict[str, Any]  # manifest parameters beyond the run's settings (how the encoder is fed)
    forward: Forward  # float32 outputs per batch
    legacy: dict[str, Any] = field(default_factory=dict)  # what a manifest made before `record` existed meant by its absence
    prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model  # once, after loading (a table's resample)


@dataclass(frozen=True)
class StageKind:
    """What makes `encode` and `features` different: the model and its plan."""

    name: str  # stage name in the manifest
    subdir: str  # directory under the data root
    family: EncoderFamily  # which frozen encoder
    plan: Callable[[EncoderRef, EncodeConfig, LatentSpace], StagePlan]  # (encoder, run, latent space) → shapes, record, map


def _vae_plan(ref: EncoderRef, cfg: EncodeConfig, space: LatentSpace) -> StagePlan:
    side = space.side(cfg.resolution)
    record = {"latent_space": space.record()}  # a function of the VAE config, which the identity pins: so is the legacy
    return StagePlan({"moments": (2 * space.channels, side, side)}, record, lambda vae, x: {"moments": vae_moments(vae, x)},
                     record)


# Features made before params.representation: DINOv2 with registers at SD-VAE's grid. (Plain DINOv2's were made with
# transformers' per-call plain bicubic table, not REPA's resampled one: a manifest without the record is another run.)
BEFORE_REPRESENTATIONS = ("dinov2-reg",)


def _features_plan(ref: EncoderRef, cfg: EncodeConfig, space: LatentSpace) -> StagePlan:
    spec = feature_spec(ref.config, space.token_grid(cfg.resolution, cfg.patch_size), sidecar(ref, "preprocessor_config.json"))
    record = {"representation": spec.record()}
    before = spec.family.key in BEFORE_REPRESENTATIONS and spec.grid == latent_space(sd_vae_config()).token_grid(cfg.resolution)
    return StagePlan(spec.shapes(), record, lambda model, x: encode_features(model, x, spec),  # type: ignore[arg-type]
                     record if before else {}, lambda model: fit_positions(model, spec))  # type: ignore[arg-type]


def stage_latent_space(jobs: Sequence[tuple[StageKind, EncoderRef]], data: Path) -> LatentSpace:
    """The latent space the features' token grid follows: the VAE encoded in the same run, else the one DATA/latents
    records, else the default VAE's (SD-VAE: f8)."""
    if vae := next((ref for kind, ref in jobs if kind.family is VAE), None):
        return latent_space(vae.config)
    try:
        space = manifest_space(read_manifest(Path(data) / "latents").params)
    except UserError:  # no latents/ yet (or a damaged manifest, which `encode` will name)
        space = None
    if space is None:
        log.info(f"features: no readable {Path(data) / 'latents'}: the token grid follows the default VAE's latents "
                 "(SD-VAE, f8); encode first for another VAE.")
    return space or latent_space(sd_vae_config())


ENCODE = StageKind("encode", "latents", VAE, _vae_plan)
FEATURES = StageKind("features", "features", ENCODER, _features_plan)


@dataclass
class StageResult:
    """What one run of a stage did (the CLI prints it)."""

    stage: str  # "encode" | "features"
    out: Path  # the stage directory
    state: StageState  # NEW, RESUME or COMPLETE (nothing was done)
    images: int  # images in the source
    processed: int  # images encoded by this run
    skipped: int  # images that could not be read (in all chunks once the stage is complete)
    seconds: float  # wall time of the encoding loop (model loading excluded)
    encoder: dict[str, Any] = field(default_factory=dict)  # the manifest's encoder identity
    tiny_random: bool = False  # weights are random: for tests and demos only
    rank: int = 0  # torchrun rank of this process (counts above are for all ranks)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> Table:
        """One-screen summary."""
        t = Table(title=f"redi {self.stage}", show_header=False)
        t.add_row("images", str(self.images))
        t.add_row("encoded this run", str(self.processed))
        t.add_row("skipped (unreadable)", f"[yellow]{self.skipped}[/]" if self.skipped else "0")
        t.add_row("time", f"{self.seconds:.1f} s")
        t.add_row("throughput", f"{self.images_per_second:.1f} images/s")
        t.add_row("encoder", escape(describe_identity(self.encoder)))
        if self.tiny_random:
            t.add_row("[bold yellow]warning[/]", "[bold yellow]tiny-random weights: for tests and demos only[/]")
        return t


def run_encode(cfg: EncodeConfig) -> StageResult:
    """Stage `encode`: VAE posterior moments of every image into DATA/latents."""
    return run_stages([(ENCODE, cfg)])[0]


def run_features(cfg: EncodeConfig) -> StageResult:
    """Stage `features`: the encoder's patch tokens (and global token, if it has one) of every image into DATA/features."""
    return run_stages([(FEATURES, cfg)])[0]


@dataclass
class _Job:
    """One stage of a run: its encoder, directory, this rank's pending chunks and (once loaded) model and arrays."""

    kind: StageKind
    ref: EncoderRef
    plan: StagePlan
    stage: StageDir
    result: StageResult
    pending: set[int]  # this rank's uncommitted chunks (empty when the stage is complete)
    model: torch.nn.Module | None = None
    arrays: dict[str, zarr.Array] | None = None


def run_stages(jobs: Sequence[tuple[StageKind, EncodeConfig]]) -> list[StageResult]:
    """Create, resume or confirm each stage directory, decoding every image once for all stages that need it.

    Each stage keeps its own manifest, chunk ledger and errors file, exactly as when it runs
    alone: `redi encode --features` followed by `redi features` has nothing left to do.
    """
    cfg = jobs[0][1]
    assert all(dataclasses.replace(c, model=cfg.model, revision=cfg.revision) == cfg for _, c in jobs), \
        "stages run together share every setting but the encoder"
    source = open_source(cfg.source)
    with process_group(cfg.device) as job, contextlib.ExitStack() as locks:  # rank 0 holds each stage's lock
        rank, world, device = job.rank, job.world_size, job.device
        precision = cfg.precision or "fp32"  # the stored data outlives every experiment: exact unless asked
        refs = [(kind, resolve(kind.family, c.model, c.revision)) for kind, c in jobs]
        space = stage_latent_space(refs, cfg.data)
        opened = [_open_job(kind, ref, c, space, source, precision, rank, world, locks)
                  for (kind, ref), (_, c) in zip(refs, jobs, strict=True)]
        active = [job for job in opened if job.pending]
        if active:
            for job in active:
                job.model = job.plan.prepare(load(job.ref, device))
                job.arrays = open_arrays(job.stage.root, len(source), job.plan.shapes, cfg.chunk_size, cfg.dtype)
            start = time.perf_counter()
            _encode_chunks(active, cfg, source, device, precision)
            for job in active:
                job.result.seconds = time.perf_counter() - start
        for job in opened:
            if job.result.state is not StageState.COMPLETE:
                _close_job(job, rank, world)
        return [job.result for job in opened]


def _open_job(kind: StageKind, ref: EncoderRef, cfg: EncodeConfig, space: LatentSpace, source: ImageSource, precision: str,
              rank: int, world: int, locks: contextlib.ExitStack) -> _Job:
    """Check or create the stage directory and find this rank's pending chunks."""
    plan = kind.plan(ref, cfg, space)
    shapes = plan.shapes
    params = {"resolution": cfg.resolution, "dtype": cfg.dtype, "chunk_size": cfg.chunk_size,
              "batch_size": cfg.batch_size, "precision": precision, "arrays": shapes, **plan.record}
    manifest = Manifest(kind.name, params, ref.identity, source.describe(), ref.tiny_random)
    out = Path(cfg.data) / kind.subdir
    stage = StageDir(out, math.ceil(len(source) / cfg.chunk_size))
    state = _open_stage(stage, manifest, plan.legacy, cfg, source, shapes, rank, world, locks)
    result = StageResult(kind.name, out, state, len(source), 0, 0, 0.0, ref.identity, ref.tiny_random, rank)
    if state is StageState.COMPLETE:
        result.skipped = stage.skipped() or 0
        return _Job(kind, ref, plan, stage, result, set())
    mine = stage.pending_of(rank, world)
    log.info(f"{kind.name}: {len(source)} images from {source.location} → {out}; {len(stage.pending())} of "
             f"{stage.n_chunks} chunks to do{f' by {world} processes' if world > 1 else ''}; "
             f"{describe_identity(ref.identity)}{' (tiny-random weights)' if ref.tiny_random else ''}")
    return _Job(kind, ref, plan, stage, result, mine)


def _close_job(job: _Job, rank: int, world: int) -> None:
    """Sum the ranks' counts, and once every chunk is committed write the stage's errors file."""
    result = job.result
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, (result.processed, result.skipped, result.seconds))  # also a barrier
        result.processed, result.skipped = sum(s[0] for s in shares), sum(s[1] for s in shares)
        result.seconds = max(s[2] for s in shares)
    if rank == 0 and not job.stage.pending():
        job.stage.finish()
    barrier()
    if (skipped := job.stage.skipped()) is not None:
        result.skipped = skipped


def _open_stage(
    stage: StageDir, manifest: Manifest, legacy: dict[str, Any], cfg: EncodeConfig, source: ImageSource,
    shapes: dict[str, tuple[int, ...]], rank: int, world: int, locks: contextlib.ExitStack,
) -> StageState:
    """Rank 0 takes the stage's lock, checks the manifest (refusing, wiping or creating) and lays out the
    store; the others follow."""
    if rank != 0:
        refusal = _broadcast(None, world)
        if refusal:
            raise UserError(refusal)
        return stage.start(manifest, force=False, legacy=legacy)
    try:
        locks.enter_context(stage.held())  # the other ranks write nothing before the broadcast
        state = stage.start(manifest, cfg.force, legacy, source.keys, shapes, cfg.chunk_size, cfg.dtype)
    except UserError as e:
        _broadcast(str(e), world)
        raise
    _broadcast(None, world)
    return state


def _broadcast(refusal: str | None, world: int) -> str | None:
    """Rank 0's refusal message (or None) sent to every rank; also a barrier."""
    if world == 1:
        return refusal
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _CroppedImages(Dataset):
    """Image i of a source, decoded and ADM-cropped: (i, uint8 (R, R, 3), reason or "")."""

    def __init__(self, source: ImageSource, resolution: int):
        self.source = source
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, str]:
        pixels, reason = load_cropped(self.source, index, self.resolution)
        return index, pixels, reason


def _collate(items: list[tuple[int, np.ndarray, str]]) -> tuple[list[int], torch.Tensor, list[str]]:
    indices, pixels, reasons = zip(*items, strict=True)
    return list(indices), torch.from_numpy(np.stack(pixels)), list(reasons)  # (B, R, R, 3) uint8


def _chunk_batches(chunks: list[int], n: int, chunk_size: int, batch_size: int) -> list[list[int]]:
    """Index batches that never cross a chunk boundary: the same batches for a chunk in every run."""
    batches = []
    for c in chunks:
        end = min((c + 1) * chunk_size, n)
        batches += [list(range(b, min(b + batch_size, end))) for b in range(c * chunk_size, end, batch_size)]
    return batches


def _encode_chunks(
    jobs: list[_Job], cfg: EncodeConfig, source: ImageSource, device: torch.device, precision: str,
) -> None:
    """Encode every chunk some job still needs (each image decoded once); a writer thread stores and commits
    chunk c for each job while chunk c+1 is encoded."""
    labels, keys, store_dtype = source.labels, source.keys, getattr(torch, cfg.dtype)
    chunks = sorted(set().union(*(job.pending for job in jobs)))
    loader = DataLoader(
        _CroppedImages(source, cfg.resolution), batch_sampler=_chunk_batches(chunks, len(source), cfg.chunk_size, cfg.batch_size),
        num_workers=loader_workers(cfg.workers), collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init,
    )
    total = sum(min((c + 1) * cfg.chunk_size, len(source)) - c * cfg.chunk_size for c in chunks)
    parts: dict[int, dict[str, list[np.ndarray]]] = {id(job): {} for job in jobs}  # job → array name → batches
    errors: list[ChunkError] = []
    in_flight: list[Future[None]] = []
    name = "+".join(job.kind.name for job in jobs)
    with (
        ThreadPoolExecutor(max_workers=1) as writer,
        counting(name + (" [yellow](tiny-random)[/]" if any(job.ref.tiny_random for job in jobs) else ""), total) as advance,
        torch.inference_mode(),
        _autocast(device, precision),
    ):
        for indices, pixels, reasons in loader:
            chunk, end = indices[0] // cfg.chunk_size, indices[-1] + 1
            needed = [job for job in jobs if chunk in job.pending]
            pixels = pixels.to(device, non_blocking=True)  # (B, R, R, 3) uint8
            for job in needed:
                for array, value in job.plan.forward(job.model, pixels).items():  # name → (B, ...) float32
                    parts[id(job)].setdefault(array, []).append(value.to(store_dtype).cpu().numpy())
            errors += [ChunkError(i, keys[i], r) for i, r in zip(indices, reasons, strict=True) if r]
            advance(len(indices))
            if end == min((chunk + 1) * cfg.chunk_size, len(source)):
                for future in in_flight:
                    future.result()  # at most one chunk waits in memory; re-raises a failed write
                start = chunk * cfg.chunk_size
                in_flight = [writer.submit(_write_and_commit, job.stage, job.arrays, chunk, start, end, parts[id(job)], labels, errors)
                             for job in needed]
                for job in needed:
                    job.result.processed += end - start
                    job.result.skipped += len(errors)
                parts, errors = {id(job): {} for job in jobs}, []
        for future in in_flight:
            future.result()


def _write_and_commit(
    stage: StageDir, arrays: dict[str, zarr.Array], chunk: int, start: int, end: int,
    parts: dict[str, list[np.ndarray]], labels: np.ndarray, errors: list[ChunkError],
) -> None:
    """Write rows start:end of every array (unreadable images: zeros, valid=False), then commit the chunk."""
    valid = np.ones(end - start, dtype=bool)  # (n,)
    valid[[e.index - start for e in errors]] = False
    columns = {name: np.concatenate(batches) for name, batches in parts.items()}  # name → (n, ...)
    for values in columns.values():
        values[~valid] = 0
    stage.write_chunk(arrays, chunk, start, columns | {"labels": labels[start:end], "valid": valid}, errors)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])

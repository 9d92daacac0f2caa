"""`redi eval`: FID, sFID, Inception Score, precision and recall of a sample batch against an ADM reference batch."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from rich.progress import Progress

from common.atomic import atomic_write_json, sha256_file
from common.display import progress_bar
from common.errors import UserError
from common.runtime import resolve_device
from sampler.inception import FID_WEIGHTS_SHA256_PREFIX, NUM_CLASSES, POOL_DIM, SPATIAL_DIM, FIDInceptionV3, load_fid_inception
from sampler.metrics import (
    AdmBatch,
    FIDStatistics,
    faiss_module,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    read_adm_batch,
)

log = logging.getLogger(__name__)
REF_BATCHES_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"  # ADM's evaluations


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one `redi eval` run: the flags of `redi eval`."""

    samples: Path
    """ADM-format .npz of samples (arr_0 uint8 N×H×W×3), e.g. from `redi sample`.

    arr_1 (labels) is ignored."""
    ref: Path
    """ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz (openai/guided-diffusion's evaluations).

    Its precomputed mu/sigma/mu_s/sigma_s are used when present."""
    inception: Path | None = None
    """pytorch-fid's FID weights pt_inception-2015-12-05-6726825d.pth (its fid_weights release).

    The TF FID graph's weights; never downloaded."""
    batch_size: int = 64
    """Images per Inception forward pass; changes speed, not results (ADM: 64)."""
    device: str = "auto"
    """Where the network runs: auto, cpu, cuda or cuda:N."""
    out: Path | None = None
    """JSON report; default: SAMPLES.eval.json next to the samples."""
    split_size: int = 5000
    """Images per Inception Score split (ADM: 5000, i.e. 10 splits for 50K samples)."""
    nearest_k: int = 3
    """k of the k-NN balls of precision/recall (ADM: 3)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.split_size < 1 or self.nearest_k < 1:
            raise UserError("--batch-size, the split size and k must be positive integers.")

    @property
    def out_path(self) -> Path:
        """Where the JSON report goes."""
        return self.out if self.out is not None else self.samples.with_suffix(".eval.json")


@dataclass(frozen=True)
class EvalResult:
    """What `redi eval` measured and where it wrote it."""

    metrics: dict[str, float]  # inception_score, fid, sfid, precision, recall → value
    out: Path  # the JSON report
    num_samples: int  # images in the sample batch
    num_ref: int  # images in the reference batch
    device: str  # where the network ran
    images_per_s: float  # Inception throughput over both batches
    seconds: float  # wall time of the whole evaluation
    inception_official: bool  # the weights are the published pt_inception-2015-12-05-6726825d.pth
    precomputed_ref_stats: bool  # the reference's mu/sigma/mu_s/sigma_s came from its file
    warnings: list[str]  # why these numbers may not mean what the papers' do (also logged, and in the report)


@dataclass(frozen=True)
class Activations:
    """Inception outputs of a whole batch, on the CPU."""

    pool: np.ndarray  # (N, 2048) float32 pool_3
    spatial: np.ndarray  # (N, 2023) float32 mixed_6/conv[..., :7]
    probs: np.ndarray  # (N, 1008) float32 softmax of the unbiased logits


@contextmanager
def full_fp32() -> Iterator[None]:
    """Disable TF32 convolutions and matmuls (on by default for cuDNN) so GPU features match float32 CPU ones."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compute_activations(
    net: FIDInceptionV3, batch: AdmBatch, batch_size: int, device: torch.device, progress: Progress
) -> Activations:
    """Run every image of `batch` through the network, `batch_size` at a time, with a progress bar."""
    n = batch.num_images
    pool = np.empty((n, POOL_DIM), np.float32)
    spatial = np.empty((n, SPATIAL_DIM), np.float32)
    probs = np.empty((n, NUM_CLASSES), np.float32)
    task = progress.add_task(f"Inception {escape(batch.path.name)}", total=n)
    start = 0
    reader = batch.batches(batch_size)
    images = next(reader, None)
    with torch.inference_mode(), full_fp32():
        while images is not None:
            feats = net(torch.from_numpy(images).to(device))  # uint8 (B, H, W, 3) → features; async on CUDA
            stop = start + len(images)
            images = next(reader, None)  # read the next batch while the GPU works on this one
            pool[start:stop] = feats.pool.cpu().numpy()
            spatial[start:stop] = feats.spatial.cpu().numpy()
            probs[start:stop] = torch.softmax(feats.logits, dim=1).cpu().numpy()
            progress.advance(task, stop - start)
            start = stop
    assert start == n, f"read {start} of {n} images from {batch.path}"
    return Activations(pool=pool, spatial=spatial, probs=probs)


def _sample_settings(samples: Path) -> dict[str, Any] | None:
    """The `sample.json` next to the samples (written by `redi sample`), or None."""
    path = samples.parent / "sample.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; fix or remove it, since redi eval copies it into the report.") from None


def _stats(precomputed: FIDStatistics | None, features: np.ndarray) -> FIDStatistics:
    """ADM's rule: a file's precomputed statistics win over those of its activations."""
    return precomputed if precomputed is not None else feature_statistics(features)


def too_few_images(batch: AdmBatch) -> str | None:
    """The warning for a batch whose covariance is estimated from fewer images than features: it is rank-deficient,
    so the Fréchet distance (and sFID's, POOL_DIM ≈ SPATIAL_DIM) says little; ADM's protocol uses 50,000 samples."""
    if batch.pool_stats is not None or batch.num_images >= POOL_DIM:
        return None
    return (f"{batch.path.name} holds {batch.num_images:,} images, fewer than the {POOL_DIM:,} Inception features: its "
            f"covariance is rank-deficient, so FID and sFID are not meaningful (the papers use 50,000 samples).")


def _batch_summary(batch: AdmBatch) -> dict[str, Any]:
    return {
        "path": str(batch.path),
        "num_images": batch.num_images,
        "height": batch.height,
        "width": batch.width,
        "precomputed_stats": batch.pool_stats is not None,
    }


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Compute the ADM metrics of `cfg.samples` against `cfg.ref` and write the JSON report."""
    t0 = time.perf_counter()
    dims = (POOL_DIM, SPATIAL_DIM)
    if not cfg.ref.exists():
        raise UserError(f"The reference batch {cfg.ref} does not exist: download ADM's VIRTUAL_imagenet256_labeled.npz "
                        f"(openai/guided-diffusion's evaluations) from {REF_BATCHES_URL}256/ (512 px: "
                        f"{REF_BATCHES_URL}512/VIRTUAL_imagenet512.npz) and pass it with --ref.")
    samples, ref = read_adm_batch(cfg.samples, dims), read_adm_batch(cfg.ref, dims)
    for batch in (samples, ref):
        if batch.num_images <= cfg.nearest_k:
            raise UserError(f"{batch.path} holds {batch.num_images} images; precision/recall with k={cfg.nearest_k} needs at least {cfg.nearest_k + 1}.")
    if (samples.height, samples.width) != (ref.height, ref.width):
        log.warning(f"the samples are {samples.height}×{samples.width} and the reference {ref.height}×{ref.width}; the "
                    "papers' figures compare batches of one resolution.")
    faiss_module()  # before the long Inception pass: one sentence if the `eval` extra is missing
    sample_settings = _sample_settings(cfg.samples)
    device = resolve_device(cfg.device)
    net = load_fid_inception(cfg.inception, device)
    assert cfg.inception is not None  # load_fid_inception refused None
    inception_sha256 = sha256_file(cfg.inception)
    official = inception_sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)
    warnings = [w for w in (too_few_images(samples), too_few_images(ref)) if w]
    if not official:
        warnings.append("the Inception weights are not pt_inception-2015-12-05-6726825d.pth: these numbers are not "
                        "comparable with published ones.")
    for warning in warnings:  # before the long Inception pass
        log.warning(warning)

    t_net = time.perf_counter()
    with progress_bar(transient=True) as progress:
        ref_acts = compute_activations(net, ref, cfg.batch_size, device, progress)
        sample_acts = compute_activations(net, samples, cfg.batch_size, device, progress)
    images_per_s = (ref.num_images + samples.num_images) / (time.perf_counter() - t_net)

    precision, recall = precision_recall(ref_acts.pool, sample_acts.pool, cfg.nearest_k)
    metrics = {
        "inception_score": inception_score(sample_acts.probs, cfg.split_size),
        "fid": frechet_distance(_stats(samples.pool_stats, sample_acts.pool), _stats(ref.pool_stats, ref_acts.pool)),
        "sfid": frechet_distance(
            _stats(samples.spatial_stats, sample_acts.spatial), _stats(ref.spatial_stats, ref_acts.spatial)
        ),
        "precision": precision,
        "recall": recall,
    }
    seconds = time.perf_counter() - t0
    report = {
        "metrics": metrics,
        "samples": _batch_summary(samples),
        "ref": _batch_summary(ref),
        "inception": {"path": str(cfg.inception), "sha256": inception_sha256, "official": official},
        "settings": {
            "batch_size": cfg.batch_size,
            "device": str(device),
            "split_size": cfg.split_size,
            "nearest_k": cfg.nearest_k,
        },
        "sample_settings": sample_settings,
        "warnings": warnings,
        "images_per_s": images_per_s,
        "seconds": seconds,
    }
    try:
        atomic_write_json(cfg.out_path, report)
    except OSError as e:
        raise UserError(f"Cannot write the report {cfg.out_path}: {e.strerror}.") from None
    return EvalResult(
        metrics=metrics,
        out=cfg.out_path,
        num_samples=samples.num_images,
        num_ref=ref.num_images,
        device=str(device),
        images_per_s=images_per_s,
        seconds=seconds,
        inception_official=official,
        precomputed_ref_stats=ref.pool_stats is not None,
        warnings=warnings,
    )

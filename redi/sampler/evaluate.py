"""`redi eval`: FID, sFID, Inception Score, precision and recall (ADM's suite) and FD-DINOv2 of a sample batch against
an ADM reference batch, with an eval card saying how the samples were made and what they were compared with."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from rich.markup import escape
from rich.progress import Progress

from redi.common.atomic import atomic_write_json, read_json, sha256_file
from redi.common.display import progress_bar
from redi.common.errors import UserError
from redi.common.schema import Range, check_ranges
from redi.common.runtime import resolve_device
from redi.sampler.fd_dinov2 import DEFAULT_FD_ENCODER, DinoV2Features
from redi.sampler.inception import FID_WEIGHTS_SHA256_PREFIX, POOL_DIM, SPATIAL_DIM, FIDInceptionV3, load_fid_inception
from redi.pipeline.readers import read_first
from redi.pipeline.shards_config import SHARDS_JSON
from redi.sampler.metrics import (
    AdmBatch,
    FIDStatistics,
    faiss_module,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    read_adm_batch,
)
from redi.sampler.outputs import GRID_MAX, PCS_DIR, SAMPLE_JSON, pcs_path, read_sample_json
from redi.sampler.pc_metrics import FD_WINDOW, score_pcs
from redi.trainer.config import resolve_shards_dir

log = logging.getLogger(__name__)
REF_BATCHES_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"  # ADM's evaluations
METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
DEFAULT_METRICS = ("fid", "sfid", "is", "pr")  # ADM's suite
INCEPTION_METRICS = ("fid", "sfid", "is", "pr")
PCS_EVAL_JSON = "pcs.eval.json"  # the PC metrics' report, in the sample folder


def parse_metrics(text: str) -> tuple[str, ...]:
    """'fid,fd_dinov2' → ('fid', 'fd_dinov2'); unknown names are one sentence."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UserError(f"--metrics takes a comma list of {', '.join(METRICS)}, not {text!r}.")
    return names


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one `redi eval` run: the flags of `redi eval`."""

    samples: Path
    """ADM-format .npz of samples (arr_0 uint8 N×H×W×3), e.g. from `redi sample`; for the PC metrics its folder.

    arr_1 (labels) is ignored."""
    ref: Path
    """ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz), or a data root: FD-PC and nearest neighbours instead.

    A batch's precomputed mu/sigma/mu_s/sigma_s are used when present. A data root (shards.json) compares the
    generated PCs that the sample folder keeps (its first 64) with the training PCs (docs/METHOD.md)."""
    inception: Path | None = None
    """pytorch-fid's FID weights pt_inception-2015-12-05-6726825d.pth (its fid_weights release); fid, sfid, is, pr.

    The TF FID graph's weights; never downloaded."""
    metrics: tuple[str, ...] = DEFAULT_METRICS
    """Comma list of fid, sfid, is, pr (ADM's suite) and fd_dinov2 (FD of DINOv2 ViT-L/14 CLS features, as edm2)."""
    fd_encoder: str = DEFAULT_FD_ENCODER
    """fd_dinov2's encoder: hub id or local directory, loaded as `redi features` loads one (tiny-random: tests)."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per network forward pass; changes speed, not results (ADM: 64)."""
    device: str = "auto"
    """Where the networks run: auto, cpu, cuda or cuda:N."""
    out: Path | None = None
    """JSON report; default: SAMPLES.eval.json next to the samples (PC metrics: pcs.eval.json in the sample folder)."""
    split_size: Annotated[int, Range(1)] = 5000
    """Images per Inception Score split (ADM: 5000, i.e. 10 splits for 50K samples)."""
    nearest_k: Annotated[int, Range(1)] = 3
    """k of the k-NN balls of precision/recall (ADM: 3)."""
    before: Path | None = None
    """With a data root as --ref: a second sample folder scored beside SAMPLES, e.g. `redi sample --weights init`'s.

    For a before/after of training."""
    window: Annotated[int, Range(1)] = FD_WINDOW
    """With a data root as --ref: tokens per side of the windows FD-PC compares (1: single tokens)."""
    num_ref: Annotated[int, Range(2)] = 10_000
    """With a data root as --ref: training samples (the shards' first) whose PCs are the reference."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.metrics or any(m not in METRICS for m in self.metrics):
            raise UserError(f"--metrics takes a comma list of {', '.join(METRICS)}.")

    @property
    def out_path(self) -> Path:
        """Where the JSON report goes."""
        return self.out if self.out is not None else self.samples.with_suffix(".eval.json")


@dataclass(frozen=True)
class EvalResult:
    """What `redi eval` measured and where it wrote it."""

    metrics: dict[str, float]  # inception_score, fid, sfid, precision, recall, fd_dinov2 → value (those asked for)
    out: Path  # the JSON report
    num_samples: int  # images in the sample batch
    num_ref: int  # images in the reference batch
    device: str  # where the networks ran
    images_per_s: float  # network throughput over both batches
    seconds: float  # wall time of the whole evaluation
    inception_official: bool | None  # the weights are the published pt_inception-2015-12-05-6726825d.pth (None: unused)
    precomputed_ref_stats: bool  # the reference's mu/sigma/mu_s/sigma_s came from its file
    fd_comparable: bool | None  # fd_dinov2's encoder is DINOv2 ViT-L/14 (None: not asked for)
    warnings: list[str]  # why these numbers may not mean what the papers' do (also logged, and in the report)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Disable TF32 convolutions and matmuls (on by default for cuDNN) so GPU features match float32 CPU ones."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


Activations = dict[str, np.ndarray]
"""Features of a whole batch, on the CPU: pool (N, 2048), spatial (N, 2023), probs (N, 1008) from Inception, dinov2
(N, D) from the FD encoder; only those the metrics asked for."""


class Detectors:
    """The networks the asked metrics need (the FID Inception, the FD-DINOv2 encoder) and their features."""

    def __init__(self, metrics: tuple[str, ...], inception: Path | None, fd_encoder: str, device: torch.device):
        self.metrics = metrics
        self.device = device
        self.inception: FIDInceptionV3 | None = None
        self.inception_record: dict[str, Any] | None = None
        if any(m in INCEPTION_METRICS for m in metrics):
            self.inception = load_fid_inception(inception, device)
            assert inception is not None  # load_fid_inception refused None
            digest = sha256_file(inception)
            self.inception_record = {"path": str(inception), "sha256": digest,
                                     "official": digest.startswith(FID_WEIGHTS_SHA256_PREFIX)}
        self.dinov2 = DinoV2Features(fd_encoder, device) if "fd_dinov2" in metrics else None

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, 3) on the device → each feature (B, ·), left on the device (asynchronous on CUDA)."""
        out = {}
        with full_fp32():
            if self.inception is not None:
                feats = self.inception(images)
                out |= {"pool": feats.pool, "spatial": feats.spatial, "probs": torch.softmax(feats.logits, dim=1)}
            if self.dinov2 is not None:
                out["dinov2"] = self.dinov2(images)
        return out

    def record(self) -> dict[str, Any]:
        """The networks' identities, for the report and its card."""
        return {"inception": self.inception_record, "fd_encoder": self.dinov2.record() if self.dinov2 else None}


def compute_activations(detectors: Detectors, batches: Iterator[np.ndarray], total: int, label: str,
                        progress: Progress) -> Activations:
    """Every image of `batches` (uint8 (B, H, W, 3) arrays) through the detectors, with a progress bar."""
    parts: dict[str, list[np.ndarray]] = {}
    task = progress.add_task(escape(label), total=total)
    images = next(batches, None)
    while images is not None:
        feats = detectors(torch.from_numpy(images).to(detectors.device))  # async on CUDA
        count = len(images)
        images = next(batches, None)  # read the next batch while the GPU works on this one
        for name, value in feats.items():
            parts.setdefault(name, []).append(value.cpu().numpy())
        progress.advance(task, count)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _stats(precomputed: FIDStatistics | None, features: np.ndarray) -> FIDStatistics:
    """ADM's rule: a file's precomputed statistics win over those of its activations."""
    return precomputed if precomputed is not None else feature_statistics(features)


def score(metrics: tuple[str, ...], samples: Activations, ref: Activations, ref_batch: AdmBatch,
          split_size: int = 5000, nearest_k: int = 3, sample_batch: AdmBatch | None = None) -> dict[str, float]:
    """The asked metrics from both batches' activations (a batch file's precomputed statistics win, as in ADM)."""
    pool_s, spatial_s = (sample_batch.pool_stats, sample_batch.spatial_stats) if sample_batch else (None, None)
    out: dict[str, float] = {}
    if "is" in metrics:
        out["inception_score"] = inception_score(samples["probs"], split_size)
    if "fid" in metrics:
        out["fid"] = frechet_distance(_stats(pool_s, samples["pool"]), _stats(ref_batch.pool_stats, ref["pool"]))
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(_stats(spatial_s, samples["spatial"]), _stats(ref_batch.spatial_stats, ref["spatial"]))
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(ref["pool"], samples["pool"], nearest_k)
    if "fd_dinov2" in metrics:
        out["fd_dinov2"] = frechet_distance(feature_statistics(samples["dinov2"]), feature_statistics(ref["dinov2"]))
    return out


def check_batches(metrics: tuple[str, ...], nearest_k: int, *batches: AdmBatch) -> None:
    """One sentence for a batch too small for the asked metrics; the faiss check before the long network pass."""
    for batch in batches:
        if "pr" in metrics and batch.num_images <= nearest_k:
            raise UserError(f"{batch.path} holds {batch.num_images} images; precision/recall with k={nearest_k} needs at least {nearest_k + 1}.")
        if batch.num_images < 2:
            raise UserError(f"{batch.path} holds {batch.num_images} image; a Fréchet distance needs at least 2.")
    if "pr" in metrics:
        faiss_module()  # one sentence if the `eval` extra is missing


def _sample_report(samples: Path) -> dict[str, Any] | None:
    """The `sample.json` next to the samples (written by `redi sample`), or None."""
    if not (samples.parent / SAMPLE_JSON).is_file():
        return None
    return read_sample_json(samples.parent, "fix or remove it, since redi eval copies it into the report")


def too_few_images(batch: AdmBatch, dim: int, what: str) -> str | None:
    """The warning for a batch whose covariance is estimated from fewer images than `dim` features: it is rank-deficient,
    so the Fréchet distance says little; ADM's protocol uses 50,000 samples."""
    if (what == "Inception" and batch.pool_stats is not None) or batch.num_images >= dim:
        return None
    metrics = "FID and sFID are" if what == "Inception" else "FD-DINOv2 is"
    return (f"{batch.path.name} holds {batch.num_images:,} images, fewer than the {dim:,} {what} features: its "
            f"covariance is rank-deficient, so {metrics} not meaningful (the papers use 50,000 samples).")


def eval_warnings(detectors: Detectors, *batches: AdmBatch) -> list[str]:
    """Why the numbers may not be comparable with the papers': too few images, unofficial weights, another encoder."""
    warnings = []
    if detectors.inception_record is not None:
        warnings += [w for b in batches if (w := too_few_images(b, POOL_DIM, "Inception"))]
        if not detectors.inception_record["official"]:
            warnings.append("the Inception weights are not pt_inception-2015-12-05-6726825d.pth: these numbers are not "
                            "comparable with published ones.")
    if detectors.dinov2 is not None:
        warnings += [w for b in batches if (w := too_few_images(b, detectors.dinov2.dim, "DINOv2"))]
        if not detectors.dinov2.comparable:
            warnings.append(f"the FD encoder is not DINOv2 ViT-L/14 ({DEFAULT_FD_ENCODER}): FD-DINOv2 is not comparable "
                            "with published figures.")
    return warnings


def _batch_summary(batch: AdmBatch) -> dict[str, Any]:
    return {
        "path": str(batch.path),
        "num_images": batch.num_images,
        "height": batch.height,
        "width": batch.width,
        "precomputed_stats": batch.pool_stats is not None,
    }


def eval_card(sample_report: dict[str, Any] | None, num_samples: int, ref_sha256: str, networks: dict[str, Any],
              metrics: tuple[str, ...], seconds: float) -> dict[str, Any]:
    """What a reader needs to compare the numbers with another paper's: how the samples were made (checkpoint, sampler,
    steps, NFE, guidance, labels, precision; from sample.json, None where there is none) and what they were compared
    with (the reference batch, the Inception file, the FD encoder)."""
    report = sample_report if isinstance(sample_report, dict) else {}
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    work = report.get("work") if isinstance(report.get("work"), dict) else {}
    labels = settings.get("labels") if isinstance(settings.get("labels"), dict) else {}
    fd = networks.get("fd_encoder") or {}
    return {
        "checkpoint": settings.get("checkpoint"),
        "model": (settings.get("model") or {}).get("name") if isinstance(settings.get("model"), dict) else None,
        "sampler": settings.get("sampler"), "steps": settings.get("steps"),
        "sampler_options": settings.get("sampler_options"), "nfe_per_image": work.get("nfe_per_image"),
        "guidance": settings.get("guidance"), "labels": labels.get("mode"), "seed": settings.get("seed"),
        "precision": settings.get("precision"), "quantize": settings.get("quantize"), "num_samples": num_samples,
        "metrics": list(metrics), "ref_sha256": ref_sha256,
        "inception_sha256": (networks.get("inception") or {}).get("sha256"),
        "fd_encoder": fd.get("describe"), "seconds": seconds,
    }


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Compute the asked metrics of `cfg.samples` against `cfg.ref` and write the JSON report: ADM's suite against a
    reference batch, or FD-PC and the nearest-neighbour check against a data root's training PCs."""
    if is_data_root(cfg.ref):
        return evaluate_pcs(cfg)
    if cfg.before is not None:
        raise UserError("--before compares PCs: pass a data root (its shards) as --ref, not a reference batch.")
    t0 = time.perf_counter()
    dims = (POOL_DIM, SPATIAL_DIM)
    if not cfg.ref.exists():
        raise UserError(f"The reference batch {cfg.ref} does not exist: download ADM's VIRTUAL_imagenet256_labeled.npz "
                        f"(openai/guided-diffusion's evaluations) from {REF_BATCHES_URL}256/ (512 px: "
                        f"{REF_BATCHES_URL}512/VIRTUAL_imagenet512.npz) and pass it with --ref.")
    samples, ref = read_adm_batch(cfg.samples, dims), read_adm_batch(cfg.ref, dims)
    check_batches(cfg.metrics, cfg.nearest_k, samples, ref)
    if (samples.height, samples.width) != (ref.height, ref.width):
        log.warning(f"the samples are {samples.height}×{samples.width} and the reference {ref.height}×{ref.width}; the "
                    "papers' figures compare batches of one resolution.")
    sample_report = _sample_report(cfg.samples)
    device = resolve_device(cfg.device)
    detectors = Detectors(cfg.metrics, cfg.inception, cfg.fd_encoder, device)
    ref_sha256 = sha256_file(cfg.ref)
    warnings = eval_warnings(detectors, samples, ref)
    for warning in warnings:  # before the long network pass
        log.warning(warning)

    t_net = time.perf_counter()
    with progress_bar(transient=True) as progress:
        ref_acts = compute_activations(detectors, ref.batches(cfg.batch_size), ref.num_images, f"features of {ref.path.name}", progress)
        sample_acts = compute_activations(detectors, samples.batches(cfg.batch_size), samples.num_images,
                                          f"features of {samples.path.name}", progress)
    images_per_s = (ref.num_images + samples.num_images) / (time.perf_counter() - t_net)

    metrics = score(cfg.metrics, sample_acts, ref_acts, ref, cfg.split_size, cfg.nearest_k, samples)
    networks = detectors.record()
    seconds = time.perf_counter() - t0
    report = {
        "metrics": metrics,
        "card": eval_card(sample_report, samples.num_images, ref_sha256, networks, cfg.metrics, seconds),
        "samples": _batch_summary(samples),
        "ref": _batch_summary(ref) | {"sha256": ref_sha256},
        **networks,
        "settings": {
            "batch_size": cfg.batch_size,
            "device": str(device),
            "split_size": cfg.split_size,
            "nearest_k": cfg.nearest_k,
            "metrics": list(cfg.metrics),
        },
        "sample_settings": sample_report,
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
        inception_official=networks["inception"]["official"] if networks["inception"] else None,
        precomputed_ref_stats=ref.pool_stats is not None,
        fd_comparable=networks["fd_encoder"]["comparable"] if networks["fd_encoder"] else None,
        warnings=warnings,
    )


# ---- `redi eval SAMPLES --ref DATA`: the PC metrics of a `redi sample` folder -------------------------------------


def sample_folder_pcs(samples: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The generated PCs (n, r, h, h) that a `redi sample` folder (or its samples.npz) keeps, those of its first
    min(N, GRID_MAX) images, and its sample.json."""
    folder = samples if samples.is_dir() else samples.parent
    path = folder / SAMPLE_JSON
    if not path.is_file():
        raise UserError(f"{folder} is not a `redi sample` output folder (no {SAMPLE_JSON}): the PC metrics read its "
                        f"{PCS_DIR}/.")
    report = read_json(path, dict, f"rerun `redi sample --out {folder}`.")
    if not report.get("complete") or not isinstance(report.get("num"), int):
        raise UserError(f"{folder} is not finished (its {SAMPLE_JSON} says so); rerun `redi sample --out {folder}`.")
    count = min(report["num"], GRID_MAX)
    missing = [i for i in range(count) if not pcs_path(folder, i).is_file()]
    if missing:
        raise UserError(f"{folder} keeps no generated PCs ({pcs_path(folder, missing[0]).name} is missing): the PC "
                        "metrics need a model with PC channels (ReDi) sampled by `redi sample`.")
    return np.stack([np.load(pcs_path(folder, i)) for i in range(count)]), report


def is_data_root(ref: Path) -> bool:
    """--ref names a data root (or its shards/) rather than an ADM batch: it holds shards.json."""
    return ref.is_dir() and ((ref / SHARDS_JSON).is_file() or (ref / "shards" / SHARDS_JSON).is_file())


def evaluate_pcs(cfg: EvalConfig) -> EvalResult:
    """FD-PC and the nearest-neighbour check of the samples (and of --before) against the data root --ref's training
    PCs; writes the JSON report."""
    t0 = time.perf_counter()
    generated, report = sample_folder_pcs(cfg.samples)
    info, _, arrays = read_first(str(resolve_shards_dir(cfg.ref)), cfg.num_ref, ("pcs",))
    if generated.shape[1] > info.pcs:
        raise UserError(f"The samples have {generated.shape[1]} PC channels but {cfg.ref} stores {info.pcs}: "
                        "compare them with the data root the model was trained on.")
    scores = {"samples": score_pcs(generated, arrays["pcs"], cfg.window)}
    before_report = None
    if cfg.before is not None:
        before, before_report = sample_folder_pcs(cfg.before)
        scores["before"] = score_pcs(before, arrays["pcs"], cfg.window)
    metrics = {f"{prefix}{name}": value for key, prefix in (("samples", ""), ("before", "before_")) if key in scores
               for name, value in scores[key].figures().items()}  # fd_pc, nn_generated, nn_noise, nn_training
    seconds = time.perf_counter() - t0
    out = cfg.out if cfg.out is not None else (cfg.samples if cfg.samples.is_dir() else cfg.samples.parent) / PCS_EVAL_JSON
    card = eval_card(report, len(generated), info.sha256, {}, ("fd_pc",), seconds)
    atomic_write_json(out, {"metrics": metrics, "card": card, "scores": {k: s.to_json() for k, s in scores.items()},
                            "ref": {"data": str(cfg.ref), "shards_json_sha256": info.sha256},
                            "sample_settings": report, "before_settings": before_report, "seconds": seconds})
    return EvalResult(metrics=metrics, out=out, num_samples=len(generated), num_ref=scores["samples"].num_training,
                      device="cpu", images_per_s=0.0, seconds=seconds, inception_official=None,
                      precomputed_ref_stats=False, fd_comparable=None, warnings=[])

"""FID during training: every --eval-every steps, the EMA weights are evaluated as `redi sample` + `redi eval` would.

Each rank samples its part of the --eval-num images (`redi sample`'s batches: batch b of size B to rank b mod W),
with the run's sampler (sampler/grids.py), and puts them through the FID Inception without writing them; one gather
brings the features to rank 0, which scores them in index order against the reference batch's, computed once at the
start (sharded the same way). Missing or unreadable reference files are refused at the start of the run, not at
step N. Each number is logged with its eval card: the exact sampling settings, the reference and Inception hashes,
the time it took; the same settings given to `redi sample --ckpt RUN/checkpoints/step-N.pt` then `redi eval` give the
same numbers (tests/test_periodic_eval.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from redi.common.atomic import sha256_file
from redi.common.distributed import DistInfo
from redi.common.errors import UserError
from redi.sampler.evaluate import (
    DEFAULT_METRICS,
    Activations,
    Detectors,
    EvalConfig,
    check_batches,
    eval_card,
    eval_warnings,
    score,
)
from redi.sampler.fd_dinov2 import DEFAULT_FD_ENCODER
from redi.sampler.inception import POOL_DIM, SPATIAL_DIM
from redi.sampler.metrics import read_adm_batch
from redi.sampler.sample import batches_of
from redi.trainer.checkpoint import Checkpoint
from redi.trainer.config import TrainConfig
from redi.sampler.grids import RunSampler

log = logging.getLogger(__name__)
EVAL_METRICS = DEFAULT_METRICS  # ADM's suite
_EVAL = {f.name: f.default for f in dataclasses.fields(EvalConfig)}  # `redi eval`'s defaults: ADM's protocol
EVAL_BATCH, NEAREST_K, SPLIT_SIZE = _EVAL["batch_size"], _EVAL["nearest_k"], _EVAL["split_size"]


class PeriodicEval:
    """The run's in-training evaluation: networks, reference features and sampler, all ready at the start."""

    def __init__(self, cfg: TrainConfig, ckpt: Checkpoint, dist_info: DistInfo):
        assert cfg.eval_ref is not None and cfg.inception is not None, "TrainConfig refuses eval_every without them"
        self.dist_info = dist_info
        self.ref_batch = read_adm_batch(Path(cfg.eval_ref), (POOL_DIM, SPATIAL_DIM))
        check_batches(EVAL_METRICS, NEAREST_K, self.ref_batch)
        if cfg.eval_num <= NEAREST_K:
            raise UserError(f"--eval-num {cfg.eval_num} is too few: precision and recall need at least {NEAREST_K + 1} images.")
        self.detectors = Detectors(EVAL_METRICS, Path(cfg.inception), DEFAULT_FD_ENCODER, dist_info.device)
        if dist_info.is_main:  # said once, at the start: why these numbers may not be the papers'
            for warning in eval_warnings(self.detectors, self.ref_batch):
                log.warning(warning)
            if cfg.eval_num < POOL_DIM:
                log.warning(f"--eval-num {cfg.eval_num:,} is fewer than the {POOL_DIM:,} Inception features: the FID of "
                            "each evaluation follows the training's trend but is not comparable with FID-50K.")
        self.sampler = RunSampler.build(cfg, ckpt, dist_info.device, cfg.eval_num, cfg.eval_labels, EVAL_BATCH)
        self.ref_sha256 = sha256_file(Path(cfg.eval_ref)) if dist_info.is_main else ""
        mine = set(range(dist_info.rank, -(-self.ref_batch.num_images // EVAL_BATCH), dist_info.world_size))
        ref_parts = [(list(range(b * EVAL_BATCH, b * EVAL_BATCH + len(images))), self._features(images))
                     for b, images in enumerate(self.ref_batch.batches(EVAL_BATCH)) if b in mine]
        self.ref = self._gather(ref_parts)  # rank 0: the reference's features in index order

    def _features(self, images: np.ndarray) -> Activations:
        feats = self.detectors(torch.from_numpy(images).to(self.dist_info.device))
        return {name: value.cpu().numpy() for name, value in feats.items()}

    def _gather(self, parts: list[tuple[list[int], Activations]]) -> Activations | None:
        """Every rank's (indices, features) on rank 0 in index order (one all_gather_object); None on other ranks."""
        everything = [parts]
        if dist.is_initialized():
            everything = [None] * self.dist_info.world_size
            dist.all_gather_object(everything, parts)
        if not self.dist_info.is_main:
            return None
        pieces = sorted((pair for part in everything for pair in _first_index(part)), key=lambda pair: pair[0])
        return {name: np.concatenate([feats[name] for _, feats in pieces]) for name in pieces[0][1]}

    def __call__(self, step: int, ckpt: Checkpoint) -> tuple[dict[str, Any] | None, float]:
        """Evaluate the EMA weights of `ckpt` (every rank): the metrics row (rank 0; None elsewhere) and the seconds."""
        start = time.perf_counter()
        model = self.sampler.network(ckpt)
        parts, nfe = [], 0
        for batch in batches_of(len(self.sampler.labels), EVAL_BATCH, self.dist_info.rank, self.dist_info.world_size):
            pixels, nfe = self.sampler.pixels(model, batch)  # (B, H, W, 3) uint8, never written
            parts.append((batch, self._features(pixels)))
        samples = self._gather(parts)
        if samples is None:
            return None, time.perf_counter() - start
        assert self.ref is not None, "rank 0 holds the reference features"
        metrics = score(EVAL_METRICS, samples, self.ref, self.ref_batch, SPLIT_SIZE, NEAREST_K)
        seconds = time.perf_counter() - start
        report = {"settings": self.sampler.record(step), "work": {"nfe_per_image": nfe}}
        card = eval_card(report, len(self.sampler.labels), self.ref_sha256, self.detectors.record(), EVAL_METRICS, seconds)
        return {"step": step, **metrics, "eval_seconds": seconds, "card": card}, seconds


def _first_index(part: list[tuple[list[int], Activations]]) -> Iterator[tuple[int, Activations]]:
    """(first index, features) of each batch: batches are contiguous, so their first indices order them."""
    for indices, feats in part:
        yield indices[0], feats

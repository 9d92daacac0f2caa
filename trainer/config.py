"""The resolved training configuration: every flag of `redi train`, checked once, saved in the run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from pipeline.remote import Location, as_location, read_if_exists, redact
from trainer.models import REPA_DEPTHS, SIZES
from trainer.objectives import METHODS, REP_DROP_MODES, REP_DROP_TARGETS, WEIGHTINGS, MethodParts

OBJECTIVES = {"SiT": "sit", "DiT": "dit"}

# Fields that define the network and its objective: a run directory refuses a change in these.
ARCHITECTURE_FIELDS = (
    "model", "method", "pca_rank", "fusion", "unconditional", "repa_depth", "learn_sigma", "resolution",
)


@dataclass(frozen=True)
class TrainConfig(MethodParts):
    """Everything `redi train` needs; defaults follow SPEC §7."""

    shards: str
    """Data root (or its shards/ directory) written by `redi shards`: a local path or a URL (s3://, https://, …)."""
    run: str
    """Run directory: config.json, metrics.jsonl, checkpoints/. An existing one is resumed."""
    model: str = "SiT-B/2"
    """Backbone: {SiT,DiT}-{S,B,L,XL}/2 or {SiT,DiT}-debug; the prefix picks the objective."""
    method: str = "redi"
    """baseline | redi | repa | reg | redi+repa."""
    pca_rank: int = 8
    """r: principal components generated jointly with the latent (redi methods); ≤ K in the shards."""
    fusion: str = "merged"
    """merged (one token per patch) or separate (latent and PC tokens; ~2x compute)."""
    lambda_z: float = 1.0
    """Weight of the PC-channel velocity loss."""
    rep_drop: float = 0.2
    """Representation drop probability, needed for Representation Guidance (0 disables it)."""
    rep_drop_mode: str = "sample"
    """sample (paper: one draw per sample) or batch (reference code: one draw per batch)."""
    rep_drop_target: str = "noisy"
    """noisy (paper: zero z_t) or clean (reference code: zero z_0)."""
    repa_depth: int | None = None
    """Block whose output feeds the REPA projector; None → 4 for S/B, 8 for L/XL, 1 for debug."""
    repa_weight: float = 0.5
    cls_weight: float = 0.03
    """REG class-token velocity loss weight."""
    learn_sigma: bool | None = None
    """DiT only: learned variance with the VLB term; None → on for DiT (as DiT and the ReDi paper's DiT runs)."""
    unconditional: bool = False
    """Train without labels (num_classes 1)."""
    class_dropout: float = 0.1
    """Label dropout for classifier-free guidance."""
    weighting: str = "uniform"
    """SiT time draw: uniform t ~ U(0, 1) (every reference's default) or lognormal (REPA/REG `--weighting lognormal`)."""
    batch_size: int = 256
    """Global batch (all ranks, all accumulation steps)."""
    micro_batch: int | None = None
    """Per-rank batch per forward; None → batch_size / world (no accumulation)."""
    max_steps: int = 400_000
    """Optimiser steps (the run stops there)."""
    epochs: float | None = None
    """If set, replaces max_steps by epochs × samples / batch_size."""
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Gradient-norm clip (REPA/REG; the ReDi, SiT and DiT references do not clip); 0 turns clipping off."""
    ema_decay: float = 0.9999
    precision: str = "bf16"
    """bf16 (autocast on GPU, fp32 master weights) or fp32; CPU always runs fp32."""
    compile: bool = False
    seed: int = 0
    data_format: str = "zarr"
    """zarr (random access, one node) or wds (streaming WebDataset)."""
    num_workers: int | None = None
    """DataLoader processes per rank; None: from the cores (common.runtime.loader_workers)."""
    read_ahead: int = 2
    """wds: tars downloading ahead of the one being decoded, per reader process (each held whole in memory)."""
    log_every: int = 100
    ckpt_every: int = 10_000
    """Steps between kept checkpoints (never deleted)."""
    save_every: int = 1_000
    """Steps between resume checkpoints (only the last `keep` are kept)."""
    keep: int = 2
    max_bad_steps: int = 10
    """Consecutive non-finite losses before the run stops."""
    init: str | None = None
    """Weights to start a new run from (a redi checkpoint or `redi convert` output); unused when resuming."""
    resolution: int = 0
    """Image resolution, filled from the shards."""

    def __post_init__(self) -> None:
        family, _, size = self.model.partition("-")
        if family not in OBJECTIVES or size not in SIZES:
            raise UserError(f"Unknown model '{self.model}': use SiT-B/2, SiT-XL/2, DiT-B/2, … or SiT-debug.")
        if self.method not in METHODS:
            raise UserError(f"Unknown method '{self.method}': choose one of {', '.join(METHODS)}.")
        if self.learn_sigma is None:  # resolved here, so config.json and checkpoints record the value
            object.__setattr__(self, "learn_sigma", self.objective == "dit")
        if self.fusion not in ("merged", "separate"):
            raise UserError(f"Unknown fusion '{self.fusion}': merged or separate.")
        if not 0.0 <= self.rep_drop < 1.0:
            raise UserError(f"--rep-drop must be in [0, 1), got {self.rep_drop}.")
        if self.rep_drop_mode not in REP_DROP_MODES or self.rep_drop_target not in REP_DROP_TARGETS:
            raise UserError("--rep-drop-mode is sample|batch and --rep-drop-target is noisy|clean.")
        if self.precision not in ("bf16", "fp32"):
            raise UserError(f"--precision must be bf16 or fp32, got {self.precision}.")
        if self.data_format not in ("zarr", "wds"):
            raise UserError(f"--format must be zarr or wds, got {self.data_format}.")
        if self.learn_sigma and self.objective != "dit":
            raise UserError("--learn-sigma applies to DiT models only.")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--weighting must be uniform or lognormal, got {self.weighting}.")
        if self.weighting != "uniform" and self.objective != "sit":
            raise UserError(f"--weighting {self.weighting} draws the SiT (flow) time; DiT models draw discrete timesteps.")
        if self.batch_size < 1 or self.max_steps < 1 or (self.micro_batch is not None and self.micro_batch < 1):
            raise UserError("--batch-size, --micro-batch and --max-steps must be positive.")
        if (self.num_workers is not None and self.num_workers < 0) or self.read_ahead < 0:
            raise UserError("--num-workers and --read-ahead must be ≥ 0.")
        if min(self.log_every, self.save_every, self.ckpt_every) < 1:
            raise UserError("--log-every, --save-every and --ckpt-every must be positive.")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise UserError(f"--epochs must be a finite positive number, got {self.epochs}.")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a finite number ≥ 0, got {self.lr}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}.")
        if not 0 <= self.seed < 2**62:
            raise UserError(f"--seed must be a non-negative integer below 2^62, got {self.seed}.")
        if not all(math.isfinite(v) and v >= 0 for v in (self.lambda_z, self.repa_weight, self.cls_weight, self.grad_clip)):
            raise UserError("--lambda-z, --repa-weight, --cls-weight and --grad-clip must be finite and ≥ 0.")

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.model.partition("-")[0]]

    @property
    def size(self) -> str:
        return self.model.partition("-")[2]

    @property
    def resolved_repa_depth(self) -> int:
        if not self.uses_repa:
            return 0
        return self.repa_depth if self.repa_depth is not None else REPA_DEPTHS[self.size]

    def to_json(self) -> dict[str, Any]:
        """The config as saved in the run and its checkpoints: a --shards URL without its credentials."""
        return dataclasses.asdict(self) | {"shards": redact(self.shards)}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def architecture_mismatch(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Names of architecture fields whose saved value differs from `cfg`'s."""
    now = cfg.to_json()
    return [k for k in ARCHITECTURE_FIELDS if k in saved and saved[k] != now[k]]


def resolve_shards_dir(path: str | Path) -> Location:
    """Accept either the data root or its shards/ directory, local or at a URL."""
    p = as_location(path)
    for root in (p, p / "shards"):
        if read_if_exists(root / "shards.json") is not None:  # a read, not an exists(): http's hides network errors
            return root
    raise UserError(f"No shards at {p}: run `redi shards --data {p}` first (looked for shards.json).")

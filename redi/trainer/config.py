"""The resolved training configuration: every flag of `redi train`, checked once, saved in the run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from redi.common.choices import GUIDANCE_MODES, LABEL_MODES
from redi.common.errors import UserError
from redi.common.flags import OneOf
from redi.common.schema import Range, check_ranges
from redi.common.urls import redact
from redi.pipeline.remote import Location, as_location, read_if_exists
from redi.pipeline.shards_config import FORMATS
from redi.trainer.models import FUSIONS, PROJECTOR_DIM, REPA_DEPTHS, SIZES
from redi.trainer.phema import DEFAULT_SIGMA_RELS, check_sigma_rels
from redi.trainer.objectives import METHODS, REP_DROP_MODES, REP_DROP_TARGETS, WEIGHTINGS, MethodParts
from redi.trainer.trackers import TRACKERS

OBJECTIVES = {"SiT": "sit", "DiT": "dit"}
PRECISIONS = ("bf16", "fp32")

# Fields that define the network and its objective: a run directory refuses a change in these (trainer/resume.py).
ARCHITECTURE_FIELDS = (
    "model", "method", "pca_rank", "fusion", "unconditional", "repa_depth", "learn_sigma", "resolution", "projector_dim",
)


@dataclass(frozen=True)
class TrainConfig(MethodParts):
    """Everything `redi train` needs: its flags and their help are these fields; defaults follow the papers (docs/METHOD.md)."""

    shards: str
    """Data root (or its shards/) written by `redi shards`: a path or a URL."""
    run: str
    """Run directory; an existing one resumes from its newest checkpoint with its recorded settings: a flag given there
    changes that setting from then on (logged, and recorded in its config.json).

    It holds config.json, metrics.jsonl and checkpoints/; trainer/resume.py says what may change."""
    model: str = "SiT-B"
    """Backbone: SiT or DiT (flow or DDPM), then S, B, L, XL or debug, then optionally /PATCH (SiT-XL/2); without it the
    shards' default patch: 2 on f8 latents, 1 on f16 and f32.

    The default is filled in from the shards like the resolution, so config.json and checkpoints record the full name."""
    method: Annotated[str, OneOf(METHODS)] = "redi"
    """What is generated and aligned besides the latent (docs/METHOD.md)."""
    pca_rank: Annotated[int, Range(0)] = 8
    """r: PCs generated with the latent (redi methods); at most K of the shards."""
    fusion: Annotated[str, OneOf(FUSIONS)] = "merged"
    """One token per patch, or separate latent and PC tokens (~2x compute)."""
    lambda_z: Annotated[float, Range(0)] = 1.0
    """Weight of the PC velocity loss."""
    rep_drop: Annotated[float, Range(0, 1, hi_open=True)] = 0.2
    """Representation drop probability; Representation Guidance needs it > 0."""
    rep_drop_mode: Annotated[str, OneOf(REP_DROP_MODES)] = "sample"
    """One drop draw per sample (paper) or per batch (reference code)."""
    rep_drop_target: Annotated[str, OneOf(REP_DROP_TARGETS)] = "noisy"
    """Zero the noisy z_t (paper) or the clean z_0 (reference code)."""
    repa_depth: Annotated[int | None, Range(1)] = None
    """Block feeding the REPA projector; default 4 for S/B, 8 for L/XL, 1 for debug."""
    repa_weight: Annotated[float, Range(0)] = 0.5
    """Weight of the REPA alignment loss."""
    align_until: Annotated[int | None, Range(0)] = None
    """Step from which the REPA/REG alignment term is off (HASTE: alignment helps early, then holds back); default:
    never.

    The weight in effect is metrics.jsonl's align_weight."""
    align_fade: Annotated[int, Range(0)] = 0
    """Steps over which the alignment weight falls linearly to 0 at --align-until; 0: it stops at once."""
    projector_dim: Annotated[int, Range(1)] = PROJECTOR_DIM
    """Width of the REPA projector's hidden layers (REPA: 2048; a debug model's own compute is far smaller)."""
    cls_weight: Annotated[float, Range(0)] = 0.03
    """Weight of REG's class-token velocity loss."""
    learn_sigma: bool | None = None
    """DiT: learned variance with the VLB term; default on for DiT.

    As DiT and the ReDi paper's DiT runs; None is resolved in __post_init__, so config.json records the value."""
    unconditional: bool = False
    """Train without class labels (num_classes 1)."""
    class_dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.1
    """Label drop probability, for classifier-free guidance."""
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = "uniform"
    """SiT time draw: uniform, or lognormal (REPA/REG: t = s/(1+s), ln s ~ N(0,1))."""
    batch_size: Annotated[int, Range(1)] = 256
    """Global batch over all ranks and accumulation steps."""
    micro_batch: Annotated[int | None, Range(1)] = None
    """Per-rank batch per forward; default: batch / ranks (no accumulation)."""
    max_steps: Annotated[int, Range(1)] = 400_000
    """Optimiser steps: the run stops there."""
    epochs: Annotated[float | None, Range(0, lo_open=True)] = None
    """Train this many epochs instead of --max-steps.

    Replaces max_steps by epochs × samples / batch_size; on resume, the images already seen count at the batch sizes
    they were seen at, and the rest at this one."""
    lr: Annotated[float, Range(0)] = 1e-4
    """AdamW learning rate (constant)."""
    beta1: Annotated[float, Range(0, 1, hi_open=True)] = 0.9
    """AdamW β1."""
    beta2: Annotated[float, Range(0, 1, hi_open=True)] = 0.999
    """AdamW β2."""
    weight_decay: Annotated[float, Range(0)] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, Range(0)] = 1.0
    """Gradient-norm clip; 0 turns it off.

    REPA/REG clip at 1; the ReDi, SiT and DiT references do not clip."""
    ema_decay: Annotated[float, Range(0, 1, hi_open=True)] = 0.9999
    """Decay of the EMA weights (what `redi sample` uses by default)."""
    phema: bool = False
    """Track post-hoc EMA profiles (edm2's power-function EMA) and save them every --phema-every steps, so that `redi
    ema` can make the EMA of any length after training.

    RUN/phema/step-N.pt; the profiles are part of every checkpoint too (resume keeps them exact)."""
    phema_sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS
    """Comma list of the tracked profiles' lengths σ_rel (relative standard deviations; edm2: 0.05,0.10)."""
    phema_every: Annotated[int, Range(1)] = 10_000
    """Steps between post-hoc EMA snapshots in RUN/phema (edm2: every 8Mi images)."""
    precision: Annotated[str, OneOf(PRECISIONS)] = "bf16"
    """Autocast on GPU (fp32 master weights); the CPU always runs fp32."""
    compile: bool = False
    """torch.compile the model."""
    seed: Annotated[int, Range(0, 2**62, hi_open=True)] = 0
    """Seed of the weights, the data order and the noise."""
    data_format: Annotated[str, OneOf(FORMATS)] = "zarr"
    """Read zarr (random access: a local disk) or wds (whole tars: a network disk or a URL)."""
    num_workers: Annotated[int | None, Range(0)] = None
    """DataLoader processes per rank; default: one per core of the rank's share, at most 4.

    None: common.runtime.loader_workers."""
    read_ahead: Annotated[int, Range(0)] = 2
    """wds: tars downloading ahead of the one being decoded, per worker.

    Each is held whole in memory."""
    log_every: Annotated[int, Range(1)] = 100
    """Steps between metrics lines."""
    ckpt_every: Annotated[int, Range(1)] = 10_000
    """Steps between checkpoints kept for ever."""
    save_every: Annotated[int, Range(1)] = 1_000
    """Steps between resume checkpoints (the last --keep are kept)."""
    keep: Annotated[int, Range(0)] = 2
    """Resume checkpoints kept: the newest N of the --save-every ones (a stop signal's too), 0 every one; milestones
    besides.

    The --ckpt-every milestones are never deleted. 0 keeps every checkpoint (for evaluating them all later)."""
    max_bad_steps: Annotated[int, Range(1)] = 10
    """Consecutive non-finite losses before the run stops."""
    tracker: Annotated[str | None, OneOf(TRACKERS)] = None
    """Where rank 0 also writes every metrics.jsonl number; default: tensorboard when installed.

    tensorboard: RUN/tensorboard; wandb: RUN/wandb (WANDB_MODE=offline needs no network); none."""
    sample_every: Annotated[int, Range(0)] = 10_000
    """Steps between sample grids RUN/samples/step-N.png (EMA weights, fixed labels and noise); 0: none."""
    sample_num: Annotated[int, Range(1)] = 16
    """Images per sample grid."""
    sample_steps: Annotated[int, Range(1)] = 50
    """Sampler steps of the grids and the in-training FID (ODE Euler for SiT, DDPM for DiT)."""
    sample_guidance: Annotated[str | None, OneOf(GUIDANCE_MODES)] = None
    """Guidance of the grids and the in-training FID; default: rg for a model trained with --rep-drop, else none.

    The scales are `redi sample`'s defaults."""
    eval_every: Annotated[int, Range(0)] = 0
    """Steps between in-training FID, sFID, IS, precision and recall of the EMA weights; 0: none.

    Needs --eval-ref and --inception, checked when the run starts."""
    eval_ref: str | None = None
    """ADM reference batch .npz of the in-training evaluation (VIRTUAL_imagenet256_labeled.npz)."""
    inception: str | None = None
    """pt_inception-2015-12-05-6726825d.pth for the in-training evaluation."""
    eval_num: Annotated[int, Range(1)] = 10_000
    """Images per in-training evaluation, sampled over all ranks."""
    eval_labels: Annotated[str, OneOf(LABEL_MODES)] = "random"
    """Labels of the evaluation's images: random (the papers) or balanced (N / classes of each)."""
    init: str | None = None
    """Start a new run from these weights (a redi checkpoint or `redi convert` output).

    Unused when resuming."""
    resolution: Annotated[int, Range(0)] = 0
    """Image resolution, filled from the shards."""

    def __post_init__(self) -> None:
        check_ranges(self)  # the CLI checked them when parsing the flags; a config built in code is checked here
        family, _, name = self.model.partition("-")
        size, slash, patch = name.partition("/")
        if family not in OBJECTIVES or size not in SIZES or (slash and not (patch.isdigit() and int(patch) > 0)):
            raise UserError(f"Unknown model '{self.model}': use SiT-B, SiT-XL/2, DiT-B/2, SiT-B/1, … or SiT-debug.")
        if self.method not in METHODS:
            raise UserError(f"Unknown method '{self.method}': choose one of {', '.join(METHODS)}.")
        if self.learn_sigma is None:  # resolved here, so config.json and checkpoints record the value
            object.__setattr__(self, "learn_sigma", self.objective == "dit")
        if self.fusion not in FUSIONS:
            raise UserError(f"Unknown fusion '{self.fusion}': merged or separate.")
        if self.rep_drop_mode not in REP_DROP_MODES or self.rep_drop_target not in REP_DROP_TARGETS:
            raise UserError("--rep-drop-mode is sample|batch and --rep-drop-target is noisy|clean.")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be bf16 or fp32, got {self.precision}.")
        if self.data_format not in FORMATS:
            raise UserError(f"--format must be zarr or wds, got {self.data_format}.")
        if self.learn_sigma and self.objective != "dit":
            raise UserError("--learn-sigma applies to DiT models only.")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--weighting must be uniform or lognormal, got {self.weighting}.")
        if self.weighting != "uniform" and self.objective != "sit":
            raise UserError(f"--weighting {self.weighting} draws the SiT (flow) time; DiT models draw discrete timesteps.")
        if self.tracker is not None and self.tracker not in TRACKERS:
            raise UserError(f"--tracker must be one of {', '.join(TRACKERS)}, not {self.tracker!r}.")
        if self.sample_guidance is not None and self.sample_guidance not in GUIDANCE_MODES:
            raise UserError(f"--sample-guidance must be one of {', '.join(GUIDANCE_MODES)}, not {self.sample_guidance!r}.")
        if self.eval_labels not in LABEL_MODES:
            raise UserError(f"--eval-labels must be one of {', '.join(LABEL_MODES)}, not {self.eval_labels!r}.")
        if self.eval_every and (self.eval_ref is None or self.inception is None):
            raise UserError("--eval-every needs the reference batch and the Inception weights: pass --eval-ref REF.npz "
                            "and --inception pt_inception-2015-12-05-6726825d.pth.")
        object.__setattr__(self, "phema_sigma_rels", check_sigma_rels(self.phema_sigma_rels, "--phema-sigma-rels"))
        if (self.align_until is not None or self.align_fade) and not self.uses_repa:
            raise UserError(f"--align-until and --align-fade schedule the REPA/REG alignment term, which --method "
                            f"{self.method} does not have.")
        if self.align_fade and self.align_until is None:
            raise UserError("--align-fade needs --align-until: the step where the alignment weight reaches 0.")

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.model.partition("-")[0]]

    @property
    def size(self) -> str:
        """The backbone size, a key of SIZES."""
        return self.model.partition("-")[2].partition("/")[0]

    @property
    def patch_size(self) -> int | None:
        """The patch --model names, or None: the shards' default."""
        patch = self.model.partition("/")[2]
        return int(patch) if patch else None

    def with_patch(self, default: int) -> TrainConfig:
        """The config naming its patch (`default` where --model names none): what config.json and checkpoints record."""
        return self if self.patch_size else self.replace(model=f"{self.model}/{default}")

    def align_factor(self, step: int) -> float:
        """The share of --repa-weight in effect at optimiser step `step` (0-based): 1, then a linear fade over
        --align-fade steps to 0 at --align-until, 0 from there on."""
        if self.align_until is None or step < self.align_until - self.align_fade:
            return 1.0
        if step >= self.align_until:
            return 0.0
        return (self.align_until - step) / (self.align_fade + 1)

    @property
    def resolved_repa_depth(self) -> int:
        if not self.uses_repa:
            return 0
        return self.repa_depth if self.repa_depth is not None else REPA_DEPTHS[self.size]

    def to_json(self) -> dict[str, Any]:
        """The config as saved in the run and its checkpoints: a --shards URL without its credentials."""
        return dataclasses.asdict(self) | {"shards": redact(self.shards), "phema_sigma_rels": list(self.phema_sigma_rels)}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def resolve_shards_dir(path: str | Path) -> Location:
    """Accept either the data root or its shards/ directory, local or at a URL."""
    p = as_location(path)
    for root in (p, p / "shards"):
        if read_if_exists(root / "shards.json") is not None:  # a read, not an exists(): http's hides network errors
            return root
    raise UserError(f"No shards at {p}: run `redi shards --data {p}` first (looked for shards.json).")

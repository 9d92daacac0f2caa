"""`redi sample`: a checkpoint in; per-image PNGs, a grid, the generated PCs, an ADM .npz and sample.json out.

Everything the sampler needs comes from the checkpoint: the network (`model_config`), the method
and representation drop (`config`), the latent scale and the VAE (`shards`); the shards themselves
are not read.

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
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.markup import escape
from rich.table import Table

from common.atomic import atomic_write_json, remove_temporaries, sha256_file
from common.display import counting
from common.distributed import process_group
from common.errors import UserError
from common.lock import exclusive
from common.runtime import resolve_device
from pipeline.encoders import TINY_RANDOM, load_vae
from sampler.guidance import GUIDANCE_MODES, AutocastFactory, GuidanceConfig, check_guidance
from sampler.outputs import (
    ERRORS_JSONL, GRID_MAX, GRID_PNG, IMAGES_DIR, NPZ_FILE, PCS_DIR, PCS_PNG, SAMPLE_JSON, image_path, make_grid, pcs_path,
    QUANTIZE, pcs_to_rgb, read_png, to_uint8, write_adm_npz, write_errors, write_pcs, write_picture, write_png,
)
from sampler.samplers import (
    SAMPLERS, DDPMSchedule, SamplerOptions, sample_latents, sde_min_steps, space_timesteps,
)
from trainer.checkpoint import load_checkpoint, newest_checkpoint
from trainer.models import DiffusionTransformer, ModelConfig, build_model

log = logging.getLogger(__name__)
PRECISIONS: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp32": None}  # autocast dtype of the network
WEIGHTS = ("ema", "model")
DEFAULT_SAMPLER = {"sit": "sde", "dit": "ddpm"}
DEFAULT_CFG_SCALE = 2.4  # ReDi's best table (CFG on the VAE channels)
DEFAULT_RG_SCALE = 1.5  # ReDi, B models (1.1 for XL)
DEFAULT_CLS_CFG_SCALE = 1.5  # REG generate.py's --cls-cfg-scale: its class token is guided unless told otherwise
DEFAULT_STEPS = 250  # SiT/ReDi --num-sampling-steps, REPA/REG's evaluation
LABEL_STREAM = 0x1ABE1  # SeedSequence word that keeps the label draws apart from the noise generators
WRITER_THREADS = 4  # PNG encoding runs in threads (zlib releases the GIL) while the next batch samples
LOCK_FILE = ".lock"  # in the output directory: one sampling job at a time
NONFINITE_REASON = ("the sample or its decoded image is not finite (NaN or inf), so no image was written: "
                    "lower --cfg-scale or --rg-scale, or check the checkpoint")


@dataclass(frozen=True)
class SampleConfig:
    """Every setting of one `redi sample` run."""

    run: Path | None = None
    """Run directory: its newest checkpoint is sampled (exactly one of run and ckpt)."""
    ckpt: Path | None = None
    """A checkpoint file written by `redi train`."""
    guidance: str = "none"
    """none | cfg | rg | cfg+rg."""
    cfg_scale: float | None = None
    """CFG weight w; None → 2.4 (ReDi's best table). Only with guidance cfg or cfg+rg."""
    rg_scale: float | None = None
    """Representation Guidance weight w_r; None → 1.5 (ReDi: 1.5 for B, 1.1 for XL). Only with guidance rg or cfg+rg."""
    cfg_channels: str = "vae"
    """CFG on the VAE channels only (ReDi default) or on all channels."""
    interval: tuple[float, float] | None = None
    """Guide only at noise levels t in [lo, hi] (t = 1 is noise); None guides every step."""
    cls_cfg_scale: float | None = None
    """REG models: CFG weight of the class token wherever CFG is active; None → 1.5 (REG's generate.py); ≤ 0 or 1:
    unguided."""
    sampler: str | None = None
    """sde | ode | heun (SiT) or ddpm (DiT); None picks sde for SiT and ddpm for DiT."""
    steps: int | None = None
    """Sampler steps; None → 250 (none with an adaptive solver). SDE: steps − 1 Euler–Maruyama steps and the last
    step; Heun spends 2·steps − 1 calls."""
    solver: str | None = None
    """ode only: a torchdiffeq method (dopri5: SiT/ReDi's default ODE); None → redi's fixed-step Euler loop."""
    atol: float | None = None
    """Tolerance solvers only: absolute tolerance; None → 1e-6 (SiT/ReDi)."""
    rtol: float | None = None
    """Tolerance solvers only: relative tolerance; None → 1e-3 (SiT/ReDi)."""
    last_step: str | None = None
    """sde only: mean | tweedie | euler | none; None → mean (SiT/ReDi/REPA)."""
    last_step_size: float | None = None
    """sde only: where the last step starts; None → 0.04 (SiT/ReDi/REPA)."""
    num: int = 50_000
    """N: images to generate, global indices 0…N−1 (ADM's FID-50K by default)."""
    seed: int = 0
    """Image i is a function of (seed, i) only."""
    batch_size: int = 64
    """Images per forward pass and per process (B; the network sees up to 3·B rows with cfg+rg)."""
    class_labels: tuple[int, ...] | None = None
    """Labels cycled over the indices (label of i = labels[i % len]); None draws one per index from (seed, i)."""
    out: Path | None = None
    """Output directory; None → RUN/samples/NAME (or samples/NAME next to --ckpt), NAME built from the settings."""
    vae: str | None = None
    """Decoder override: hub id, local directory or tiny-random; None → the VAE recorded in the checkpoint."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (torchrun ranks use cuda:LOCAL_RANK)."""
    precision: str | None = None
    """Network autocast: bf16 | fp32; None → bf16 on cuda, fp32 elsewhere. Weights and sampler state stay float32."""
    quantize: str = "nearest"
    """Decoded pixels → uint8: nearest (DiT/SiT/ReDi scripts) or floor (REPA/REG generate.py); FID moves with it."""
    weights: str = "ema"
    """Which weights of the checkpoint: ema (default, as the papers) or model (the raw optimiser weights)."""
    force: bool = False
    """Delete the outputs of other settings found in `out` instead of refusing."""
    rank: int | None = None
    """This process's part when processes are launched independently; None → torchrun's RANK (or 0)."""
    world_size: int | None = None
    """Number of independently launched parts; None → torchrun's WORLD_SIZE (or 1)."""

    def __post_init__(self) -> None:
        """Refuse impossible settings with one clear sentence."""
        if (self.run is None) == (self.ckpt is None):
            raise UserError("Pass exactly one of --run RUN and --ckpt FILE.")
        if self.guidance not in GUIDANCE_MODES:
            raise UserError(f"Unknown guidance {self.guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}.")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise UserError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.num < 1 or (self.steps is not None and self.steps < 1) or self.batch_size < 1:
            raise UserError("--num, --steps and --batch-size must be positive.")
        if not 0 <= self.seed < 2**40:
            raise UserError(f"--seed must be a non-negative integer below 2^40, not {self.seed}.")
        if self.quantize not in QUANTIZE:
            raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {self.quantize!r}.")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision must be bf16 or fp32, not {self.precision!r}.")
        if self.weights not in WEIGHTS:
            raise UserError(f"--weights must be ema or model, not {self.weights!r}.")
        if self.interval is not None and self.guidance == "none":
            raise UserError("--interval bounds guidance, but --guidance is none: pass cfg, rg or cfg+rg, or leave it out.")
        for flag, value, mode in (("--cfg-scale", self.cfg_scale, "cfg"), ("--rg-scale", self.rg_scale, "rg")):
            if value is not None and mode not in self.guidance:
                raise UserError(f"{flag} has no effect with --guidance {self.guidance}: add {mode} to --guidance or leave it out.")
        if self.class_labels is not None and (not self.class_labels or min(self.class_labels) < 0):
            raise UserError("--class-labels must be 'random' or a comma list of non-negative integers.")
        if (self.rank is None) != (self.world_size is None):
            raise UserError("Give both rank and world_size, or neither.")
        if self.world_size is not None and not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is not in [0, {self.world_size}).")


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'LO,HI' → (lo, hi); None or '' → None."""
    if not text:
        return None
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--interval takes LO,HI (two numbers in [0, 1]), not {text!r}.") from None
    return lo, hi


def parse_class_labels(text: str) -> tuple[int, ...] | None:
    """'random' → None; '1,2,3' → (1, 2, 3)."""
    if text.strip().lower() == "random":
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--class-labels takes 'random' or a comma list of integers, not {text!r}.") from None


@dataclass(frozen=True)
class Checkpoint:
    """The parts of a training checkpoint that sampling uses."""

    path: Path
    sha256: str
    step: int
    model_config: ModelConfig
    train: dict[str, Any]
    """TrainConfig as saved (method, rep_drop, model name, …)."""
    shards: dict[str, Any]
    """What the checkpoint recorded of its shards (VAE identity, latent scale and shift)."""
    state: dict[str, torch.Tensor]
    """The chosen weights (ema or model)."""

    @property
    def rep_drop(self) -> float:
        """The representation drop the model was trained with (0 for methods without PC channels)."""
        return float(self.train.get("rep_drop", 0.0)) if self.model_config.pca_rank > 0 else 0.0


def resolve_checkpoint(run: Path | None, ckpt: Path | None) -> Path:
    """The checkpoint file: --ckpt as given, or the newest one of --run."""
    if ckpt is not None:
        return Path(ckpt)
    assert run is not None, "SampleConfig guarantees one of run and ckpt"
    if not Path(run).is_dir():
        raise UserError(f"No run directory at {run}.")
    newest = newest_checkpoint(Path(run))
    if newest is None:
        raise UserError(f"{run} holds no checkpoint yet (looked in {Path(run) / 'checkpoints'}).")
    return newest


def read_checkpoint(path: Path, weights: str) -> Checkpoint:
    """Load a `redi train` checkpoint safely (weights_only) and check it has what sampling needs."""
    raw = load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("model_config", "config", "shards", weights, "step") if k not in raw]
    if missing:
        raise UserError(f"{path} is not a `redi train` checkpoint (it lacks {', '.join(missing)}).")
    return Checkpoint(
        path=Path(path).resolve(), sha256=sha256_file(path), step=int(raw["step"]),
        model_config=ModelConfig(**raw["model_config"]), train=raw["config"], shards=raw["shards"], state=raw[weights],
    )


def sampling_network(ckpt: Checkpoint, device: torch.device) -> DiffusionTransformer:
    """The network in eval mode, float32, without the REPA projector (it only serves the training loss)."""
    cfg = dataclasses.replace(ckpt.model_config, repa_depth=0)
    model = build_model(cfg)
    state = {k: v for k, v in ckpt.state.items() if not k.startswith("projector.")}
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class SamplerChoice:
    """The resolved sampler: its name, step count (None for an adaptive solver) and options."""

    name: str
    steps: int | None
    options: SamplerOptions

    def settings(self) -> dict[str, Any]:
        """The options that apply to this sampler, for sample.json."""
        o = self.options
        if self.name == "sde":
            return {"last_step": o.last_step, "last_step_size": o.last_step_size}
        if o.solver is None:
            return {}
        return {"solver": o.solver} | ({"atol": o.atol, "rtol": o.rtol} if o.uses_tolerances else {})

    def label(self) -> str:
        """Short name for directories and tables, e.g. sde250, ode-dopri5-atol1e-06-rtol0.001, ode-rk4-50."""
        o = self.options
        if o.solver is not None:
            tolerances = f"-atol{o.atol:g}-rtol{o.rtol:g}" if o.uses_tolerances else ""
            return f"ode-{o.solver}" + ("" if self.steps is None else f"-{self.steps}") + tolerances
        last = "" if (o.last_step, o.last_step_size) == ("mean", 0.04) or self.name != "sde" else (
            f"-last{o.last_step}" + ("" if o.last_step == "none" else f"{o.last_step_size:g}"))
        return f"{self.name}{self.steps}{last}"


def resolve_sampler(cfg: SampleConfig, objective: str) -> SamplerChoice:
    """The sampler for this objective (default sde for SiT, ddpm for DiT) and its options; flags that do nothing
    for it are refused."""
    sampler = cfg.sampler or DEFAULT_SAMPLER[objective]
    if (sampler == "ddpm") != (objective == "dit"):
        raise UserError(
            f"The {sampler} sampler does not fit a {objective} model: use ddpm for DiT, sde, ode or heun for SiT."
        )
    options = SamplerOptions(solver=cfg.solver, **{k: v for k, v in (
        ("atol", cfg.atol), ("rtol", cfg.rtol), ("last_step", cfg.last_step), ("last_step_size", cfg.last_step_size),
    ) if v is not None})
    if cfg.solver is not None and sampler != "ode":
        raise UserError(f"--solver picks the ODE integrator: it needs --sampler ode, not {sampler}.")
    if (cfg.atol is not None or cfg.rtol is not None) and not options.uses_tolerances:
        raise UserError("--atol/--rtol apply to an adaptive --solver (dopri5, …) or implicit_adams only.")
    if (cfg.last_step is not None or cfg.last_step_size is not None) and sampler != "sde":
        raise UserError(f"--last-step and --last-step-size shape the SDE's end: they need --sampler sde, not {sampler}.")
    if cfg.last_step_size is not None and options.last_step == "none":
        raise UserError("--last-step-size has no effect with --last-step none (Euler–Maruyama runs down to 0).")
    if options.adaptive:
        if cfg.steps is not None:
            raise UserError(f"The adaptive {options.solver} solver chooses its own steps: leave --steps out "
                            "(--atol/--rtol set its accuracy).")
        return SamplerChoice(sampler, None, options)
    steps = DEFAULT_STEPS if cfg.steps is None else cfg.steps
    if sampler == "sde" and steps < sde_min_steps(options.last_step):
        raise UserError(f"--last-step {options.last_step} needs --steps {sde_min_steps(options.last_step)} or more.")
    if sampler == "ddpm":
        space_timesteps(DDPMSchedule().num_train_timesteps, steps)  # refuses more steps than training timesteps
    return SamplerChoice(sampler, steps, options)


def resolve_guidance(cfg: SampleConfig, ckpt: Checkpoint) -> GuidanceConfig:
    """The guidance for this model, refused when it cannot support it; unused scales are set to 1 (canonical)."""
    mc = ckpt.model_config
    check_guidance(cfg.guidance, mc.num_classes, ckpt.rep_drop, mc.class_dropout)
    cfg_on, rg_on = "cfg" in cfg.guidance, "rg" in cfg.guidance
    if cfg.cls_cfg_scale is not None and not (mc.reg_token and cfg_on):
        raise UserError("--cls-cfg-scale guides REG's class token: it needs a REG model and --guidance cfg or cfg+rg.")
    reg_cfg = mc.reg_token and cfg_on  # REG's generate.py guides its class token with its own weight
    return GuidanceConfig(
        mode=cfg.guidance,  # type: ignore[arg-type]
        cfg_scale=(DEFAULT_CFG_SCALE if cfg.cfg_scale is None else cfg.cfg_scale) if cfg_on else 1.0,
        rg_scale=(DEFAULT_RG_SCALE if cfg.rg_scale is None else cfg.rg_scale) if rg_on else 1.0,
        cfg_channels=cfg.cfg_channels if cfg_on else "vae",  # type: ignore[arg-type]
        interval=cfg.interval if cfg_on or rg_on else None,
        cls_cfg_scale=(DEFAULT_CLS_CFG_SCALE if cfg.cls_cfg_scale is None else cfg.cls_cfg_scale) if reg_cfg else None,
    )


def class_labels(num: int, seed: int, labels: tuple[int, ...] | None, num_classes: int) -> np.ndarray:
    """int64 (N,) label of every index: 0 for unconditional models, labels cycled, or drawn from (seed, i)."""
    if num_classes == 1:
        if labels is not None:
            raise UserError("--class-labels has no effect on an unconditional model (num_classes 1): leave it out.")
        return np.zeros(num, dtype=np.int64)
    if labels is not None:
        if max(labels) >= num_classes:
            raise UserError(f"--class-labels has {max(labels)}, but the model knows classes 0…{num_classes - 1}.")
        return np.resize(np.asarray(labels, dtype=np.int64), num)  # labels[i % len(labels)]
    draws = [np.random.default_rng([LABEL_STREAM, seed, i]).integers(num_classes) for i in range(num)]
    return np.asarray(draws, dtype=np.int64)


def labels_setting(labels: tuple[int, ...] | None, num_classes: int) -> dict[str, Any]:
    """How the labels were chosen, for sample.json."""
    if num_classes == 1:
        return {"mode": "unconditional"}
    return {"mode": "random"} if labels is None else {"mode": "list", "values": list(labels)}


def batches_of(num: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches: batch b = [b·B, (b+1)·B) ∩ [0, N) for every b with b % world_size == rank."""
    starts = range(rank * batch_size, num, world_size * batch_size)
    return [list(range(s, min(s + batch_size, num))) for s in starts]


def default_out(ckpt: Checkpoint, run: Path | None, sampler: SamplerChoice, guidance: GuidanceConfig,
                cfg: SampleConfig) -> Path:
    """RUN/samples/NAME or CKPT_DIR/samples/NAME, NAME = step, sampler (steps, options), guidance, scales, interval, seed."""
    parts = [f"step{ckpt.step:07d}", sampler.label()]
    if guidance.uses_cfg:
        parts.append(f"cfg{guidance.cfg_scale:g}" + ("all" if guidance.cfg_channels == "all" else "")
                     + (f"cls{guidance.cls_cfg_scale:g}" if guidance.cls_cfg_scale is not None else ""))
    if guidance.uses_rg:
        parts.append(f"rg{guidance.rg_scale:g}")
    if guidance.interval is not None and (guidance.uses_cfg or guidance.uses_rg):
        parts.append(f"interval{guidance.interval[0]:g}-{guidance.interval[1]:g}")
    if cfg.class_labels is not None and ckpt.model_config.num_classes > 1:
        parts.append("labels" + hashlib.sha256(repr(cfg.class_labels).encode()).hexdigest()[:8])
    if cfg.weights != "ema":
        parts.append(cfg.weights)
    parts.append(f"seed{cfg.seed}")
    base = Path(run) if run is not None else ckpt.path.parent
    return base / "samples" / "-".join(parts)


@dataclass(frozen=True)
class Decoder:
    """The VAE that turns sampled latents into images: image = vae.decode((x[:, :V] − shift) / scale)."""

    vae: torch.nn.Module
    identity: dict[str, Any]
    scale: float
    shift: float

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, V, h, h) sampled VAE channels → (N, 3, H, W) images in ≈[−1, 1], float32 (no autocast)."""
        z = (latents.float() - self.shift) / self.scale  # undo z = latent·scale + shift of training
        return self.vae.decode(z).sample  # (N, 3, H, W)


def load_decoder(ckpt: Checkpoint, override: str | None, device: torch.device) -> Decoder:
    """The VAE recorded in the checkpoint (or `override`), checked against the model's latent channels."""
    recorded = ckpt.shards.get("vae") or {}
    if override is not None:
        vae, identity = load_vae(override, device=device)
    elif not recorded.get("id"):
        raise UserError(f"{ckpt.path} records no VAE; pass --vae ID|DIR to decode.")
    elif recorded.get("kind") == TINY_RANDOM:
        vae, identity = load_vae(TINY_RANDOM, device=device)
    elif recorded.get("kind") == "local":
        vae, identity = load_vae(recorded["id"], device=device)
        if identity.get("hash") != recorded.get("revision"):
            raise UserError(
                f"The VAE directory {recorded['id']} changed since the latents were encoded; "
                f"pass --vae {recorded['id']} to decode with it anyway."
            )
    else:
        vae, identity = load_vae(recorded["id"], revision=recorded.get("revision") or "main", device=device)
    channels = int(vae.config.latent_channels)
    if channels != ckpt.model_config.vae_channels:
        raise UserError(f"The VAE {identity['id']} has {channels} latent channels, the model {ckpt.model_config.vae_channels}.")
    return Decoder(vae, identity, float(ckpt.shards.get("vae_scale", recorded.get("scale"))),
                   float(ckpt.shards.get("vae_shift", recorded.get("shift", 0.0))))


def sample_settings(cfg: SampleConfig, ckpt: Checkpoint, sampler: SamplerChoice, guidance: GuidanceConfig,
                    decoder: Decoder, precision: str) -> dict[str, Any]:
    """Everything that decides the pixels of image i (as JSON reads it back); a rerun into the same directory must match it."""
    settings = {
        "checkpoint": {"sha256": ckpt.sha256, "step": ckpt.step, "weights": cfg.weights},
        "model": {"name": ckpt.train.get("model"), "method": ckpt.train.get("method"), "rep_drop": ckpt.rep_drop,
                  "config": dataclasses.asdict(ckpt.model_config)},
        "sampler": sampler.name, "steps": sampler.steps, "sampler_options": sampler.settings(), "seed": cfg.seed,
        "guidance": {"mode": guidance.mode, "cfg_scale": guidance.cfg_scale, "rg_scale": guidance.rg_scale,
                     "cfg_channels": guidance.cfg_channels, "cls_cfg_scale": guidance.cls_cfg_scale,
                     "interval": list(guidance.interval) if guidance.interval is not None else None},
        "labels": labels_setting(cfg.class_labels, ckpt.model_config.num_classes),
        "vae": {"identity": decoder.identity, "scale": decoder.scale, "shift": decoder.shift},
        "precision": precision,
        "quantize": cfg.quantize,
        "tiny_random": decoder.identity.get("kind") == TINY_RANDOM,
    }
    return json.loads(json.dumps(settings))


@contextlib.contextmanager
def out_lock(out: Path, cfg: SampleConfig, rank: int) -> Iterator[None]:
    """One sampling job per output directory: its rank 0 holds OUT/.lock, so a second job is refused with one
    sentence; independently launched parts (cfg.rank/world_size) share it, and each part runs once."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory.")
    what = f"the samples in {out}"
    if cfg.world_size is None:
        with exclusive(out / LOCK_FILE, what) if rank == 0 else contextlib.nullcontext():
            yield
    else:
        part = out / f"{LOCK_FILE}-part-{rank}-of-{cfg.world_size}"
        with exclusive(out / LOCK_FILE, what, shared=True), exclusive(part, f"part {rank} of {what}"):
            yield


def prepare_out(out: Path, settings: dict[str, Any], ckpt_path: Path, force: bool, writes: bool) -> None:
    """Refuse an output directory made with other settings, or holding images that no sample.json describes
    (or clear it, with force); start its sample.json."""
    path = out / SAMPLE_JSON
    try:
        report = json.loads(path.read_bytes()) if path.exists() else {}
    except ValueError:  # not JSON, or not UTF-8
        report = None
    if not isinstance(report, dict):
        raise UserError(f"{path} is damaged; pass --force to start these samples over.")
    have = report.get("settings")
    if have is not None and have != settings:
        changed = sorted(k for k in settings.keys() | have.keys() if settings.get(k) != have.get(k))
        if not force:
            raise UserError(
                f"{out} holds samples made with other settings ({', '.join(changed)}); "
                "choose another --out or pass --force to replace them."
            )
        if writes:
            clear_out(out)
        report = {}
    elif have is None and writes and any((out / IMAGES_DIR).glob("*.png")):  # e.g. sample.json deleted
        if not force:
            raise UserError(f"{out} holds images but no {SAMPLE_JSON} saying how they were made; choose another --out "
                            "or pass --force to replace them.")
        clear_out(out)
    if writes and not report:
        atomic_write_json(path, {"settings": settings, "checkpoint_path": str(ckpt_path), "complete": False})


def clear_out(out: Path) -> None:
    """Delete every file `redi sample` writes in `out` (--force on samples of other or unknown settings)."""
    for name in (IMAGES_DIR, PCS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    eval_json = Path(NPZ_FILE).with_suffix(".eval.json").name  # redi eval's report on the old samples
    for name in (GRID_PNG, PCS_PNG, NPZ_FILE, SAMPLE_JSON, ERRORS_JSONL, eval_json):
        (out / name).unlink(missing_ok=True)


@dataclass
class Work:
    """What this process (or, after `reduce`, all processes) spent."""

    images: int = 0
    """Images generated now (missing ones only; present ones are skipped)."""
    batches: int = 0
    """Batches sampled."""
    model_calls: int = 0
    """Batched network forward calls (all guidance branches share one call)."""
    nfe: int = 0
    """Per-sample network evaluations, summed over the images of every sampled batch."""
    nfe_per_image: int = 0
    """Network evaluations per image (active guidance branches summed over the steps); the most any batch spent
    (adaptive solvers spend a different number per batch)."""
    seconds: float = 0.0
    """Wall time of sampling, decoding and writing (the slowest rank after `reduce`)."""
    sampled: int = 0
    """Images the sampled batches held (present ones recomputed with their batch included): nfe's denominator."""
    nonfinite: list[int] = field(default_factory=list)
    """Indices whose sample or decoded image held NaN or inf: listed in errors.jsonl, never written as images."""

    @property
    def images_per_s(self) -> float:
        """Generated images per second of wall time."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def nfe_mean_per_image(self) -> float:
        """Network evaluations per sampled image, averaged over the batches."""
        return self.nfe / self.sampled if self.sampled else 0.0

    def reduce(self, device: torch.device) -> Work:
        """Sum the counts and take the longest time over the process group (identity without one)."""
        if not dist.is_initialized():
            return self
        counts = torch.tensor([self.images, self.batches, self.model_calls, self.nfe, self.sampled],
                              dtype=torch.float64, device=device)
        peaks = torch.tensor([self.seconds, self.nfe_per_image], dtype=torch.float64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        images, batches, calls, nfe, sampled = (int(v) for v in counts.tolist())
        lists: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(lists, self.nonfinite)
        return Work(images, batches, calls, nfe, int(peaks[1]), float(peaks[0]), sampled,
                    sorted(i for part in lists for i in part))


@dataclass(frozen=True)
class SampleResult:
    """What a `redi sample` run did and where its outputs are."""

    out: Path
    num: int
    present: int
    """Images that were already there when this run started (over all processes)."""
    work: Work
    rank: int
    world_size: int
    device: str
    sampler: SamplerChoice
    guidance: str
    missing: int
    """Images still missing after this process (other independently launched ranks have not run yet)."""
    assembled: bool
    """This process wrote grid.png, pcs.png (with PCs) and samples.npz."""
    has_pcs: bool
    tiny_random: bool

    def table(self) -> Table:
        """The one-screen summary."""
        t = Table(title="redi sample" + (" [yellow](tiny-random VAE)[/]" if self.tiny_random else ""))
        t.add_column("")
        t.add_column("value", overflow="fold")
        t.add_row("images", f"{self.num:,} ({self.work.images:,} generated now, {self.present:,} already there)")
        steps = "adaptive steps" if self.sampler.steps is None else f"{self.sampler.steps} steps"
        t.add_row("sampler", f"{self.sampler.label()}, {steps}, guidance {self.guidance}")
        nfe = self.work.nfe_per_image
        if self.work.images and self.sampler.options.adaptive:
            t.add_row("NFE per image", f"{self.work.nfe_mean_per_image:.1f} mean, {nfe} at most")
        else:
            t.add_row("NFE per image", str(nfe) if self.work.images else "–")
        t.add_row("model calls", f"{self.work.model_calls:,} in {self.work.batches:,} batches")
        t.add_row("images/s", f"{self.work.images_per_s:,.2f} ({self.world_size} process(es) on {self.device})")
        if self.work.nonfinite:
            t.add_row("[bold red]not finite[/]", f"[bold red]{len(self.work.nonfinite):,} images (NaN or inf), not written: "
                                                 f"listed in {ERRORS_JSONL}[/]")
        t.add_row("output directory", escape(str(self.out)))  # paths may hold [brackets]
        files = [f"{IMAGES_DIR}/"]
        if self.assembled:
            files += [NPZ_FILE, GRID_PNG] + ([PCS_PNG] if self.has_pcs else [])
        t.add_row("files", ", ".join(files + [SAMPLE_JSON] + ([ERRORS_JSONL] if self.work.nonfinite else [])))
        return t


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
    dtype = PRECISIONS[precision]
    return None if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype))


def is_done(out: Path, index: int, needs_pcs: bool) -> bool:
    """The image exists (and its PCs, for a grid image of a model with PC channels)."""
    return image_path(out, index).exists() and (not needs_pcs or pcs_path(out, index).exists())


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


def run_sample(cfg: SampleConfig) -> SampleResult:
    """Sample this process's missing images, then (rank 0, once every image exists) assemble the outputs."""
    ckpt = read_checkpoint(resolve_checkpoint(cfg.run, cfg.ckpt), cfg.weights)
    mc = ckpt.model_config
    sampler = resolve_sampler(cfg, mc.objective)
    guidance = resolve_guidance(cfg, ckpt)
    if "rg" in guidance.mode and ckpt.train.get("rep_drop_target", "noisy") != "noisy":
        log.warning("this model was trained with the reference's clean-z drop (its dropped samples saw t·ε in the PC "
                    "channels); Representation Guidance feeds zeros, as the paper does.")
    labels = class_labels(cfg.num, cfg.seed, cfg.class_labels, mc.num_classes)
    with sample_ranks(cfg) as (rank, world, device), contextlib.ExitStack() as held:
        precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
        decoder = load_decoder(ckpt, cfg.vae, device)
        settings = sample_settings(cfg, ckpt, sampler, guidance, decoder, precision)
        out = Path(cfg.out) if cfg.out is not None else default_out(ckpt, cfg.run, sampler, guidance, cfg)
        held.enter_context(out_lock(out, cfg, rank))
        if rank == 0 and cfg.world_size is None:  # the job's lock holder, before any rank writes
            remove_temporaries(out)
        prepare_out(out, settings, ckpt.path, cfg.force, writes=rank == 0 or cfg.world_size is not None)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has checked (and with --force cleared) the directory
        grid_count = min(cfg.num, GRID_MAX)
        has_pcs = mc.pca_rank > 0

        def done(i: int) -> bool:
            return is_done(out, i, has_pcs and i < grid_count)

        mine = batches_of(cfg.num, cfg.batch_size, rank, world)
        todo = [b for b in mine if not all(done(i) for i in b)]
        to_generate = sum(1 for b in todo for i in b if not done(i))
        present = sum(len(b) for b in mine) - to_generate
        model = sampling_network(ckpt, device)
        tag = " [yellow](tiny-random VAE)[/]" if settings["tiny_random"] else ""
        plan = SamplingPlan(sampler.name, sampler.steps, cfg.seed, guidance, autocast_factory(device, precision),
                            cfg.quantize, sampler.options)
        bar = counting(f"sampling{tag}", to_generate, enabled=rank == 0)
        work = sample_batches(model, decoder, plan, todo, labels, out, done, grid_count, bar).reduce(device)
        present_all = int(Work(images=present).reduce(device).images)
        missing = sum(1 for i in range(cfg.num) if not done(i)) if rank == 0 else 0
        assembled = rank == 0 and missing == 0
        if rank == 0 and work.nonfinite:
            write_errors(out / ERRORS_JSONL, work.nonfinite, NONFINITE_REASON)
        if assembled:
            (out / ERRORS_JSONL).unlink(missing_ok=True)  # every image is there now
            report = json.loads((out / SAMPLE_JSON).read_text())
            outputs = [NPZ_FILE, GRID_PNG] + ([PCS_PNG] if has_pcs else [])
            if (work.images or not report.get("complete") or report.get("num") != cfg.num
                    or not all((out / name).exists() for name in outputs)):  # e.g. samples.npz deleted
                assemble(out, cfg.num, labels, grid_count, has_pcs, counting("assembling", cfg.num))
                atomic_write_json(out / SAMPLE_JSON, final_report(settings, ckpt, cfg, work, world, device, has_pcs))
    return SampleResult(
        out=out, num=cfg.num, present=present_all, work=work, rank=rank, world_size=world, device=str(device),
        sampler=sampler, guidance=guidance.mode, missing=missing, assembled=assembled,
        has_pcs=has_pcs, tiny_random=settings["tiny_random"],
    )


def final_report(settings: dict[str, Any], ckpt: Checkpoint, cfg: SampleConfig, work: Work, world: int,
                 device: torch.device, has_pcs: bool) -> dict[str, Any]:
    """sample.json once the outputs are assembled: settings, run shape, file names and the work this run spent."""
    return {
        "settings": settings, "checkpoint_path": str(ckpt.path), "complete": True, "num": cfg.num,
        "batch_size": cfg.batch_size, "world_size": world, "device": str(device),
        "outputs": {"images": IMAGES_DIR, "npz": NPZ_FILE, "grid": GRID_PNG, "pcs": PCS_PNG if has_pcs else None},
        "work": dataclasses.asdict(work) | {"images_per_s": work.images_per_s, "nfe_mean_per_image": work.nfe_mean_per_image},
    }


def sample_batches(
    model: DiffusionTransformer, decoder: Decoder, plan: SamplingPlan, todo: list[list[int]], labels: np.ndarray,
    out: Path, done: Callable[[int], bool], grid_count: int,
    bar: contextlib.AbstractContextManager[Callable[[int], None]],
) -> Work:
    """Sample, decode and write each batch in `todo`; only missing files are written (PCs before the PNG)."""
    mc = model.cfg
    device = next(model.parameters()).device
    work = Work()
    start = time.perf_counter()
    pending: list[Future[None]] = []
    with bar as advance, ThreadPoolExecutor(WRITER_THREADS) as pool:
        for batch in todo:
            indices = torch.tensor(batch, dtype=torch.long)
            y = torch.from_numpy(labels[batch]).to(device)  # (B,)
            x, _, stats = sample_latents(
                model, y, indices, plan.seed, plan.sampler, plan.steps, plan.guidance, plan.autocast,
                latent_size=mc.input_size, cls_dim=mc.repa_dim if mc.reg_token else None, options=plan.options,
            )  # x (B, V + r, h, h)
            decoded = decoder(x[:, : mc.vae_channels])  # (B, 3, H, W)
            finite = (torch.isfinite(x).flatten(1).all(1) & torch.isfinite(decoded).flatten(1).all(1)).tolist()  # (B,)
            pixels = to_uint8(decoded, plan.quantize)  # (B, H, W, 3)
            pcs = x[:, mc.vae_channels :].float().cpu().numpy()  # (B, r, h, h)
            for f in pending:  # the previous batch's files are on disk (a write error surfaces here)
                f.result()
            work.nonfinite += [i for k, i in enumerate(batch) if not finite[k]]
            missing = [(k, i) for k, i in enumerate(batch) if not done(i) and finite[k]]
            pending = [pool.submit(_write_image, out, i, pixels[k], pcs[k] if mc.pca_rank and i < grid_count else None)
                       for k, i in missing]
            work.images += len(missing)
            work.batches += 1
            work.model_calls += stats.model_calls
            work.nfe += stats.nfe * len(batch)
            work.sampled += len(batch)
            work.nfe_per_image = max(work.nfe_per_image, stats.nfe)
            advance(len(missing))
        for f in pending:
            f.result()
    work.seconds = time.perf_counter() - start
    return work


def _write_image(out: Path, index: int, pixels: np.ndarray, pcs: np.ndarray | None) -> None:
    """One image's files: its PCs first (grid images), then the PNG that marks the image as done."""
    if pcs is not None:
        write_pcs(pcs_path(out, index), pcs)
    write_png(image_path(out, index), pixels)


def assemble(out: Path, num: int, labels: np.ndarray, grid_count: int, has_pcs: bool,
             bar: contextlib.AbstractContextManager[Callable[[int], None]]) -> None:
    """grid.png, pcs.png and samples.npz from the per-image files (lossless PNGs), each written atomically."""
    shape = read_png(image_path(out, 0)).shape  # (H, W, 3); every other image must match it
    grid = np.stack([read_png(image_path(out, i), shape) for i in range(grid_count)])  # (G, H, W, 3)
    write_picture(out / GRID_PNG, make_grid(grid))
    if has_pcs:
        pcs = np.stack([np.load(pcs_path(out, i)) for i in range(grid_count)])  # (G, r, h, h)
        write_picture(out / PCS_PNG, make_grid(pcs_to_rgb(pcs, shape[0])))
    with bar as advance:

        def images() -> Iterator[np.ndarray]:
            for i in range(num):
                yield read_png(image_path(out, i), shape)
                advance(1)

        write_adm_npz(out / NPZ_FILE, images(), (num, *shape), labels)

"""Every setting of one `redi sample` run (SampleConfig: its flags and their help), checked without torch; what the
settings resolve to for a checkpoint is settings.py's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from redi.common.choices import AUTOGUIDANCE_MODES, GUIDANCE_MODES
from redi.common.errors import UserError
from redi.common.flags import OneOf
from redi.common.schema import Range, check_ranges
from redi.sampler.interface import LAST_STEPS, ODE_SOLVERS, SAMPLERS
from redi.sampler.labels import Labels, check_labels

PRECISIONS = ("bf16", "fp32")  # the network's autocast dtype (sample.py: AUTOCAST_DTYPES)
GUIDE_WEIGHTS = ("ema", "model")  # a checkpoint's own weights
WEIGHTS = (*GUIDE_WEIGHTS, "init")  # init: the run's untrained network, rebuilt from its seed
SAMPLE_GUIDANCE_MODES = GUIDANCE_MODES + AUTOGUIDANCE_MODES
QUANTIZE = {  # decoded x in [−1, 1] → the float whose truncation is the stored grey level
    "nearest": lambda x: 127.5 * x + 128.0,  # DiT, SiT and ReDi sample scripts: round half up
    "floor": lambda x: 127.5 * (x + 1.0),  # REPA and REG generate.py: 0.5 grey level darker on average
}


@dataclass(frozen=True)
class SampleConfig:
    """Every setting of one `redi sample` run: its flags and their help are these fields."""

    run: Path | None = None
    """Run directory: sample its newest checkpoint.

    Exactly one of run and ckpt."""
    ckpt: Path | None = None
    """A checkpoint file written by `redi train` or `redi convert` (instead of --run)."""
    guidance: Annotated[str, OneOf(SAMPLE_GUIDANCE_MODES)] = "none"
    """Classifier-free (cfg), Representation Guidance (rg), both, AutoGuidance by a guiding network (autoguidance,
    autoguidance+rg), or none."""
    cfg_scale: Annotated[float | None, Range(0)] = None
    """CFG weight w (1: no effect); default 2.4, ReDi's best table."""
    rg_scale: Annotated[float | None, Range(0)] = None
    """RG weight w_r; default 1.5 (ReDi: 1.5 for B, 1.1 for XL)."""
    cfg_channels: Literal["vae", "all"] = "vae"
    """CFG on the VAE channels only (ReDi) or on all channels."""
    interval: tuple[float, float] | None = None
    """LO,HI: guide only at noise levels t in [LO, HI] (t = 1 is noise); default: every step."""
    cls_cfg_scale: Annotated[float | None, Range()] = None
    """REG: CFG weight of the class token where CFG is on; default 1.5 (0 or 1: unguided).

    1.5 as REG's generate.py."""
    ag_scale: Annotated[float | None, Range(0)] = None
    """AutoGuidance weight w: D_guide + w·(D − D_guide) (1: no effect); default 2.0 (edm2's presets: 1.7–2.45)."""
    guide_run: Path | None = None
    """AutoGuidance: the guiding model's run directory (a smaller or earlier model of the same data); its newest
    checkpoint, or --guide-step's.

    Exactly one of guide_run and guide_ckpt with an autoguidance mode."""
    guide_ckpt: Path | None = None
    """AutoGuidance: the guiding model's checkpoint file (instead of --guide-run), e.g. a `redi ema` output."""
    guide_step: Annotated[int | None, Range(0)] = None
    """With --guide-run: guide with the checkpoint of this step (RUN2/checkpoints/step-N.pt); default its newest."""
    guide_weights: Annotated[str, OneOf(GUIDE_WEIGHTS)] = "ema"
    """The guide checkpoint's EMA weights or its raw weights (model)."""
    sampler: Annotated[str | None, OneOf(SAMPLERS)] = None
    """sde, ode or heun (SiT), ddpm (DiT); default: sde for SiT, ddpm for DiT."""
    steps: Annotated[int | None, Range(1)] = None
    """Sampler steps; default 250 (none with an adaptive --solver).

    SDE: steps − 1 Euler–Maruyama steps and the last step; Heun spends 2·steps − 1 calls."""
    solver: Annotated[str | None, OneOf(ODE_SOLVERS)] = None
    """--sampler ode with a torchdiffeq method (dopri5: SiT/ReDi's); default: redi's fixed-step Euler.

    Adaptive: dopri5, dopri8, bosh3, fehlberg2, adaptive_heun; fixed (--steps): the others."""
    atol: Annotated[float | None, Range(0, lo_open=True)] = None
    """Adaptive --solver (and implicit_adams): absolute tolerance; default 1e-6 (SiT/ReDi)."""
    rtol: Annotated[float | None, Range(0, lo_open=True)] = None
    """Adaptive --solver (and implicit_adams): relative tolerance; default 1e-3 (SiT/ReDi)."""
    last_step: Annotated[str | None, OneOf(LAST_STEPS)] = None
    """--sampler sde: the step from t = --last-step-size to 0; default mean (SiT/ReDi/REPA).

    none: Euler–Maruyama down to 0."""
    last_step_size: Annotated[float | None, Range(0, 1, lo_open=True, hi_open=True)] = None
    """--sampler sde: the noise level where the last step starts; default 0.04 (SiT/ReDi/REPA)."""
    num: Annotated[int, Range(1)] = 50_000
    """Images to generate (indices 0…N−1); 50,000 for FID."""
    seed: Annotated[int, Range(0, 2**40, hi_open=True)] = 0
    """Image i is a function of (seed, i) only."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per forward pass and process.

    B; the network sees up to 3·B rows with cfg+rg."""
    labels: Labels = "random"
    """random (one per image from seed and index, as the papers evaluate), balanced (N / classes of each class,
    shuffled by the seed, as REPA-E, RAE and LightningDiT evaluate), or a comma list of classes cycled over the images.

    A balanced label depends on N too, which sample.json records; a list is a tuple here, label of i = labels[i % len]."""
    out: Path | None = None
    """Output directory; default RUN/samples/NAME (or samples/NAME by --ckpt), NAME from the settings."""
    vae: str | None = None
    """Decode with this VAE (hub id, directory, tiny-random[:KEY]) of the run's latent space; default: the checkpoint's.

    The same latent space: class, channels and downsampling, e.g. sd-vae-ft-mse for sd-vae-ft-ema."""
    force_vae: bool = False
    """Decode with a --vae of another class or downsampling than the run's (a warning, not a refusal)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (torchrun ranks use their local GPU)."""
    precision: Annotated[str | None, OneOf(PRECISIONS)] = None
    """Network autocast; default bf16 on cuda, fp32 elsewhere.

    Weights and sampler state stay float32."""
    quantize: Annotated[str, OneOf(tuple(QUANTIZE))] = "nearest"
    """Pixels to uint8: nearest (DiT/SiT/ReDi scripts) or floor (REPA/REG, for their FID protocol).

    FID moves with it."""
    weights: Annotated[str, OneOf(WEIGHTS)] = "ema"
    """The checkpoint's EMA weights (as the papers), its raw weights (model), or the run's untrained network (init).

    init: the network before the first step, rebuilt from the run's seed, for a before/after comparison."""
    force: bool = False
    """Replace samples of other settings in --out instead of refusing."""
    rank: Annotated[int | None, Range(0)] = None
    """This process's part when processes are launched independently; None → torchrun's RANK (or 0)."""
    world_size: Annotated[int | None, Range(1)] = None
    """Number of independently launched parts; None → torchrun's WORLD_SIZE (or 1)."""

    def __post_init__(self) -> None:
        """Refuse impossible settings with one clear sentence."""
        check_ranges(self)
        if (self.run is None) == (self.ckpt is None):
            raise UserError("Pass exactly one of --run RUN and --ckpt FILE.")
        if self.guidance not in SAMPLE_GUIDANCE_MODES:
            raise UserError(f"Unknown guidance {self.guidance!r}; choose one of {', '.join(SAMPLE_GUIDANCE_MODES)}.")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise UserError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.quantize not in QUANTIZE:
            raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {self.quantize!r}.")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision must be bf16 or fp32, not {self.precision!r}.")
        if self.weights not in WEIGHTS:
            raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, not {self.weights!r}.")
        if self.interval is not None and self.guidance == "none":
            raise UserError("--interval bounds guidance, but --guidance is none: pass cfg, rg, cfg+rg or autoguidance, or "
                            "leave it out.")
        for flag, value, mode in (("--cfg-scale", self.cfg_scale, "cfg"), ("--rg-scale", self.rg_scale, "rg"),
                                  ("--ag-scale", self.ag_scale, "autoguidance")):
            if value is not None and mode not in self.guidance:
                raise UserError(f"{flag} has no effect with --guidance {self.guidance}: add {mode} to --guidance or leave it out.")
        check_labels(self.labels)
        autoguided = self.guidance in AUTOGUIDANCE_MODES
        if autoguided and (self.guide_run is None) == (self.guide_ckpt is None):
            raise UserError(f"--guidance {self.guidance} guides with a second model: pass exactly one of --guide-run RUN2 "
                            "and --guide-ckpt FILE.")
        if not autoguided and (self.guide_run is not None or self.guide_ckpt is not None or self.guide_step is not None
                               or self.guide_weights != "ema"):
            raise UserError("--guide-run, --guide-ckpt, --guide-step and --guide-weights choose AutoGuidance's guiding "
                            "model: they need --guidance autoguidance or autoguidance+rg.")
        if self.guide_step is not None and self.guide_run is None:
            raise UserError("--guide-step picks a checkpoint of --guide-run RUN2: pass --guide-run (or give the file "
                            "with --guide-ckpt).")
        if self.guide_weights not in GUIDE_WEIGHTS:
            raise UserError(f"--guide-weights must be ema or model, not {self.guide_weights!r}.")
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

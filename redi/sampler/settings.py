"""What the flags of one `redi sample` run resolve to for its checkpoint: the sampler and its steps, the guidance
weights, and the settings that sample.json records (they decide every pixel; the labels are sampler/labels.py's)."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from redi.common.errors import UserError
from redi.common.choices import AUTOGUIDANCE_MODES, GUIDANCE_MODES
from redi.common.schema import OneOf, Range, Shaped
from redi.pipeline.latent_norm import LatentNorm
from redi.pipeline.stage import TINY_RANDOM, Identity
from redi.sampler.interface import SamplerOptions
from redi.sampler.labels import labels_setting

if TYPE_CHECKING:  # torch and the VAE's libraries: seconds that describing sample.json (redi preview) does not need
    from redi.sampler.decoder import Decoder
    from redi.sampler.guidance import GuidanceConfig
    from redi.sampler.config import SampleConfig
    from redi.trainer.checkpoint import Checkpoint

log = logging.getLogger(__name__)
DEFAULT_SAMPLER = {"sit": "sde", "dit": "ddpm"}
DEFAULT_CFG_SCALE = 2.4  # ReDi's best table (CFG on the VAE channels)
DEFAULT_RG_SCALE = 1.5  # ReDi, B models (1.1 for XL)
DEFAULT_CLS_CFG_SCALE = 1.5  # REG generate.py's --cls-cfg-scale: its class token is guided unless told otherwise
DEFAULT_AG_SCALE = 2.0  # AutoGuidance: edm2's autog presets use 1.7–2.45 (FID-best 2.05–2.1 at 512)
DEFAULT_STEPS = 250  # SiT/ReDi --num-sampling-steps, REPA/REG's evaluation


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
    from redi.sampler.ddpm import DIT_SCHEDULE, space_timesteps
    from redi.sampler.samplers import sde_min_steps

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
        space_timesteps(DIT_SCHEDULE.num_train_timesteps, steps)  # refuses more steps than training timesteps
    return SamplerChoice(sampler, steps, options)


def resolve_guidance(cfg: SampleConfig, ckpt: Checkpoint) -> GuidanceConfig:
    """The guidance for this model, refused when it cannot support it; unused scales are set to 1 (canonical)."""
    from redi.sampler.guidance import GuidanceConfig, check_guidance

    mc = ckpt.model_config
    check_guidance(cfg.guidance, mc.num_classes, ckpt.rep_drop, mc.class_dropout)
    cfg_on, rg_on, ag_on = "cfg" in cfg.guidance, "rg" in cfg.guidance, "autoguidance" in cfg.guidance
    if cfg.cls_cfg_scale is not None and not (mc.reg_token and cfg_on):
        raise UserError("--cls-cfg-scale guides REG's class token: it needs a REG model and --guidance cfg or cfg+rg.")
    if rg_on and ckpt.train.get("rep_drop_target", "noisy") != "noisy":
        log.warning("this model was trained with the reference's clean-z drop (its dropped samples saw t·ε in the PC "
                    "channels); Representation Guidance feeds zeros, as the paper does.")
    reg_cfg = mc.reg_token and cfg_on  # REG's generate.py guides its class token with its own weight
    return GuidanceConfig(
        mode=cfg.guidance,  # type: ignore[arg-type]
        cfg_scale=(DEFAULT_CFG_SCALE if cfg.cfg_scale is None else cfg.cfg_scale) if cfg_on else 1.0,
        rg_scale=(DEFAULT_RG_SCALE if cfg.rg_scale is None else cfg.rg_scale) if rg_on else 1.0,
        cfg_channels=cfg.cfg_channels if cfg_on else "vae",  # type: ignore[arg-type]
        interval=cfg.interval if cfg_on or rg_on or ag_on else None,
        cls_cfg_scale=(DEFAULT_CLS_CFG_SCALE if cfg.cls_cfg_scale is None else cfg.cls_cfg_scale) if reg_cfg else None,
        ag_scale=(DEFAULT_AG_SCALE if cfg.ag_scale is None else cfg.ag_scale) if ag_on else 1.0,
    )


GUIDE_MODEL_FIELDS = ("objective", "vae_channels", "pca_rank", "input_size", "reg_token")  # what D_good − D_bad needs


def resolve_guide(cfg: SampleConfig, ckpt: Checkpoint) -> Checkpoint | None:
    """AutoGuidance's guiding checkpoint (--guide-ckpt, or --guide-run's newest or --guide-step's), refused in one
    sentence unless it models the same data in the same latent space with the same channels; None without it."""
    from redi.trainer.checkpoint import Checkpoint, checkpoint_path, list_checkpoints, resolve_checkpoint

    if cfg.guide_run is None and cfg.guide_ckpt is None:
        return None
    if cfg.guide_run is not None and cfg.guide_step is not None:
        path = checkpoint_path(cfg.guide_run, cfg.guide_step)
        if not path.exists():
            steps = ", ".join(str(s) for s, _ in list_checkpoints(cfg.guide_run)) or "none"
            raise UserError(f"--guide-run {cfg.guide_run} has no checkpoint of step {cfg.guide_step} (it has: {steps}).")
    else:
        path = resolve_checkpoint(cfg.guide_run, cfg.guide_ckpt)
    guide = Checkpoint.load(path.resolve())
    if (guide.ema if cfg.guide_weights == "ema" else guide.model) is None:
        raise UserError(f"The guide {guide.path} holds no {cfg.guide_weights} weights: pass --guide-weights "
                        f"{'model' if cfg.guide_weights == 'ema' else 'ema'}.")
    if changed := ckpt.shards.differences(guide.shards):
        raise UserError(f"The guide {guide.path} was trained on other data than the model ({', '.join(changed)} differ): "
                        "AutoGuidance needs a smaller or earlier model of the same shards, PCA and latent space.")
    mine, theirs = dataclasses.asdict(ckpt.model_config), dataclasses.asdict(guide.model_config)
    changed = [k for k in GUIDE_MODEL_FIELDS if mine[k] != theirs[k]]
    if ckpt.model_config.reg_token and mine["repa_dim"] != theirs["repa_dim"]:
        changed.append("repa_dim")
    if theirs["num_classes"] not in (mine["num_classes"], 1):
        changed.append("num_classes")
    if changed:
        raise UserError(f"The guide {guide.path} predicts other channels than the model ({', '.join(changed)} differ: "
                        f"{', '.join(f'{theirs[k]} in the guide, {mine[k]} in the model' for k in changed)}): "
                        "AutoGuidance needs a model of the "
                        "same objective, latent, PC rank and labels (size, patch and steps may differ).")
    return guide


def sample_settings(cfg: SampleConfig, ckpt: Checkpoint, sampler: SamplerChoice, guidance: GuidanceConfig,
                    decoder: Decoder, precision: str, guide: Checkpoint | None = None) -> dict[str, Any]:
    """Everything that decides the pixels of image i (as JSON reads it back); a rerun into the same directory must match it.
    The post-hoc EMA record and AutoGuidance's entries appear only where they apply."""
    guidance_record = {"mode": guidance.mode, "cfg_scale": guidance.cfg_scale, "rg_scale": guidance.rg_scale,
                       "cfg_channels": guidance.cfg_channels, "cls_cfg_scale": guidance.cls_cfg_scale,
                       "interval": list(guidance.interval) if guidance.interval is not None else None}
    if guide is not None:
        guidance_record |= {"ag_scale": guidance.ag_scale,
                            "guide": checkpoint_record(guide, cfg.guide_weights) | {"model": guide.train.get("model")}}
    settings = {
        "checkpoint": checkpoint_record(ckpt, cfg.weights),
        "model": {"name": ckpt.train.get("model"), "method": ckpt.train.get("method"), "rep_drop": ckpt.rep_drop,
                  "config": dataclasses.asdict(ckpt.model_config)},
        "sampler": sampler.name, "steps": sampler.steps, "sampler_options": sampler.settings(), "seed": cfg.seed,
        "guidance": guidance_record,
        "labels": labels_setting(cfg.labels, ckpt.model_config.num_classes, cfg.num),
        "vae": {"identity": decoder.identity, "latent_norm": decoder.norm.record()},
        "precision": precision,
        "quantize": cfg.quantize,
        "tiny_random": decoder.identity.get("kind") == TINY_RANDOM,
    }
    return json.loads(json.dumps(settings))


# --- sample.json's settings as every reader checks them (torch-free: `redi preview` reads them) ---

@dataclass(frozen=True)
class PosthocRef:
    """A `redi ema` reconstruction's σ_rel and step."""

    sigma_rel: Annotated[float, Range(0, lo_open=True)]
    step: Annotated[int, Range(0)]


@dataclass(frozen=True)
class CheckpointRef:
    """`settings.checkpoint` (and AutoGuidance's `guide`): which weights of which file (`checkpoint_record`)."""

    sha256: str | None
    step: Annotated[int | None, Range(0)]
    weights: Annotated[str, OneOf(("ema", "model"))]
    posthoc_ema: PosthocRef | None = None
    model: str | None = None
    """The guide's model name (AutoGuidance)."""


@dataclass(frozen=True)
class GuidanceRecord:
    """`settings.guidance`: the mode, the scales that apply (the others 1) and the guided noise levels."""

    mode: Annotated[str, OneOf(GUIDANCE_MODES + AUTOGUIDANCE_MODES)]
    cfg_scale: Annotated[float, Range(0)]
    rg_scale: Annotated[float, Range(0)]
    cfg_channels: Literal["vae", "all"]
    cls_cfg_scale: Annotated[float | None, Range()]
    interval: tuple[Annotated[float, Range(0, 1)], Annotated[float, Range(0, 1)]] | None
    ag_scale: Annotated[float | None, Range(0)] = None
    guide: CheckpointRef | None = None


@dataclass(frozen=True)
class ModelRef:
    """`settings.model`: the network's name, method, representation drop and config (ModelConfig's fields)."""

    name: str | None
    method: str | None
    rep_drop: Annotated[float, Range(0, 1, hi_open=True)]
    config: dict[str, Any]


@dataclass(frozen=True)
class DecoderRef:
    """`settings.vae`: the VAE that decoded and the normalisation it inverted."""

    identity: Annotated[dict[str, Any], Shaped(Identity)]
    latent_norm: Annotated[dict[str, Any], Shaped(LatentNorm)]


@dataclass(frozen=True)
class SampleSettings:
    """sample.json `settings` as `sample_settings` writes them: everything that decides the pixels of image i."""

    checkpoint: CheckpointRef
    model: ModelRef
    sampler: str
    steps: Annotated[int | None, Range(1)]
    """None: an adaptive solver."""
    sampler_options: dict[str, Any]
    seed: Annotated[int, Range(0)]
    guidance: GuidanceRecord
    labels: dict[str, Any]
    """sampler/labels.py's labels_setting."""
    vae: DecoderRef
    precision: str
    quantize: str
    tiny_random: bool


def describe_settings(s: dict[str, Any]) -> str:
    """One line of the settings that shape a sample (sample.json's): model, step, weights, guidance, sampler, seed."""
    g = s["guidance"]
    ag = f" {g['ag_scale']:g}" if "ag_scale" in g else ""
    scales = {"none": "", "cfg": f" {g['cfg_scale']:g}", "rg": f" {g['rg_scale']:g}",
              "cfg+rg": f" {g['cfg_scale']:g}+{g['rg_scale']:g}", "autoguidance": ag,
              "autoguidance+rg": f"{ag}+{g['rg_scale']:g}"}.get(g["mode"], "")
    if "cfg" in g["mode"] and g.get("cfg_channels") == "all":
        scales += " on all channels"
    step = s["checkpoint"]["step"]
    return (f"{s['model']['name']} {s['model']['method']}, step {step:,}, " if step is not None else
            f"{s['model']['name']} {s['model']['method']}, ") + (
            f"{_weights(s['checkpoint'])} weights, guidance {g['mode']}{scales}, {s['sampler']} "
            f"{s['steps'] if s['steps'] is not None else 'adaptive'} steps, seed {s['seed']}"
            + (", tiny-random VAE" if s.get("tiny_random") else ""))


def _weights(checkpoint: dict[str, Any]) -> str:
    """'EMA', 'raw', 'untrained (init)', or a reconstruction's 'EMA σ_rel 0.1'."""
    posthoc = checkpoint.get("posthoc_ema")
    if isinstance(posthoc, dict):
        return f"EMA σ_rel {posthoc['sigma_rel']:g}"
    return {"ema": "EMA", "model": "raw", "init": "untrained (init)"}.get(checkpoint["weights"], str(checkpoint["weights"]))


def checkpoint_record(ckpt: Checkpoint, weights: str) -> dict[str, Any]:
    """Which weights were sampled: the file's SHA-256 and step, ema or model, and for a `redi ema` reconstruction its
    σ_rel (what `redi info` plots against)."""
    record: dict[str, Any] = {"sha256": ckpt.sha256, "step": ckpt.step, "weights": weights}
    if ckpt.posthoc_ema is not None:
        record["posthoc_ema"] = {"sigma_rel": ckpt.posthoc_ema["sigma_rel"], "step": ckpt.posthoc_ema["step"]}
    return record

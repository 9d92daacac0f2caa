"""Convert checkpoints of the public DiT, SiT, REPA, REG and ReDi code into redi checkpoints.

Every public network descends from facebookresearch/DiT `models.py`, so most keys already match ours:
`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `pos_embed`,
`blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}`, `final_layer.{linear, adaLN_modulation.1}`.
What differs, per origin:

- REPA (sihyun-yu/REPA `models/sit.py`): `projectors.0.{0,2,4}` → `projector.{0,2,4}` (further projectors, for
  other encoders, are dropped); legacy files hold `decoder_blocks.i` = `blocks.(i + encoder depth)`
  (REPA `utils.load_legacy_checkpoints`).
- REG (Martinser/REG, REPA's code plus one class token): as REPA, and `cls_projectors2` → `cls_embedder`,
  `wg_norm` → `cls_norm`, `final_layer.linear_cls` kept; its `pos_embed` has a leading zero row for the class
  token, dropped (our class token gets no position embedding, which is the same map).
- ReDi (zelaki/ReDi `models.py`): one `x_embedder` over 4 + r channels = our merged fusion; the optional
  `projector` (REPA loss) keeps its name.
- Learned sigma: SiT releases (and ReDi built with learn_sigma) predict 2C channels and their forward keeps the
  first C (`x, _ = x.chunk(2, dim=1)`): we keep the mean rows of `final_layer.linear`. DiT keeps both halves
  (its DDPM sampler uses the variance, and so does ours).

Time: the SiT code (and ReDi's, built on it) uses x_t = t·x_0 + (1 − t)·ε with t = 1 the data and predicts
v = x_0 − ε; ours (REPA/REG) uses x_t = (1 − t)·x_0 + t·ε, v = ε − x_0. So v_ours(x, t) = −v_sit(x, 1 − t).
Both changes are linear in the weights and are folded into them: the sinusoidal features at 1 − t are a fixed
rotation of those at t (cos(f − tf) = cos f·cos tf + sin f·sin tf, sin(f − tf) = sin f·cos tf − cos f·sin tf),
absorbed by `t_embedder.mlp.0`, and the sign flip is absorbed by the output layer. The converted network is a
plain redi network that needs no special case anywhere.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor

from redi.common.atomic import sha256_file
from redi.common.errors import UserError
from redi.common.public_files import load_public_checkpoint
from redi.common.flags import OneOf
from redi.common.schema import Range, check_ranges
from redi.pipeline.vaes import latent_space, sd_vae_config
from redi.trainer.checkpoint import Checkpoint, ShardSummary
from redi.trainer.config import TrainConfig
from redi.trainer.models import REPA_DEPTHS, SIZES, ModelConfig, TimestepEmbedder, build_model
from redi.trainer.objectives import WEIGHTINGS

SD_VAE = latent_space(sd_vae_config())  # every public origin models SD-VAE's latents (4 channels, f8)
VAE_CHANNELS = SD_VAE.channels
DEFAULT_CLASS_DROPOUT = 0.1  # class_dropout_prob of every public model; none of their train.py passes another
VAE = {"id": "stabilityai/sd-vae-ft-ema", "revision": "main", "kind": "hub"}
DINOV2_REG = {"id": "facebook/dinov2-with-registers-base", "revision": "main", "kind": "hub",
              "class": "Dinov2WithRegistersModel", "dim": 768}  # ReDi: torch.hub dinov2_vitb14_reg
DINOV2 = {"id": "facebook/dinov2-base", "revision": "main", "kind": "hub",
          "class": "Dinov2Model", "dim": 768}  # REPA/REG default --enc-type dinov2-vit-b: torch.hub dinov2_vitb14
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes in saved state dicts
LEGACY_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.(.*)$")
BLOCK = re.compile(r"^blocks\.(\d+)\.")
PICKLED = "pickled Python objects (REPA, REG and ReDi training checkpoints store their argparse 'args')"


@dataclass(frozen=True)
class Origin:
    """What a public code base implies about its checkpoints."""

    name: str
    """CLI name: redi | repa | reg | sit | dit."""
    repository: str
    """Where the model definition lives."""
    objective: str
    """Our objective for it: "sit" (flow, velocity) or "dit" (DDPM, ε)."""
    time_convention: str
    """The origin's time direction and prediction, in words (recorded in the converted file)."""
    time_reversed: bool
    """True when t = 1 is data there (SiT code): the conversion folds t → 1 − t and v → −v into the weights."""


SIT_TIME = "SiT transport: x_t = t·x0 + (1−t)·ε, t = 1 is data, v = x0 − ε"
REPA_TIME = "REPA: x_t = (1−t)·x0 + t·ε, t = 1 is noise, v = ε − x0 (as redi)"
ORIGINS: dict[str, Origin] = {
    "redi": Origin("redi", "zelaki/ReDi", "sit", SIT_TIME, True),
    "repa": Origin("repa", "sihyun-yu/REPA", "sit", REPA_TIME, False),
    "reg": Origin("reg", "Martinser/REG", "sit", REPA_TIME, False),
    "sit": Origin("sit", "willisma/SiT", "sit", SIT_TIME, True),
    "dit": Origin("dit", "facebookresearch/DiT", "dit", "DDPM: discrete timestep 0…999 (999 = noise), ε prediction", False),
}


@dataclass(frozen=True)
class ConvertConfig:
    """One `redi convert` run: the flags of `redi convert`."""

    checkpoint: Path
    """Public checkpoint: a DiT/SiT EMA release or a REPA/REG/ReDi training checkpoint (.pt, .pth)."""
    origin: Annotated[str, OneOf(tuple(ORIGINS))]
    """The code that wrote it: redi (zelaki/ReDi), repa, reg, sit (willisma/SiT) or dit."""
    out: Path
    """The redi checkpoint to write (then: redi sample --ckpt OUT)."""
    rep_drop: Annotated[float | None, Range(0, 1, hi_open=True)] = None
    """ReDi: the representation-drop probability it was trained with (RG needs it); default: its args, else 0."""
    repa_depth: Annotated[int | None, Range(1)] = None
    """Block feeding the REPA projector; default: its args (encoder_depth), else 4 for S/B, 8 for L/XL."""
    trust_pickle: bool = False
    """Allow unpickling (training checkpoints store argparse args); unpickling can run code."""
    force: bool = False
    """Replace an existing --out file."""

    def __post_init__(self) -> None:
        """Refuse unknown origins and out-of-range values with one sentence."""
        check_ranges(self)
        if self.origin not in ORIGINS:
            raise UserError(f"Unknown origin {self.origin!r}: choose one of {', '.join(ORIGINS)}.")
        if self.rep_drop is not None and self.origin != "redi":
            raise UserError("--rep-drop applies to ReDi checkpoints only (the other origins have no PC channels).")


@dataclass
class ConvertResult:
    """What a conversion produced (the CLI prints it)."""

    out: Path
    origin: Origin
    model_config: ModelConfig
    train_config: dict[str, Any]
    weights: str  # which weights of the file were taken: "ema", "model" or "state dict"
    step: int  # training step recorded in the file (0 when unknown)
    num_params: int
    source_sha256: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def split_checkpoint(blob: Any, path: Path) -> tuple[dict[str, Tensor], str, dict[str, Any], int]:
    """(state dict, which weights, training args, step): EMA weights when the file has them."""
    if not isinstance(blob, dict):
        raise UserError(f"{path} holds a {type(blob).__name__}, not a state dict or a checkpoint dict.")
    if all(isinstance(v, Tensor) for v in blob.values()):
        return blob, "state dict", {}, 0
    for name in ("ema", "model"):
        if isinstance(blob.get(name), dict):
            raw = blob.get("args")
            args = vars(raw) if hasattr(raw, "__dict__") else raw if isinstance(raw, dict) else {}
            step = blob.get("steps", blob.get("step", 0))
            return blob[name], name, args, int(step) if isinstance(step, int) else 0
    raise UserError(f"{path} has neither weights ('ema' or 'model') nor a plain state dict "
                    f"(keys: {', '.join(map(str, blob))}).")


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP ("module.") and torch.compile ("_orig_mod.") prefixes from every key."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _num_blocks(state: dict[str, Tensor]) -> int:
    """Number of `blocks.i` entries (transformer blocks) in a state dict."""
    return 1 + max((int(m.group(1)) for k in state if (m := BLOCK.match(k))), default=-1)


def unfold_legacy_blocks(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int | None]:
    """REPA legacy layout: `decoder_blocks.i` → `blocks.(i + k)`, k = number of `blocks`; k is None if not legacy."""
    if not any(LEGACY_BLOCK.match(k) for k in state):
        return state, None
    encoder_depth = _num_blocks(state)
    out = {}
    for key, value in state.items():
        m = LEGACY_BLOCK.match(key)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else key] = value
    return out, encoder_depth


def _require(state: dict[str, Tensor], key: str, origin: Origin) -> Tensor:
    if key not in state:
        raise UserError(f"The checkpoint has no '{key}': it is not a {origin.name} ({origin.repository}) model.")
    return state[key]


def _size_name(depth: int, hidden: int) -> str:
    """Our backbone name for (depth, hidden), e.g. (28, 1152) → "XL"."""
    for name, (d, h, _) in SIZES.items():
        if (d, h) == (depth, hidden):
            return name
    raise UserError(f"No redi backbone has {depth} blocks of width {hidden} (known: {', '.join(SIZES)}).")


def _check_args(args: dict[str, Any]) -> None:
    """Refuse settings of the training args that our network or objective does not implement."""
    if args.get("qk_norm"):
        raise UserError("The checkpoint was trained with --qk-norm, which redi's attention does not implement.")
    path_type = str(args.get("path_type", "linear")).lower()
    if path_type != "linear":
        raise UserError(f"The checkpoint uses the {path_type!r} interpolant; redi implements the linear one only.")
    prediction = str(args.get("prediction", "v")).lower()
    if prediction not in ("v", "velocity"):
        raise UserError(f"The checkpoint predicts {prediction!r}; redi's SiT objective predicts the velocity.")
    if args.get("weighting", "uniform") not in WEIGHTINGS:
        raise UserError(f"The checkpoint was trained with --weighting {args['weighting']}; redi implements "
                        f"{' and '.join(WEIGHTINGS)}.")


def _backbone(state: dict[str, Tensor], origin: Origin, args: dict[str, Any]) -> tuple[str, int, int, int]:
    """(size name, patch, latent side, PCA rank) from the patch embedding, the blocks and the position table."""
    proj = _require(state, "x_embedder.proj.weight", origin)  # (D, C_in, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    size = _size_name(_num_blocks(state), hidden)
    tokens = _require(state, "pos_embed", origin).shape[1] - int(origin.name == "reg")  # REG: + class-token row
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UserError(f"The checkpoint's position embedding has {tokens} patch rows, not a square grid.")
    pca_rank = in_channels - VAE_CHANNELS
    if origin.name != "redi" and pca_rank != 0:
        raise UserError(f"A {origin.name} checkpoint takes {VAE_CHANNELS} latent channels, this one {in_channels}: "
                        "is it a ReDi model?")
    if origin.name == "redi" and pca_rank < 1:
        raise UserError(f"A ReDi checkpoint takes {VAE_CHANNELS} + r channels with r ≥ 1, this one {in_channels}.")
    if "pca_rank" in args and int(args["pca_rank"]) != pca_rank:
        raise UserError(f"The checkpoint's args say --pca-rank {args['pca_rank']}, its input {pca_rank} PC channels.")
    return size, patch, grid * patch, pca_rank


def label_dropout(origin: Origin, args: dict[str, Any], notes: list[str]) -> float:
    """The label dropout the network actually trained with.

    Every public SiT/DiT keeps its class_dropout_prob default, 0.1 (REPA/REG's train.py never passes `--cfg-prob`
    to it; it only sets `use_cfg`, which the network ignores). REPA/REG's `--legacy` also dropped labels in
    train.py with probability cfg_prob before the network's own 0.1: a label then survived both.
    """
    if origin.name in ("repa", "reg") and args.get("legacy"):
        cfg_prob = float(args.get("cfg_prob", DEFAULT_CLASS_DROPOUT))
        p = 1.0 - (1.0 - cfg_prob) * (1.0 - DEFAULT_CLASS_DROPOUT)
        notes.append(f"--legacy: labels dropped twice (--cfg-prob {cfg_prob:g}, then the network's "
                     f"{DEFAULT_CLASS_DROPOUT:g}): recorded label dropout {p:g}")
        return p
    return DEFAULT_CLASS_DROPOUT


def _label_table(state: dict[str, Tensor], origin: Origin, args: dict[str, Any],
                 notes: list[str]) -> tuple[int, float]:
    """(number of classes, label dropout): a table of num_classes + 1 rows has the null (CFG) row."""
    rows = _require(state, "y_embedder.embedding_table.weight", origin).shape[0]
    num_classes = int(args.get("num_classes", rows - 1))
    if rows not in (num_classes, num_classes + 1):
        raise UserError(f"The label table has {rows} rows for {num_classes} classes.")
    return num_classes, label_dropout(origin, args, notes) if rows == num_classes + 1 else 0.0


def _projector(state: dict[str, Tensor], origin: Origin, args: dict[str, Any], size: str, repa_depth: int | None,
               legacy_depth: int | None, notes: list[str]) -> tuple[int, int]:
    """(REPA depth, REPA width): (0, 768) without a projector; the depth from the flag, the args or the paper."""
    key = "projectors.0.4.weight" if origin.name in ("repa", "reg") else "projector.4.weight"
    if key not in state:
        if origin.name == "reg":
            raise UserError("A REG checkpoint has REPA projectors (projectors.0); this one has none.")
        return 0, DINOV2["dim"]
    if repa_depth is None:
        known = args.get("encoder_depth", args.get("repa_layer", legacy_depth))
        repa_depth = int(known) if known is not None else REPA_DEPTHS[size]
        if known is None:
            notes.append(f"projector depth unknown: set to the paper's {repa_depth} for {size} (--repa-depth to change)")
    return repa_depth, state[key].shape[0]


def infer_model_config(state: dict[str, Tensor], origin: Origin, args: dict[str, Any], repa_depth: int | None,
                       legacy_depth: int | None, notes: list[str]) -> ModelConfig:
    """Our ModelConfig from the shapes of the public state dict (and its training args when known)."""
    size, patch, input_size, pca_rank = _backbone(state, origin, args)
    in_channels = VAE_CHANNELS + pca_rank
    out_channels = _require(state, "final_layer.linear.weight", origin).shape[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"The output layer predicts {out_channels} channels for {in_channels} input channels.")
    learn_sigma = out_channels == 2 * in_channels
    if learn_sigma and origin.objective == "sit":
        notes.append("learned-sigma head: kept the mean half, as the origin's forward does")
    if origin.objective == "dit" and not learn_sigma:
        notes.append("no learned sigma: our DDPM sampler uses the fixed small posterior variance")
    num_classes, class_dropout = _label_table(state, origin, args, notes)
    depth, repa_dim = _projector(state, origin, args, size, repa_depth, legacy_depth, notes)
    return ModelConfig(
        size=size, objective=origin.objective, input_size=input_size, patch_size=patch, vae_channels=VAE_CHANNELS,
        pca_rank=pca_rank,
        fusion="merged", num_classes=num_classes, class_dropout=class_dropout, repa_depth=depth, repa_dim=repa_dim,
        reg_token=origin.name == "reg", learn_sigma=learn_sigma and origin.objective == "dit",
    )


def mean_half_rows(weight_rows: int, out_channels: int) -> Tensor:
    """(rows,) bool: the rows of an output Linear over (p, q, C) features that predict channels c < C/2."""
    return torch.arange(weight_rows).remainder(out_channels) < out_channels // 2


def map_state_dict(state: dict[str, Tensor], origin: Origin, cfg: ModelConfig, notes: list[str]) -> dict[str, Tensor]:
    """Rename and reshape the public keys to ours (see the module docstring)."""
    out: dict[str, Tensor] = {}
    dropped_projectors = set()
    for key, value in state.items():
        if key.startswith("projectors."):
            index, _, rest = key.removeprefix("projectors.").partition(".")
            if index != "0":
                dropped_projectors.add(index)
                continue
            key = f"projector.{rest}"
        elif key.startswith("cls_projectors2."):
            key = "cls_embedder." + key.removeprefix("cls_projectors2.")
        elif key.startswith("wg_norm."):
            key = "cls_norm." + key.removeprefix("wg_norm.")
        out[key] = value
    if dropped_projectors:
        notes.append(f"dropped {len(dropped_projectors)} extra REPA projector(s) (kept projectors.0)")
    if cfg.reg_token:
        pos = out["pos_embed"]  # (1, 1 + L, D): row 0 belongs to the class token
        if pos[:, 0].abs().max() > 0:
            raise UserError("The REG checkpoint's class-token position embedding is not zero; redi's class token has none.")
        out["pos_embed"] = pos[:, 1:].contiguous()  # (1, L, D)
    out_channels = out["final_layer.linear.weight"].shape[0] // (cfg.patch_size**2)
    if out_channels == 2 * cfg.in_channels and not cfg.learn_sigma:
        keep = mean_half_rows(out["final_layer.linear.weight"].shape[0], out_channels)
        out["final_layer.linear.weight"] = out["final_layer.linear.weight"][keep].contiguous()  # (p·p·C, D)
        out["final_layer.linear.bias"] = out["final_layer.linear.bias"][keep].contiguous()  # (p·p·C,)
    rows = out["y_embedder.embedding_table.weight"]
    if rows.shape[0] == cfg.num_classes:
        out["y_embedder.embedding_table.weight"] = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        notes.append("no null-label row (trained without label dropout): appended a zero row; CFG is meaningless")
    return out


def fold_time_reversal(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights computing −v(x, 1 − t) of the given ones: rotate the timestep features, negate the outputs."""
    out = dict(state)
    w = state["t_embedder.mlp.0.weight"]  # (D, F): columns [cos(t·f_k) …, sin(t·f_k) …]
    half = w.shape[1] // 2
    phase = TimestepEmbedder.timestep_embedding(torch.ones(1), w.shape[1])[0].double()  # (F,) [cos f_k, sin f_k]
    cos, sin = phase[:half], phase[half:2 * half]  # (F/2,) each
    wc, ws = w[:, :half].double(), w[:, half:2 * half].double()  # (D, F/2) each
    folded = torch.cat([wc * cos + ws * sin, wc * sin - ws * cos], dim=1)  # (D, F): W·M, emb(1 − t) = M·emb(t)
    out["t_embedder.mlp.0.weight"] = torch.cat([folded, w[:, 2 * half:].double()], dim=1).to(w.dtype)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias",
                "final_layer.linear_cls.weight", "final_layer.linear_cls.bias"):
        if key in out:
            out[key] = -out[key]  # v = x0 − ε → ε − x0
    return out


def check_loads(state: dict[str, Tensor], cfg: ModelConfig) -> int:
    """Strict load into our network built on the meta device (no memory); returns the parameter count."""
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # assign: checks keys and shapes, copies nothing
    except RuntimeError as e:
        first = " ".join(str(e).split())[:400]
        raise UserError(f"The converted weights do not fit redi's {cfg.size} network: {first}") from None
    return sum(p.numel() for p in model.parameters())


def train_config(origin: Origin, cfg: ModelConfig, args: dict[str, Any], rep_drop: float | None,
                 out: Path, notes: list[str]) -> dict[str, Any]:
    """The TrainConfig the origin implies, as the plain dict our checkpoints carry."""
    method = {"redi": "redi+repa" if cfg.repa_depth else "redi", "repa": "repa", "reg": "reg"}.get(origin.name, "baseline")
    if cfg.pca_rank and rep_drop is None:
        known = args.get("dino_drop_prob")
        if "dino_drop_prob" not in args:
            notes.append("representation drop unknown: recorded 0, so RG is refused (--rep-drop to set it)")
        rep_drop = float(known or 0.0)
    family = "DiT" if cfg.objective == "dit" else "SiT"
    repa_weight = args.get("repa_weight" if origin.name == "redi" else "proj_coeff", 0.5)  # ReDi: --repa-weight
    train = TrainConfig(
        shards="", run=str(out), model=f"{family}-{cfg.size}/{cfg.patch_size}", method=method, pca_rank=cfg.pca_rank,
        rep_drop=rep_drop or 0.0, rep_drop_mode="batch" if cfg.pca_rank else "sample",
        rep_drop_target="clean" if cfg.pca_rank else "noisy",  # ReDi's code: one draw per batch, zeroes z_0
        repa_depth=cfg.repa_depth or None, repa_weight=float(repa_weight),
        cls_weight=float(args.get("cls", 0.03)), learn_sigma=cfg.learn_sigma, unconditional=cfg.num_classes == 1,
        class_dropout=cfg.class_dropout, weighting=str(args.get("weighting", "uniform")),  # REPA/REG --weighting
        resolution=cfg.input_size * SD_VAE.downsampling,
    )
    return train.to_json()


def shard_summary(origin: Origin, cfg: ModelConfig) -> ShardSummary:
    """The data the origin trained on, as far as it is known."""
    resolution = cfg.input_size * SD_VAE.downsampling
    encoder = {"redi": DINOV2_REG, "repa": DINOV2, "reg": DINOV2}.get(origin.name, {})
    return ShardSummary(
        root=None, shards_json_sha256=None, vae=dict(VAE), encoder=dict(encoder), num_samples=None,
        num_classes=cfg.num_classes, resolution=resolution, latent_shape=[cfg.vae_channels, cfg.input_size, cfg.input_size],
        pcs=cfg.pca_rank, grid=cfg.input_size // cfg.patch_size, feature_dim=cfg.repa_dim,
        latent_space=SD_VAE.record(), latent_norm=SD_VAE.config_norm().record(), pca_sha256=None,
    )


def convert_state(state: dict[str, Tensor], origin: Origin, args: dict[str, Any], repa_depth: int | None,
                  notes: list[str]) -> tuple[dict[str, Tensor], ModelConfig]:
    """A public state dict → (our state dict, our ModelConfig); behaviour-preserving under our samplers."""
    if origin.objective == "sit":
        _check_args(args)
    state, legacy_depth = unfold_legacy_blocks(strip_prefixes(state))
    if legacy_depth is not None:
        notes.append(f"legacy REPA layout: decoder_blocks renumbered after {legacy_depth} encoder blocks")
    cfg = infer_model_config(state, origin, args, repa_depth, legacy_depth, notes)
    ours = map_state_dict(state, origin, cfg, notes)
    if origin.time_reversed:
        ours = fold_time_reversal(ours)
        notes.append("time direction folded into the weights: t → 1 − t in t_embedder.mlp.0, v → −v in final_layer")
    return ours, cfg


def convert_checkpoint(cfg: ConvertConfig) -> ConvertResult:
    """`redi convert`: read a public checkpoint, map it onto our network, write a redi checkpoint."""
    start = time.perf_counter()
    origin = ORIGINS[cfg.origin]
    out = Path(cfg.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name the checkpoint file to write.")
    if out.exists() and not cfg.force:
        raise UserError(f"{out} exists; pass --force to replace it.")
    if out.resolve() == Path(cfg.checkpoint).resolve():
        raise UserError("--out must differ from the checkpoint being converted.")
    blob = load_public_checkpoint(cfg.checkpoint, cfg.trust_pickle, PICKLED)
    if isinstance(blob, dict) and "model_config" in blob:  # converting ours would reverse time a second time
        raise UserError(f"{cfg.checkpoint} is already a redi checkpoint: sample it or pass it to --init as it is.")
    state, weights, args, step = split_checkpoint(blob, Path(cfg.checkpoint))
    notes = [f"took the '{weights}' weights" if weights != "state dict" else "plain state dict (an EMA release)"]
    ours, model_cfg = convert_state(state, origin, args, cfg.repa_depth, notes)
    num_params = check_loads(ours, model_cfg)
    ours = {k: v.detach().clone().contiguous() for k, v in ours.items()}  # own memory, off the mmap
    source_sha = sha256_file(Path(cfg.checkpoint))
    train = train_config(origin, model_cfg, args, cfg.rep_drop, out, notes)
    origin_record = {"name": origin.name, "repository": origin.repository, "file": Path(cfg.checkpoint).name,
                     "sha256": source_sha, "weights": weights, "time_convention": origin.time_convention,
                     "time_reversed_into_weights": origin.time_reversed, "notes": list(notes)}
    Checkpoint(step=step, train=train, model_config=model_cfg, shards=shard_summary(origin, model_cfg), model=ours,
               ema=ours, opt=None, origin=origin_record).save(out)
    return ConvertResult(out=out, origin=origin, model_config=model_cfg, train_config=train, weights=weights,
                         step=step, num_params=num_params, source_sha256=source_sha, notes=notes,
                         seconds=time.perf_counter() - start)

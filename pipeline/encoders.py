"""The two frozen encoders: the SD VAE (diffusers `AutoencoderKL`) and DINOv2-with-registers (transformers).

DINOv2 without registers (`facebook/dinov2-base`, transformers' `Dinov2Model`) is accepted too:
it is what REPA and REG aligned with, so `--encoder facebook/dinov2-base` gives their exact
targets (the class is read from the config's `model_type`).

An encoder is named by a hub id, a local directory or `tiny-random` (the same classes with
tiny widths and a fixed seed, for tests and the offline demo). `resolve_*` reads only the
config and returns the identity a manifest records; `load_*` builds the model. The
per-batch maps from uint8 images to stored outputs (`vae_moments`, `dino_tokens`) live
here too, so the sampler and the stages share one definition of the pre-processing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

from pipeline.atomic import read_json
from pipeline.errors import UserError

TINY_RANDOM = "tiny-random"
TINY_SEED = 0  # torch seed of the tiny-random weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def tiny_vae_config() -> dict[str, Any]:
    """AutoencoderKL with 4 blocks (3 downsamplings → latents 4×R/8×R/8) and 8 channels per block."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
        "block_out_channels": [8, 8, 8, 8], "sample_size": 256,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def sd_vae_config() -> dict[str, Any]:
    """The real `sd-vae-ft-ema` architecture (for random-init throughput measurements)."""
    return {**tiny_vae_config(), "layers_per_block": 2, "norm_num_groups": 32, "block_out_channels": [128, 256, 512, 512]}


def tiny_dino_config() -> dict[str, Any]:
    """DINOv2-with-registers with patch 14 at 224 and 4 registers (16×16 tokens at R=256), width 32, 2 layers."""
    return {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 4,
        "patch_size": 14, "image_size": 224, "num_register_tokens": 4, "layerscale_value": 1.0,
    }


def dinov2_base_config() -> dict[str, Any]:
    """The real ViT-B/14 with 4 registers (768 wide, 12 layers, 12 heads) of `dinov2-with-registers-base`."""
    return {**tiny_dino_config(), "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}


DinoModel = Dinov2WithRegistersModel | Dinov2Model
DINO_CLASSES: dict[str, type[DinoModel]] = {"dinov2_with_registers": Dinov2WithRegistersModel, "dinov2": Dinov2Model}


def _vae_class(config: dict[str, Any]) -> type[AutoencoderKL]:
    return AutoencoderKL


def _dino_class(config: dict[str, Any]) -> type[DinoModel]:
    """Dinov2WithRegistersModel (ReDi; also the tiny-random configs, which carry no model_type) or Dinov2Model."""
    kind = config.get("model_type", "dinov2_with_registers")
    if kind not in DINO_CLASSES:
        raise UserError(f"The --encoder config is a {kind!r} model; expected DINOv2 ({', '.join(DINO_CLASSES)}).")
    return DINO_CLASSES[kind]


def _build_vae(config: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL.from_config(config)


def _build_dino(config: dict[str, Any]) -> DinoModel:
    cls = _dino_class(config)
    return cls(cls.config_class(**config))


def _vae_hub_config(name: str, revision: str, offline: bool) -> dict[str, Any]:
    return dict(AutoencoderKL.load_config(name, revision=revision, local_files_only=offline))


def _dino_hub_config(name: str, revision: str, offline: bool) -> dict[str, Any]:
    return AutoConfig.from_pretrained(name, revision=revision, local_files_only=offline).to_dict()


@dataclass(frozen=True)
class EncoderFamily:
    """What differs between the two frozen encoders."""

    what: str  # words for messages
    flag: str  # the CLI option that names it
    example_dir: str  # a plausible local directory for the error message
    model_class: Callable[[dict[str, Any]], type[torch.nn.Module]]  # config → class (the identity records it)
    tiny_config: Callable[[], dict[str, Any]]  # the tiny-random architecture
    dim_key: str  # config field recorded as the identity's "dim"
    config_keys: tuple[str, ...]  # fields every config of this family has (a config without them is another model)
    hub_config: Callable[[str, str, bool], dict[str, Any]]  # (id, revision, cached only) → config, no weights
    build: Callable[[dict[str, Any]], torch.nn.Module]  # config → randomly initialised model


VAE = EncoderFamily(
    "VAE", "--vae", "/path/to/sd-vae-ft-ema", _vae_class, tiny_vae_config, "latent_channels",
    ("latent_channels", "block_out_channels"), _vae_hub_config, _build_vae,
)
DINO = EncoderFamily(
    "DINOv2 encoder", "--encoder", "/path/to/dinov2-with-registers-base", _dino_class,
    tiny_dino_config, "hidden_size", ("hidden_size", "patch_size"), _dino_hub_config, _build_dino,
)


@dataclass(frozen=True)
class EncoderRef:
    """An encoder resolved to its config and manifest identity, before any weights are read."""

    family: EncoderFamily
    name: str  # hub id, local directory or "tiny-random"
    revision: str  # hub revision asked for ("main" unless pinned)
    config: dict[str, Any]  # the model config (diffusers / transformers fields)
    identity: dict[str, Any]  # {"kind", "id", "revision" | "hash", "class", "dim"} for the manifest

    @property
    def tiny_random(self) -> bool:
        return self.identity["kind"] == TINY_RANDOM


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for cached files only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve(family: EncoderFamily, name: str, revision: str = "main") -> EncoderRef:
    """Find the config of `name` (tiny-random, local directory or hub id) without loading weights."""
    base = {"id": name}
    if name == TINY_RANDOM:
        config = family.tiny_config()
        ident = {**base, "kind": TINY_RANDOM, "hash": _config_hash(config, []), "seed": TINY_SEED}
    elif Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is not a model directory (no config.json there); pass {family.flag} DIR or a hub id.")
        config = read_json(path / "config.json", dict, f"pass {family.flag} a model directory or a hub id")
        weights = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        ident = {**base, "id": str(path), "kind": "local", "hash": _config_hash(config, weights)}
    else:
        try:
            with _quiet_hub():
                config = family.hub_config(name, revision, offline())
        except (OSError, ValueError):  # missing files, no network, or an id the hub rejects
            raise _unavailable(family, name, revision) from None
        ident = {**base, "kind": "hub", "revision": revision}
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            ident["commit"] = Path(cached).parent.name  # …/snapshots/<commit>/config.json
    ident["class"] = family.model_class(config).__name__
    if missing := [k for k in family.config_keys if k not in config]:
        kind = config.get("_class_name") or config.get("model_type") or "an unknown model"
        raise UserError(f"{name} is not a {family.what}: its config ({kind}) lacks {', '.join(missing)}; pass "
                        f"{family.flag} a {family.what} directory or hub id.")
    ident["dim"] = int(config[family.dim_key])
    return EncoderRef(family, name, revision, config, ident)


def load(ref: EncoderRef, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The frozen model in eval mode: random with a fixed seed for tiny-random, else the pretrained weights."""
    if ref.tiny_random:
        model = random_init(ref.family, ref.config, TINY_SEED)
    else:
        kind = ref.identity["kind"]
        source = ref.identity["id"]
        hub = {"revision": ref.revision, "local_files_only": offline()} if kind == "hub" else {}
        try:
            with _quiet_hub():
                model = ref.family.model_class(ref.config).from_pretrained(source, **hub)  # type: ignore[attr-defined]
        except OSError:
            raise _unavailable(ref.family, ref.name, ref.revision) from None
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def random_init(family: EncoderFamily, config: dict[str, Any], seed: int) -> torch.nn.Module:
    """`family`'s model built from `config` with weights drawn from torch seed `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(config)


def load_vae(
    name: str, revision: str = "main", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The frozen VAE and its identity (the sampler uses this to decode)."""
    ref = resolve(VAE, name, revision)
    return load(ref, device, dtype), ref.identity  # type: ignore[return-value]


def vae_downsampling(config: dict[str, Any]) -> int:
    """Spatial factor between image and latent (8 for the SD VAE: one halving per block but the last)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def dino_side(resolution: int) -> int:
    """DINOv2 input side for crop resolution R: 224·R/256 (SPEC §3)."""
    return 224 * resolution // 256


def vae_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, R, R, 3) images → float32 (N, 2C, R/f, R/f): posterior mean, then std = exp(½·logvar)."""
    x = images.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1  # (N, 3, R, R) in [-1, 1]
    posterior = vae.encode(x).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()  # (N, 2C, R/f, R/f)


def dino_preprocess(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, R, R, 3) → float32 (N, 3, S, S): /255, ImageNet mean/std, THEN bicubic resize to S = 224·R/256."""
    x = images.permute(0, 3, 1, 2).float() / 255  # (N, 3, R, R) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std  # (N, 3, R, R)
    side = dino_side(resolution)
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=False)  # (N, 3, S, S)


def dino_tokens(model: DinoModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, R, R, 3) → float32 CLS (N, D) and patch tokens (N, P, D) after the final LayerNorm."""
    x = dino_preprocess(images, images.shape[1]).to(model.dtype)  # (N, 3, S, S)
    h = model(pixel_values=x).last_hidden_state  # (N, 1 + registers + P, D)
    cls = h[:, 0]  # (N, D)
    patch = h[:, 1 + getattr(model.config, "num_register_tokens", 0) :]  # (N, P, D), registers dropped
    return cls.float(), patch.float()


def describe_identity(identity: dict[str, Any]) -> str:
    """One line for logs: `id@revision (class, dim D)`, or `id#hash…` for local and tiny-random encoders."""
    pin = f"@{identity['revision']}" if "revision" in identity else f"#{str(identity.get('hash', ''))[:12]}"
    return f"{identity.get('id')}{pin} ({identity.get('class')}, dim {identity.get('dim')})"


def _config_hash(config: dict[str, Any], weights: list[tuple[str, int]]) -> str:
    """SHA-256 of a config and the names and sizes of the weight files next to it."""
    text = json.dumps(config, sort_keys=True) + "".join(f"\n{n}\t{s}" for n, s in weights)
    return hashlib.sha256(text.encode()).hexdigest()


def _unavailable(family: EncoderFamily, name: str, revision: str) -> UserError:
    return UserError(
        f"Cannot load the {family.what} '{name}' (revision {revision}): its weights are neither in the "
        f"Hugging Face cache nor downloadable here; pass a local directory instead, e.g. {family.flag} {family.example_dir}."
    )


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence the deprecation chatter diffusers triggers inside huggingface_hub."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        yield

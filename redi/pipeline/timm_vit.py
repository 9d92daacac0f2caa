"""REPA's remaining encoders, MoCo v3 and DINOv1: their timm-style ViT checkpoints as transformers' `ViTModel`.

REPA (`utils.py` load_encoders) builds MoCo v3 ViT-B/L from RCG's checkpoints (`models/mocov3_vit.py`: timm's
VisionTransformer) and DINOv1 ViT-B/16 from DINO's (`models/dinov1.py`, not in REPA's repository). Both files are
timm-style state dicts: `cls_token`, `pos_embed` (1, 1 + 14², D: trained at 224 px), `patch_embed.proj`,
`blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` and `norm`. `ViTModel` is the same network (pre-norm
blocks, one CLS token, qkv bias, exact GELU, LayerNorm eps 1e-6 here). `redi convert-encoder FILE --from mocov3|dinov1
--out DIR` writes a ViTModel directory in the hub's key names (those of transformers' own DINO conversion, which every
transformers version loads), and `redi features --encoder DIR` reads it like any other model. The position table
stays the checkpoint's: the features stage resamples it once to the token grid, as REPA does
(`representations.fit_positions`). The checkpoint files are the user's; nothing here downloads them.
"""
from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import ViTConfig, ViTModel
from transformers.utils import logging as hf_logging

from redi.common.atomic import atomic_write_json, atomic_write_with, sha256_file
from redi.common.errors import UserError
from redi.common.flags import OneOf
from redi.common.schema import Range, check_ranges
from redi.common.public_files import load_public_checkpoint
from redi.pipeline import positions

LAYER_NORM_EPS = 1e-6  # timm's, MoCo v3's and DINO's ViTs (partial(nn.LayerNorm, eps=1e-6)); ViTConfig's default is 1e-12
BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
BLOCK_KEYS = {  # timm block parameter → the hub's ViTModel layer parameter (qkv is split in three)
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
TOP_KEYS = {  # timm parameter outside the blocks → the hub's ViTModel parameter
    "cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
}
RCG_NAMES = {  # RCG's MoCo v3 ViT-L names four parameters wrongly (REPA fix_mocov3_state_dict)
    "blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
    "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2",
}


def _mocov3_state(blob: Any) -> dict[str, Tensor]:
    """MoCo v3 training checkpoints (moco-v3, RCG): the base encoder of `state_dict`, without its projection head."""
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise UserError("A MoCo v3 checkpoint holds its weights under 'state_dict' (moco-v3's vit-b-300ep.pth.tar, "
                        f"RCG's mocov3_vitb.pth); this file holds {_keys(blob)}.")
    prefix = "module.base_encoder."
    state = {k.removeprefix(prefix): v for k, v in blob["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"The MoCo v3 checkpoint's state_dict has no '{prefix}…' weights (it holds "
                        f"{_keys(blob['state_dict'])}).")
    for wrong, right in RCG_NAMES.items():
        state = {k.replace(wrong, right) if k.startswith(wrong + ".") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("head.")}  # the MoCo projector


def _dinov1_state(blob: Any) -> dict[str, Tensor]:
    """DINO's released backbone (dino_vitbase16_pretrain.pth): the timm-style state dict itself."""
    if not isinstance(blob, dict) or "pos_embed" not in blob:
        raise UserError("A DINOv1 checkpoint is DINO's backbone file (dino_vitbase16_pretrain.pth, a plain state dict "
                        f"with pos_embed); this file holds {_keys(blob)}.")
    return {k: v for k, v in blob.items() if not k.startswith("head.")}


def _keys(blob: Any) -> str:
    if not isinstance(blob, dict):
        return f"a {type(blob).__name__}"
    names = list(map(str, blob))
    return ", ".join(names[:6]) + (", …" if len(names) > 6 else "") if names else "nothing"


@dataclass(frozen=True)
class Origin:
    """A method whose ViT checkpoints REPA aligns with."""

    name: str  # `--from`
    title: str  # words for messages and docs
    files: str  # the released files REPA uses
    heads: dict[int, int]  # width → attention heads of the released architectures (a state dict does not say)
    state: Callable[[Any], dict[str, Tensor]]  # the loaded file → its timm-style encoder state dict
    sincos: bool  # the table is MoCo v3's fixed 2-D sin-cos (rows first), not learned


ORIGINS = {
    "mocov3": Origin("mocov3", "MoCo v3", "RCG's mocov3_vitb.pth / mocov3_vitl.pth, moco-v3's vit-b-300ep.pth.tar",
                     {384: 12, 768: 12, 1024: 16, 1280: 16}, _mocov3_state, True),
    "dinov1": Origin("dinov1", "DINOv1", "DINO's dino_vitbase16_pretrain.pth", {384: 6, 768: 12}, _dinov1_state, False),
}


def vit_fields(state: dict[str, Tensor], heads: int, origin: str) -> dict[str, Any]:
    """The ViTConfig of a timm-style state dict: width, depth, MLP and patch read from the weights, the input side
    from the table (patch · n for n × n positions), `heads` given; `converted_from` records the origin."""
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight") if k not in state]
    if missing:
        raise UserError(f"The checkpoint is not a timm-style ViT: it lacks {', '.join(missing)} (it holds {_keys(state)}).")
    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    if side * side != state["pos_embed"].shape[1] - 1 or width % heads:
        raise UserError(f"The checkpoint's ViT is not one redi converts: {state['pos_embed'].shape[1] - 1} positions "
                        f"(not a square grid after one CLS token) or width {width} not divisible by {heads} heads.")
    depth = 1 + max(int(m.group(1)) for k in state if (m := BLOCK.match(k)))
    return {"model_type": "vit", "hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
            "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0], "patch_size": patch,
            "image_size": patch * side, "layer_norm_eps": LAYER_NORM_EPS, "hidden_act": "gelu", "qkv_bias": True,
            "converted_from": {"format": origin}}


def hub_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """timm-style keys → the hub's ViTModel keys (encoder.layer.i.attention.attention.query, …); qkv split in three.
    A key neither maps is refused: the checkpoint holds a part that ViTModel lacks (a ConvStem, a pooling norm)."""
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in TOP_KEYS:
            ours[TOP_KEYS[key]] = value
        elif (m := BLOCK.match(key)) and int(m.group(1)) < depth:
            layer, name = f"encoder.layer.{m.group(1)}.", m.group(2)
            param = name.rsplit(".", 1)
            if param[0] == "attn.qkv":  # (3D, D) rows: q, k, v (timm's qkv.reshape(B, N, 3, heads, D / heads))
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    ours[f"{layer}attention.attention.{part}.{param[1]}"] = chunk
            elif param[0] in BLOCK_KEYS:
                ours[f"{layer}{BLOCK_KEYS[param[0]]}.{param[1]}"] = value
            else:
                raise UserError(f"The checkpoint's {key} has no place in a ViTModel (a plain timm ViT block has "
                                "norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).")
        else:
            raise UserError(f"The checkpoint's {key} has no place in a ViTModel; redi converts plain timm ViTs "
                            "(cls_token, pos_embed, patch_embed, blocks, norm).")
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in ours.items()}


def write_model(out: Path, fields: dict[str, Any], state: dict[str, Tensor]) -> None:
    """A ViTModel directory: model.safetensors, then config.json (whose presence makes it a model directory)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config = ViTConfig(**{k: v for k, v in fields.items() if k != "model_type"}).to_dict()
    atomic_write_json(out / "config.json", {**config, "architectures": ["ViTModel"]})


def load_model(source: str | Path, **hub: Any) -> tuple[ViTModel, dict[str, list[str]]]:
    """A ViTModel directory without the pooler (REPA takes the tokens), and transformers' loading report."""
    return ViTModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True, **hub)


def tiny_config() -> dict[str, Any]:
    """`tiny-random:vit`: a MoCo v3 ViT/16 trained at 224 (14×14 table), 32 wide, 2 layers, 2 heads, MLP 64."""
    return {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "patch_size": 16, "image_size": 224, "layer_norm_eps": LAYER_NORM_EPS,
            "hidden_act": "gelu", "qkv_bias": True, "converted_from": {"format": "mocov3"}}


def random_state(config: dict[str, Any]) -> dict[str, Tensor]:
    """A timm-style state dict of `config`'s shape, drawn from torch's RNG: the keys a real checkpoint holds and, for
    MoCo v3, its fixed sin-cos table (DINO's is learned: random here)."""
    d, mlp, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    n = config["image_size"] // p
    noise = lambda *shape: 0.02 * torch.randn(*shape)
    state = {"cls_token": noise(1, 1, d), "patch_embed.proj.weight": noise(d, 3, p, p), "patch_embed.proj.bias": noise(d),
             "norm.weight": 1 + noise(d), "norm.bias": noise(d)}
    sincos = ORIGINS[config.get("converted_from", {}).get("format", "mocov3")].sincos
    state["pos_embed"] = positions.sincos(d, n, rows_first=True, prefix=1) if sincos else noise(1, 1 + n * n, d)
    for i in range(config["num_hidden_layers"]):
        for name, shape in (("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("norm2", (d,)),
                            ("mlp.fc1", (mlp, d)), ("mlp.fc2", (d, mlp))):
            state[f"blocks.{i}.{name}.weight"] = (1 + noise(d)) if name.startswith("norm") else noise(*shape)
            state[f"blocks.{i}.{name}.bias"] = noise(shape[0])
    return state


def random_model(config: dict[str, Any]) -> ViTModel:
    """`tiny-random:vit`: a random timm-style state dict through the converter's files and loader, as a real one."""
    state = random_state(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar: tiny-random models load silently
    try:
        with tempfile.TemporaryDirectory(prefix="redi-vit-") as tmp:
            write_model(Path(tmp), config, hub_state(state, config["num_hidden_layers"]))
            model, _ = load_model(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model


@dataclass(frozen=True)
class EncoderConvertConfig:
    """One `redi convert-encoder` run: the flags of `redi convert-encoder`."""

    checkpoint: Path
    """The public checkpoint file (MoCo v3: RCG's mocov3_vitb.pth or moco-v3's vit-b-300ep.pth.tar; DINOv1: DINO's
    dino_vitbase16_pretrain.pth)."""
    origin: Annotated[str, OneOf(tuple(ORIGINS))]
    """The method that trained it: mocov3 or dinov1."""
    out: Path
    """The model directory to write (then: redi features --encoder OUT)."""
    heads: Annotated[int | None, Range(1)] = None
    """Attention heads; default: the released models' for the checkpoint's width (MoCo v3: 12 at 384/768, 16 at
    1024/1280; DINO: 6 at 384, 12 at 768)."""
    trust_pickle: bool = False
    """Allow unpickling the checkpoint (unpickling can run code)."""
    force: bool = False
    """Replace an existing --out directory's model."""

    def __post_init__(self) -> None:
        """Refuse unknown origins and head counts below 1 with one sentence."""
        check_ranges(self)
        if self.origin not in ORIGINS:
            raise UserError(f"Unknown origin {self.origin!r}: choose one of {', '.join(ORIGINS)}.")


@dataclass(frozen=True)
class EncoderConvertResult:
    """What a conversion wrote (the CLI prints it)."""

    out: Path
    origin: Origin
    config: dict[str, Any]  # the ViTConfig fields written
    num_params: int
    seconds: float


def convert_encoder(cfg: EncoderConvertConfig) -> EncoderConvertResult:
    """`redi convert-encoder`: a MoCo v3 or DINOv1 checkpoint → a ViTModel directory that `redi features` loads."""
    start = time.perf_counter()
    origin, out = ORIGINS[cfg.origin], Path(cfg.out)
    if out.is_file():
        raise UserError(f"--out {out} is a file; name the model directory to write.")
    if (out / "config.json").exists() and not cfg.force:
        raise UserError(f"{out} already holds a model; pass --force to replace it.")
    blob = load_public_checkpoint(cfg.checkpoint, cfg.trust_pickle)
    state = origin.state(blob)
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    heads = cfg.heads or origin.heads.get(width or 0)
    if heads is None:
        raise UserError(f"No released {origin.title} ViT is {width} wide; pass --heads (its attention heads).")
    fields = vit_fields(state, heads, origin.name)
    fields["converted_from"] |= {"file": Path(cfg.checkpoint).name, "sha256": sha256_file(Path(cfg.checkpoint))}
    write_model(out, fields, hub_state(state, fields["num_hidden_layers"]))
    model, info = load_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], f"ViTModel did not take the converted weights: {info}"
    return EncoderConvertResult(out, origin, fields, sum(p.numel() for p in model.parameters()),
                                time.perf_counter() - start)

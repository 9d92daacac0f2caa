"""Representation encoders for `redi features`: the families, their pre-processing and the tokens kept.

The family is read from the model config's `model_type`; a full CLIP/SigLIP/SigLIP2 checkpoint's
config holds its vision tower's under `vision_config`, and the tower is what is loaded. Per family:
- pre-processing: REPA's `preprocess_raw_image` (train.py) where REPA used the encoder (DINOv2,
  CLIP, MAE, I-JEPA); otherwise the model's own image processor (`preprocessor_config.json` when
  the model directory has one, else the transformers defaults of the family's processor);
- input side: patch · G pixels, so that the encoder's patch grid is the diffusion model's G × G
  token grid (REPA's appendix);
- position table: where REPA resamples a learned table (DINOv2, MAE, MoCo v3, DINOv1, and by the same rule
  CLIP and I-JEPA off their native grid) it is resampled once, as REPA's `load_encoders` does, by
  `fit_positions` when the model is loaded; the forward then adds it as it is. DINOv2 with registers
  interpolates the same way at every call (transformers), SigLIP with its own transformers code, and
  DINOv3 (RoPE) and SigLIP2 NaFlex need nothing;
- tokens: the patch tokens in grid order (CLS and registers dropped) and the global token REG
  needs: the CLS token, SigLIP's attention-pooled output, or none (I-JEPA). It is stored as `cls`.
docs/ENCODERS.md tabulates all of it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import torch
from torch import nn
from transformers import (
    CLIPVisionModel, Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel, IJepaModel, PreTrainedModel,
    Siglip2VisionModel, SiglipVisionModel, ViTMAEModel, ViTModel,
)

from redi.common.errors import UserError
from redi.common.schema import Range, dump, load
from redi.pipeline import positions, timm_vit
from redi.pipeline.representation_record import Preprocess, RepresentationRecord, TableRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # REPA's CLIP_DEFAULT_MEAN (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's image processors: x ↦ 2x − 1
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}  # preprocessor `resample`
def _repa(mean: tuple[float, ...], std: tuple[float, ...], normalise_first: bool, name: str) -> Preprocess:
    return Preprocess(mean, std, "bicubic", False, normalise_first, f"REPA preprocess_raw_image ({name})")


def _processor(mean: tuple[float, ...], std: tuple[float, ...], interpolation: str, name: str) -> Preprocess:
    return Preprocess(mean, std, interpolation, True, False, f"{name} defaults (transformers)")


# A model call: (model, x (N, 3, S, S), G) → (token sequence (N, T, D), pooled output (N, D) or None).
Call = Callable[[PreTrainedModel, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]


def _call_plain(model: PreTrainedModel, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DINOv2 (adds its table as it is when it has G² rows, else interpolates it) and DINOv3 (RoPE: any multiple of
    the patch)."""
    out = model(pixel_values=x)
    return out.last_hidden_state, out.pooler_output


def _call_interpolated(model: PreTrainedModel, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP, I-JEPA, ViT (tables fitted to the grid: added as they are) and SigLIP (its table interpolated by
    transformers, bicubic): transformers checks the input side against the config's unless asked to interpolate."""
    out = model(pixel_values=x, interpolate_pos_encoding=True)
    return out.last_hidden_state, out.pooler_output


def _call_mae(model: PreTrainedModel, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ViTMAEModel loaded with mask_ratio 0 and ascending noise: every patch kept, in grid order.

    The tokens are the last block's output before the final LayerNorm, as REPA's `mae_vit.forward_features`."""
    n, patches = x.shape[0], grid * grid
    noise = torch.arange(patches, device=x.device, dtype=torch.float32).expand(n, patches)  # argsort = identity
    out = model(pixel_values=x, noise=noise, interpolate_pos_encoding=True, output_hidden_states=True)  # table fitted
    assert not out.mask.any() and torch.equal(out.ids_restore[0].cpu(), torch.arange(patches)), "MAE masked or shuffled patches"
    return out.hidden_states[-1], None  # (N, 1 + G², D)


def siglip2_patches(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, S, S) → (N, G², p·p·C): rows of patches, each (py, px, channel) as Siglip2ImageProcessor flattens them."""
    n, c, side, _ = x.shape
    p = side // grid
    return x.reshape(n, c, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(n, grid * grid, p * p * c)


def _call_siglip2(model: PreTrainedModel, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Siglip2VisionModel (NaFlex) takes patchified pixels and their grid; it resizes its position table itself."""
    n = x.shape[0]
    mask = torch.ones(n, grid * grid, dtype=torch.long, device=x.device)  # (N, G²): no padding
    shapes = torch.tensor([[grid, grid]], device=x.device).expand(n, 2)  # (N, 2)
    out = model(pixel_values=siglip2_patches(x, grid), pixel_attention_mask=mask, spatial_shapes=shapes)
    return out.last_hidden_state, out.pooler_output


def _pooled_if_head(config: dict[str, Any]) -> str | None:
    """SigLIP's global token is its attention-pooling (MAP) head's output; some towers ship without the head."""
    return "pooled" if config.get("vision_use_head", True) else None


def _tiny(model_type: str, patch: int, image_size: int | None = 224, **extra: Any) -> dict[str, Any]:
    """A tiny-random config: 32 wide, MLP 64, 2 layers, 2 heads; the family's class, patch and token layout."""
    size = {"image_size": image_size} if image_size else {}  # SigLIP2 NaFlex has a position table, no image size
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "patch_size": patch, **size, **extra}


def tiny_dino_config() -> dict[str, Any]:
    """DINOv2-with-registers with patch 14, 4 registers and the real checkpoints' image_size 518 (a 37×37 position
    table, interpolated to 16×16 at R=256 as theirs), width 32, 2 layers."""
    return {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 4,
        "patch_size": 14, "image_size": 518, "num_register_tokens": 4, "layerscale_value": 1.0,
    }


def tiny_default_config() -> dict[str, Any]:
    """Plain `tiny-random`: the DINOv2-with-registers model the default chain has always used, at image_size 224 (a
    16×16 table), so that the chain's outputs stay comparable with those recorded before; `tiny-random:dinov2-reg` is
    the same model with the real checkpoints' 518."""
    return {**tiny_dino_config(), "image_size": 224}


def dinov2_base_config() -> dict[str, Any]:
    """The real ViT-B/14 with 4 registers (768 wide, 12 layers, 12 heads) of `dinov2-with-registers-base`."""
    return {**tiny_dino_config(), "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}


def dinov2_large_config() -> dict[str, Any]:
    """The real ViT-L/14 with 4 registers (1024 wide, 24 layers, 16 heads) of `dinov2-with-registers-large`."""
    return {**tiny_dino_config(), "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}


def siglip2_base_config() -> dict[str, Any]:
    """The real SigLIP2 B/16 NaFlex vision tower of `siglip2-base-patch16-naflex` (768 wide, 12 layers, MLP 3072)."""
    return {**_tiny("siglip2_vision_model", 16, None, num_patches=256), "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12}


# The real architectures `redi bench encode` measures at random weights (no download).
ARCHITECTURES: dict[str, Callable[[], dict[str, Any]]] = {
    "dinov2-b": dinov2_base_config, "dinov2-l": dinov2_large_config, "siglip2-b": siglip2_base_config,
}


def _embeddings(model: PreTrainedModel) -> nn.Module:
    """The model's embeddings module (older transformers keep a CLIP tower's under `vision_model`)."""
    return getattr(model, "vision_model", model).embeddings


@dataclass(frozen=True)
class PositionTable:
    """A family's learned (or fixed) absolute position table, which REPA resamples once to the token grid."""

    prefix: int  # rows before the n × n grid: the CLS token's position, or none (I-JEPA)
    embedding: bool = False  # CLIP keeps it as an nn.Embedding (rows, D) with position ids; the others as a (1, rows, D) parameter

    def get(self, model: PreTrainedModel) -> torch.Tensor:
        """The table, (1, prefix + n², D)."""
        e = _embeddings(model)
        return e.position_embedding.weight[None] if self.embedding else e.position_embeddings

    def put(self, model: PreTrainedModel, table: torch.Tensor) -> None:
        """Replace the table by `table` (1, prefix + G², D), frozen like the rest of the encoder."""
        e = _embeddings(model)
        if self.embedding:
            e.position_embedding = nn.Embedding.from_pretrained(table[0].detach(), freeze=True)
            e.register_buffer("position_ids", torch.arange(table.shape[1], device=table.device)[None], persistent=False)
            e.num_patches, e.num_positions = table.shape[1] - self.prefix, table.shape[1]
        else:
            e.position_embeddings = nn.Parameter(table.detach(), requires_grad=False)


def _random_mae(settings: dict[str, Any]) -> PreTrainedModel:
    """ViTMAEModel at random with the fixed sin-cos table MAE's checkpoints hold (MAE `get_2d_sincos_pos_embed`,
    CLS row zero), which transformers' own initialisation leaves at zero."""
    model = ViTMAEModel(ViTMAEModel.config_class(**settings))
    config = model.config
    table = positions.sincos(config.hidden_size, config.image_size // config.patch_size, rows_first=False, prefix=1)
    PositionTable(1).put(model, table)
    return model


@dataclass(frozen=True)
class Family:
    """One encoder family: its class, how its images are prepared and which of its tokens are kept."""

    key: str  # `--encoder tiny-random:KEY`, docs
    title: str  # words for messages and docs
    model_class: type[PreTrainedModel]
    model_types: tuple[str, ...]  # config `model_type`s of the vision model itself
    preprocess: Preprocess  # REPA's values, or the image processor's defaults
    cls: bool  # a CLS token leads the sequence (then it is the global token)
    call: Call
    tiny: Callable[[], dict[str, Any]]  # the tiny-random config (carries its model_type)
    full_type: str | None = None  # model_type of a full image-text checkpoint whose `vision_config` is this tower
    pooled: Callable[[dict[str, Any]], str | None] = lambda config: None  # global token when there is no CLS
    overrides: dict[str, Any] = field(default_factory=dict)  # config values forced at load
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the class's arguments besides the config
    positions: PositionTable | None = None  # the table REPA resamples once to the grid (`fit_positions`)
    random: Callable[[dict[str, Any]], PreTrainedModel] | None = None  # random weights, where not the class's own init

    @property
    def repa(self) -> bool:
        """REPA's own pre-processing: a preprocessor_config.json does not change it."""
        return self.preprocess.source.startswith("REPA")

    def global_token(self, config: dict[str, Any]) -> str | None:
        """"cls", "pooled" or None (no global token: REG cannot use this encoder)."""
        return "cls" if self.cls else self.pooled(config)

    def prefix(self, config: dict[str, Any]) -> int:
        """Tokens before the patches: the CLS token and the registers."""
        return int(self.cls) + int(config.get("num_register_tokens", 0))


_REPA_DINOV2 = _repa(IMAGENET_MEAN, IMAGENET_STD, True, "dinov2")
FAMILIES: tuple[Family, ...] = (
    Family("dinov2-reg", "DINOv2 with registers", Dinov2WithRegistersModel, ("dinov2_with_registers",), _REPA_DINOV2,
           True, _call_plain, tiny_dino_config),
    Family("dinov2", "DINOv2", Dinov2Model, ("dinov2",), _REPA_DINOV2, True, _call_plain,
           lambda: {**{k: v for k, v in tiny_dino_config().items() if k != "num_register_tokens"}, "model_type": "dinov2"},
           positions=PositionTable(1)),
    Family("dinov3", "DINOv3 ViT", DINOv3ViTModel, ("dinov3_vit",),
           _processor(IMAGENET_MEAN, IMAGENET_STD, "bilinear", "DINOv3ViTImageProcessor"), True, _call_plain,
           lambda: _tiny("dinov3_vit", 16, num_register_tokens=4)),
    Family("siglip", "SigLIP", SiglipVisionModel, ("siglip_vision_model",),
           _processor(HALF, HALF, "bicubic", "SiglipImageProcessor"), False, _call_interpolated,
           lambda: _tiny("siglip_vision_model", 16),
           full_type="siglip", pooled=_pooled_if_head),
    Family("siglip2", "SigLIP2", Siglip2VisionModel, ("siglip2_vision_model",),
           _processor(HALF, HALF, "bilinear", "Siglip2ImageProcessor"), False, _call_siglip2,
           lambda: _tiny("siglip2_vision_model", 16, None, num_patches=256),
           full_type="siglip2", pooled=_pooled_if_head),
    Family("clip", "CLIP", CLIPVisionModel, ("clip_vision_model",), _repa(CLIP_MEAN, CLIP_STD, False, "clip"), True,
           _call_interpolated, lambda: _tiny("clip_vision_model", 14),
           full_type="clip", positions=PositionTable(1, embedding=True)),
    Family("mae", "MAE", ViTMAEModel, ("vit_mae",), _repa(IMAGENET_MEAN, IMAGENET_STD, True, "mae"), True, _call_mae,
           lambda: _tiny("vit_mae", 16, mask_ratio=0.75),
           overrides={"mask_ratio": 0.0}, positions=PositionTable(1), random=_random_mae),
    Family("ijepa", "I-JEPA", IJepaModel, ("ijepa",), _repa(IMAGENET_MEAN, IMAGENET_STD, True, "jepa"), False,
           _call_interpolated, lambda: _tiny("ijepa", 14), positions=PositionTable(0)),
    Family("vit", "ViT (MoCo v3, DINOv1)", ViTModel, ("vit",), _repa(IMAGENET_MEAN, IMAGENET_STD, True, "mocov3, dinov1"),
           True, _call_interpolated, timm_vit.tiny_config, model_kwargs={"add_pooling_layer": False},
           positions=PositionTable(1), random=timm_vit.random_model),
)
DEFAULT_TYPE = "dinov2_with_registers"  # the plain tiny-random config carries no model_type (byte-identical to before)


def supported() -> str:
    """The supported families and their model types, for messages."""
    return "; ".join(f"{f.title} ({', '.join(f.model_types + ((f.full_type,) if f.full_type else ()))})" for f in FAMILIES)


def family_of(config: dict[str, Any]) -> Family:
    """The family named by a (vision) config's model_type; anything else is one sentence listing the supported ones."""
    return _family(config.get("model_type", DEFAULT_TYPE))


def _family(kind: str | None) -> Family:
    for family in FAMILIES:
        if kind in family.model_types:
            return family
    what = f"is a {kind!r} model" if kind else "names no model_type (not a transformers model)"
    raise UserError(f"The --encoder config {what}; the supported encoder families are: {supported()}.")


def vision_config(config: dict[str, Any]) -> dict[str, Any]:
    """The vision model's full config (defaults filled) from a checkpoint's: a full CLIP/SigLIP config yields its tower's."""
    kind = config.get("model_type") or config.get("_class_name")  # a diffusers config names its class instead
    full = next((f for f in FAMILIES if f.full_type and kind == f.full_type), None)
    sub = config.get("vision_config", {}) if full else config
    family = full or _family(kind)
    try:
        return family.model_class.config_class(**{k: v for k, v in sub.items() if k != "model_type"}).to_dict()
    except (TypeError, ValueError) as e:
        raise UserError(f"The --encoder config is not a valid {family.title} config: {str(e).splitlines()[-1].strip()}") from None


def tiny_configs() -> dict[str, Callable[[], dict[str, Any]]]:
    """`tiny-random` (DINOv2 with registers, as always) and `tiny-random:KEY` for every family."""
    return {"": tiny_default_config, **{f.key: f.tiny for f in FAMILIES}}


def build(config: dict[str, Any]) -> PreTrainedModel:
    """A randomly initialised model of `config`'s family (the load-time overrides applied)."""
    family = family_of(config)
    settings = {k: v for k, v in config.items() if k != "model_type"} | family.overrides
    if family.random is not None:
        return family.random(settings)
    return family.model_class(family.model_class.config_class(**settings), **family.model_kwargs)


def from_pretrained(config: dict[str, Any], source: str, **hub: Any) -> PreTrainedModel:
    """The pretrained vision model of `source` (a full image-text checkpoint: its vision tower). Weights the model
    needs but the checkpoint lacks are one sentence, not random values (the caller silences transformers' own key
    report: a full checkpoint's text weights are unused by design)."""
    family = family_of(config)
    model, info = family.model_class.from_pretrained(source, output_loading_info=True, **hub, **family.overrides,
                                                     **family.model_kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"{source} lacks {len(missing)} weights of {family.model_class.__name__} (e.g. {missing[0]}): "
                        f"it is not a complete {family.title} checkpoint.")
    return model


POSITIVE = Range(0, lo_open=True)


@dataclass(frozen=True)
class ProcessorConfig:
    """The fields of a transformers preprocessor_config.json that redi reads (the rest is transformers')."""

    resample: Literal[2, 3, "bilinear", "bicubic"] = 3
    """PIL's resampling filter: 2 bilinear, 3 bicubic (redi resizes with these two only)."""
    do_rescale: bool = True
    rescale_factor: Annotated[float, Range(0, lo_open=True)] = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[Annotated[float, Range()], Annotated[float, Range()], Annotated[float, Range()]] | None = None
    """Per RGB channel."""
    image_std: tuple[Annotated[float, POSITIVE], Annotated[float, POSITIVE], Annotated[float, POSITIVE]] | None = None


def processor_preprocess(family: Family, processor: dict[str, Any] | None) -> Preprocess:
    """The family's pre-processing, its mean/std/interpolation taken from a preprocessor_config.json if one is given
    (REPA's families keep REPA's values)."""
    if family.repa or processor is None:
        return family.preprocess
    config: ProcessorConfig = load(ProcessorConfig, processor, "The encoder's preprocessor_config.json",
                                   "redi resizes bilinear (2) or bicubic (3) and rescales by 1/255")
    if config.do_rescale and abs(config.rescale_factor - 1 / 255) > 1e-9:
        raise UserError(f"The encoder's preprocessor_config.json rescales by {config.rescale_factor}; redi "
                        "supports 1/255 only.")
    return replace(
        family.preprocess, interpolation=PIL_RESAMPLE[config.resample], source="preprocessor_config.json",
        mean=(config.image_mean or family.preprocess.mean) if config.do_normalize else (0.0, 0.0, 0.0),
        std=(config.image_std or family.preprocess.std) if config.do_normalize else (1.0, 1.0, 1.0),
    )


@dataclass(frozen=True)
class FeatureSpec:
    """How one `features` run encodes: family, input side, token grid, pre-processing, tokens kept."""

    family: Family
    grid: int  # G: patch tokens per side, the diffusion model's token grid
    patch: int  # encoder patch size in pixels
    dim: int  # D: token width, from the config
    prefix: int  # tokens before the patches (CLS, registers), dropped
    global_token: str | None  # "cls" | "pooled" | None, stored as the `cls` array
    preprocess: Preprocess
    table_grid: int | None = None  # n: the checkpoint's n × n position table, when REPA resamples it (Family.positions)

    @property
    def resamples(self) -> bool:
        """The position table is resampled once from the checkpoint's n × n grid to G × G (`fit_positions`)."""
        return self.table_grid is not None and self.table_grid != self.grid

    @property
    def side(self) -> int:
        """Encoder input side S = patch · G."""
        return self.patch * self.grid

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image array shapes: `cls` (D,) when there is a global token, `patch` (G², D)."""
        glob = {"cls": (self.dim,)} if self.global_token else {}
        return {**glob, "patch": (self.grid * self.grid, self.dim)}

    def record(self) -> dict[str, Any]:
        """What the manifest records of it (a RepresentationRecord; the position table only where it is resampled)."""
        table = TableRecord(self.table_grid, self.grid, positions.REPA.words) if self.resamples and self.table_grid else None
        record = dump(RepresentationRecord(self.family.key, self.side, self.grid, self.patch, self.prefix,
                                           self.global_token, self.preprocess, table))
        return {k: v for k, v in record.items() if k != "position_table" or v is not None}


def feature_spec(config: dict[str, Any], grid: int, processor: dict[str, Any] | None = None) -> FeatureSpec:
    """The spec of an encoder (its vision config) for the diffusion model's G × G token grid (`LatentSpace.token_grid`),
    pre-processing from `processor` where it applies."""
    family, patch = family_of(config), int(config["patch_size"])
    table_grid = int(config["image_size"]) // patch if family.positions else None
    return FeatureSpec(family, grid, patch, int(config["hidden_size"]), family.prefix(config), family.global_token(config),
                       processor_preprocess(family, processor), table_grid)


def fit_positions(model: PreTrainedModel, spec: FeatureSpec,
                  how: positions.Interpolation = positions.REPA) -> PreTrainedModel:
    """Resample the model's position table once to the G × G grid, by default as REPA's `load_encoders` does (timm's
    `resample_abs_pos_embed`), so that the forward adds it as it is (FD-DINOv2 passes torch.hub DINOv2's own
    interpolation). A family without such a table, or a table of G² rows (the native grid, or fitted already), is
    left alone; a table fitted to another grid is refused (resampling it again would compound): load the encoder again."""
    table = spec.family.positions
    if table is None:
        return model
    rows = table.get(model).shape[1] - table.prefix
    if rows == spec.grid ** 2:
        return model
    assert rows == spec.table_grid ** 2, f"the position table holds {rows} positions, not the checkpoint's " \
        f"{spec.table_grid}²: fitted to another grid already; load the encoder again for {spec.grid}²"
    with torch.no_grad():
        table.put(model, positions.resample(table.get(model), spec.grid, table.prefix, how))
    return model


def encode_features(model: PreTrainedModel, images: torch.Tensor, spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """uint8 (N, R, R, 3) → float32 `patch` (N, G², D) and, with a global token, `cls` (N, D), of a model whose
    position table `fit_positions` has fitted to the grid."""
    if (table := spec.family.positions) is not None:
        assert table.get(model).shape[1] == table.prefix + spec.grid ** 2, "fit_positions(model, spec) before encoding"
    x = spec.preprocess(images, spec.side).to(model.dtype)  # (N, 3, S, S)
    h, pooled = spec.family.call(model, x, spec.grid)  # (N, T, D), (N, D) or None
    patch = h[:, spec.prefix:]  # (N, G², D): CLS and registers dropped
    assert patch.shape[1] == spec.grid ** 2, f"{spec.family.title} gave {patch.shape[1]} patch tokens, not {spec.grid}²"
    out = {"patch": patch.float()}
    if spec.global_token:
        out["cls"] = (h[:, 0] if spec.global_token == "cls" else pooled).float()  # (N, D)
    return out


def encoder_tokens(model: PreTrainedModel, images: torch.Tensor, grid: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Global token (N, D) or None, and patch tokens (N, G², D) of a loaded model with its family's default
    pre-processing (benchmarks and tests; the stage also reads a preprocessor_config.json), its position table
    fitted to the grid on the first call."""
    spec = feature_spec(model.config.to_dict(), grid)
    out = encode_features(fit_positions(model, spec), images, spec)
    return out.get("cls"), out["patch"]

"""REPA's encoders as REPA computes them. Each family's features equal a computation written here from REPA's code
(sihyun-yu/REPA train.py `preprocess_raw_image`; utils.py `load_encoders`, which resamples a pretrained position
table once with timm's `resample_abs_pos_embed`; the models' own forwards), on tiny models with the real checkpoints'
tables (DINOv2 518 px: 37×37; MAE 224 px /16: MAE's fixed sin-cos 14×14); MoCo v3 and DINOv1 checkpoints go through
`redi convert-encoder` and are checked against a plain-torch timm ViT forward of the checkpoint itself."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from typer.testing import CliRunner

from redi.cli import app
from redi.common.errors import UserError
from redi.pipeline import timm_vit
from redi.pipeline.demo_data import write_demo_images
from redi.pipeline.encoders import ENCODER, load, resolve
from redi.pipeline.images import center_crop_arr, decode_rgb, open_source
from redi.pipeline.representations import encode_features, feature_spec, fit_positions, tiny_configs

IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm.data
CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ENC_TYPE = {"dinov2-reg": "dinov2reg-vit-b", "dinov2": "dinov2-vit-b", "mae": "mae-vit-l", "clip": "clip-vit-L",
            "ijepa": "jepa-vit-h", "vit": "mocov3-vit-b"}  # REPA's --enc-type of each family


def resample_abs_pos_embed(posemb: torch.Tensor, new_size: list[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """timm.layers.pos_embed.resample_abs_pos_embed (square table, antialias=True, bicubic)."""
    if posemb.shape[1] == new_size[0] * new_size[1] + num_prefix_tokens:
        return posemb
    hw = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
    prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim, dtype = posemb.shape[-1], posemb.dtype
    posemb = posemb.float().reshape(1, hw, hw, -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode="bicubic", antialias=True)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, posemb], dim=1)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # torchvision Normalize


def preprocess_raw_image(x: torch.Tensor, enc_type: str) -> torch.Tensor:
    """REPA train.py: uint8-valued (N, 3, R, R) float → the encoder's input (R = 256 or 512)."""
    resolution = x.shape[-1]
    if "clip" in enc_type:
        x = x / 255.0
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
        x = normalize(x, CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD)
    elif "mocov3" in enc_type or "mae" in enc_type or "dinov1" in enc_type:  # REPA: dinov1 a branch of its own, the same
        x = x / 255.0
        x = normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    elif "dinov2" in enc_type or "jepa" in enc_type:  # REPA: jepa a branch of its own, the same
        x = x / 255.0
        x = normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return x


def repa_tokens(family: str, model: torch.nn.Module, x: torch.Tensor, grid: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(CLS, patch tokens) as REPA's encoder forwards compute them, on the weights of `model` as loaded (its table the
    checkpoint's, resampled here once to the grid, as load_encoders does)."""
    e, n = model.embeddings, x.shape[0]
    if family.startswith("dinov2"):  # torch.hub DINOv2: prepare_tokens_with_masks, blocks, norm → x_norm_*
        pos = resample_abs_pos_embed(e.position_embeddings, [grid, grid])
        h = torch.cat([e.cls_token.expand(n, -1, -1), e.patch_embeddings(x)], dim=1) + pos
        registers = e.register_tokens.expand(n, -1, -1) if family == "dinov2-reg" else h[:, :0]
        h = torch.cat([h[:, :1], registers, h[:, 1:]], dim=1)
        for block in model.encoder.layer:
            h = block(h)
        h = model.layernorm(h)
        return h[:, 0], h[:, 1 + registers.shape[1]:]
    if family == "mae":  # REPA models/mae_vit.py forward_features: no final norm
        pos = resample_abs_pos_embed(e.position_embeddings, [grid, grid])
        h = torch.cat([e.cls_token.expand(n, -1, -1), e.patch_embeddings(x)], dim=1) + pos
        for block in model.layers:
            h = block(h)
        return h[:, 0], h[:, 1:]
    if family == "clip":  # REPA models/clip_vit.py UpdatedVisionTransformer: ln_pre, transformer, no ln_post
        pos = resample_abs_pos_embed(e.position_embedding.weight[None], [grid, grid])
        patches = e.patch_embedding(x).flatten(2).transpose(1, 2)
        h = model.pre_layrnorm(torch.cat([e.class_embedding.expand(n, 1, -1), patches], dim=1) + pos)
        for block in model.encoder.layers:
            h = block(h, None)
        return h[:, 0], h[:, 1:]
    assert family == "ijepa"  # REPA models/jepa.py VisionTransformer.forward: no CLS, final norm
    h = e.patch_embeddings(x) + resample_abs_pos_embed(e.position_embeddings, [grid, grid], num_prefix_tokens=0)
    for block in model.layers:
        h = block(h)
    return None, model.layernorm(h)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def images(resolution: int, count: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (count, resolution, resolution, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(resolution))


@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("family", ["dinov2-reg", "dinov2", "mae", "clip", "ijepa"])
def test_features_equal_repas_computation(family: str, resolution: int) -> None:
    """DINOv2 (plain and with registers) at 256 and 512 as REPA; MAE, CLIP and I-JEPA at 256 as REPA and at 512
    (which REPA refuses) by REPA's rule for every encoder it runs off its native grid."""
    loaded = load(resolve(ENCODER, f"tiny-random:{family}"))
    grid = resolution // 16  # SD-VAE f8, patch 2
    spec = feature_spec(loaded.config.to_dict(), grid)
    pixels = images(resolution)
    with torch.inference_mode():
        ours = encode_features(fit_positions(copy.deepcopy(loaded), spec), pixels, spec)  # type: ignore[arg-type]
        cls, patch = repa_tokens(family, loaded, preprocess_raw_image(pixels.permute(0, 3, 1, 2).float(), ENC_TYPE[family]),
                                 grid)
    assert ours["patch"].shape == patch.shape == (2, grid * grid, 32)
    assert relative(ours["patch"], patch) <= 1e-6
    if cls is not None:
        assert relative(ours["cls"], cls) <= 1e-6


def test_tiny_random_tables_are_the_real_checkpoints() -> None:
    """DINOv2 (both classes): image_size 518, a 37×37 table; MAE: its fixed sin-cos table (MAE util/pos_embed.py
    get_2d_sincos_pos_embed, numpy meshgrid(w, h): the column coordinate first), not transformers' zeros."""
    for family in ("dinov2", "dinov2-reg"):
        assert load(resolve(ENCODER, f"tiny-random:{family}")).embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 32)

    def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=float) / (embed_dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(14, dtype=float), np.arange(14, dtype=float)), axis=0).reshape(2, 1, 14, 14)
    emb = np.concatenate([get_1d_sincos_pos_embed_from_grid(16, grid[0]), get_1d_sincos_pos_embed_from_grid(16, grid[1])], 1)
    want = torch.from_numpy(np.concatenate([np.zeros([1, 32]), emb], axis=0)).float()[None]  # (1, 1 + 196, 32)
    got = load(resolve(ENCODER, "tiny-random:mae")).embeddings.position_embeddings
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_table_is_resampled_once() -> None:
    """Plain DINOv2's table becomes G² rows at load, so transformers adds it without interpolating; fitting it to
    another grid afterwards (which would resample a resampled table) is refused. Registers: the table is left to the
    class (it interpolates at every call exactly as timm, previous test)."""
    model = load(resolve(ENCODER, "tiny-random:dinov2"))
    spec = feature_spec(model.config.to_dict(), 16)
    fit_positions(model, spec)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 256, 32)
    fit_positions(model, spec)  # the same grid: nothing to do
    with pytest.raises(AssertionError, match="load the encoder again"):
        fit_positions(model, feature_spec(model.config.to_dict(), 32))
    with pytest.raises(AssertionError, match="fit_positions"):
        encode_features(load(resolve(ENCODER, "tiny-random:dinov2")), images(256, 1), spec)  # type: ignore[arg-type]
    registers = load(resolve(ENCODER, "tiny-random:dinov2-reg"))
    fit_positions(registers, feature_spec(registers.config.to_dict(), 16))
    assert registers.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 32)


def timm_vit_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """timm's VisionTransformer.forward_features (MoCo v3's VisionTransformerMoCo, DINO's vit_base) in plain torch on a
    timm-style state dict whose pos_embed fits the input: patch embedding, CLS, positions, pre-norm blocks
    (LayerNorm eps 1e-6, qkv attention, exact GELU MLP), final norm. (N, 3, S, S) → (N, 1 + G², D)."""
    w = state["patch_embed.proj.weight"]
    h = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([state["cls_token"].expand(len(h), -1, -1), h], dim=1) + state["pos_embed"]
    n, t, d = h.shape
    norm = lambda z, name: F.layer_norm(z, (d,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)
    linear = lambda z, name: F.linear(z, state[f"{name}.weight"], state[f"{name}.bias"])
    for i in range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))):
        b = f"blocks.{i}."
        q, k, v = linear(norm(h, b + "norm1"), b + "attn.qkv").reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(dim=-1) @ v  # (N, heads, T, D / heads)
        h = h + linear(attention.transpose(1, 2).reshape(n, t, d), b + "attn.proj")
        h = h + linear(F.gelu(linear(norm(h, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return norm(h, "norm")


def redi(*args: str | Path, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"redi {' '.join(map(str, args))}\n{result.output}"
    return " ".join(result.output.split())


def public_file(origin: str, state: dict[str, torch.Tensor], path: Path) -> Path:
    """The checkpoint as its method releases it: MoCo v3's training checkpoint (the DDP-wrapped base and momentum
    encoders with their projection heads, the predictor, the epoch), DINO's backbone as a plain state dict."""
    if origin == "mocov3":
        head = {"head.0.weight": torch.randn(8, 32), "head.1.weight": torch.ones(8)}
        encoder = state | head
        blob = {"epoch": 300, "arch": "vit_base", "state_dict": {
            **{f"module.base_encoder.{k}": v for k, v in encoder.items()},
            **{f"module.momentum_encoder.{k}": v + 1 for k, v in encoder.items()},
            "module.predictor.0.weight": torch.randn(8, 8)}}
    else:
        blob = dict(state)
    torch.save(blob, path)
    return path


@pytest.mark.parametrize("origin", ["mocov3", "dinov1"])
def test_a_converted_checkpoint_gives_repas_features(origin: str, tmp_path: Path) -> None:
    """The released file → `redi convert-encoder` → `--encoder DIR`: our tokens at 256 px equal timm's forward of the
    checkpoint with REPA's pre-processing and its table resampled once to 16×16 (REPA load_encoders)."""
    config = {**timm_vit.tiny_config(), "converted_from": {"format": origin}}
    state = timm_vit.random_state(config)
    file = public_file(origin, state, tmp_path / f"{origin}.pth")
    out = redi("convert-encoder", file, "--from", origin, "--out", tmp_path / "model", "--heads", "2")
    assert "2 layers, 2 heads, patch 16, 14×14 position table" in out
    ref = resolve(ENCODER, str(tmp_path / "model"))
    assert ref.identity["class"] == "ViTModel" and ref.config["converted_from"]["format"] == origin
    model = load(ref)
    spec = feature_spec(ref.config, 16)
    pixels = images(256)
    with torch.inference_mode():
        ours = encode_features(fit_positions(model, spec), pixels, spec)  # type: ignore[arg-type]
        table = resample_abs_pos_embed(state["pos_embed"], [16, 16])
        z = timm_vit_forward(state | {"pos_embed": table}, preprocess_raw_image(pixels.permute(0, 3, 1, 2).float(),
                                                                                  f"{origin}-vit-b"), heads=2)
    assert relative(ours["patch"], z[:, 1:]) <= 1e-6 and relative(ours["cls"], z[:, 0]) <= 1e-6  # REPA: z[:, 1:]
    out = redi("convert-encoder", file, "--from", origin, "--out", tmp_path / "model", "--heads", "2", code=2)
    assert "--force" in out


def test_the_tiny_random_vit_is_a_converted_mocov3_checkpoint() -> None:
    config = timm_vit.tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = timm_vit.random_state(config)
    assert timm_vit.vit_fields(state, 2, "mocov3") == config
    model = load(resolve(ENCODER, "tiny-random:vit"))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, timm_vit_forward(state, x, heads=2),
                                   rtol=1e-5, atol=1e-6)


def test_conversion_refusals(tmp_path: Path) -> None:
    state = timm_vit.random_state(timm_vit.tiny_config())
    dino = public_file("dinov1", state, tmp_path / "dino.pth")
    out = redi("convert-encoder", dino, "--from", "mocov3", "--out", tmp_path / "a", code=2)
    assert out.startswith("error: A MoCo v3 checkpoint holds its weights under 'state_dict'") and "Traceback" not in out
    out = redi("convert-encoder", dino, "--from", "dinov1", "--out", tmp_path / "a", code=2)
    assert "No released DINOv1 ViT is 32 wide; pass --heads" in out
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.q_norm\.weight has no place"):
        timm_vit.hub_state({"blocks.0.attn.q_norm.weight": torch.ones(32)}, 1)
    rcg = {f"module.base_encoder.blocks.13.{a}.weight": torch.ones(1) for a in ("norm13", "mlp.fc13")}
    rcg |= {f"module.base_encoder.blocks.14.{a}.bias": torch.ones(1) for a in ("norm14", "mlp.fc14")}
    assert sorted(timm_vit.ORIGINS["mocov3"].state({"state_dict": rcg})) == [  # REPA fix_mocov3_state_dict
        "blocks.13.mlp.fc1.weight", "blocks.13.norm1.weight", "blocks.14.mlp.fc2.bias", "blocks.14.norm2.bias"]


def test_every_repa_family_has_its_tiny_random() -> None:
    assert {"dinov2", "dinov2-reg", "mae", "clip", "ijepa", "vit"} <= set(tiny_configs())


def test_the_features_stage_resamples_once_and_says_so(tmp_path: Path) -> None:
    """`redi features --encoder tiny-random:dinov2` at 64 px: the 37×37 table fitted to 4×4 at load (the manifest and
    `redi info` say so), the stored tokens those of the fitted model; the registers model records nothing of it."""
    images = write_demo_images(tmp_path / "images", 2).out
    for encoder, table in (("tiny-random:dinov2", {"from": 37, "to": 4}), ("tiny-random", None)):
        data = tmp_path / encoder.replace(":", "-")
        redi("features", images, "--data", data, "--encoder", encoder, "--resolution", "64", "--workers", "0")
        record = json.loads((data / "features" / "manifest.json").read_text())["params"]["representation"]
        assert (record.get("position_table") or {}).get("from") == (table or {}).get("from")
        assert ("position table: 37² → 4², resampled once" in redi("info", data)) == bool(table)
    model = load(resolve(ENCODER, "tiny-random:dinov2"))
    spec = feature_spec(model.config.to_dict(), 4)
    pixels = torch.from_numpy(np.stack([center_crop_arr(decode_rgb(open_source(images).read_bytes(i)), 64) for i in (0, 1)]))
    with torch.inference_mode():
        want = encode_features(fit_positions(model, spec), pixels, spec)["patch"]  # type: ignore[arg-type]
    got = zarr.open_group(tmp_path / "tiny-random-dinov2" / "features" / "store.zarr", mode="r")["patch"][:]
    np.testing.assert_allclose(got, want.half().numpy(), rtol=1e-3, atol=1e-3)  # stored as float16

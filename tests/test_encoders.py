"""The encoder zoo: every representation family, loaded by path, through features → pca → shards → train → sample;
the tokens each family keeps; DINOv2 as before the zoo."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from redi.cli import app
from redi.common.errors import UserError
from redi.pipeline.demo_data import write_demo_images
from redi.pipeline.encoders import ENCODER, load, random_init, resolve
from redi.pipeline.images import load_cropped, open_source
from redi.pipeline.representations import (
    FAMILIES, encode_features, feature_spec, fit_positions, siglip2_patches, tiny_configs, tiny_dino_config,
)

R = ["--resolution", "64", "--workers", "0", "--batch-size", "4"]  # 64 px: a 4×4 token grid, SiT-debug's
TRAIN = ["--model", "SiT-debug", "--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--workers", "0"]


def redi(*args: str | Path, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"redi {' '.join(map(str, args))}\n{result.output}"
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 demo images and their tiny-random VAE latents, shared by every family."""
    root = tmp_path_factory.mktemp("zoo")
    images = write_demo_images(root / "images", 8).out
    redi("encode", images, "--data", root / "data", "--vae", "tiny-random", *R)
    return images, root / "data" / "latents"


def saved(family: str, where: Path) -> Path:
    """The tiny-random model of `family` written with save_pretrained: loading it by path is the real-weights path."""
    load(resolve(ENCODER, f"tiny-random:{family}")).save_pretrained(where)  # type: ignore[operator]
    return where


@pytest.mark.parametrize("family", [f.key for f in FAMILIES])
def test_each_family_by_path_trains_and_samples(family: str, encoded: tuple[Path, Path], tmp_path: Path) -> None:
    images, latents = encoded
    data = tmp_path / "data"
    shutil.copytree(latents, data / "latents")
    model = saved(family, tmp_path / "model")
    if family == "siglip":  # the model's own image-processor values, read from its directory
        (model / "preprocessor_config.json").write_text('{"resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    redi("features", images, "--data", data, "--encoder", model, *R)
    record = json.loads((data / "features" / "manifest.json").read_text())["params"]["representation"]
    if family == "siglip":
        assert (record["preprocess"]["source"], record["preprocess"]["interpolation"]) == ("preprocessor_config.json", "bilinear")
    patch = tiny_configs()[family]()["patch_size"]
    assert (record["family"], record["grid"], record["input_side"]) == (family, 4, 4 * patch)
    glob = record["global_token"]
    assert glob == {"siglip": "pooled", "siglip2": "pooled", "ijepa": None}.get(family, "cls")
    store = zarr.open_group(data / "features" / "store.zarr", mode="r")
    assert store["patch"].shape == (8, 16, 32) and ("cls" in store) == bool(glob)
    info = redi("info", data)
    assert f"token grid: 4×4 at {4 * patch} px" in info and f"global token: {glob or 'none'}" in info

    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "4", "--shard-size", "4", "--patch-tokens")
    assert "consistent" in redi("verify", data)
    for method in ("redi", "repa", "reg"):
        extra = ["--pca-rank", "4"] if method == "redi" else []
        out = redi("train", "--shards", data, "--run", tmp_path / method, "--method", method, *TRAIN, *extra,
                   code=0 if glob or method != "reg" else 2)
        if not glob and method == "reg":
            assert "global token" in out and "--method repa" in out
    redi("sample", "--run", tmp_path / "redi", "--steps", "2", "--num", "2", "--out", tmp_path / "samples")
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 64, 64, 3)


@pytest.mark.parametrize("family, full", [("clip", "CLIPModel"), ("siglip", "SiglipModel"), ("siglip2", "Siglip2Model")])
def test_a_full_image_text_checkpoint_gives_its_vision_tower(family: str, full: str, tmp_path: Path) -> None:
    import transformers

    cls = getattr(transformers, full)
    vision = {k: v for k, v in tiny_configs()[family]().items() if k != "model_type"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
    torch.manual_seed(0)
    model = cls(cls.config_class(vision_config=vision, text_config=text, projection_dim=16) if family == "clip"
                else cls.config_class(vision_config=vision, text_config=text))
    model.save_pretrained(tmp_path / "full")
    ref = resolve(ENCODER, str(tmp_path / "full"))
    tower = load(ref)
    assert type(tower).__name__ == ref.identity["class"] == type(model.vision_model).__name__ and ref.identity["dim"] == 32
    want = model.vision_model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in tower.state_dict().items())


def test_a_checkpoint_lacking_weights_is_refused(tmp_path: Path) -> None:
    """A SigLIP config with the pooling head over weights without it: one sentence, not a random head."""
    headless = {**tiny_configs()["siglip"](), "vision_use_head": False}
    random_init(ENCODER, headless, 0).save_pretrained(tmp_path / "siglip")  # type: ignore[operator]
    config = json.loads((tmp_path / "siglip" / "config.json").read_text())
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({**config, "vision_use_head": True}))
    with pytest.raises(UserError, match=r"lacks \d+ weights of SiglipVisionModel \(e\.g\. head\."):
        load(resolve(ENCODER, str(tmp_path / "siglip")))


def test_mae_keeps_every_patch_in_grid_order() -> None:
    """ViTMAEModel masks 75% and shuffles by default; the features are the unmasked encoder in raster order."""
    spec = feature_spec(tiny_configs()["mae"](), 4)
    model = fit_positions(load(resolve(ENCODER, "tiny-random:mae")), spec)  # type: ignore[arg-type]
    assert model.config.mask_ratio == 0.0 and tiny_configs()["mae"]()["mask_ratio"] == 0.75
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        got = encode_features(model, pixels, spec)  # type: ignore[arg-type]
        x = spec.preprocess(pixels, spec.side)  # (2, 3, 64, 64): no resize at patch 16
        emb = model.embeddings
        tokens = emb.patch_embeddings(x)  # (2, 16, D), row-major grid
        pos = emb.position_embeddings  # (1, 1 + 16, D): the 14×14 sin-cos table resampled to 4×4 at load
        h = torch.cat([(emb.cls_token + pos[:, :1]).expand(2, -1, -1), tokens + pos[:, 1:]], dim=1)
        for layer in model.layers:
            h = layer(h)
    torch.testing.assert_close(got["patch"], h[:, 1:])  # before the final LayerNorm, as REPA's MAE
    torch.testing.assert_close(got["cls"], h[:, 0])


def test_siglip_global_token_is_the_attention_pooled_output() -> None:
    for family in ("siglip", "siglip2"):
        model = load(resolve(ENCODER, f"tiny-random:{family}"))
        spec = feature_spec(tiny_configs()[family](), 4)
        pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
        with torch.inference_mode():
            got = encode_features(model, pixels, spec)  # type: ignore[arg-type]
            pooled = model.head(got["patch"])  # the MAP head on the post-LayerNorm patch tokens
        assert spec.global_token == "pooled" and spec.prefix == 0
        torch.testing.assert_close(got["cls"], pooled)
        assert not torch.allclose(got["cls"], got["patch"].mean(1), atol=1e-3)
    headless = {**tiny_configs()["siglip"](), "vision_use_head": False}
    assert feature_spec(headless, 4).global_token is None and "cls" not in feature_spec(headless, 4).shapes()


def test_siglip2_patches_are_its_image_processors() -> None:
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    x = torch.randn(2, 3, 64, 64)
    want = np.stack([convert_image_to_patches(img.numpy(), 16) for img in x])  # (2, 16, 768)
    np.testing.assert_array_equal(siglip2_patches(x, 4).numpy(), want)


def test_registers_are_dropped_and_grids_follow_the_resolution() -> None:
    for family, tokens_dropped in (("dinov2-reg", 5), ("dinov2", 1), ("dinov3", 5), ("clip", 1), ("ijepa", 0)):
        config = tiny_configs()[family]()
        spec = feature_spec(config, 32)
        assert spec.prefix == tokens_dropped and spec.grid == 32 and spec.side == 32 * config["patch_size"]
        with torch.inference_mode():
            model = fit_positions(load(resolve(ENCODER, f"tiny-random:{family}")), feature_spec(config, 8))  # type: ignore[arg-type]
            out = encode_features(model, torch.zeros(1, 128, 128, 3, dtype=torch.uint8), feature_spec(config, 8))
        assert out["patch"].shape == (1, 64, 32)
    assert feature_spec(tiny_dino_config(), 16).side == 224  # DINOv2 at 224 for 256 px (16×16), as REPA
    assert feature_spec(tiny_configs()["mae"](), 16).side == 256  # MAE-L/16 at 256 → 16×16
    assert feature_spec(tiny_configs()["siglip2"](), 32).side == 512


def test_an_unsupported_model_is_one_sentence_naming_the_families(tmp_path: Path) -> None:
    images = write_demo_images(tmp_path / "images", 1).out
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    out = redi("features", images, "--data", tmp_path / "data", "--encoder", tmp_path / "bert", *R, code=2)
    assert "'bert' model" in out and out.count(".") <= 2  # one sentence
    for family in FAMILIES:
        assert family.title in out
    out = redi("features", images, "--data", tmp_path / "data", "--encoder", "tiny-random:resnet", *R, code=2)
    assert "tiny-random:siglip2" in out


def dino_tokens_before(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `redi features` computed on main (cc81fcd) before the zoo, kept as the reference: uint8 (N, R, R, 3) → /255,
    ImageNet mean/std, THEN bicubic resize to 224·R/256 (no antialias) → CLS (N, D) and patch tokens (N, P, D)."""
    x = images.permute(0, 3, 1, 2).float() / 255  # (N, 3, R, R)
    x = (x - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    side = 224 * images.shape[1] // 256
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)  # (N, 3, S, S)
    h = model(pixel_values=x).last_hidden_state  # (N, 1 + registers + P, D)
    return h[:, 0], h[:, 1 + getattr(model.config, "num_register_tokens", 0):]


def test_dinov2_features_equal_the_code_before_the_zoo(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(tmp_path / "images" / f"img{i}.png")
    random_init(ENCODER, tiny_dino_config(), 0).save_pretrained(tmp_path / "reg-dir")  # type: ignore[operator]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = {k: v for k, v in tiny_dino_config().items() if k != "num_register_tokens"} | {"image_size": 224}
        Dinov2Model(Dinov2Config(**plain)).save_pretrained(tmp_path / "plain-dir")  # its table: 16×16, as before
    source = open_source(tmp_path / "images")
    # Plain DINOv2 off its table's grid is no longer what it was: the table is resampled once, as REPA does
    # (tests/test_repa_encoders.py); on it (16×16 at 256 px) nothing is resampled, then or now.
    for name, resolution in (("tiny-random", 64), ("tiny-random", 256), ("reg-dir", 256), ("plain-dir", 256)):
        encoder = name if name == "tiny-random" else tmp_path / name
        data = tmp_path / f"{name}-{resolution}"
        redi("features", tmp_path / "images", "--data", data, "--encoder", encoder, "--resolution", str(resolution),
             "--workers", "0", "--batch-size", "4")
        store = zarr.open_group(data / "features" / "store.zarr", mode="r")
        crops = torch.from_numpy(np.stack([load_cropped(source, i, resolution)[0] for i in range(4)]))  # (4, R, R, 3)
        with torch.no_grad():
            want = dino_tokens_before(load(resolve(ENCODER, str(encoder))), crops)
        for array, reference in zip(("cls", "patch"), want, strict=True):  # float16 storage: about one ulp apart at most
            np.testing.assert_allclose(store[array][:], reference.numpy(), rtol=1e-3, atol=1e-3, err_msg=f"{name} {resolution} {array}")

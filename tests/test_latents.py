"""The latent zoo: every VAE family by path through encode → shards → train → sample; the latent normalisation
(config or measured) applied by the trainer and inverted by the sampler; the token grid derived from the latents
(512 end to end); stages made before the records; the default chain as before the zoo."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from redi.cli import app
from redi.pipeline.encoders import VAE, load, random_init, resolve
from redi.pipeline.latent_norm import LatentNorm
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.vaes import latent_space, tiny_configs
from redi.sampler.sample import Decoder
from redi.trainer.metrics import read_metrics
from redi.trainer.objectives import prepare_batch

FAST = ["--workers", "0", "--batch-size", "4"]
TRAIN = ["--model", "SiT-debug", "--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--workers", "0"]


def redi(*args: str | Path, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"redi {' '.join(map(str, args))}\n{result.output}"
    return " ".join(result.output.split())


def random_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` random RGB PNGs of 90×80 pixels (numpy seed `seed`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (90, 80, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def stored(data: Path, stage: str, name: str) -> np.ndarray:
    return zarr.open_array(data / stage / "store.zarr" / name, mode="r")[:]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_images(tmp_path_factory.mktemp("latents") / "images", 6)


# family: (resolution, channels, latent side, token grid, patch, config scale, config shift)
FAMILIES = {
    "sd": (64, 4, 8, 4, 2, 0.18215, 0.0),  # SD-VAE: AutoencoderKL's default scaling factor, no shift
    "flux": (64, 16, 8, 4, 2, 0.3611, 0.1159),  # FLUX.1: 16 channels, scale and shift from the config
    "dc": (128, 32, 4, 4, 1, 0.41407, 0.0),  # DC-AE f32c32: deterministic, f32, patch 1
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_vae_family_by_path_encodes_trains_and_samples(family: str, images: Path, tmp_path: Path) -> None:
    resolution, channels, side, grid, patch, scale, shift = FAMILIES[family]
    vae_dir = tmp_path / "vae"
    load(resolve(VAE, f"tiny-random:{family}")).save_pretrained(vae_dir)  # type: ignore[operator]
    data = tmp_path / "data"
    redi("encode", images, "--data", data, "--vae", vae_dir, "--with-features", "--encoder", "tiny-random",
         "--resolution", resolution, *FAST)
    space = json.loads((data / "latents" / "manifest.json").read_text())["params"]["latent_space"]
    assert (space["channels"], space["downsampling"], space["scaling_factor"]) == (channels, resolution // side, scale)
    moments = stored(data, "latents", "moments")
    assert moments.shape == (6, 2 * channels, side, side)
    assert (moments[:, channels:] == 0).all() == (family == "dc")  # DC-AE: the latent and a std of 0
    representation = json.loads((data / "features" / "manifest.json").read_text())["params"]["representation"]
    assert representation["grid"] == grid and stored(data, "features", "patch").shape[1] == grid * grid
    info = redi("info", data)
    assert f"latent space: {channels} ch, f{resolution // side}{', std 0' if family == 'dc' else ''}" in info
    assert f"config scale: {scale}{f', shift {shift}' if shift else ''}" in info

    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "4", "--shard-size", "4", "--patch-tokens")
    info = read_shard_info(data / "shards")
    assert info.latent_shape == (channels, side, side) and info.patch_size == patch and info.grid == grid
    assert info.latent_norm == LatentNorm("config", (shift,) * channels, (scale,) * channels)
    for method in ("redi", "repa"):
        extra = ["--pca-rank", "4"] if method == "redi" else []
        redi("train", "--shards", data, "--run", tmp_path / method, "--method", method, *TRAIN, *extra)
    run = json.loads((tmp_path / "redi" / "config.json").read_text())
    config = run["model_config"]
    assert (config["vae_channels"], config["input_size"], config["patch_size"]) == (channels, side, patch)
    assert run["train"]["model"] == f"SiT-debug/{patch}"  # --model SiT-debug: the shards' default patch, recorded
    redi("sample", "--run", tmp_path / "redi", "--steps", "2", "--num", "2", "--out", tmp_path / "samples")
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, resolution, resolution, 3)
    if family == "sd":  # patch 1: 8×8 tokens, which REPA cannot align with the 4×4 patches
        out = redi("train", "--shards", data, "--run", tmp_path / "p1", "--method", "repa", *TRAIN, "--model", "SiT-debug/1",
                   code=2)
        assert "8×8 tokens" in out and "4×4 patches" in out and "--model SiT-debug/2" in out and "--patch-size 1" in out
    if family == "sd":  # another decoder: the same latent space is fine, another one refused unless forced
        sample = ["sample", "--run", tmp_path / "redi", "--steps", "2", "--num", "1"]
        redi(*sample, "--vae", "tiny-random", "--out", tmp_path / "same")
        out = redi(*sample, "--vae", "tiny-random:flux", "--out", tmp_path / "flux", code=2)
        assert "has 16 latent channels, the model 4" in out
        f16 = {**tiny_configs()["sd"](), "block_out_channels": [8] * 5, "down_block_types": ["DownEncoderBlock2D"] * 5,
               "up_block_types": ["UpDecoderBlock2D"] * 5}
        random_init(VAE, f16, 0).save_pretrained(tmp_path / "f16")  # type: ignore[operator]
        out = redi(*sample, "--vae", tmp_path / "f16", "--out", tmp_path / "f16-samples", code=2)
        assert "another latent space (AutoencoderKL, 4 channels, f16) than the run's (AutoencoderKL, 4 channels, f8)" in out
        assert "--force-vae" in out and out.count(".") <= 2
        out = redi(*sample, "--vae", tmp_path / "f16", "--force-vae", "--out", tmp_path / "f16-samples")
        assert "another latent space" in out  # the warning


def test_an_unsupported_vae_class_is_one_sentence_naming_the_supported(images: Path, tmp_path: Path) -> None:
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text('{"_class_name": "VQModel", "latent_channels": 3}')
    out = redi("encode", images, "--data", tmp_path / "data", "--vae", tmp_path / "vq", code=2)
    assert "'VQModel'" in out and "AutoencoderKL" in out and "AutoencoderDC" in out and out.count(".") <= 3
    out = redi("encode", images, "--data", tmp_path / "data", "--vae", "tiny-random:vq", code=2)
    assert "tiny-random:flux" in out and "tiny-random:dc" in out


def test_per_channel_statistics_apply_only_when_the_config_gives_both() -> None:
    """diffusers' pipelines use latents_mean and latents_std together or not at all (StableDiffusionXLPipeline:
    `if has_latents_mean and has_latents_std: … else: latents / scaling_factor`); one alone changes nothing."""
    sd, flux = tiny_configs()["sd"](), tiny_configs()["flux"]()
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 4.0]
    both = latent_space({**sd, "latents_mean": mean, "latents_std": std}).config_norm()
    assert both == LatentNorm("config", tuple(mean), tuple(0.18215 / s for s in std))  # (z − mean) · scale / std
    for config in (sd, flux):
        for one in ({"latents_mean": mean}, {"latents_std": std}):
            space = latent_space({**config, **one})  # FLUX.1's shift_factor beside an ignored latents_mean: no conflict
            assert space == latent_space(config) and space.config_norm() == latent_space(config).config_norm()


class _Identity(torch.nn.Module):
    """A 'VAE' whose decoder returns the latent it is given: what the sampler decodes, exactly."""

    def decode(self, z: torch.Tensor) -> object:
        return type("Out", (), {"sample": z})()


@pytest.mark.parametrize("norm", [
    latent_space(tiny_configs()["flux"]()).config_norm(),  # z' = 0.3611 · (z − 0.1159)
    LatentNorm("channel", (0.5, -1.0, 2.0, 0.0), (1 / 3.0, 2.0, 0.25, 1.0)),
])
def test_the_samplers_unnormalisation_inverts_the_trainers_normalisation(norm: LatentNorm) -> None:
    z = torch.randn(3, norm.channels, 4, 4, generator=torch.Generator().manual_seed(0)) * 5 + 1  # (N, C, h, h) known latent
    moments = torch.cat([z, torch.zeros_like(z)], dim=1)  # std 0: the trainer's sample is z itself
    trained = prepare_batch(moments, None, 0, norm)  # (N, C, h, h): what the network learns
    assert not torch.allclose(trained, z)
    decoded = Decoder(_Identity(), {}, norm)(trained)  # what the sampler hands the VAE
    torch.testing.assert_close(decoded, z, rtol=0, atol=1e-6 * float(z.abs().max()))


@pytest.mark.parametrize("family", ["flux", "dc"])
def test_channel_statistics_equal_numpys_over_the_stored_latents(family: str, images: Path, tmp_path: Path) -> None:
    resolution, channels = FAMILIES[family][:2]
    data = tmp_path / "data"
    redi("encode", images, "--data", data, "--vae", f"tiny-random:{family}", "--with-features", "--encoder", "tiny-random",
         "--resolution", resolution, *FAST)
    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "2", "--shard-size", "4", "--latent-norm", "channel")
    norm = read_shard_info(data / "shards").latent_norm
    moments = stored(data, "latents", "moments").astype(np.float64)  # (N, 2C, h, h)
    mean, std = moments[:, :channels], moments[:, channels:]
    want_mean = mean.mean(axis=(0, 2, 3))
    want_std = np.sqrt(mean.var(axis=(0, 2, 3)) + (std**2).mean(axis=(0, 2, 3)))  # of the samples mean + std·ε
    if family == "dc":
        want_std = mean.std(axis=(0, 2, 3))  # deterministic: the latents' own std
    assert norm.kind == "channel"
    np.testing.assert_allclose(norm.shift, want_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(1 / np.array(norm.scale), want_std, rtol=1e-9)
    # The trainer's samples of the whole set, normalised, have zero mean and unit variance per channel.
    drawn = torch.cat([prepare_batch(torch.from_numpy(moments).float(), None, 0, norm, torch.Generator().manual_seed(s))
                       for s in range(50)])  # (50·N, C, h, h)
    np.testing.assert_allclose(drawn.mean((0, 2, 3)).numpy(), 0, atol=0.05)
    np.testing.assert_allclose(drawn.std((0, 2, 3)).numpy(), 1, atol=0.05)
    out = redi("shards", "--data", data, "--pcs", "2", "--shard-size", "4", code=2)  # another norm: other shards
    assert "latent_norm" in out and "--force" in out
    # A run on them decodes with its recorded tiny-random VAE and inverts the measured normalisation.
    redi("train", "--shards", data, "--run", tmp_path / "run", "--method", "baseline", *TRAIN[:2], "--batch-size", "2",
         "--max-steps", "1", "--workers", "0")
    redi("sample", "--run", tmp_path / "run", "--steps", "2", "--num", "1", "--out", tmp_path / "samples")
    settings = json.loads((tmp_path / "samples" / "sample.json").read_text())["settings"]["vae"]
    assert settings["identity"]["id"] == f"tiny-random:{family}" and settings["latent_norm"] == norm.record()


def test_the_token_grid_follows_the_latents(images: Path, tmp_path: Path) -> None:
    """features after encode: G = (R / f) / patch; the default patch is 2 on f8 latents and 1 on f32; --patch-size sets it."""
    for vae, resolution, patch, grid in (("tiny-random:dc", 128, None, 4), ("tiny-random", 128, None, 8),
                                         ("tiny-random", 64, 1, 8)):
        data = tmp_path / f"{vae}-{resolution}-{patch}"
        redi("encode", images, "--data", data, "--vae", vae, "--resolution", resolution, *FAST)
        extra = ["--patch-size", str(patch)] if patch else []
        redi("features", images, "--data", data, "--encoder", "tiny-random", "--resolution", resolution, *FAST, *extra)
        record = json.loads((data / "features" / "manifest.json").read_text())["params"]["representation"]
        assert (record["grid"], record["input_side"]) == (grid, 14 * grid)


def test_512_end_to_end_has_repas_token_grids(tmp_path: Path) -> None:
    """REPA's 512 recipe: SD-VAE 64×64 latents, patch 2 → 32×32 tokens; DINOv2 at 448 → 32×32 patches."""
    images = random_images(tmp_path / "images", 2)
    data = tmp_path / "data"
    redi("encode", images, "--data", data, "--vae", "tiny-random", "--with-features", "--encoder", "tiny-random",
         "--resolution", "512", *FAST)
    assert stored(data, "latents", "moments").shape == (2, 8, 64, 64)
    representation = json.loads((data / "features" / "manifest.json").read_text())["params"]["representation"]
    assert (representation["input_side"], representation["grid"]) == (448, 32)
    assert stored(data, "features", "patch").shape == (2, 32 * 32, 32)
    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "2", "--shard-size", "2", "--patch-tokens")
    info = read_shard_info(data / "shards")
    assert info.fields["pcs"].shape == (2, 32, 32) and info.fields["patch_tokens"].shape == (1024, 32)
    assert info.latent_shape == (4, 64, 64) and info.patch_size == 2
    redi("train", "--shards", data, "--run", tmp_path / "run", "--method", "repa", *TRAIN[:2], "--batch-size", "2",
         "--max-steps", "1", "--workers", "0")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step-0000001.pt", weights_only=True)
    assert ckpt["model"]["pos_embed"].shape[1] == 1024  # 32×32 tokens: the encoder's grid
    redi("sample", "--run", tmp_path / "run", "--steps", "2", "--num", "1", "--out", tmp_path / "samples")
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (1, 512, 512, 3)


def test_stages_made_before_the_records_are_read_as_they_were_made(images: Path, tmp_path: Path) -> None:
    """A features manifest without params.representation (exactly what main wrote before the encoder zoo, cc81fcd), a
    latents manifest without params.latent_space and shards.json with `vae.scale` instead of the latent records are
    what they were: the reruns have nothing to do, and the shards normalise as SD-VAE's config says."""
    data = tmp_path / "data"
    encode = ["encode", images, "--data", data, "--vae", "tiny-random", "--with-features", "--encoder", "tiny-random",
              "--resolution", "64", *FAST]
    redi(*encode)
    for stage, field in (("features", "representation"), ("latents", "latent_space")):
        path = data / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["params"][field]
        path.write_text(json.dumps(manifest, indent=2))
    assert redi(*encode).count("complete with these settings: nothing to do") == 2
    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "2", "--shard-size", "4")
    info = read_shard_info(data / "shards")
    assert info.latent_norm.record() == {"kind": "config", "shift": [0.0] * 4, "scale": [0.18215] * 4}
    path = data / "shards" / "shards.json"
    old = json.loads(path.read_text())
    for key in ("latent_space", "latent_norm", "patch_size"):
        del old[key]
    old["vae"] |= {"scale": 0.18215, "shift": 0.0}
    path.write_text(json.dumps(old))
    before = read_shard_info(data / "shards")
    assert (before.latent_norm, before.latent_space, before.patch_size) == (info.latent_norm, info.latent_space, 2)


def fingerprint(values: np.ndarray) -> list[float]:
    """RMS and 3 projections on fixed random directions (numpy seed 0), in float64: arrays equal to float tolerance have
    fingerprints equal to that tolerance (relative to the RMS); a change anywhere moves a projection by its own RMS."""
    x = np.asarray(values, dtype=np.float64).ravel()  # (n,)
    directions = np.random.default_rng(0).standard_normal((3, x.size))  # (3, n)
    return [float(np.sqrt(np.mean(x * x))), *(directions @ x / np.sqrt(x.size)).tolist()]


# What the default chain (tiny-random VAE and DINOv2-reg at 64 px, 6 random 90×80 PNGs of numpy seed 0, one thread)
# wrote on main at 5cb68c9, before the latent zoo, on an Intel Xeon (AVX-512) with torch 2.13.0+cpu, where 5cb68c9 and
# the code after the zoo wrote the same bytes: the float16 latents and shard arrays (BEFORE_ARRAYS, 13 kB), the
# fingerprints of the weights after 3 training steps and of the 2 sampled images, and the 3 logged losses. Float kernels
# differ between CPUs, so each is compared within a tolerance above what other kernels move and below a real change.
# Scalar kernels (ATEN_CPU_CAPABILITY=default, no AVX) moved the arrays by 0.26 of FLOAT16_TOLERANCE (the PCs; float16
# values one rounding apart), the weights by 2e-7 of their RMS and the losses by 2e-5; AVX2 kernels less; two threads
# one sampled pixel by 1. The input map x/128 − 1 instead of x/127.5 − 1 moves the moments by 4 FLOAT16_TOLERANCEs, a
# 1 % larger learning rate the weights by 5e-6 of their RMS.
BEFORE_ARRAYS = Path(__file__).parent / "fixtures" / "default-chain-5cb68c9.npz"  # moments, cls, patch_tokens, pcs
FLOAT16_TOLERANCE = 2e-3  # relative, and absolute in units of the array's RMS
BEFORE_MODEL = [0.08392778228, 0.02741729762, 0.04462694323, 0.05845863307]  # fingerprint, to 2e-6 of the RMS
BEFORE_SAMPLES = [147.5223406, 102.6936509, -29.48236781, -111.0253579]  # fingerprint (uint8), to 1e-3 of the RMS
BEFORE_LOSSES = [3.043135881, 1.849791408, 2.04386425]  # relative 2e-4
WDS_FIELDS = ("moments", "pcs", "cls", "patch_tokens")  # the .npy members of each key, after its label
CHUNK_FILES = [  # two blocks of 4 samples (--shard-size 4)
    "samples.zarr/cls/c/0/0", "samples.zarr/cls/c/1/0", "samples.zarr/label/c/0", "samples.zarr/label/c/1",
    "samples.zarr/moments/c/0/0/0/0", "samples.zarr/moments/c/1/0/0/0", "samples.zarr/patch_tokens/c/0/0/0",
    "samples.zarr/patch_tokens/c/1/0/0", "samples.zarr/pcs/c/0/0/0/0", "samples.zarr/pcs/c/1/0/0/0",
]


@pytest.mark.parametrize("vae", ["tiny-random", "tiny-random:sd"])
def test_the_default_chain_is_as_before_the_zoo(vae: str, images: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    redi("encode", images, "--data", data, "--vae", vae, "--with-features", "--encoder", "tiny-random",
         "--resolution", "64", *FAST)
    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "4", "--shard-size", "4", "--patch-tokens", "--format", "both")
    redi("train", "--shards", data, "--run", tmp_path / "run", "--model", "SiT-debug", "--method", "redi", "--pca-rank", "4",
         "--batch-size", "2", "--max-steps", "3", "--workers", "0", "--log-every", "1")
    redi("sample", "--run", tmp_path / "run", "--steps", "2", "--num", "2", "--out", tmp_path / "samples")
    shards = zarr.open_group(data / "shards" / "samples.zarr", mode="r")
    moments = stored(data, "latents", "moments")
    with np.load(BEFORE_ARRAYS) as before:
        for name, got in (("moments", moments), *((n, shards[n][:]) for n in ("cls", "patch_tokens", "pcs"))):
            want = before[name].astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=FLOAT16_TOLERANCE, err_msg=name,
                                       atol=FLOAT16_TOLERANCE * float(np.sqrt(np.mean(want * want))))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step-0000003.pt", weights_only=True)
    weights = np.concatenate([v.numpy().ravel() for _, v in sorted(ckpt["model"].items())])
    np.testing.assert_allclose(fingerprint(weights), BEFORE_MODEL, rtol=0, atol=2e-6 * BEFORE_MODEL[0])
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        np.testing.assert_allclose(fingerprint(f["arr_0"]), BEFORE_SAMPLES, rtol=0, atol=1e-3 * BEFORE_SAMPLES[0])
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    np.testing.assert_allclose(losses, BEFORE_LOSSES, rtol=2e-4)
    # What no float kernel makes is compared exactly: the labels, the chunk files, the tars' members (each a zarr row).
    assert np.array_equal(shards["label"][:], np.zeros(6))
    assert sorted(str(p.relative_to(data / "shards")) for p in (data / "shards" / "samples.zarr").rglob("*")
                  if "/c/" in str(p) and p.is_file()) == CHUNK_FILES
    keys = json.loads((data / "shards" / "keys.json").read_text())  # the shards' order, a seeded permutation
    index = {key: i for i, key in enumerate(json.loads((data / "latents" / "keys.json").read_text()))}
    assert shards["moments"][:].tobytes() == moments[[index[key] for key in keys]].tobytes()
    members: dict[str, bytes] = {}
    for path in sorted((data / "shards" / "wds").glob("*.tar")):
        with tarfile.open(path) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    assert list(members) == [f"{key}.{field}" for key in keys for field in ("label.cls", *(f"{f}.npy" for f in WDS_FIELDS))]
    for i, key in enumerate(keys):
        assert members[f"{key}.label.cls"] == b"0", key
        for field in WDS_FIELDS:
            row = np.load(io.BytesIO(members[f"{key}.{field}.npy"]))
            assert (row.dtype, row.shape, row.tobytes()) == (np.float16, shards[field].shape[1:], shards[field][i].tobytes())

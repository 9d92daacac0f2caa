"""`redi demo-vae`: the fit lowers the reconstruction error, its directory loads as any local VAE with unit-variance
latents, a second call is a no-op, and a refit is another VAE to the stages that read it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from redi.cli import app
from redi.pipeline.demo_data import write_demo_images
from redi.pipeline.demo_vae import FIT_JSON, DemoVaeConfig, fit_demo_vae, read_images
from redi.pipeline.encoders import VAE, load, resolve
from redi.pipeline.vaes import vae_moments

R = 64  # crop side: 8×8 latents


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_images(tmp_path_factory.mktemp("demo-vae") / "images", 8, 0).out


def reconstruction_mse(vae: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).square().mean())


def test_fit_saves_a_vae_that_encode_loads_with_unit_variance_latents(images: Path, tmp_path: Path) -> None:
    cfg = DemoVaeConfig(images=images, out=tmp_path / "vae", resolution=R, max_steps=60, crop=32, batch_size=4)
    result = fit_demo_vae(cfg)
    assert result.fitted and result.record["last_loss"] < result.record["first_loss"]
    ref = resolve(VAE, str(cfg.out))
    assert ref.identity["kind"] == "local" and not ref.tiny_random
    vae = load(ref)
    x, _ = read_images(images, R)  # (8, 3, R, R)
    untrained = resolve(VAE, "tiny-random")  # the same architecture at its seeded random weights
    assert reconstruction_mse(vae, x) < 0.7 * reconstruction_mse(load(untrained), x)
    pixels = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8)  # (8, R, R, 3), as encode hands them over
    means = vae_moments(vae, pixels)[:, :4]  # (8, 4, R/8, R/8): the posterior means encode stores
    assert float(means.std()) * vae.config.scaling_factor == pytest.approx(1.0, rel=1e-3)
    assert (cfg.out / FIT_JSON).stat().st_mode & 0o444 == 0o444  # readable by others, as a plain save would be


def test_same_settings_do_nothing_and_other_settings_make_another_vae(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "vae"
    first = CliRunner().invoke(app, ["demo-vae", str(images), "--out", str(out), "--resolution", str(R),
                                     "--max-steps", "3", "--crop", "32", "--batch-size", "2"])
    assert first.exit_code == 0, first.output
    identity = resolve(VAE, str(out)).identity["hash"]
    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    again = CliRunner().invoke(app, ["demo-vae", str(images), "--out", str(out), "--resolution", str(R),
                                     "--max-steps", "3", "--crop", "32", "--batch-size", "2"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    refit = fit_demo_vae(DemoVaeConfig(images=images, out=out, resolution=R, max_steps=3, crop=32, batch_size=2, seed=1))
    assert refit.fitted and json.loads((out / FIT_JSON).read_text())["settings"]["seed"] == 1
    assert resolve(VAE, str(out)).identity["hash"] != identity  # same file sizes, other weights: another VAE
    assert not [p for p in tmp_path.iterdir() if p.name != "vae"]  # no temporary folder left


def test_bad_settings_are_one_sentence(images: Path, tmp_path: Path) -> None:
    bad = CliRunner().invoke(app, ["demo-vae", str(images), "--out", str(tmp_path / "v"), "--crop", "30"])
    assert bad.exit_code != 0 and "--crop must be a multiple of 8" in bad.output and "Traceback" not in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = CliRunner().invoke(app, ["demo-vae", str(empty), "--out", str(tmp_path / "v")])
    assert none.exit_code != 0 and "Traceback" not in none.output

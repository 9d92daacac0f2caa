"""`redi demo-vae`: a small AutoencoderKL fitted to an image folder, so that the demo's pictures show its images.

The tiny-random VAE decodes every latent, the training latents too, to texture. This fits the same architecture
(`vaes.tiny_sd_config`: AutoencoderKL, 4 latent channels, f8, 8 channels per block) to the images the demo
trains on, in a few CPU minutes, and saves it with diffusers' `save_pretrained`; `redi encode --vae DIR` then
loads it as it loads any local VAE (the real path: config.json and safetensors weights).

The fit: the images ADM-centre-cropped as `redi encode` crops them, random `crop`×`crop` windows (aligned to the
VAE's factor), the VAE loss of LDM's autoencoders without the perceptual and GAN terms: mean squared error per
pixel plus `kl_weight` × the posterior's KL to N(0, I) per latent element. After the fit, `scaling_factor` in
the saved config is 1/std of the posterior means over all the images, the way SD's 0.18215 was chosen, so
the latents the diffusion model sees have unit variance. On the 64 demo images at 256 px the defaults reach a
reconstruction PSNR of 18 dB in about 100 s on one CPU thread (`redi demo-vae data/demo/images --out DIR`, this
project's 2-core machine; `--max-steps 1500 --lr 2e-3 --batch-size 16`: 19.4 dB in 213 s; `--crop 32 --batch-size
32`: 10.8 dB, too small a view for the f8 encoder's edges).

Cached like every stage: DIR/fit.json (written last) records the settings and the images' hash; a second call with
the same ones does nothing, other ones fit again. The directory is assembled in a temporary sibling and renamed
into place, so a killed fit leaves either the old VAE or none, never a half-written one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from redi.common.atomic import FILE_MODE, atomic_write_json, sha256_file, try_read_json
from redi.common.display import counting
from redi.common.errors import UserError
from redi.common.schema import Range, check_ranges
from redi.pipeline.images import load_cropped, open_source
from redi.pipeline.vaes import latent_space, tiny_sd_config

FIT_JSON = "fit.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' save_pretrained name
FACTOR = latent_space(tiny_sd_config()).downsampling  # f of the fitted architecture: windows align to its latents


@dataclass(frozen=True)
class DemoVaeConfig:
    """Settings of `redi demo-vae`."""

    images: Path
    """Image folder (or zip/tar) to fit, as `redi encode` reads it."""
    out: Path
    """Directory of the fitted VAE (config.json, weights, fit.json)."""
    resolution: Annotated[int, Range(1)] = 256
    """Side of the centre crop, as `redi encode --resolution`."""
    max_steps: Annotated[int, Range(1)] = 800
    """Optimiser steps."""
    crop: Annotated[int, Range(1)] = 64
    """Side of the random training windows (a multiple of the VAE's downsampling factor; the VAE is convolutional)."""
    batch_size: Annotated[int, Range(1)] = 12
    """Windows per step."""
    lr: Annotated[float, Range(0, lo_open=True)] = 3e-3
    """Adam learning rate."""
    kl_weight: Annotated[float, Range(0)] = 2e-6
    """Weight of the KL term per latent element against the squared error per pixel."""
    seed: Annotated[int, Range(0)] = 0
    """Seed of the initial weights and of the windows drawn."""

    def __post_init__(self) -> None:
        check_ranges(self)
        latent_space(tiny_sd_config()).side(self.resolution)  # --resolution a multiple of the factor, or one sentence
        if self.crop % FACTOR or self.crop > self.resolution:
            raise UserError(f"--crop must be a multiple of {FACTOR} (the VAE's downsampling) no larger than --resolution "
                            f"({self.resolution}), got {self.crop}.")

    def settings(self) -> dict[str, Any]:
        """What fit.json records: every setting that changes the weights."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("images", "out")}


@dataclass(frozen=True)
class DemoVaeResult:
    """What `fit_demo_vae` did."""

    out: Path
    fitted: bool  # False: the directory already held this fit
    record: dict[str, Any]  # fit.json


def read_images(images: Path, resolution: int) -> tuple[torch.Tensor, str]:
    """Every readable image, centre-cropped: (N, 3, R, R) in [−1, 1], and the SHA-256 of their uint8 pixels."""
    source = open_source(images)
    arrays = [arr for arr, why in (load_cropped(source, i, resolution) for i in range(len(source))) if not why]
    if not arrays:
        raise UserError(f"{images} holds no readable image to fit a VAE to.")
    pixels = np.stack(arrays)  # (N, R, R, 3) uint8
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, digest


def fit_demo_vae(cfg: DemoVaeConfig) -> DemoVaeResult:
    """Fit (or find already fitted) the VAE of `cfg` and save it to cfg.out."""
    from diffusers import AutoencoderKL

    x_all, digest = read_images(cfg.images, cfg.resolution)  # (N, 3, R, R)
    wanted = {"images_sha256": digest, "num_images": len(x_all), "settings": cfg.settings()}
    done = try_read_json(cfg.out / FIT_JSON)
    if isinstance(done, dict) and {k: done.get(k) for k in wanted} == wanted and (cfg.out / WEIGHTS).is_file():
        return DemoVaeResult(cfg.out, False, done)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(**tiny_sd_config())
    started = time.perf_counter()
    first, last = fit(vae, x_all, cfg)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x[None]).latent_dist.mean for x in x_all])  # (N, C, R/f, R/f)
        recon = torch.cat([vae.decode(m[None]).sample for m in means]).clamp(-1, 1)  # (N, 3, R, R)
    mse = float((recon - x_all).square().mean())
    vae.register_to_config(scaling_factor=1.0 / float(means.std()))
    record = wanted | {
        "first_loss": first, "last_loss": last, "psnr_db": 10 * float(np.log10(4.0 / mse)),
        "latent_std": float(means.std()), "seconds": time.perf_counter() - started,
    }
    save(vae, record, cfg.out)
    return DemoVaeResult(cfg.out, True, record)


def fit(vae: torch.nn.Module, x_all: torch.Tensor, cfg: DemoVaeConfig) -> tuple[float, float]:
    """Adam on random windows of `x_all` (N, 3, R, R); the loss of the first and of the last step."""
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    side = x_all.shape[-1]
    losses: list[float] = []
    vae.train()
    with counting("demo-vae", cfg.max_steps, "steps/s") as advance:
        for _ in range(cfg.max_steps):
            idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)  # (B,)
            top, left = (FACTOR * v for v in torch.randint(0, (side - cfg.crop) // FACTOR + 1, (2,), generator=g).tolist())
            x = x_all[idx, :, top : top + cfg.crop, left : left + cfg.crop]  # (B, 3, c, c)
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=g)).sample  # (B, 3, c, c)
            kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
            loss = (rec - x).square().mean() + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            advance(1)
    return losses[0], losses[-1]


def save(vae: Any, record: dict[str, Any], out: Path) -> None:
    """save_pretrained into a temporary sibling, name the weights in config.json, then rename it over `out`.

    redi knows a local model directory by its config and its weight files' names and sizes (pipeline/encoders.py);
    a refit has the same sizes, so config.json carries the weights' SHA-256 (`_weights_sha256`: diffusers ignores
    keys that start with an underscore) and every refit is another VAE to the stages that read it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        atomic_write_json(tmp / "config.json", config | {"_weights_sha256": sha256_file(tmp / WEIGHTS)})
        atomic_write_json(tmp / FIT_JSON, record)
        for path in tmp.iterdir():  # mkdtemp's folder and save_pretrained's files are private (0700, 0600)
            path.chmod(FILE_MODE)
        tmp.chmod(FILE_MODE | (FILE_MODE & 0o444) >> 2)  # a folder: x wherever r
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

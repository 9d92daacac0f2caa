"""Encoding throughput: the batched, chunked `encode --with-features` pass vs one image at a time.

The baseline is what public REPA-style preprocessing does per image: decode it, ADM-crop it,
run the VAE and DINOv2 on a batch of one, save one `.npy` per image and output. The batched
side is the real stage runner (DataLoader workers, batches, Zarr chunks, commits; each image
decoded once for both stages, as `make encode` runs it). Both use
the same models: tiny-random by default, or (`real_arch=True`) randomly initialised models
of the real architectures (sd-vae-ft-ema, DINOv2-reg ViT-B/14) saved to a temporary local
directory, on the GPU when there is one. Nothing is downloaded. `models_images_per_s` times the
two models alone on images already on the device: the ceiling of the batched stage.
`architecture_throughput` times the `encode` stage alone with the real VAE architectures (SD-VAE,
FLUX.1's VAE, DC-AE f32c32) and the `features` stage alone with the real representation architectures
(DINOv2-B/L, SigLIP2-B), at random weights; `run` reports it too unless `quick`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from redi.pipeline.demo_data import write_demo_images
from redi.pipeline.encode import ENCODE, FEATURES, EncodeConfig, run_stages
from redi.pipeline.encoders import ENCODER, TINY_RANDOM, VAE, load, random_init, resolve
from redi.pipeline.images import ImageSource, load_cropped, open_source
from redi.pipeline.representations import ARCHITECTURES, dinov2_base_config, encoder_tokens, tiny_dino_config
from redi.pipeline.vaes import ARCHITECTURES as VAE_ARCHITECTURES
from redi.pipeline.vaes import latent_space, sd_vae_config, tiny_sd_config, vae_moments


def run(quick: bool = False, real_arch: bool = False, resolution: int = 256, workers: int | None = None,
        num: int | None = None, batch_size: int | None = None, one_at_a_time: bool = True,
        images: Path | None = None, encoders: tuple[str, ...] | None = None) -> dict[str, float | str]:
    """Images/s of VAE+DINOv2 encoding, batched stages vs one at a time (unless told not to), and their ratio; then
    `encode` or `features` alone with each of `encoders` (default: every real VAE and encoder architecture for the
    plain `redi bench encode` run, none when quick, real_arch or given images, as the GPU suite's calls are).

    `images`: a folder of images to encode (several runs can share one) instead of `num` new demo images.
    """
    num = len(open_source(images)) if images is not None else num or (8 if quick else (512 if real_arch else 64))
    resolution = 64 if quick else resolution
    device = "cuda" if real_arch and torch.cuda.is_available() else "cpu"
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    with tempfile.TemporaryDirectory(prefix="redi-bench-encode-") as tmp:
        root = Path(tmp)
        images = images if images is not None else write_demo_images(root / "images", num).out
        vae_name, dino_name = _real_arch_dirs(root) if real_arch else (TINY_RANDOM, TINY_RANDOM)
        common = {"resolution": resolution, "device": device, "workers": workers, "batch_size": batch_size or (8 if quick else 128 if device == "cuda" else 64)}
        cfg = EncodeConfig(images, root / "data", vae_name, **common)
        enc, _ = run_stages([(ENCODE, cfg), (FEATURES, dataclasses.replace(cfg, model=dino_name))])
        batched = num / enc.seconds
        figures: dict[str, float | str] = {
            "models": "real architectures, random init" if real_arch else "tiny-random",
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "images": float(num),
            "resolution": float(resolution),
            "workers": float(workers),
            "batch_size": float(common["batch_size"]),
            "batched_images_per_s": batched,
        }
        if one_at_a_time:
            single = _one_at_a_time(open_source(images), vae_name, dino_name, resolution, torch.device(device), root / "npy")
            figures |= {"one_at_a_time_images_per_s": single, "speedup": batched / single}
    plain = not (quick or real_arch or images is not None)
    names = encoders if encoders is not None else (*VAE_ARCHITECTURES, *ARCHITECTURES) if plain else ()
    return figures | architecture_throughput(names, workers=workers)


def architecture_throughput(names: tuple[str, ...], num: int | None = None, resolution: int = 256,
                           batch_size: int | None = None, workers: int = 0) -> dict[str, float]:
    """Images/s of the `encode` stage with each named real VAE architecture (pipeline.vaes.ARCHITECTURES) and of the
    `features` stage with each named encoder (pipeline.representations.ARCHITECTURES), at random weights saved with
    save_pretrained and loaded by path, as real weights are."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num = num or (256 if device == "cuda" else 16)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="redi-bench-encoders-") as tmp:
        root = Path(tmp)
        images = write_demo_images(root / "images", num).out
        for name in names:
            kind, family, config = (ENCODE, VAE, VAE_ARCHITECTURES[name]) if name in VAE_ARCHITECTURES else \
                (FEATURES, ENCODER, ARCHITECTURES[name])
            model_dir = root / name
            random_init(family, config(), 0).save_pretrained(model_dir)  # type: ignore[operator]
            cfg = EncodeConfig(images, root / f"data-{name}", str(model_dir), resolution=resolution, device=device,
                               workers=workers, batch_size=batch_size or (128 if device == "cuda" else 8))
            (result,) = run_stages([(kind, cfg)])
            figures[f"{kind.name}_{name}_images_per_s"] = result.images_per_second
    return figures


def models_images_per_s(real_arch: bool, batch_size: int, resolution: int = 256, reps: int = 3) -> dict[str, float | str]:
    """Images/s of the two encoders alone (`vae_moments` + `encoder_tokens` on images already on the device), in the
    stages' default fp32: the ceiling the batched stage would reach if decoding and writing cost nothing."""
    device = torch.device("cuda" if real_arch and torch.cuda.is_available() else "cpu")
    vae_config = sd_vae_config() if real_arch else tiny_sd_config()
    vae = random_init(VAE, vae_config, 0).to(device).eval()
    grid = latent_space(vae_config).token_grid(resolution)
    dino = random_init(ENCODER, dinov2_base_config() if real_arch else tiny_dino_config(), 0).to(device).eval()
    images = torch.randint(0, 256, (batch_size, resolution, resolution, 3), dtype=torch.uint8, device=device)  # (B, R, R, 3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = {}
    with torch.inference_mode():
        for name, encode in (("vae", lambda: vae_moments(vae, images)), ("dinov2", lambda: encoder_tokens(dino, images, grid))):
            encode()  # warm-up: kernel selection, allocator
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                encode()
            sync()
            seconds[name] = (time.perf_counter() - t0) / reps
    return {"batch_size": float(batch_size), "vae_images_per_s": batch_size / seconds["vae"],
            "dinov2_images_per_s": batch_size / seconds["dinov2"],
            "both_images_per_s": batch_size / (seconds["vae"] + seconds["dinov2"])}


def _one_at_a_time(source: ImageSource, vae_name: str, dino_name: str, resolution: int, device: torch.device, out: Path) -> float:
    """Images/s of decode → crop → VAE(batch 1) → DINOv2(batch 1) → one .npy per image and output."""
    vae_ref = resolve(VAE, vae_name)
    vae, dino = load(vae_ref, device), load(resolve(ENCODER, dino_name), device)
    grid = latent_space(vae_ref.config).token_grid(resolution)
    out.mkdir()
    start = time.perf_counter()
    with torch.inference_mode():  # float32, as the stages by default and the reference preprocessing
        for i in range(len(source)):
            pixels, _ = load_cropped(source, i, resolution)
            x = torch.from_numpy(pixels)[None].to(device)  # (1, R, R, 3) uint8
            moments = vae_moments(vae, x)  # (1, 2C, R/f, R/f)
            cls, patch = encoder_tokens(dino, x, grid)  # (1, D), (1, P, D)
            np.save(out / f"{i:08d}.moments.npy", moments[0].half().cpu().numpy())
            np.save(out / f"{i:08d}.cls.npy", cls[0].half().cpu().numpy())
            np.save(out / f"{i:08d}.patch.npy", patch[0].half().cpu().numpy())
    return len(source) / (time.perf_counter() - start)


def _real_arch_dirs(root: Path) -> tuple[str, str]:
    """Random-init models of the real architectures, saved as local model directories."""
    vae_dir, dino_dir = root / "sd-vae-ft-ema-random", root / "dinov2-reg-base-random"
    random_init(VAE, sd_vae_config(), 0).save_pretrained(vae_dir)  # type: ignore[operator]
    random_init(ENCODER, dinov2_base_config(), 0).save_pretrained(dino_dir)  # type: ignore[operator]
    return str(vae_dir), str(dino_dir)


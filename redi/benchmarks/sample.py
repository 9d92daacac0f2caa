"""Sampling throughput: images/s of `redi sample`'s own loop (sampler, guidance, VAE decode, PNG writes) at a given NFE.

The loop is `sampler.sample.sample_batches`, the function `redi sample` runs, on a network of the
requested size with random weights (speed does not depend on them) at ImageNet-256 shapes: a
32×32 latent with 4 VAE channels plus 8 PCs for ReDi. The decoder is the SD-VAE architecture with
random weights (the tiny-random VAE in quick CPU runs). One batch of warm-up is not timed. The
figures include the count of batched network calls per sampler step, which must be 1: all the
guidance branches of a step share one forward pass.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from redi.pipeline.encoders import VAE, random_init
from redi.pipeline.vaes import latent_space, sd_vae_config, tiny_sd_config
from redi.sampler.decoder import Decoder
from redi.sampler.guidance import GuidanceConfig
from redi.sampler.labels import class_labels
from redi.sampler.sample import SamplingPlan, autocast_factory, sample_batches
from redi.sampler.settings import DEFAULT_SAMPLER
from redi.trainer.flops import forward_flops
from redi.trainer.metrics import peak_flops
from redi.trainer.models import ModelConfig, build_model

NUM_CLASSES = 1000  # ImageNet
SD_VAE = latent_space(sd_vae_config())  # the decoder: SD-VAE's architecture, 4 channels, f8
LATENT_SIDE = SD_VAE.side(256)  # ImageNet 256
PCA_RANK = 8  # ReDi's default r
FID_IMAGES = 50_000  # ADM's FID-50K


def _network(model: str, method: str, device: torch.device) -> torch.nn.Module:
    """A random-weight network of `model` (e.g. SiT-B/2, DiT-XL/2) with the PC channels of `method`."""
    family, _, size = model.partition("-")
    cfg = ModelConfig(size=size, objective={"SiT": "sit", "DiT": "dit"}[family], input_size=LATENT_SIDE,
                      pca_rank=PCA_RANK if method == "redi" else 0, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    return build_model(cfg).to(device).eval().requires_grad_(False)


def _decoder(device: torch.device, tiny: bool) -> Decoder:
    """The SD-VAE decoder architecture (or the tiny-random one) with random weights."""
    config = tiny_sd_config() if tiny else sd_vae_config()
    vae = random_init(VAE, config, seed=0).to(device).eval().requires_grad_(False)
    return Decoder(vae, {"id": "random-init", "kind": "tiny-random" if tiny else "random-init"}, SD_VAE.config_norm())


def _decode_images_per_s(decoder: Decoder, batch: int, channels: int, device: torch.device, reps: int) -> float:
    """Images/s of the VAE decode alone."""
    z = torch.randn(batch, channels, LATENT_SIDE, LATENT_SIDE, device=device)
    decoder(z)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        decoder(z)
    sync()
    return reps * batch / (time.perf_counter() - t0)


def run(quick: bool = False, model: str | None = None, method: str = "redi", steps: int | None = None,
        batch: int | None = None, batches: int | None = None, guidance: str = "none", cfg_scale: float = 1.8,
        rg_scale: float = 1.5, interval: tuple[float, float] | None = None,
        precision: str | None = None) -> dict[str, float | str]:
    """Time the sampling loop; CPU: S/2 with few steps, GPU: B/2 at 250 steps unless told otherwise."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = model or ("SiT-B/2" if cuda else "SiT-S/2")
    steps = steps or (250 if cuda else 2 if quick else 8)
    batch = batch or (64 if cuda else 2 if quick else 4)
    batches = batches or (2 if cuda else 1)
    precision = precision or ("bf16" if cuda else "fp32")
    net = _network(model, method, device)
    sampler = DEFAULT_SAMPLER[net.cfg.objective]
    guide = GuidanceConfig(mode=guidance, cfg_scale=cfg_scale if "cfg" in guidance else 1.0,  # type: ignore[arg-type]
                           rg_scale=rg_scale if "rg" in guidance else 1.0, interval=interval)
    plan = SamplingPlan(sampler, steps, 0, guide, autocast_factory(device, precision))
    decoder = _decoder(device, tiny=quick and not cuda)
    labels = class_labels((batches + 1) * batch, 0, "random", NUM_CLASSES)
    todo = [list(range(b * batch, (b + 1) * batch)) for b in range(batches + 1)]
    silent = contextlib.nullcontext(lambda n: None)
    with tempfile.TemporaryDirectory(prefix="redi-bench-sample-") as tmp:
        out = Path(tmp)
        sample_batches(net, decoder, plan, todo[:1], labels, out, lambda i: False, 0, silent)  # warm-up
        work = sample_batches(net, decoder, plan, todo[1:], labels, out, lambda i: False, 0, silent)
    calls_per_step = work.model_calls / (work.batches * steps)
    assert calls_per_step == 1, f"{calls_per_step} network calls per sampler step: the guidance branches must share one"
    figures: dict[str, float | str] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "model": model, "method": method,
        "sampler": sampler, "steps": steps, "batch": batch, "precision": precision, "guidance": guidance,
        "interval": "none" if interval is None else f"{interval[0]:g},{interval[1]:g}",
        "nfe_per_image": work.nfe_per_image, "model_calls_per_step": calls_per_step,
        "images_per_s": work.images_per_s,
        "fid50k_hours_one_device": FID_IMAGES / work.images_per_s / 3600,
        "decode_images_per_s": _decode_images_per_s(decoder, batch, net.cfg.vae_channels, device, reps=1 if quick else 3),
    }
    network_flops = forward_flops(net.cfg) * work.nfe_per_image * work.images_per_s
    figures["network_tflops"] = network_flops / 1e12
    if (peak := peak_flops(device)) is not None:
        figures["network_mfu"] = network_flops / peak
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SiT-S/2 … SiT-XL/2, DiT-B/2 …; default SiT-B/2 on GPU, SiT-S/2 on CPU")
    parser.add_argument("--method", default="redi", choices=("redi", "baseline"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--batches", type=int, help="timed batches after one warm-up batch")
    parser.add_argument("--guidance", default="none", choices=("none", "cfg", "rg", "cfg+rg"))
    parser.add_argument("--cfg-scale", type=float, default=1.8)
    parser.add_argument("--rg-scale", type=float, default=1.5)
    parser.add_argument("--interval", help="LO,HI guidance interval, e.g. 0,0.7; default: every step")
    parser.add_argument("--precision", choices=("bf16", "fp32"))
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    iv = tuple(float(v) for v in a.interval.split(",")) if a.interval else None
    print(json.dumps(run(quick=a.quick, model=a.model, method=a.method, steps=a.steps, batch=a.batch, batches=a.batches,
                         guidance=a.guidance, cfg_scale=a.cfg_scale, rg_scale=a.rg_scale, interval=iv,  # type: ignore[arg-type]
                         precision=a.precision), indent=2))

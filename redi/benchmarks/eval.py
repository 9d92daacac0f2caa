"""`redi bench eval`: Inception throughput and metric cost, projected to ADM's 50K samples + 10K reference images."""
from __future__ import annotations

import time

import numpy as np
import torch

from redi.sampler.evaluate import full_fp32
from redi.sampler.inception import FIDInceptionV3, he_init_
from redi.sampler.metrics import feature_statistics, frechet_distance, precision_recall

NUM_SAMPLES = 50_000  # ADM's FID-50K sample batch
NUM_REF = 10_000  # VIRTUAL_imagenet256_labeled.npz holds 10,000 images


def _images_per_s(device: torch.device, batch: int, reps: int, side: int) -> float:
    """Inception forward throughput (random weights; speed does not depend on them) on uint8 side×side images."""
    net = he_init_(FIDInceptionV3(), seed=0).eval().to(device)
    images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode(), full_fp32():
        net(images)  # warm-up: cuDNN algorithm choice, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            net(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * reps / (time.perf_counter() - t0)


def _precision_recall_s(n: int, dim: int) -> float:
    """Seconds of precision/recall on n reference and n sample features of width dim."""
    rng = np.random.default_rng(0)
    ref, samples = rng.random((n, dim), np.float32), rng.random((n, dim), np.float32)
    t0 = time.perf_counter()
    precision_recall(ref, samples)
    return time.perf_counter() - t0


def _frechet_s(dim: int) -> float:
    """Seconds of one Fréchet distance between two dim-wide Gaussians (the eigen/SVD part of FID)."""
    rng = np.random.default_rng(0)
    a, b = (feature_statistics(rng.random((2 * dim, dim))) for _ in range(2))
    t0 = time.perf_counter()
    frechet_distance(a, b)
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict[str, float | str]:
    """Measure feature extraction (GPU when present) and the metrics (CPU), and project a 50K evaluation."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    batch, reps = (64, 10) if on_gpu else ((2, 1) if quick else (16, 2))
    side = 64 if quick else 256  # ADM ImageNet-256 batches are 256×256; the net resizes to 299 either way
    ips = _images_per_s(device, batch, reps, side)
    pr_n, pr_dim = (500, 256) if quick else (5000, 2048)
    pr_s = _precision_recall_s(pr_n, pr_dim)
    # Brute-force k-NN cost ∝ pairs × width: radii (Ns² + Nr²) plus the two membership searches (2·Ns·Nr).
    pairs_50k = NUM_SAMPLES**2 + NUM_REF**2 + 2 * NUM_SAMPLES * NUM_REF
    pr_50k_s = pr_s * pairs_50k / (4 * pr_n**2) * (2048 / pr_dim)
    fd_dim = 256 if quick else 2048
    return {
        "device": str(torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"),
        "image_side": float(side),
        "batch_size": float(batch),
        "inception_images_per_s": ips,
        "inception_50k_plus_10k_ref_s_projected": (NUM_SAMPLES + NUM_REF) / ips,
        f"precision_recall_{pr_n}x{pr_n}x{pr_dim}_s": pr_s,
        "precision_recall_50k_vs_10k_s_projected": pr_50k_s,
        f"frechet_distance_{fd_dim}d_s": _frechet_s(fd_dim),
    }

"""`redi bench pca`: throughput and memory of the streaming PCA fit on a synthetic features store."""
from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from redi.common.runtime import resolve_device
from redi.pipeline.pca import PCAConfig, FeatureStore, MomentAccumulator, fit_pca, read_batches

SPEC_IMAGES = 76_800  # SPEC §4: images in the reference fit
CHUNK_IMAGES = 32  # images per zarr chunk of the synthetic store


def peak_rss_growth(fn: Callable[[], object]) -> int | None:
    """Growth in bytes of the resident-set peak while fn runs (torch's allocations too); None off Linux."""

    def read_kb(field: str) -> int:
        found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        assert found is not None, f"/proc/self/status has no {field}"
        return int(found.group(1))

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = read_kb("VmRSS")
    fn()
    return (read_kb("VmHWM") - base) * 1024


def synthetic_features(root: Path, n_images: int, p: int, d: int, seed: int = 0) -> FeatureStore:
    """A features store of random float16 tokens, written chunk by chunk (no manifest: benchmark only)."""
    group = zarr.open_group(root / "store.zarr", mode="w")
    patch = group.create_array("patch", shape=(n_images, p, d), dtype="float16", chunks=(CHUNK_IMAGES, p, d))
    rng = np.random.default_rng(seed)
    for start in range(0, n_images, CHUNK_IMAGES):
        b = min(CHUNK_IMAGES, n_images - start)
        patch[start : start + b] = (rng.standard_normal((b, p, d), dtype=np.float32) + 0.5).astype(np.float16)
    return FeatureStore(patch=patch, valid=np.ones(n_images, dtype=bool), fingerprint="benchmark", manifest={})


def run(quick: bool = False, device: str = "auto") -> dict[str, float | str]:
    """Time reading, accumulating and the whole fit; report tokens/s and the projected SPEC §4 fit time."""
    n_images, p, d = (64, 256, 768) if quick else (2048, 256, 768)
    batch_images = 64
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        features = synthetic_features(Path(tmp), n_images, p, d)
        indices = np.arange(n_images)
        n_tokens = n_images * p

        start = time.perf_counter()
        blocks = sum(1 for _ in read_batches(features.patch, indices, batch_images))
        read_s = time.perf_counter() - start
        assert blocks == -(-n_images // batch_images), "read_batches lost a block"

        block = np.asarray(features.patch[:batch_images])  # (B, P, D) float16, reused: compute only
        acc = MomentAccumulator(d, dev)
        start = time.perf_counter()
        for _ in range(blocks):
            acc.update(block)
        acc.moments()  # synchronises a CUDA device
        compute_s = time.perf_counter() - start

        cfg = PCAConfig(num_images=n_images, device=str(dev), batch_images=batch_images)
        timing: dict[str, float] = {}

        def timed_fit() -> None:
            t0 = time.perf_counter()
            fit_pca(features, cfg)
            timing["fit_s"] = time.perf_counter() - t0

        growth = peak_rss_growth(timed_fit)
    fit_tokens_per_s = n_tokens / timing["fit_s"]
    return {
        "device": str(dev),
        "torch_threads": float(torch.get_num_threads()),
        "images": float(n_images),
        "tokens": float(n_tokens),
        "dim": float(d),
        "read_tokens_per_s": n_tokens / read_s,
        "accumulate_tokens_per_s": n_tokens / compute_s,
        "fit_tokens_per_s": fit_tokens_per_s,
        "fit_s": timing["fit_s"],
        "peak_rss_growth_mb": float("nan") if growth is None else growth / 2**20,
        "read_buffer_mb": 2 * batch_images * p * d * 2 / 2**20,  # the block in use and the one being read
        "projected_spec_fit_s": SPEC_IMAGES * p / fit_tokens_per_s,
    }

"""Shard reader throughput: Zarr and WebDataset readers vs the public one-file-per-sample layout.

Builds `num` synthetic `latents/`, `features/` and `pca.safetensors` (docs/FORMATS.md), runs
the real `shards` stage on them, then times one process (no workers) reading two epochs in batches
of 256 with the fields moments (8×32×32) + pcs (32×16×16) + cls: samples/s, and the CPU time per
sample, which other work on a shared machine hardly moves. The baseline is the layout of the
public REPA/ReDi code: one PNG (256×256) and one `.npy` (the moments) per sample, read per sample
with `PIL.Image.open` + `np.load` through a DataLoader. The synthetic DINOv2 width is 64 instead of
768 (a 768-wide patch-token store of 8k images would be 3 GB), so the CLS field is 128 bytes
instead of 1.5 KB: 4% fewer bytes per sample than real shards. It also times the WebDataset reader's
own tar parser and .npy decoder against `tarfile` and `np.load` on one of those tars.

With `shards` (`redi bench loader --shards URL`) it reads existing shards instead, local or at any
fsspec URL: samples/s and MB/s of each format they hold, the WebDataset reader with and without
read-ahead. `python -m redi.benchmarks.loader --shards DIR --link-latency-ms 50 --link-mb-per-s 100`
serves local shards through a loopback HTTP server that waits and paces like a distant object store.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import json
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from redi.common.atomic import atomic_write_json
from redi.common.errors import UserError
from redi.pipeline.pca import features_fingerprint
from redi.pipeline.pca_file import PCAModel
from redi.pipeline.readers import DEFAULT_FIELDS, _NpyDecoder, make_loader, tar_members
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.shards import ShardsConfig, build_shards, tar_relpath
from redi.pipeline.stage import ChunkError, Manifest, StageDir
from redi.pipeline.vaes import latent_space, sd_vae_config
from redi.trainer.config import resolve_shards_dir

BATCH = 256


def _write_input_stage(root: Path, stage: str, arrays: dict[str, np.ndarray], keys: list[str],
                       invalid: set[int], resolution: int, chunk: int, record: dict[str, Any]) -> Manifest:
    """A complete input stage (manifest, store.zarr, keys.json, progress/, errors.jsonl) holding `arrays`; `record`:
    the manifest's parameters beyond the run's settings."""
    n = len(keys)
    stage_dir = StageDir(root, n_chunks=-(-n // chunk))
    identity = {"kind": "tiny-random", "id": "tiny-random", "hash": "synthetic", "class": stage, "dim": 0}
    params = {"resolution": resolution, "chunk_size": chunk, **record}
    manifest = Manifest(stage=stage, params=params, encoder=identity,
                        source={"kind": "synthetic", "fingerprint": "synthetic-source", "count": n}, tiny_random=True)
    stage_dir.open(manifest, force=True)
    group = zarr.open_group(root / "store.zarr", mode="w")
    for name, values in arrays.items():
        group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(chunk, *values.shape[1:]))[:] = values
    atomic_write_json(root / "keys.json", keys)
    for c in range(stage_dir.n_chunks):
        bad = sorted(i for i in invalid if c * chunk <= i < (c + 1) * chunk)
        stage_dir.commit(c, [ChunkError(index=i, key=keys[i], reason=f"unreadable in {stage}") for i in bad])
    stage_dir.finish()
    return manifest


def make_stage_inputs(data: Path, num_images: int, *, latent_side: int = 4, grid: int = 3, dim: int = 16,
                      num_classes: int = 5, invalid_latents: tuple[int, ...] = (),
                      invalid_features: tuple[int, ...] = (), seed: int = 0, chunk: int = 16) -> None:
    """Synthetic `latents/`, `features/` and `pca.safetensors` under `data`; keys hold '/' and '.'."""
    rng = np.random.default_rng(seed)
    n, h, p2 = num_images, latent_side, grid * grid
    labels = (np.arange(n) * num_classes // n).astype(np.int64)  # class-sorted, as an ImageFolder index is
    keys = [f"class{label:03d}/img.{i:06d}" for i, label in enumerate(labels)]
    bad_lat, bad_feat = set(invalid_latents), set(invalid_features)
    lat_valid = np.array([i not in bad_lat for i in range(n)])
    feat_valid = np.array([i not in bad_feat for i in range(n)])
    space = latent_space(sd_vae_config())  # SD-VAE's 4-channel f8 latents
    moments = rng.standard_normal((n, 2 * space.channels, h, h), dtype=np.float32).astype(np.float16)  # (N, 2C, h, h)
    _write_input_stage(data / "latents", "encode", {"moments": moments, "labels": labels, "valid": lat_valid},
                       keys, bad_lat, space.downsampling * h, chunk, {"latent_space": space.record()})
    cls = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    patch = (rng.standard_normal((n, p2, dim), dtype=np.float32) * rng.uniform(0.5, 2.0, dim)).astype(np.float16)
    features = _write_input_stage(data / "features", "features",
                                  {"cls": cls, "patch": patch, "labels": labels, "valid": feat_valid},
                                  keys, bad_feat, space.downsampling * h, chunk, {})
    components, _ = np.linalg.qr(rng.standard_normal((dim, dim)))  # (D, D) orthonormal
    variance = np.sort(rng.uniform(0.1, 2.0, dim))[::-1]
    PCAModel(mu=rng.standard_normal(dim), std=rng.uniform(0.5, 2.0, dim), pca_mean=0.1 * rng.standard_normal(dim),
             components=components.T.copy(), explained_variance=variance,
             explained_variance_ratio=variance / variance.sum(),
             n_images=n, n_tokens=n * p2, seed=seed, source=features_fingerprint(features),
             ).save(data / "pca.safetensors")


class PublicLayoutDataset(Dataset):
    """The per-sample layout of the public REPA/ReDi code: `np.load` of one .npy and `PIL.Image.open` of one PNG."""

    def __init__(self, root: Path, num: int):
        self.root = root
        self.num = num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.array(Image.open(self.root / f"{i:06d}.png"))  # (256, 256, 3) uint8
        moments = np.load(self.root / f"{i:06d}.npy")  # (8, 32, 32) float16
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(moments)


def _write_public_layout(root: Path, moments: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i, m in enumerate(moments):
        coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # upsampled noise: photo-like PNG size
        Image.fromarray(coarse).resize((256, 256), Image.BICUBIC).save(root / f"{i:06d}.png")
        np.save(root / f"{i:06d}.npy", m)


def _samples_per_second(batches: Iterable[Any], num_samples: int) -> tuple[float, float]:
    """Samples/s over the batches covering `num_samples` samples (the first batch included), and this process's
    CPU µs per sample over them: with no workers, the reader's own cost, which a busy shared machine hardly moves."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    seen = 0
    for batch in batches:
        seen += len(batch["index"] if isinstance(batch, dict) else batch[0])  # shard batch or (images, moments)
        if seen >= num_samples:
            break
    return seen / (time.perf_counter() - t0), (time.process_time() - cpu0) / seen * 1e6


def _tarfile_members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as f:
        return f.getmembers()


def _best_seconds(work: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


def parser_speedups(tar: bytes, repeats: int = 20) -> dict[str, float]:
    """How much faster the reader's tar listing and .npy decoding are than `tarfile` and `np.load` on one tar."""
    npy = [(offset, size) for name, offset, size in tar_members(tar, Path("shard.tar"), "") if name.endswith(".npy")]
    decode = _NpyDecoder()
    ours_list = _best_seconds(lambda: list(tar_members(tar, Path("shard.tar"), "")), repeats)
    tarfile_list = _best_seconds(lambda: _tarfile_members(tar), repeats)
    ours_decode = _best_seconds(lambda: [decode(tar, offset, size) for offset, size in npy], repeats)
    np_load = _best_seconds(lambda: [np.load(io.BytesIO(tar[offset:offset + size])) for offset, size in npy], repeats)
    return {"tar_members": len(npy), "tar_listing_vs_tarfile": tarfile_list / ours_list,
            "npy_decoding_vs_np_load": np_load / ours_decode}


def shard_rates(shards: str, samples: int | None = None) -> dict[str, float | str]:
    """Samples/s and MB/s of reading existing shards (a path or a URL), each format they hold, from a cold start."""
    root = resolve_shards_dir(shards)
    info = read_shard_info(root)
    num = samples or info.num_samples
    sample_bytes = sum(info.fields[name].nbytes for name in ("label", *DEFAULT_FIELDS))
    figures: dict[str, float | str] = {"shards": str(root), "samples": num, "sample_bytes": sample_bytes}
    runs = [("zarr", "zarr", 0), ("wds", "wds", 2), ("wds_no_read_ahead", "wds", 0)]
    for name, fmt, depth in (r for r in runs if r[1] in info.formats):
        loader = make_loader(root, batch_size=min(BATCH, num), format=fmt, seed=0, read_ahead=depth,
                             epochs=-(-num // info.num_samples))  # finite: no tar fetched ahead goes unread
        rate, _ = _samples_per_second(iter(loader), num)
        figures |= {f"{name}_samples_per_s": rate, f"{name}_MB_per_s": rate * sample_bytes / 1e6}
    return figures


class _SlowLink(http.server.SimpleHTTPRequestHandler):
    """Serves files as a distant store would: `latency_s` before each body, then `bytes_per_s` per connection."""

    latency_s = 0.0
    bytes_per_s = float("inf")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        time.sleep(self.latency_s)
        t0, sent = time.perf_counter(), 0
        while chunk := source.read(1 << 16):
            outputfile.write(chunk)
            sent += len(chunk)
            time.sleep(max(0.0, sent / self.bytes_per_s - (time.perf_counter() - t0)))


@contextlib.contextmanager
def slow_link(directory: Path, latency_ms: float, mb_per_s: float) -> Iterator[str]:
    """A loopback HTTP server of `directory` behind a simulated link; yields its URL."""
    handler = type("Link", (_SlowLink,), {"latency_s": latency_ms / 1e3, "bytes_per_s": mb_per_s * 1e6})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def run(quick: bool = False, num: int | None = None, shards: str | None = None) -> dict[str, float | str]:
    """Build `num` synthetic shard samples, then measure samples/s of both readers and of the public layout
    (or, given `shards`, of reading `num` of those)."""
    if shards is not None:
        return shard_rates(shards, num)
    num = num or (1024 if quick else 8192)
    num_public = 64 if quick else 512
    if num < BATCH:
        raise UserError(f"The loader benchmark needs at least one batch of samples ({BATCH}), not {num}.")
    with tempfile.TemporaryDirectory(prefix="redi-bench-loader-") as tmp:
        data = Path(tmp)
        make_stage_inputs(data, num, latent_side=32, grid=16, dim=64, chunk=256)
        t0 = time.perf_counter()
        result = build_shards(data, ShardsConfig(formats=("wds", "zarr"), pcs=32, shard_size=1024), progress=False)
        stage_seconds = time.perf_counter() - t0
        shards = data / "shards"
        figures: dict[str, float | str] = {"samples": num, "batch": BATCH, "stage_samples_per_s": num / stage_seconds}
        figures |= parser_speedups((shards / tar_relpath(0)).read_bytes(), repeats=2 if quick else 20)
        for fmt in ("zarr", "wds"):
            loader = make_loader(shards, batch_size=BATCH, format=fmt, seed=0, epochs=2)
            rate, cpu_us = _samples_per_second(iter(loader), 2 * result.num_samples)
            figures |= {f"{fmt}_samples_per_s": rate, f"{fmt}_us_per_sample": 1e6 / rate, f"{fmt}_cpu_us_per_sample": cpu_us}
        moments = zarr.open_array(shards / "samples.zarr" / "moments", mode="r")[:min(num, num_public)]
        _write_public_layout(data / "public", moments, seed=1)
        public = DataLoader(PublicLayoutDataset(data / "public", len(moments)), batch_size=BATCH, shuffle=True)
        figures["public_layout_samples_per_s"] = _samples_per_second(iter(public), len(moments))[0]
    for fmt in ("zarr", "wds"):
        figures[f"{fmt}_vs_public"] = figures[f"{fmt}_samples_per_s"] / figures["public_layout_samples_per_s"]
    figures["fields"] = "moments(8x32x32) + pcs(32x16x16) + cls(64) + label, float16"
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", "--samples", type=int, help="synthetic dataset size (default 8192; 1024 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shards", help="read these shards (a data root or shards/ directory, a path or a URL)")
    parser.add_argument("--link-latency-ms", type=float, help="serve the local --shards DIR over a loopback link "
                        "with this wait before each response …")
    parser.add_argument("--link-mb-per-s", type=float, default=100.0, help="… and this bandwidth per connection")
    a = parser.parse_args()
    if a.link_latency_ms is None:
        print(json.dumps(run(quick=a.quick, num=a.num, shards=a.shards), indent=2))
    else:
        root = Path(a.shards).resolve()
        with slow_link(root.parent, a.link_latency_ms, a.link_mb_per_s) as url:
            figures = run(num=a.num, shards=f"{url}/{root.name}")
        print(json.dumps(figures | {"link": f"{a.link_latency_ms:g} ms, {a.link_mb_per_s:g} MB/s per connection"},
                         indent=2))

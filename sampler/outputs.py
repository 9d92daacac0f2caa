"""The files `redi sample` writes into its output directory.

    images/000123.png   one PNG per image, named by its global index: the resumable unit (written
                        atomically, so a file that exists is complete)
    pcs/000123.npy      the generated PC channels (r, h, h) float32 of the images shown in the grids
    grid.png            the first min(N, 64) images
    pcs.png             the same images' first three generated PCs as RGB (models with PC channels)
    samples.npz         ADM format: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,) labels
    sample.json         every setting, the checkpoint's identity and the work spent
    errors.jsonl        the indices whose sample was not finite (NaN or inf), one JSON object per line;
                        only while some are (no image is written for them, so nothing is assembled)

The grid, the PC picture and the .npz are assembled once, at the end, from the per-image files.
"""
from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from common.atomic import atomic_open, atomic_write_bytes, atomic_write_with
from common.errors import UserError

IMAGES_DIR = "images"
PCS_DIR = "pcs"
GRID_PNG = "grid.png"
PCS_PNG = "pcs.png"
NPZ_FILE = "samples.npz"
SAMPLE_JSON = "sample.json"
ERRORS_JSONL = "errors.jsonl"
GRID_MAX = 64  # images shown in grid.png and pcs.png
GRID_PADDING = 2  # black pixels between grid cells (torchvision's make_grid default)
PNG_COMPRESS_LEVEL = 1  # zlib level: ~3× faster than PIL's default 6, files ~15% larger, still lossless
PC_PERCENTILES = (1.0, 99.0)  # the PC picture maps this percentile range of each PC to 0…255


def image_path(out: Path, index: int) -> Path:
    """Per-image PNG of global index `index`."""
    return Path(out) / IMAGES_DIR / f"{index:06d}.png"


def pcs_path(out: Path, index: int) -> Path:
    """Generated PCs of global index `index` (kept for the grid images only)."""
    return Path(out) / PCS_DIR / f"{index:06d}.npy"


QUANTIZE = {  # decoded x in [−1, 1] → the float whose truncation is the stored grey level
    "nearest": lambda x: 127.5 * x + 128.0,  # DiT, SiT and ReDi sample scripts: round half up
    "floor": lambda x: 127.5 * (x + 1.0),  # REPA and REG generate.py: 0.5 grey level darker on average
}


def to_uint8(images: Tensor, quantize: str = "nearest") -> np.ndarray:
    """Decoded images (N, 3, H, W) in [−1, 1] → uint8 (N, H, W, 3): clamp to [0, 255] and truncate, as the references."""
    x = QUANTIZE[quantize](images.float()).clamp(0, 255).to(torch.uint8)  # (N, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)


def write_png(path: Path, image: np.ndarray) -> None:
    """One uint8 (H, W, 3) image as a PNG, atomically (a crash never leaves a partial file under `path`)."""
    atomic_write_with(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL))


def read_png(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A per-image PNG as uint8 (H, W, 3), checked against the expected shape when one is given."""
    with Image.open(path) as img:
        image = np.asarray(img.convert("RGB"))
    if shape is not None and image.shape != shape:
        raise UserError(
            f"{path} is {image.shape[1]}×{image.shape[0]}, not {shape[1]}×{shape[0]}: "
            "it was made by another model; delete it or use another --out."
        )
    return image


def write_pcs(path: Path, pcs: np.ndarray) -> None:
    """One image's generated PCs (r, h, h) float32 as .npy, atomically."""
    with atomic_open(path) as f:
        np.save(f, np.ascontiguousarray(pcs, dtype=np.float32))


def write_errors(path: Path, indices: list[int], reason: str) -> None:
    """errors.jsonl: one {"index", "reason"} object per line, atomically."""
    atomic_write_bytes(path, "".join(json.dumps({"index": i, "reason": reason}) + "\n" for i in indices).encode())


def make_grid(images: np.ndarray, padding: int = GRID_PADDING) -> np.ndarray:
    """uint8 (N, H, W, 3) → one uint8 picture with ⌈√N⌉ columns, `padding` black pixels around each cell."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = padding + (k // cols) * (h + padding), padding + (k % cols) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def pcs_to_rgb(pcs: np.ndarray, side: int) -> np.ndarray:
    """Generated PCs (N, r, h, h) → uint8 (N, side, side, 3): PCs 1–3 as R, G, B (black when r < 3).

    Each PC is mapped from its 1st–99th percentile over the whole batch to 0…255 (a robust
    per-channel scale, so colours are comparable between images), then upsampled nearest-neighbour
    by side/h so each latent cell is a visible block aligned with the image grid.
    """
    n, r, h, w = pcs.shape
    rgb = np.zeros((n, 3, h, w), dtype=np.float64)  # (N, 3, h, h)
    rgb[:, : min(r, 3)] = pcs[:, :3]
    lo = np.percentile(rgb, PC_PERCENTILES[0], axis=(0, 2, 3), keepdims=True)  # (1, 3, 1, 1)
    hi = np.percentile(rgb, PC_PERCENTILES[1], axis=(0, 2, 3), keepdims=True)  # (1, 3, 1, 1)
    scaled = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)  # (N, 3, h, h)
    pixels = np.round(scaled * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, h, h, 3)
    factor = max(1, side // h)
    return pixels.repeat(factor, axis=1).repeat(factor, axis=2)  # (N, h·f, h·f, 3)


def write_picture(path: Path, picture: np.ndarray) -> None:
    """A uint8 (H, W, 3) picture (grid) as a PNG, atomically."""
    atomic_write_with(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))


def write_adm_npz(path: Path, images: Iterable[np.ndarray], shape: tuple[int, int, int, int], labels: np.ndarray) -> None:
    """ADM's sample batch: arr_0 uint8 `shape` = (N, H, W, 3) and arr_1 int64 (N,), atomically.

    The images are streamed into the (uncompressed, zip64) archive one at a time, so memory stays
    at one image instead of N·H·W·3 bytes (9.8 GB for 50K at 256²); numpy.load and ADM's
    evaluator read the result like any numpy.savez file.
    """
    assert labels.shape == (shape[0],), f"labels {labels.shape} do not match {shape[0]} images"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_open(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            count = 0
            for image in images:
                assert image.shape == shape[1:] and image.dtype == np.uint8, f"image {count} is {image.shape} {image.dtype}"
                member.write(np.ascontiguousarray(image).tobytes())
                count += 1
            assert count == shape[0], f"{count} images streamed for an arr_0 of {shape[0]}"
        with zf.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, labels.astype(np.int64))

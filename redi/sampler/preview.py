"""`redi preview`: one captioned picture of what a model learns from and what it makes.

Rows: the first training latents of the shards decoded by their VAE, the same samples' PCs (1–3 as RGB),
and, given a `redi sample` folder, its images and its generated PCs on the same colour scale as the
training PCs. Captions say what each row is and with which settings it was made (from sample.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from redi.common.errors import UserError
from redi.common.schema import Range, check_ranges
from redi.common.stamp import content_digest, picture_stamp
from redi.pipeline.shard_info import ShardInfo, read_shard_info
from redi.pipeline.shards_config import SHARDS_JSON
from redi.pipeline.stage import TINY_RANDOM
from redi.sampler.outputs import IMAGES_DIR, SAMPLE_JSON, image_path, pcs_path, pcs_to_rgb, read_png, read_sample_json, to_uint8, \
    write_picture
from redi.sampler.settings import describe_settings

CELL = 128  # side of one picture in the sheet, pixels
PAD = 4  # between pictures and rows
CAPTION_SIZE = 15  # font size of the row captions
CAPTION_HEIGHT = 22
NO_CELLS = np.zeros((0, CELL, CELL, 3), np.uint8)  # a row of a sheet left as it was drawn


@dataclass(frozen=True)
class PreviewConfig:
    """What `redi preview` shows: its flags."""

    data: Path
    """Data root (or its shards/) whose training samples to show."""
    samples: Path | None = None
    """A `redi sample` output folder to show beside them (its first images and generated PCs)."""
    num: Annotated[int, Range(1, 64)] = 8
    """Pictures per row."""
    out: Path | None = None
    """The PNG to write; default: DATA/preview.png."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class Row:
    """One captioned row of the sheet."""

    caption: str
    cells: np.ndarray  # uint8 (N, CELL, CELL, 3)
    meaning: str  # what a person should see in it (the command's summary)


@dataclass(frozen=True)
class PreviewResult:
    out: Path
    rows: list[Row]
    tiny_random: bool  # the VAE has random weights: decoded latents are texture, not pictures


def preview(cfg: PreviewConfig) -> PreviewResult:
    """Read the first `num` training samples (and the samples' first images), lay them out, write the PNG; a PNG
    stamped with the digest of these inputs (common/stamp.py) is left as it is."""
    root = cfg.data / "shards" if (cfg.data / "shards" / SHARDS_JSON).exists() else cfg.data
    info = read_shard_info(str(root))
    n = min(cfg.num, info.num_samples)
    report = _sample_report(cfg.samples) if cfg.samples else None
    count = min(n, report["num"]) if report else 0
    images = [image_path(cfg.samples, i) for i in range(count)] if cfg.samples else []
    pcs = [pcs_path(cfg.samples, i) for i in range(count)] if cfg.samples else []
    kept = bool(pcs) and all(p.exists() for p in pcs)  # the sampler keeps the grid images' PCs
    texts = _row_texts(info, report["settings"] if report else None, kept)
    sample_files = [cfg.samples / SAMPLE_JSON, *images, *(pcs if kept else [])] if cfg.samples else []
    source = content_digest([root / SHARDS_JSON, *sample_files], f"{n} images, cells of {CELL}")
    out = cfg.out if cfg.out is not None else cfg.data / "preview.png"
    tiny = info.raw["vae"].get("kind") == TINY_RANDOM
    if picture_stamp(out) == source:  # drawn from these very inputs: nothing to do
        return PreviewResult(out, [Row(caption, NO_CELLS, meaning) for caption, meaning in texts], tiny)
    names, decoded, real_pcs = _training(root, info, n)
    generated_pcs = np.stack([np.load(p) for p in pcs]) if kept else None
    real_rgb, generated_rgb = _pc_cells(real_pcs, generated_pcs)
    cells = [_labelled(_cells(decoded), names), real_rgb]
    if images:
        cells.append(_cells(np.stack([read_png(p) for p in images])))
    if generated_rgb is not None:
        cells.append(generated_rgb)
    rows = [Row(caption, row_cells, meaning) for (caption, meaning), row_cells in zip(texts, cells, strict=True)]
    write_picture(out, _sheet(rows), source)
    return PreviewResult(out, rows, tiny)


def _row_texts(info: ShardInfo, settings: dict[str, Any] | None, kept: bool) -> list[tuple[str, str]]:
    """(caption, what a person should see) of each row."""
    vae = info.raw["vae"]
    texture = ": random weights decode every latent, these and the samples', to texture" if vae.get("kind") == TINY_RANDOM else ""
    texts = [(f"Training latents from the shards, decoded by their VAE ({vae['id']}{texture})",
              "the VAE's decoding of the latents the model trains on: the best a sample can look"),
             (f"Their PCs 1-3 as RGB (K = {info.pcs} stored; ReDi generates the first r with the latent)",
              "the representation the model learns to generate with the latent")]
    if settings is not None:
        texts.append((f"Samples: {describe_settings(settings)}", "what the model makes from noise with these settings"))
    if kept:
        texts.append(("Their generated PCs 1-3, on the training PCs' colour scale",
                      "the representation generated jointly with each sample"))
    return texts


def _training(root: Path, info: ShardInfo, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The shards' first `n` samples (shuffled at write time, so varied): class names, the posterior means decoded
    by the recorded VAE, uint8 (n, R, R, 3), and the PCs, float32 (n, K, p, p)."""
    import torch  # torch, transformers and diffusers: seconds, only to draw

    from redi.pipeline.encoders import VAE, load, resolve
    from redi.pipeline.readers import read_first

    _, keys, arrays = read_first(str(root), n, ("moments", "pcs"))
    vae_record = info.raw["vae"]
    revision = vae_record.get("revision", "main") if vae_record.get("kind") == "hub" else "main"
    vae = load(resolve(VAE, vae_record["id"], revision))
    with torch.no_grad():
        mean = torch.from_numpy(arrays["moments"][:, : info.latent_shape[0]].astype(np.float32))  # (n, C, h, h)
        decoded = to_uint8(vae.decode(mean).sample)  # (n, R, R, 3); the moments are unscaled: no scale or shift
    names = [key.split("/")[0] for key in keys]  # ImageFolder keys start with the class folder
    return names, decoded, arrays["pcs"].astype(np.float32)


def _sample_report(samples: Path) -> dict[str, Any]:
    """A finished `redi sample` folder's sample.json; one sentence for anything else."""
    path = samples / SAMPLE_JSON
    if not path.is_file() or not (samples / IMAGES_DIR).is_dir():
        raise UserError(f"{samples} is not a `redi sample` output folder (no {SAMPLE_JSON} or {IMAGES_DIR}/).")
    report = read_sample_json(samples, f"rerun `redi sample --out {samples}`")
    if report.get("complete") is not True or report.get("num") is None:
        raise UserError(f"{samples} is not finished (its {SAMPLE_JSON} says so); rerun `redi sample --out {samples}`.")
    return report


def _labelled(cells: np.ndarray, names: list[str]) -> np.ndarray:
    """Each cell with its class name in its top-left corner, on a white box (readable over any picture)."""
    out = []
    font = ImageFont.load_default(size=CAPTION_SIZE - 3)
    for cell, name in zip(cells, names, strict=True):
        img = Image.fromarray(cell)
        draw = ImageDraw.Draw(img)
        draw.rectangle(draw.textbbox((2, 1), name, font=font), fill="white")
        draw.text((2, 1), name, fill="black", font=font)
        out.append(np.asarray(img))
    return np.stack(out)


def _cells(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) → (N, CELL, CELL, 3), resampled with a box filter (a faithful small view)."""
    return np.stack([np.asarray(Image.fromarray(im).resize((CELL, CELL), Image.Resampling.BOX)) for im in images])


def _pc_cells(real: np.ndarray, generated: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """PCs 1–3 as RGB cells, real (n, K, p, p) and generated (m, r, h, h) on one colour scale (the same units)."""
    if generated is None:
        return pcs_to_rgb(real[:, :3], CELL), None
    factor = generated.shape[-1] // real.shape[-1]  # the trainer upsamples p → h
    up = real[:, :3].repeat(factor, axis=2).repeat(factor, axis=3)  # (n, 3, h, h)
    gen = np.zeros((len(generated), 3, *generated.shape[-2:]), np.float32)
    gen[:, : min(3, generated.shape[1])] = generated[:, :3]
    both = pcs_to_rgb(np.concatenate([up, gen]), CELL)  # (n + m, CELL, CELL, 3)
    return both[: len(up)], both[len(up):]


def _sheet(rows: list[Row]) -> np.ndarray:
    """The rows one under the other, each under its caption, on a white page."""
    width = PAD + max(len(r.cells) for r in rows) * (CELL + PAD)
    height = sum(CAPTION_HEIGHT + CELL + PAD for _ in rows) + PAD
    page = Image.new("RGB", (max(width, 640), height), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=CAPTION_SIZE)
    top = PAD
    for row in rows:
        draw.text((PAD, top + 2), row.caption, fill="black", font=font)
        top += CAPTION_HEIGHT
        for i, cell in enumerate(row.cells):
            page.paste(Image.fromarray(cell), (PAD + i * (CELL + PAD), top))
        top += CELL + PAD
    return np.asarray(page)

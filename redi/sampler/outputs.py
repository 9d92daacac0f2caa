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

The directory's name says its settings (`default_out`); sample.json's settings must match a rerun's (`prepare_out`),
and one job at a time writes it (`out_lock`). The grid, the PC picture and the .npz are assembled once, at the end,
from the per-image files (`assemble`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from redi.common.atomic import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_with, read_json
from redi.common.errors import UserError
from redi.common.lock import exclusive
from redi.common.schema import Range, Shaped, load
from redi.common.stamp import PNG_KEY
from redi.sampler.config import QUANTIZE, SampleConfig
from redi.sampler.settings import SampleSettings

if TYPE_CHECKING:  # the folder's layout reads without torch (redi preview); the tensors' conversion imports it
    from torch import Tensor

    from redi.sampler.guidance import GuidanceConfig
    from redi.sampler.settings import SamplerChoice
    from redi.trainer.checkpoint import Checkpoint

IMAGES_DIR = "images"
PCS_DIR = "pcs"
GRID_PNG = "grid.png"
PCS_PNG = "pcs.png"
NPZ_FILE = "samples.npz"
SAMPLE_JSON = "sample.json"
ERRORS_JSONL = "errors.jsonl"
LOCK_FILE = ".lock"  # one sampling job at a time
WRITER_THREADS = 4  # PNG encoding runs in threads (zlib releases the GIL) while the next batch samples
GRID_MAX = 64  # images shown in grid.png and pcs.png
GRID_PADDING = 2  # black pixels between grid cells (torchvision's make_grid default)
PNG_COMPRESS_LEVEL = 1  # zlib level: ~3× faster than PIL's default 6, files ~15% larger, still lossless
PC_PERCENTILES = (1.0, 99.0)  # the PC picture maps this percentile range of each PC to 0…255
CAPTION_SIZE = 12  # font size of a grid's caption and of its class labels
CAPTION_LINE = 16  # pixels per caption line above a grid
LABEL_LINE = 14  # pixels of the class-label line under each row of cells


def image_path(out: Path, index: int) -> Path:
    """Per-image PNG of global index `index`."""
    return Path(out) / IMAGES_DIR / f"{index:06d}.png"


def pcs_path(out: Path, index: int) -> Path:
    """Generated PCs of global index `index` (kept for the grid images only)."""
    return Path(out) / PCS_DIR / f"{index:06d}.npy"


def to_uint8(images: Tensor, quantize: str = "nearest") -> np.ndarray:
    """Decoded images (N, 3, H, W) in [−1, 1] → uint8 (N, H, W, 3): clamp to [0, 255] and truncate, as the references."""
    import torch

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


def captioned_grid(images: np.ndarray, caption: str, labels: np.ndarray | None,
                   padding: int = GRID_PADDING) -> np.ndarray:
    """uint8 (N, H, W, 3) → one uint8 picture: ⌈√N⌉ columns of cells, `padding` black pixels around each (torchvision's
    make_grid), under a caption wrapped to the grid's width, each row of cells followed by a line with each cell's class
    label (no line for an unconditional model); white text on black, the cells' pixels untouched."""
    n, h, w, _ = images.shape
    cols, rows = math.ceil(math.sqrt(n)), math.ceil(n / math.ceil(math.sqrt(n)))
    font = ImageFont.load_default(size=CAPTION_SIZE)
    width = cols * (w + padding) + padding
    lines = _wrapped(caption, font, width - 2 * padding)
    label_line = LABEL_LINE if labels is not None else 0
    top = len(lines) * CAPTION_LINE + padding
    page = Image.new("RGB", (width, top + rows * (h + padding + label_line) + padding), "black")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((padding, padding + i * CAPTION_LINE), line, fill="white", font=font)
    for k, image in enumerate(images):
        x, y = padding + (k % cols) * (w + padding), top + padding + (k // cols) * (h + padding + label_line)
        page.paste(Image.fromarray(image), (x, y))
        if labels is not None:
            draw.text((x, y + h + 1), f"class {int(labels[k])}", fill="white", font=font)
    return np.asarray(page)


def _wrapped(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words."""
    lines = [""]
    for word in text.split():
        longer = f"{lines[-1]} {word}".strip()
        if lines[-1] and ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(longer, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = longer
    return lines


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


def write_picture(path: Path, picture: np.ndarray, drawn_from: str | None = None) -> None:
    """A uint8 (H, W, 3) picture (grid) as a PNG, atomically, stamped `drawn_from` (common/stamp.py) if given."""
    info = PngImagePlugin.PngInfo()
    if drawn_from:
        info.add_text(PNG_KEY, drawn_from)
    atomic_write_with(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG", pnginfo=info))


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


def default_out(ckpt: Checkpoint, run: Path | None, sampler: SamplerChoice, guidance: GuidanceConfig,
                cfg: SampleConfig, guide: Checkpoint | None = None) -> Path:
    """RUN/samples/NAME or CKPT_DIR/samples/NAME, NAME = step (and a post-hoc EMA's σ_rel), sampler (steps, options),
    guidance, scales (AutoGuidance: and the guide's SHA-256 prefix), interval, seed."""
    from redi.trainer.checkpoint import sigma_label

    parts = [f"step{ckpt.step:07d}", sampler.label()]
    if ckpt.posthoc_ema is not None:
        parts.insert(1, f"sigma{sigma_label(ckpt.posthoc_ema['sigma_rel'])}")
    if guidance.uses_ag and guide is not None:
        parts.append(f"ag{guidance.ag_scale:g}-guide{(guide.sha256 or '')[:8]}" + ("model" if cfg.guide_weights != "ema" else ""))
    if guidance.uses_cfg:
        parts.append(f"cfg{guidance.cfg_scale:g}" + ("all" if guidance.cfg_channels == "all" else "")
                     + (f"cls{guidance.cls_cfg_scale:g}" if guidance.cls_cfg_scale is not None else ""))
    if guidance.uses_rg:
        parts.append(f"rg{guidance.rg_scale:g}")
    if guidance.interval is not None and (guidance.uses_cfg or guidance.uses_rg or guidance.uses_ag):
        parts.append(f"interval{guidance.interval[0]:g}-{guidance.interval[1]:g}")
    if isinstance(cfg.labels, tuple) and ckpt.model_config.num_classes > 1:
        parts.append("labels" + hashlib.sha256(repr(cfg.labels).encode()).hexdigest()[:8])
    elif cfg.labels != "random" and ckpt.model_config.num_classes > 1:
        parts.append(cfg.labels)
    if cfg.weights != "ema":
        parts.append(cfg.weights)
    parts.append(f"seed{cfg.seed}")
    base = Path(run) if run is not None else ckpt.path.parent
    return base / "samples" / "-".join(parts)


@contextlib.contextmanager
def out_lock(out: Path, cfg: SampleConfig, rank: int) -> Iterator[None]:
    """One sampling job per output directory: its rank 0 holds OUT/.lock, so a second job is refused with one
    sentence; independently launched parts (cfg.rank/world_size) share it, and each part runs once."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory.")
    what = f"the samples in {out}"
    if cfg.world_size is None:
        with exclusive(out / LOCK_FILE, what) if rank == 0 else contextlib.nullcontext():
            yield
    else:
        part = out / f"{LOCK_FILE}-part-{rank}-of-{cfg.world_size}"
        with exclusive(out / LOCK_FILE, what, shared=True), exclusive(part, f"part {rank} of {what}"):
            yield


@dataclass(frozen=True)
class SampleRecord:
    """sample.json: the settings every image was made with (written before the first image), and once the outputs
    are assembled how many, where, and the work spent (report.py: final_report)."""

    settings: Annotated[dict[str, Any], Shaped(SampleSettings)]
    checkpoint_path: str
    complete: bool = False
    num: Annotated[int | None, Range(1)] = None
    batch_size: Annotated[int | None, Range(1)] = None
    world_size: Annotated[int | None, Range(1)] = None
    device: str | None = None
    outputs: dict[str, str | None] | None = None
    work: dict[str, Any] | None = None


def read_sample_json(out: Path, remedy: str) -> dict[str, Any]:
    """OUT/sample.json as written, every field checked against SampleRecord: a damaged one is one sentence ending in
    `remedy` (what remakes it)."""
    path = out / SAMPLE_JSON
    report = read_json(path, dict, remedy)
    load(SampleRecord, report, path, remedy)
    return report


def prepare_out(out: Path, settings: dict[str, Any], ckpt_path: Path, force: bool, writes: bool) -> None:
    """Refuse an output directory made with other settings, or holding images that no sample.json describes
    (or clear it, with force); start its sample.json."""
    path = out / SAMPLE_JSON
    try:
        report = read_sample_json(out, "pass --force to start these samples over") if path.exists() else {}
    except UserError:
        if not force:
            raise
        if writes:
            clear_out(out)
        report = {}
    have = report.get("settings")
    if have is not None and have != settings:
        changed = sorted(k for k in settings.keys() | have.keys() if settings.get(k) != have.get(k))
        if not force:
            raise UserError(
                f"{out} holds samples made with other settings ({', '.join(changed)}); "
                "choose another --out or pass --force to replace them."
            )
        if writes:
            clear_out(out)
        report = {}
    elif have is None and writes and any((out / IMAGES_DIR).glob("*.png")):  # e.g. sample.json deleted
        if not force:
            raise UserError(f"{out} holds images but no {SAMPLE_JSON} saying how they were made; choose another --out "
                            "or pass --force to replace them.")
        clear_out(out)
    if writes and not report:
        atomic_write_json(path, {"settings": settings, "checkpoint_path": str(ckpt_path), "complete": False})


def clear_out(out: Path) -> None:
    """Delete every file `redi sample` writes in `out` (--force on samples of other or unknown settings)."""
    for name in (IMAGES_DIR, PCS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    eval_json = Path(NPZ_FILE).with_suffix(".eval.json").name  # redi eval's report on the old samples
    for name in (GRID_PNG, PCS_PNG, NPZ_FILE, SAMPLE_JSON, ERRORS_JSONL, eval_json):
        (out / name).unlink(missing_ok=True)


def is_done(out: Path, index: int, needs_pcs: bool) -> bool:
    """The image exists (and its PCs, for a grid image of a model with PC channels)."""
    return image_path(out, index).exists() and (not needs_pcs or pcs_path(out, index).exists())


def is_assembled(out: Path, num: int, has_pcs: bool) -> bool:
    """sample.json says the outputs of these `num` images are complete, and each of them is there."""
    report = read_sample_json(out, "pass --force to start these samples over")
    outputs = [NPZ_FILE, GRID_PNG] + ([PCS_PNG] if has_pcs else [])
    return report.get("complete") is True and report.get("num") == num and all((out / name).exists() for name in outputs)


def write_image(out: Path, index: int, pixels: np.ndarray, pcs: np.ndarray | None) -> None:
    """One image's files: its PCs first (grid images), then the PNG that marks the image as done."""
    if pcs is not None:
        write_pcs(pcs_path(out, index), pcs)
    write_png(image_path(out, index), pixels)


class BatchWriter:
    """Writes each sampled batch's missing files in threads while the next batch samples (`with`: every file is on
    disk when it ends): per image its PCs (grid images of a model with PC channels) and then its PNG; an image whose
    sample or decoded pixels are not finite is not written."""

    def __init__(self, out: Path, done: Callable[[int], bool], grid_count: int, quantize: str):
        self.out, self.done, self.grid_count, self.quantize = out, done, grid_count, quantize
        self.pool = ThreadPoolExecutor(WRITER_THREADS)
        self.pending: list[Future[None]] = []

    def write_batch(self, batch: list[int], x: Tensor, decoded: Tensor, pcs_from: int | None) -> tuple[int, list[int]]:
        """Start writing global indices `batch` from the sample x (B, V + r, h, h) (its channels pcs_from: are the PCs;
        None: a model without PC channels) and the decoded images (B, 3, H, W); (images written, indices not finite).
        The previous batch's files are on disk when it returns (a write error surfaces here)."""
        import torch

        finite = (torch.isfinite(x).flatten(1).all(1) & torch.isfinite(decoded).flatten(1).all(1)).tolist()  # (B,)
        pixels = to_uint8(decoded, self.quantize)  # (B, H, W, 3)
        pcs = x[:, pcs_from:].float().cpu().numpy() if pcs_from is not None else None  # (B, r, h, h)
        self.wait()
        missing = [(k, i) for k, i in enumerate(batch) if not self.done(i) and finite[k]]
        self.pending = [self.pool.submit(write_image, self.out, i, pixels[k],
                                         pcs[k] if pcs is not None and i < self.grid_count else None) for k, i in missing]
        return len(missing), [i for k, i in enumerate(batch) if not finite[k]]

    def wait(self) -> None:
        """Every file started so far is on disk."""
        for f in self.pending:
            f.result()
        self.pending = []

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True)


def assemble(out: Path, num: int, labels: np.ndarray, grid_count: int, has_pcs: bool, caption: str, conditional: bool,
             bar: contextlib.AbstractContextManager[Callable[[int], None]]) -> None:
    """grid.png and pcs.png (the first images, captioned with `caption` and, for a class-conditional model, each
    image's class) and samples.npz from the per-image files (lossless PNGs), each written atomically."""
    shape = read_png(image_path(out, 0)).shape  # (H, W, 3); every other image must match it
    grid = np.stack([read_png(image_path(out, i), shape) for i in range(grid_count)])  # (G, H, W, 3)
    shown = labels[:grid_count] if conditional else None
    write_picture(out / GRID_PNG, captioned_grid(grid, caption, shown))
    if has_pcs:
        pcs = np.stack([np.load(pcs_path(out, i)) for i in range(grid_count)])  # (G, r, h, h)
        write_picture(out / PCS_PNG, captioned_grid(pcs_to_rgb(pcs, shape[0]), f"Generated PCs 1-3 as RGB: {caption}",
                                                    shown))
    with bar as advance:

        def images() -> Iterator[np.ndarray]:
            for i in range(num):
                yield read_png(image_path(out, i), shape)
                advance(1)

        write_adm_npz(out / NPZ_FILE, images(), (num, *shape), labels)


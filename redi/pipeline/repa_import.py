"""Import a dataset preprocessed by REPA's `preprocessing/dataset_tools.py` as our `latents/` stage, without the VAE.

REPA's layout (ReDi and REG reuse it) under one directory DIR, each part a folder or a `.zip`:
- `images/`: `dataset_tools.py convert --transform=center-crop-dhariwal --resolution=256x256`, i.e. the ADM centre
  crop, stored as PNGs `AAAAA/imgNNNNNNNN.png` with `dataset.json` {"labels": [[relpath, label], ...]};
- `vae-sd/`: `dataset_tools.py encode` of those images, one `AAAAA/img-mean-std-NNNNNNNN.npy` per image holding
  `torch.cat([posterior.mean, posterior.std], dim=1)` of the SD VAE (`stabilityai/sd-vae-ft-mse` by default, whose
  encoder is sd-vae-ft-ema's: we record ft-ema, the VAE our own encode uses and the sampler decodes with) on
  x = img/127.5 − 1 as float32 (8, R/8, R/8), and a `dataset.json` keyed by the .npy names.
That is exactly our moments layout (docs/FORMATS.md: channels 0–3 mean, 4–7 std, unscaled), so the values are
copied as they are.

REPA's `CustomDataset` pairs the sorted image names with the sorted .npy names by position; so do we, and where
both follow dataset_tools' names we check that their numbers agree. The image list is our own image index of
DIR/images, so the keys, labels and source fingerprint are those `redi features DIR/images` records, and
`redi shards` joins the two stages like a pair made by our own `encode` and `features`.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image

from redi.common.atomic import atomic_write_json, remove_temporaries
from redi.common.display import counting
from redi.common.errors import UserError
from redi.common.flags import OneOf
from redi.common.schema import Range, check_ranges
from redi.common.lock import exclusive
from redi.pipeline.encode import STORE_DTYPES, StageResult
from redi.pipeline.images import ImageSource, labels_from_dataset_json, open_source
from redi.pipeline.stage import (
    ChunkError, Manifest, StageDir, StageState, failure_reason, open_arrays, read_errors, stage_lock,
)
from redi.pipeline.vaes import latent_space, sd_vae_config

DECODER_VAE = "stabilityai/sd-vae-ft-ema"  # recorded VAE: REPA's default sd-vae-ft-mse has the same encoder weights
SD_VAE = latent_space(sd_vae_config())  # REPA encodes with SD-VAE: 4 channels, f8, a moments file holds 2 × 4
IMPORT_KIND = "repa-import"  # the encoder identity's kind: the moments were made outside redi
IMAGE_NAME = re.compile(r"(?:^|/)img(\d+)\.[^/.]+$")  # dataset_tools convert: AAAAA/imgNNNNNNNN.png
MOMENTS_NAME = re.compile(r"(?:^|/)img-mean-std-(\d+)\.npy$")  # dataset_tools encode: AAAAA/img-mean-std-NNNNNNNN.npy


@dataclass(frozen=True)
class RepaImportConfig:
    """One `redi import-repa` run: the flags of `redi import-repa`."""

    root: Path
    """REPA data directory with images/ and vae-sd/ (folders or .zip) from its preprocessing/dataset_tools.py."""
    data: Path
    """Our data root: the import writes DATA/latents."""
    images: Path | None = None
    """The image source that was encoded; default: ROOT/images, else ROOT/images.zip."""
    latents: Path | None = None
    """REPA's encoded latents; default: ROOT/vae-sd, else ROOT/vae-sd.zip."""
    vae: str = DECODER_VAE
    """VAE recorded for the latents and used to decode samples (REPA's sd-vae-ft-mse has the same encoder).

    sd-vae-ft-mse, REPA's default, and sd-vae-ft-ema share the encoder, so REPA's latents are ft-ema latents."""
    resolution: Annotated[int, Range(16)] = 256
    """Side R of REPA's images; the moments are (8, R/8, R/8)."""
    chunk_size: Annotated[int, Range(1)] = 256
    """Images per committed unit and per Zarr chunk."""
    dtype: Annotated[str, OneOf(STORE_DTYPES)] = "float16"
    """Storage dtype of the moments (REPA's files are float32)."""
    workers: Annotated[int, Range(1)] = 8
    """Threads reading the .npy files."""
    force: bool = False
    """Delete and redo a latents/ stage made with other settings."""

    def __post_init__(self) -> None:
        """Refuse out-of-range values with one sentence."""
        check_ranges(self)
        if self.resolution % 16:
            raise UserError(f"--resolution must be a positive multiple of 16 (got {self.resolution}).")
        if self.dtype not in STORE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)} (got {self.dtype}).")

    @property
    def moments_shape(self) -> tuple[int, int, int]:
        """(8, R/8, R/8): posterior mean and std of the 4 latent channels."""
        side = self.resolution // SD_VAE.downsampling
        return (2 * SD_VAE.channels, side, side)


class MomentFiles:
    """REPA's per-image `.npy` moments and their dataset.json labels, in a folder or a `.zip`."""

    def __init__(self, location: Path):
        self.location = Path(location)
        if self.location.is_dir():
            self.zip: zipfile.ZipFile | None = None
            names = _walk_npy(self.location)
            sizes = [(self.location / n).stat().st_size for n in names]
            meta = self.location / "dataset.json"
            labels_json = meta.read_bytes() if meta.is_file() else None
        elif self.location.suffix.lower() == ".zip" and self.location.is_file():
            try:
                self.zip = zipfile.ZipFile(self.location)
            except (OSError, zipfile.BadZipFile) as e:
                raise UserError(f"Cannot read the zip file {self.location}: {e}.") from None
            infos = sorted((i for i in self.zip.infolist() if i.filename.endswith(".npy")), key=lambda i: i.filename)
            names, sizes = [i.filename for i in infos], [i.file_size for i in infos]
            labels_json = self.zip.read("dataset.json") if "dataset.json" in self.zip.namelist() else None
        else:
            raise UserError(f"{self.location} is neither a folder nor a .zip of REPA latents (vae-sd).")
        if not names:
            raise UserError(f"{self.location} holds no .npy files: is it the vae-sd output of REPA's "
                            "dataset_tools.py encode?")
        self.relpaths: list[str] = names
        self.sizes: list[int] = sizes
        self.labels = None if labels_json is None else labels_from_dataset_json(labels_json, str(self.location))

    def __len__(self) -> int:
        return len(self.relpaths)

    def read(self, index: int) -> np.ndarray:
        """The array in file `index` (no pickle allowed)."""
        name = self.relpaths[index]
        data = self.zip.read(name) if self.zip is not None else (self.location / name).read_bytes()
        return np.load(io.BytesIO(data), allow_pickle=False)

    def fingerprint(self) -> str:
        """SHA-256 over `relpath\\tsize` lines and the labels file: identifies the imported latents."""
        h = hashlib.sha256()
        for name, size in zip(self.relpaths, self.sizes, strict=True):
            h.update(f"{name}\t{size}\n".encode())
        h.update(repr(self.labels).encode())
        return h.hexdigest()


def _walk_npy(root: Path) -> list[str]:
    """Sorted relative POSIX paths of the `.npy` files under `root` (hidden files and folders skipped)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if f.endswith(".npy") and not f.startswith(".")]
    return sorted(out)


def _default_part(root: Path, given: Path | None, name: str) -> Path:
    """`given`, else ROOT/NAME, else ROOT/NAME.zip."""
    if given is not None:
        return Path(given)
    folder = Path(root) / name
    return folder if folder.exists() or not folder.with_suffix(".zip").exists() else folder.with_suffix(".zip")


def check_pairing(source: ImageSource, files: MomentFiles) -> None:
    """Same count; where both use dataset_tools' names, image i and moments file i carry the same number."""
    if len(source) != len(files):
        raise UserError(f"{source.location} holds {len(source)} images but {files.location} holds {len(files)} "
                        ".npy files; REPA pairs them one to one.")
    for entry, name in zip(source.entries, files.relpaths, strict=True):
        image, moments = IMAGE_NAME.search(entry.relpath), MOMENTS_NAME.search(name)
        if image and moments and int(image.group(1)) != int(moments.group(1)):
            raise UserError(f"{files.location}/{name} does not belong to {source.location}/{entry.relpath} "
                            "(sorted position pairs them): are these the images that were encoded?")


def check_labels(source: ImageSource, files: MomentFiles) -> np.ndarray:
    """The labels to store: the image source's, which must agree with vae-sd/dataset.json where it has them."""
    labels = source.labels  # (N,) what `redi features` records
    if files.labels is None:
        return labels
    missing = [n for n in files.relpaths if n not in files.labels]
    if missing:
        raise UserError(f"{files.location}/dataset.json has no label for {len(missing)} files (e.g. {missing[0]}).")
    theirs = np.array([files.labels[n] for n in files.relpaths], dtype=np.int64)  # (N,)
    differ = np.flatnonzero(theirs != labels)
    if len(differ):
        i = int(differ[0])
        raise UserError(f"{len(differ)} labels of {files.location}/dataset.json differ from those of {source.location} "
                        f"(e.g. {files.relpaths[i]}: {theirs[i]} vs {source.entries[i].relpath}: {labels[i]}); "
                        "give the images folder whose dataset.json the latents were made with.")
    return labels


def check_resolution(source: ImageSource, files: MomentFiles, cfg: RepaImportConfig) -> None:
    """REPA's images are R×R already and its moments (8, R/8, R/8): refuse anything else before writing."""
    try:
        with Image.open(io.BytesIO(source.read_bytes(0))) as im:
            size = im.size
    except Exception as e:  # any decoder error on the probe image
        raise UserError(f"Cannot read {source.location}/{source.entries[0].relpath} ({type(e).__name__}: {e}).") from None
    if size != (cfg.resolution, cfg.resolution):
        raise UserError(f"The images in {source.location} are {size[0]}×{size[1]}, "
                        f"not {cfg.resolution}×{cfg.resolution}: "
                        f"pass --resolution {size[0]} if they are REPA's square crops.")
    first = files.read(0)
    if first.shape != cfg.moments_shape:
        raise UserError(f"{files.location}/{files.relpaths[0]} holds an array of shape {first.shape}, not the "
                        f"{cfg.moments_shape} mean‖std of a {cfg.resolution}-pixel image.")


def _read_moments(files: MomentFiles, index: int, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray | None, str]:
    """(moments, "") or (None, why file `index` cannot be used, e.g. values that do not fit `dtype`)."""
    try:
        value = files.read(index)
    except Exception as e:  # a damaged file must never stop the import
        return None, failure_reason(e)
    if value.shape != shape or not np.issubdtype(value.dtype, np.floating):
        return None, f"array of shape {value.shape} and dtype {value.dtype}, expected float {shape}"
    if not _fits(value, dtype):
        return None, f"values that are not finite in {dtype} (largest |value| {np.abs(value).max():g})"
    return value, ""


def _fits(value: np.ndarray, dtype: str) -> bool:
    """Whether every value survives the cast to the storage dtype (float16 turns |x| > 65504 into inf)."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(value.astype(dtype)).all())


def import_repa(cfg: RepaImportConfig) -> StageResult:
    """Write DATA/latents from REPA's vae-sd latents: cached, chunked and resumable like `encode`, one process at a time."""
    out = Path(cfg.data) / "latents"
    with exclusive(stage_lock(out), str(out)):
        remove_temporaries(out)  # left by a killed run
        return _import(cfg)


def _import(cfg: RepaImportConfig) -> StageResult:
    """`import_repa` without the lock."""
    images = _default_part(cfg.root, cfg.images, "images")
    source = open_source(images)
    files = MomentFiles(_default_part(cfg.root, cfg.latents, "vae-sd"))
    check_pairing(source, files)
    labels = check_labels(source, files)
    check_resolution(source, files, cfg)
    identity: dict[str, Any] = {"kind": IMPORT_KIND, "id": cfg.vae, "revision": "main", "class": "AutoencoderKL",
                                "dim": SD_VAE.channels, "hash": files.fingerprint(),
                                "tool": "REPA preprocessing/dataset_tools.py encode"}
    shape = cfg.moments_shape
    space = {"latent_space": SD_VAE.record()}
    params = {"resolution": cfg.resolution, "dtype": cfg.dtype, "chunk_size": cfg.chunk_size,
              "arrays": {"moments": shape}, "imported": "repa", **space}
    out = Path(cfg.data) / "latents"
    stage = StageDir(out, math.ceil(len(source) / cfg.chunk_size))
    state = stage.open(Manifest("encode", params, identity, source.describe()), cfg.force, legacy=space)
    result = StageResult("import-repa", out, state, len(source), 0, 0, 0.0, identity)
    if state is StageState.COMPLETE:
        result.skipped = len(read_errors(out))
        return result
    arrays = open_arrays(out, len(source), {"moments": shape}, cfg.chunk_size, cfg.dtype)
    keys = source.keys
    if not (out / "keys.json").exists():
        atomic_write_json(out / "keys.json", keys)
    start = time.perf_counter()
    pending = stage.pending()
    total = sum(min((c + 1) * cfg.chunk_size, len(source)) - c * cfg.chunk_size for c in pending)
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool, counting("import-repa", total) as advance:
        for chunk in pending:
            lo, hi = chunk * cfg.chunk_size, min((chunk + 1) * cfg.chunk_size, len(source))
            moments = np.zeros((hi - lo, *shape), dtype=cfg.dtype)  # (n, 8, h, h); zeros where unreadable
            errors = []
            for i, (value, reason) in zip(range(lo, hi), pool.map(lambda i: _read_moments(files, i, shape, cfg.dtype), range(lo, hi)), strict=True):
                if reason:
                    errors.append(ChunkError(i, keys[i], f"{files.relpaths[i]}: {reason}"))
                else:
                    moments[i - lo] = value
            valid = np.ones(hi - lo, dtype=bool)  # (n,)
            valid[[e.index - lo for e in errors]] = False
            stage.write_chunk(arrays, chunk, lo, {"moments": moments, "labels": labels[lo:hi], "valid": valid}, errors)
            result.processed, result.skipped = result.processed + hi - lo, result.skipped + len(errors)
            advance(hi - lo)
    result.seconds = time.perf_counter() - start
    stage.finish()
    result.skipped = len(read_errors(out))
    return result


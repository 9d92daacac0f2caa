"""Image sources (folder, edm2 `.zip`, WebDataset `.tar`), decoding to RGB and the ADM centre crop.

Every source lists its images once, sorted by relative path: image `i` is the i-th entry,
its key is the relative path without extension (docs/FORMATS.md, *Image index*). Sources
are picklable and reopen their files lazily in each process, so DataLoader workers can
read from them.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO

import numpy as np
from PIL import Image

from redi.common.atomic import decode_json
from redi.common.errors import UserError
from redi.common.schema import Range, load
from redi.pipeline.stage import SourceRecord, failure_reason

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageEntry:
    """One image of a source: where it is, how big it is, its class label."""

    relpath: str  # POSIX path relative to the source root (or the tar member name)
    size: int  # bytes; -1 when the file cannot even be stat'ed (a broken link)
    label: int  # class index; 0 when the source has no labels

    @property
    def key(self) -> str:
        """The relative path without its extension, e.g. `n01440764/n01440764_10026`."""
        return str(PurePosixPath(self.relpath).with_suffix(""))


class ImageSource(ABC):
    """A sorted, labelled list of encoded images that can be read back by index."""

    kind: str  # "folder" | "zip" | "tar"

    def __init__(self, location: str, entries: list[ImageEntry]):
        if not entries:
            raise UserError(f"{location} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
        self.location = location
        self.entries = sorted(entries, key=lambda e: e.relpath)
        dup = [k for k, n in Counter(e.key for e in self.entries).items() if n > 1]
        if dup:
            raise UserError(f"{location} holds two images with the key '{dup[0]}' (same name, different extension).")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.entries], dtype=np.int64)  # (N,)

    def fingerprint(self) -> str:
        """SHA-256 over `relpath\\tsize` lines of the sorted listing."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(f"{e.relpath}\t{e.size}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What a stage manifest records about its input (a SourceRecord)."""
        return asdict(SourceRecord(self.kind, self.fingerprint(), len(self)))

    @abstractmethod
    def read_bytes(self, index: int) -> bytes:
        """The encoded bytes of image `index` (raises when they cannot be read)."""

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles stay behind: each process reopens its own.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_handle")}


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


MAX_LABEL = 1_000_000  # a label is an index into the class embedding: ImageNet-21k has 21,841 classes
LABELS = Range(0, MAX_LABEL, hi_open=True)  # what a label may be, wherever it comes from


@dataclass(frozen=True)
class DatasetJson:
    """edm2/REPA `dataset.json`: `{"labels": [[relpath, label], ...]}`, or null labels (unlabelled images)."""

    labels: list[tuple[str, Annotated[int, LABELS]]] | None = None


def labels_from_dataset_json(data: bytes, location: str) -> dict[str, int] | None:
    """Parse edm2/REPA `dataset.json`: relpath → label, or None when it gives no labels; a damaged file, a label that is
    not an integer in [0, MAX_LABEL) (1.5, true, 1e400) or JSON nested too deep is one sentence."""
    where = f"{location}/dataset.json"
    remedy = 'it must hold {"labels": [[relpath, label], ...]} with integer labels'
    try:
        value = decode_json(data)
    except ValueError:
        raise UserError(f"{where} is not readable JSON; {remedy}.") from None
    labels = load(DatasetJson, value, where, remedy).labels
    return None if labels is None else {p.replace("\\", "/"): label for p, label in labels}


def _check_label(label: int, what: str) -> int:
    """`label`, or one sentence (`what` names where it came from) when it is not a usable class index."""
    if not LABELS.contains(label):
        raise UserError(f"{what} the label {label}; a label must be {LABELS.describe(int)}.")
    return label


def _label_entries(files: list[tuple[str, int]], labels: dict[str, int] | None, location: str) -> list[ImageEntry]:
    """Attach dataset.json labels (or 0 when there are none) to (relpath, size) pairs."""
    if labels is None:
        return [ImageEntry(p, s, 0) for p, s in files]
    missing = [p for p, _ in files if p not in labels]
    if missing:
        raise UserError(f"{location}: dataset.json has no label for {len(missing)} images (e.g. {missing[0]}).")
    return [ImageEntry(p, s, labels[p]) for p, s in files]


class FolderSource(ImageSource):
    """A directory: ImageFolder layout (label = sorted sub-folder index), flat (label 0) or with dataset.json."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = Path(root)
        files = [(p, _size_or_minus_one(self.root / p)) for p in walk_images(self.root)]
        if (self.root / "dataset.json").is_file():
            labels = labels_from_dataset_json((self.root / "dataset.json").read_bytes(), str(self.root))
            entries = _label_entries(files, labels, str(self.root))
        else:
            entries = _image_folder_entries(files, str(self.root))
        super().__init__(str(self.root), entries)

    def read_bytes(self, index: int) -> bytes:
        return (self.root / self.entries[index].relpath).read_bytes()


def walk_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, skipping hidden files and folders."""
    out: list[str] = []

    def fail(e: OSError) -> None:
        raise UserError(f"Cannot list {e.filename}: {e.strerror}.")

    seen = {_folder_id(root)}  # each real folder once: a linked folder is followed once, a link loop is cut
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and _first_visit(Path(dirpath) / d, seen)]
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if _has_image_suffix(f) and not f.startswith(".")]
    if bad := next((p for p in out if _not_utf8(p)), None):
        raise UserError(f"{root}: the file name {bad!r} is not valid UTF-8 text; rename it (keys are stored as text).")
    return out


def _folder_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    """True the first time the real folder behind `folder` is met (walked in sorted order, so deterministic)."""
    try:
        key = _folder_id(folder)
    except OSError:  # vanished or unreadable: os.walk reports it through onerror
        return True
    if key in seen:
        return False
    seen.add(key)
    return True


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by os as surrogate escapes
        return True
    return False


def _size_or_minus_one(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _image_folder_entries(files: list[tuple[str, int]], location: str) -> list[ImageEntry]:
    """ImageFolder labels: sorted first-level folder names → 0..K-1; a flat folder is all label 0."""
    nested = [p for p, _ in files if "/" in p]
    if not nested:
        return [ImageEntry(p, s, 0) for p, s in files]
    if len(nested) != len(files):
        loose = next(p for p, _ in files if "/" not in p)
        raise UserError(
            f"{location} mixes images at its top level (e.g. {loose}) with class sub-folders; "
            "move them into a sub-folder."
        )
    index = {c: i for i, c in enumerate(sorted({p.split("/")[0] for p in nested}))}
    return [ImageEntry(p, s, index[p.split("/")[0]]) for p, s in files]


class ZipSource(ImageSource):
    """An edm2/REPA `.zip`: images anywhere inside, labels from a top-level dataset.json (else 0)."""

    kind = "zip"

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = [i for i in z.infolist() if not i.is_dir()]
                files = [(i.filename, i.file_size) for i in infos if _has_image_suffix(i.filename)]
                names = {i.filename for i in infos}
                labels = labels_from_dataset_json(z.read("dataset.json"), str(path)) if "dataset.json" in names else None
        except (OSError, RuntimeError, zipfile.BadZipFile) as e:  # RuntimeError: an encrypted member
            raise UserError(f"Cannot read the zip file {path}: {e}.") from None
        super().__init__(str(self.path), _label_entries(files, labels, str(path)))

    def _zip(self) -> zipfile.ZipFile:
        handle = self.__dict__.get("_handle")
        if handle is None or handle[0] != os.getpid():
            handle = (os.getpid(), zipfile.ZipFile(self.path))
            self._handle = handle
        return handle[1]

    def read_bytes(self, index: int) -> bytes:
        return self._zip().read(self.entries[index].relpath)


@dataclass(frozen=True)
class _TarMember:
    """Where an image's bytes lie inside an uncompressed tar file."""

    tar: int  # index into TarSource.tars
    offset: int  # byte offset of the member's data
    size: int  # byte count


class TarSource(ImageSource):
    """WebDataset shards: image members (label from a `KEY.cls` member, else 0), read by seeking."""

    kind = "tar"

    def __init__(self, tars: list[Path], location: str):
        self.tars = sorted(Path(t) for t in tars)
        members: dict[str, _TarMember] = {}
        classes: dict[str, int] = {}
        for t, path in enumerate(self.tars):
            for name, info, data in _scan_tar(path):
                if name in members:
                    raise UserError(f"{location}: the member {name} appears twice ({self.tars[members[name].tar].name} "
                                    f"and {path.name}).")
                if _has_image_suffix(name):  # a link gets size -1: reading it fails, so errors.jsonl lists it
                    members[name] = _TarMember(t, info.offset_data, info.size if info.isfile() else -1)
                elif data is not None:
                    classes[name[: -len(".cls")]] = _parse_cls(data, name, location)
        entries = [ImageEntry(n, m.size, classes.get(str(PurePosixPath(n).with_suffix("")), 0)) for n, m in members.items()]
        super().__init__(location, entries)
        self.members = [members[e.relpath] for e in self.entries]

    def _file(self, tar: int) -> BinaryIO:
        handles = self.__dict__.get("_handles")
        if handles is None or handles[0] != os.getpid():
            handles = (os.getpid(), {})
            self._handles = handles
        if tar not in handles[1]:
            handles[1][tar] = open(self.tars[tar], "rb")  # noqa: SIM115 — kept open: this process reads its next members
        return handles[1][tar]

    def read_bytes(self, index: int) -> bytes:
        m = self.members[index]
        if m.size < 0:
            raise OSError("a link inside the tar file (links are not followed)")
        f = self._file(m.tar)
        f.seek(m.offset)
        data = f.read(m.size)
        if len(data) != m.size:
            raise OSError(f"tar member cut short ({len(data)} of {m.size} bytes)")
        return data


def _scan_tar(path: Path) -> list[tuple[str, tarfile.TarInfo, bytes | None]]:
    """(name without a leading `./`, info, bytes of a `.cls` member else None) for each regular member and link."""
    try:
        with tarfile.open(path, "r:") as tf:
            out = []
            for info in tf:
                name = info.name.removeprefix("./")
                if (info.isfile() or info.issym() or info.islnk()) and not PurePosixPath(name).name.startswith("."):
                    data = tf.extractfile(info).read() if info.isfile() and name.endswith(".cls") else None  # type: ignore[union-attr]
                    out.append((name, info, data))
            return out
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"Cannot read {path} as an uncompressed tar file: {e}.") from None


def _parse_cls(data: bytes, name: str, location: str) -> int:
    try:
        label = int(data.decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{location}: {name} does not hold an integer class label.") from None
    return _check_label(label, f"{location}: {name} holds")


def open_source(spec: str | Path) -> ImageSource:
    """A folder, a `.zip`, a `.tar`, a folder of `.tar` files or a glob of them."""
    text = str(spec)
    if any(c in text for c in "*?[") and not Path(text).exists():  # a glob, unless a path of that name exists
        tars = [Path(p) for p in glob.glob(text) if p.endswith(".tar")]
        if not tars:
            raise UserError(f"No .tar files match {text}.")
        return TarSource(tars, text)
    path = Path(text)
    if not path.exists():
        raise UserError(f"The image source {path} does not exist.")
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if tars and walk_images(path):
            raise UserError(f"{path} holds both images and .tar files: pass the tars as a quoted glob ('{path}/*.tar') "
                            "or move them out.")
        if tars:
            return TarSource(tars, str(path))
        return FolderSource(path)
    if path.suffix.lower() == ".zip":
        return ZipSource(path)
    if path.suffix.lower() == ".tar":
        return TarSource([path], str(path))
    raise UserError(f"{path} is not a folder, a .zip or a .tar file.")


def decode_rgb(data: bytes, resolution: int | None = None) -> Image.Image:
    """Decode image bytes fully and convert any mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB; with `resolution`,
    an image whose ADM crop would need too much memory is refused before it is decoded (`check_crop`)."""
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"the image has more pixels than PIL's decompression-bomb limit of "
                         f"{Image.MAX_IMAGE_PIXELS:,}; not decoded") from None
    with im:
        if resolution is not None:
            check_crop(im.size, resolution)
        im.load()  # decode now, so truncated files fail here rather than later
        return to_rgb(im)


MAX_ASPECT = 64  # long side / short side of an image that is encoded (the crop keeps 1/64 of it at most)
MAX_RESIZED_PIXELS = 1 << 26  # pixels of the resize before the ADM crop (~200 MB as RGB)


def check_crop(size: tuple[int, int], resolution: int) -> None:
    """Refuse (ValueError) an image whose ADM crop would blow up in memory: the resize before the crop scales the
    short side to R, so a 141-byte 20000×1 PNG would become 5,120,000×256 pixels (13 GB at R = 256)."""
    w, h = size
    short, long = min(w, h), max(w, h)
    resized = long * resolution // max(short, 1) * resolution  # pixels after the resize (whatever BOX halving ran)
    if short < 1 or long > MAX_ASPECT * short:
        raise ValueError(f"{w}×{h} pixels: an aspect ratio beyond {MAX_ASPECT}:1, which the centre crop would first "
                         f"resize to {long * resolution // max(short, 1):,}×{resolution} pixels; not decoded")
    if resized > MAX_RESIZED_PIXELS:
        raise ValueError(f"{w}×{h} pixels: the centre crop would first resize it to {resized:,} pixels, over the "
                         f"budget of {MAX_RESIZED_PIXELS:,}; not decoded")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of `im`; 16-bit greyscale keeps its top 8 bits instead of being clipped."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop: BOX-halve while min side ≥ 2R, BICUBIC-resize min side to R, crop R×R → (R, R, 3) uint8."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)  # (H, W, 3)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution].copy()  # (R, R, 3), writable


def load_cropped(source: ImageSource, index: int, resolution: int) -> tuple[np.ndarray, str]:
    """Image `index` decoded and ADM-cropped, with "" — or zeros and the reason it could not be read."""
    try:
        return center_crop_arr(decode_rgb(source.read_bytes(index), resolution), resolution), ""
    except Exception as e:  # one bad file (any decoder error) must never stop a stage
        return np.zeros((resolution, resolution, 3), dtype=np.uint8), failure_reason(e)

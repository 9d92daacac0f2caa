"""The stage cache: manifests, committed chunks and the errors file shared by every stage.

A stage directory holds `manifest.json` (what was asked for), `progress/CCCCCC.json`
(one file per committed chunk, written atomically *after* the chunk's data) and, once
every chunk is committed, `errors.jsonl` (the union of the chunks' errors, index order).
A killed run leaves at most one half-written chunk without its progress file; the rerun
writes that chunk again, so the result equals an uninterrupted run. A progress file that is
damaged counts as missing (its chunk is written again), and an errors.jsonl that differs from
the progress files is written again, so a stage's own records mend on the rerun. Each progress
file keeps the SHA-256 of the files its chunk wrote: `InputCheck` holds a later stage's reads
to them.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import zarr

from redi.common.atomic import (
    atomic_write_bytes, atomic_write_json, decode_json, is_temporary, remove_temporaries, sha256_file, try_read_json,
)
from redi.common.errors import UserError, writing
from redi.common.lock import exclusive
from redi.common.schema import OneOf, Range, Shaped, load, read, same_json, try_load
from redi.pipeline.remote import Location
from redi.pipeline.representation_record import RepresentationRecord
from redi.pipeline.vaes import LatentSpace

FORMAT_VERSION = 1
KEYS_JSON = "keys.json"  # the image keys of a stage (index order) or of the shards (sample order)


@dataclass(frozen=True)
class Manifest:
    """Everything that determines a stage's output; equal manifests mean equal outputs."""

    stage: str
    params: dict[str, Any]
    encoder: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    tiny_random: bool = False
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        # Round-trip through JSON so tuples/paths compare equal to what is read back.
        return json.loads(json.dumps(asdict(self), sort_keys=True, default=str))


TINY_RANDOM = "tiny-random"  # the identity kind of the random-weight encoders (tests and demos)


@dataclass(frozen=True)
class Identity:
    """What a manifest records of a frozen encoder (`encoder` of latents/ and features/ manifests, shards.json's
    `encoder`; pipeline/encoders.py writes it as `EncoderRef.identity`): what every reader checks."""

    id: str
    """Hub id, local directory or tiny-random."""
    kind: str
    """hub, local, tiny-random, or repa-import."""
    class_: str | None = None
    """The model class (JSON key "class")."""
    dim: Annotated[int | None, Range(0)] = None
    """Latent channels (VAE) or token width (encoder), from the config (0: synthetic stages, benchmarks/loader.py)."""
    revision: str | None = None
    """The hub revision asked for."""
    commit: str | None = None
    """The hub commit the revision resolved to, when cached."""
    hash: str | None = None
    """SHA-256 of a local or tiny-random config (and of the local weights' names and sizes)."""
    seed: int | None = None
    """tiny-random: the torch seed of its weights."""
    tool: str | None = None
    """import-repa: what made the imported latents."""


def describe_identity(identity: dict[str, Any]) -> str:
    """A manifest's encoder identity (pipeline/encoders.py writes it) in one line for logs and summaries:
    `id@revision (class, dim D)`, or `id#hash…` for local and tiny-random encoders."""
    pin = f"@{identity['revision']}" if "revision" in identity else f"#{str(identity.get('hash', ''))[:12]}"
    return f"{identity.get('id')}{pin} ({identity.get('class')}, dim {identity.get('dim')})"
@dataclass(frozen=True)
class SourceRecord:
    """What a stage manifest records of its image source (`source`; pipeline/images.py: ImageSource.describe): the
    listing's kind, fingerprint and size."""

    kind: str
    """folder, zip or tar."""
    fingerprint: str
    """SHA-256 over `relpath\\tsize` lines of the sorted listing."""
    count: Annotated[int, Range(1)]
    """Images listed."""


@dataclass(frozen=True)
class ArrayStageParams:
    """`params` of a latents/ or features/ manifest (encode.py and import-repa write it)."""

    resolution: Annotated[int, Range(1)]
    """Crop side R."""
    chunk_size: Annotated[int, Range(1)]
    """Images per committed chunk."""
    dtype: Annotated[str | None, OneOf(("float16", "float32"))] = None
    """Storage dtype of the arrays (absent in synthetic stages: benchmarks/loader.py)."""
    arrays: dict[str, tuple[Annotated[int, Range(1)], ...]] | None = None
    """Per-image shape of each array (absent in synthetic stages: every array there)."""
    batch_size: Annotated[int | None, Range(1)] = None
    """Images per forward pass (none for imported latents)."""
    precision: str | None = None
    """Autocast of the forward pass."""
    latent_space: LatentSpace | None = None
    """latents/: what the moments are (absent before the record: SD-VAE, `vaes.manifest_space`)."""
    representation: RepresentationRecord | None = None
    """features/: how the encoder was fed (absent before the record)."""
    imported: str | None = None
    """import-repa: whose latents these are."""


@dataclass(frozen=True)
class ArrayStageManifest(Manifest):
    """A latents/ or features/ manifest as `read_manifest` returns it: Manifest's dicts, checked against their records."""

    params: Annotated[dict[str, Any], Shaped(ArrayStageParams)]
    encoder: Annotated[dict[str, Any], Shaped(Identity)]
    source: Annotated[dict[str, Any], Shaped(SourceRecord)]


class StageState(Enum):
    NEW = "new"  # nothing there yet (or --force wiped it)
    RESUME = "resume"  # same manifest, some chunks still missing
    COMPLETE = "complete"  # same manifest, every chunk committed: nothing to do


@dataclass(frozen=True)
class ChunkError:
    """One line of errors.jsonl: an image the stage could not read."""

    index: Annotated[int, Range(0)]
    key: str
    reason: str


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")  # e.g. " <_io.BytesIO object at 0x7f04…>"


def failure_reason(error: BaseException) -> str:
    """The errors.jsonl reason of an input that could not be read: the error's type and message, without the object
    reprs (memory addresses) that some messages carry, so that a stage writes the same bytes on every run."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}"
@dataclass(frozen=True)
class Ledger:
    """progress/CCCCCC.json: a committed chunk's errors and the SHA-256 of each file it wrote (null: zarr wrote none)."""

    errors: list[ChunkError]
    sha256: dict[str, str | None]  # {} for a ledger of format 1, a bare list of errors (before checksums)


class StageDir:
    """One stage's output directory: manifest check, chunk ledger, errors file."""

    def __init__(self, root: Path, n_chunks: int):
        self.root = Path(root)
        self.n_chunks = n_chunks

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def errors_path(self) -> Path:
        return self.root / "errors.jsonl"

    def _progress_path(self, chunk: int) -> Path:
        return self.root / "progress" / f"{chunk:06d}.json"

    def open(self, manifest: Manifest, force: bool, legacy: dict[str, Any] | None = None) -> StageState:
        """Create, resume or refuse, comparing `manifest` with what is on disk; `force` redoes the stage whatever is there.

        `legacy`: parameters that manifests written before they were recorded lack, with the values that code used;
        such a manifest is read with them (and left as it is: later stages fingerprint it)."""
        wanted = manifest.to_json()
        if force:
            if self.root.exists():
                shutil.rmtree(self.root)
        elif self.manifest_path.exists():
            try:
                have = decode_json(self.manifest_path.read_bytes())
            except ValueError:  # not JSON, not UTF-8, or nested too deep
                raise UserError(f"{self.manifest_path} is damaged; pass --force to redo the stage.") from None
            if legacy and isinstance(have, dict) and isinstance(have.get("params"), dict):
                have = {**have, "params": json.loads(json.dumps(legacy, default=str)) | have["params"]}
            if not same_json(have, wanted):
                changed = sorted(diff_keys(have, wanted)) if isinstance(have, dict) else ["manifest"]
                raise UserError(
                    f"{self.root} holds the '{manifest.stage}' stage's output made with different settings "
                    f"({', '.join(changed)}); pass --force to redo it or choose another data root."
                )
            return StageState.COMPLETE if self.is_complete() else StageState.RESUME
        elif self.root.is_dir() and any(not is_temporary(p) for p in self.root.iterdir()):  # the manifest comes first
            raise UserError(f"{self.root} holds stage output but no manifest.json saying what made it; pass --force "
                            "to redo the stage or choose another data root.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.manifest_path, wanted)
        except OSError as e:
            raise UserError(f"Cannot write to {self.root}: {e.strerror}.") from None
        return StageState.NEW

    def is_done(self, chunk: int) -> bool:
        return self._ledger(chunk) is not None

    def pending(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not self.is_done(c)]

    def pending_of(self, rank: int, world: int) -> set[int]:
        """The uncommitted chunks rank `rank` of `world` processes writes: c % world == rank."""
        return {c for c in self.pending() if c % world == rank}

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """This job alone writes the stage (its lock; a second job is refused in one sentence), and what a killed run
        left half-written is gone."""
        with exclusive(stage_lock(self.root), f"{self.root}"):
            remove_temporaries(self.root)
            yield

    def start(self, manifest: Manifest, force: bool, legacy: dict[str, Any], keys: list[str] | None = None,
              arrays: dict[str, tuple[int, ...]] | None = None, chunk_size: int = 0, dtype: str = "") -> StageState:
        """`open` the stage, and unless it is complete lay out its store: the Zarr `arrays` (name → per-image shape,
        with labels and valid) and keys.json (`keys`, index order); without `keys` only open it (the ranks that follow
        rank 0)."""
        state = self.open(manifest, force, legacy)
        if keys is not None and arrays is not None and state is not StageState.COMPLETE:
            open_arrays(self.root, len(keys), arrays, chunk_size, dtype)
            if not (self.root / KEYS_JSON).exists():
                atomic_write_json(self.root / KEYS_JSON, keys)
        return state

    def write_chunk(self, arrays: dict[str, zarr.Array], chunk: int, start: int, columns: dict[str, np.ndarray],
                    errors: list[ChunkError]) -> None:
        """Write rows start: of each array (name → (n, ...): the outputs, labels and valid), then commit the chunk with
        the SHA-256 of each file it wrote (a full disk is one sentence naming the chunk file)."""
        for name, values in columns.items():
            with writing(chunk_file(self.root, arrays[name], name, chunk)):
                arrays[name][start : start + len(values)] = values
        self.commit(chunk, errors, chunk_checksums(self.root, arrays, chunk))

    def commit(self, chunk: int, errors: list[ChunkError], files: dict[str, str | None] | None = None) -> None:
        """Mark a chunk committed; call only after its data is fully written. `files`: the SHA-256 of each file
        the chunk wrote, by path relative to the stage (None: nothing written, as zarr skips fill-value chunks)."""
        atomic_write_json(self._progress_path(chunk), asdict(Ledger(errors, files or {})))

    def _ledger(self, chunk: int) -> Ledger | None:
        """The chunk's commit record, or None when it is missing or damaged (the chunk is then redone)."""
        raw = try_read_json(self._progress_path(chunk))
        return try_load(Ledger, {"errors": raw, "sha256": {}} if isinstance(raw, list) else raw)

    def chunk_errors(self) -> list[ChunkError]:
        """The errors recorded by the committed chunks, in chunk order."""
        return [e for c in range(self.n_chunks) if (ledger := self._ledger(c)) for e in ledger.errors]

    def _changed(self, chunk: int, prefix: str = "") -> list[str]:
        """Files of committed `chunk` (under `prefix`) that are missing or differ from their recorded SHA-256."""
        ledger = self._ledger(chunk) or Ledger([], {})
        bad = []
        for rel, digest in ledger.sha256.items():
            path = self.root / rel
            if rel.startswith(prefix) and (sha256_file(path) if path.is_file() else None) != digest:
                bad.append(rel)
        return bad

    def damaged_files(self) -> list[str]:
        """Files of committed chunks that are missing or differ from the SHA-256 recorded when they were written."""
        return [rel for c in range(self.n_chunks) for rel in self._changed(c)]

    def check_chunk(self, chunk: int, prefix: str = "") -> None:
        """One sentence (UserError) when committed `chunk`'s files under `prefix` are not those it wrote, so a
        stage never reads damaged input; `redi verify --repair` and a rerun of the stage rewrite them."""
        if not self.is_done(chunk):
            raise UserError(f"{self._progress_path(chunk)} is missing or damaged, so chunk {chunk} of {self.root} cannot "
                            f"be checked: run `redi verify {self.root.parent} --repair`, then rerun the stage that writes "
                            f"{self.root.name}/.")
        if bad := self._changed(chunk, prefix):
            raise UserError(f"{self.root / bad[0]} (chunk {chunk}) differs from the SHA-256 recorded when it was written: "
                            f"run `redi verify {self.root.parent} --repair`, then rerun the stage that writes "
                            f"{self.root.name}/.")

    def uncommit(self, files: list[str]) -> list[int]:
        """Forget the chunks that wrote `files` (a rerun of the stage writes them again); return those chunks."""
        chunks = [c for c in range(self.n_chunks) if set((self._ledger(c) or Ledger([], {})).sha256) & set(files)]
        self.forget(chunks)
        return chunks

    def forget(self, chunks: list[int]) -> None:
        """Uncommit `chunks`: the stage is incomplete again and a rerun writes them."""
        for c in chunks:
            self._progress_path(c).unlink(missing_ok=True)
        if chunks:
            self.errors_path.unlink(missing_ok=True)

    def _errors_bytes(self) -> bytes:
        return "".join(json.dumps(asdict(e)) + "\n" for e in self.chunk_errors()).encode()

    def is_complete(self) -> bool:
        """Every chunk committed and errors.jsonl written from their records (a damaged one is rewritten by finish)."""
        if self.pending() or not self.errors_path.is_file():
            return False
        return self.errors_path.read_bytes() == self._errors_bytes()

    def skipped(self) -> int | None:
        """Images the complete stage could not read (errors.jsonl's lines); None while chunks are pending."""
        return len(read_errors(self.root)) if self.is_complete() else None

    def finish(self) -> list[ChunkError]:
        """Write `errors.jsonl` once every chunk is committed; return the errors."""
        assert not self.pending(), f"finish() with {len(self.pending())} chunks missing"
        atomic_write_bytes(self.errors_path, self._errors_bytes())
        return self.chunk_errors()


class InputCheck:
    """What a stage reads of an earlier stage, checked against the SHA-256s recorded when it was written (each
    chunk file once): the hash costs one more pass over bytes that are read anyway. Chunks whose ledgers hold no
    checksums (an older format) are read unchecked."""

    def __init__(self, stage_root: Path, rows: int):
        self.root = Path(stage_root)
        self.chunk_size: int = read_manifest(self.root).params["chunk_size"]
        self.stage = StageDir(self.root, -(-rows // self.chunk_size))
        self._checked: set[tuple[int, str]] = set()

    def rows(self, array: str, first: int, last: int) -> None:
        """Check the chunk files of `array` that hold rows [first, last)."""
        for c in range(first // self.chunk_size, (last - 1) // self.chunk_size + 1):
            if (c, array) not in self._checked:
                self.stage.check_chunk(c, f"store.zarr/{array}/")
                self._checked.add((c, array))


def stage_lock(stage_root: Path) -> Path:
    """The lock file of a stage: a sibling in the data root, so `--force` can wipe the stage while holding it."""
    root = Path(stage_root)
    return root.parent / f".{root.name}.lock"


ZARR_METADATA_ERRORS = (FileNotFoundError, KeyError, TypeError, ValueError, AttributeError)  # zarr's, for bad zarr.json


def open_array(path: Path, remedy: str) -> zarr.Array:
    """The zarr array at `path`, for reading; absent or with a zarr.json zarr cannot parse, one sentence ending in
    `remedy`."""
    try:
        return zarr.open_array(path, mode="r")
    except ZARR_METADATA_ERRORS:
        raise UserError(f"{path} is missing or its zarr.json is damaged; {remedy}.") from None


def open_arrays(
    root: Path, n: int, shapes: dict[str, tuple[int, ...]], chunk: int, dtype: str
) -> dict[str, zarr.Array]:
    """The stage's Zarr arrays (outputs, `labels`, `valid`), created on first use, chunked along N."""
    layout = {name: (shape, dtype) for name, shape in shapes.items()} | {"labels": ((), "int64"), "valid": ((), "bool")}
    arrays = {}
    try:
        with writing(root / "store.zarr" / "zarr.json"):
            group = zarr.open_group(root / "store.zarr", mode="a")
        for name, (shape, dt) in layout.items():
            if name in group:
                arrays[name] = arr = group[name]
                if not isinstance(arr, zarr.Array) or arr.shape != (n, *shape):
                    raise UserError(f"{root / 'store.zarr' / name} holds {getattr(arr, 'shape', 'no array')} where this "
                                    f"stage writes {(n, *shape)}; pass --force to redo the stage.")
            else:
                with writing(root / "store.zarr" / name / "zarr.json"):
                    arrays[name] = group.create_array(name, shape=(n, *shape), chunks=(chunk, *shape), dtype=dt,
                                                      fill_value=0)
    except (*ZARR_METADATA_ERRORS, OSError) as e:
        raise UserError(f"{root / 'store.zarr'} is damaged ({type(e).__name__}); pass --force to redo the stage.") from None
    return arrays  # type: ignore[return-value]


def chunk_file(root: Path, arr: zarr.Array, name: str, chunk: int) -> Path:
    """The file of a stage that holds chunk `chunk` of its array `name`."""
    return root / "store.zarr" / name / arr.metadata.chunk_key_encoding.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))


def chunk_checksums(root: Path, arrays: dict[str, zarr.Array], chunk: int) -> dict[str, str | None]:
    """SHA-256 of the file holding chunk `chunk` of each array (None where zarr wrote none: all fill value)."""
    sums: dict[str, str | None] = {}
    for name, arr in arrays.items():
        path = chunk_file(root, arr, name, chunk)
        sums[path.relative_to(root).as_posix()] = sha256_file(path) if path.is_file() else None
    return sums


def read_manifest(stage_root: Path) -> ArrayStageManifest:
    """The manifest of latents/ or features/, every field checked (a wrong one is one sentence naming it)."""
    path = Path(stage_root) / "manifest.json"
    if not path.exists():
        raise UserError(f"{stage_root} has no manifest.json: run the stage that writes it first.")
    return read(ArrayStageManifest, path, f"rerun the stage that writes {Path(stage_root).name}/ with --force")


def read_keys(folder: Location, remedy: str) -> list[str]:
    """FOLDER/keys.json: a list of image keys (latents/, features/, shards/ and a published copy)."""
    return read(list[str], folder / KEYS_JSON, remedy)


def read_errors(stage_root: Path) -> list[ChunkError]:
    path = Path(stage_root) / "errors.jsonl"
    if not path.exists():
        raise UserError(f"{stage_root} is not complete (no errors.jsonl): rerun the stage to finish it.")
    remedy = "rerun the stage (the same command) to write it again from its chunk records"
    try:
        records = [decode_json(line) for line in path.read_bytes().splitlines() if line]
    except ValueError:
        raise UserError(f"{path} is damaged (a line is not JSON); {remedy}.") from None
    return load(list[ChunkError], records, path, remedy)


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif not same_json(va, vb):
            out.append(f"{prefix}{k}")
    return out

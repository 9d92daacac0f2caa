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

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import zarr

from redi.common.atomic import atomic_write_bytes, atomic_write_json, is_temporary, read_json, sha256_file, try_read_json
from redi.common.errors import UserError

FORMAT_VERSION = 1


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


def describe_identity(identity: dict[str, Any]) -> str:
    """A manifest's encoder identity (pipeline/encoders.py writes it) in one line for logs and summaries:
    `id@revision (class, dim D)`, or `id#hash…` for local and tiny-random encoders."""
    pin = f"@{identity['revision']}" if "revision" in identity else f"#{str(identity.get('hash', ''))[:12]}"
    return f"{identity.get('id')}{pin} ({identity.get('class')}, dim {identity.get('dim')})"


class StageState(Enum):
    NEW = "new"  # nothing there yet (or --force wiped it)
    RESUME = "resume"  # same manifest, some chunks still missing
    COMPLETE = "complete"  # same manifest, every chunk committed: nothing to do


@dataclass(frozen=True)
class ChunkError:
    index: int
    key: str
    reason: str


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")  # e.g. " <_io.BytesIO object at 0x7f04…>"


def failure_reason(error: BaseException) -> str:
    """The errors.jsonl reason of an input that could not be read: the error's type and message, without the object
    reprs (memory addresses) that some messages carry, so that a stage writes the same bytes on every run."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}"


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
                have = json.loads(self.manifest_path.read_bytes())
            except ValueError:  # not JSON, or not UTF-8
                raise UserError(f"{self.manifest_path} is damaged; pass --force to redo the stage.") from None
            if legacy and isinstance(have, dict) and isinstance(have.get("params"), dict):
                have = {**have, "params": json.loads(json.dumps(legacy, default=str)) | have["params"]}
            if have != wanted:
                changed = sorted(diff_keys(have, wanted)) if isinstance(have, dict) else ["manifest"]
                raise UserError(
                    f"{self.root} holds a '{manifest.stage}' stage made with different settings "
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

    def commit(self, chunk: int, errors: list[ChunkError], files: dict[str, str | None] | None = None) -> None:
        """Mark a chunk committed; call only after its data is fully written. `files`: the SHA-256 of each file
        the chunk wrote, by path relative to the stage (None: nothing written, as zarr skips fill-value chunks)."""
        atomic_write_json(self._progress_path(chunk), {"errors": [asdict(e) for e in errors], "sha256": files or {}})

    def _ledger(self, chunk: int) -> dict[str, Any] | None:
        """The chunk's commit record, or None when it is missing or damaged (the chunk is then redone)."""
        raw = try_read_json(self._progress_path(chunk))
        ledger = {"errors": raw, "sha256": {}} if isinstance(raw, list) else raw  # a list: format 1 before checksums
        if not (isinstance(ledger, dict) and isinstance(ledger.get("errors"), list) and isinstance(ledger.get("sha256"), dict)
                and all(_is_error_record(e) for e in ledger["errors"])
                and all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in ledger["sha256"].items())):
            return None
        return ledger

    def chunk_errors(self) -> list[ChunkError]:
        """The errors recorded by the committed chunks, in chunk order."""
        return [ChunkError(**e) for c in range(self.n_chunks) if (ledger := self._ledger(c)) for e in ledger["errors"]]

    def _changed(self, chunk: int, prefix: str = "") -> list[str]:
        """Files of committed `chunk` (under `prefix`) that are missing or differ from their recorded SHA-256."""
        ledger = self._ledger(chunk) or {"sha256": {}}
        bad = []
        for rel, digest in ledger["sha256"].items():
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
        chunks = [c for c in range(self.n_chunks) if set((self._ledger(c) or {"sha256": {}})["sha256"]) & set(files)]
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

    def finish(self) -> list[ChunkError]:
        """Write `errors.jsonl` once every chunk is committed; return the errors."""
        assert not self.pending(), f"finish() with {len(self.pending())} chunks missing"
        atomic_write_bytes(self.errors_path, self._errors_bytes())
        return self.chunk_errors()


def _is_error_record(e: Any) -> bool:
    return (isinstance(e, dict) and set(e) == {"index", "key", "reason"} and type(e["index"]) is int
            and isinstance(e["key"], str) and isinstance(e["reason"], str))


class InputCheck:
    """What a stage reads of an earlier stage, checked against the SHA-256s recorded when it was written (each
    chunk file once): the hash costs one more pass over bytes that are read anyway. Stages made without a
    chunk size or checksums in their records (older formats) are read unchecked."""

    def __init__(self, stage_root: Path, rows: int):
        self.root = Path(stage_root)
        params = read_manifest(self.root).get("params")
        chunk_size = params.get("chunk_size") if isinstance(params, dict) else None
        self.chunk_size = chunk_size if type(chunk_size) is int and chunk_size > 0 else None
        self.stage = StageDir(self.root, -(-rows // self.chunk_size) if self.chunk_size else 0)
        self._checked: set[tuple[int, str]] = set()

    def rows(self, array: str, first: int, last: int) -> None:
        """Check the chunk files of `array` that hold rows [first, last)."""
        if self.chunk_size is None:
            return
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


def read_manifest(stage_root: Path) -> dict[str, Any]:
    path = Path(stage_root) / "manifest.json"
    if not path.exists():
        raise UserError(f"{stage_root} has no manifest.json: run the stage that writes it first.")
    return read_json(path, dict, "rerun the stage that writes it with --force")


def read_errors(stage_root: Path) -> list[ChunkError]:
    path = Path(stage_root) / "errors.jsonl"
    if not path.exists():
        raise UserError(f"{stage_root} is not complete (no errors.jsonl): rerun the stage to finish it.")
    try:
        records = [json.loads(line) for line in path.read_bytes().splitlines() if line]
    except ValueError:
        records = [None]
    if not all(_is_error_record(r) for r in records):
        raise UserError(f"{path} is damaged; rerun the stage (the same command) to write it again from its chunk records.")
    return [ChunkError(**r) for r in records]


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out

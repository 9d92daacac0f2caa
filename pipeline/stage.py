"""The stage cache: manifests, committed chunks and the errors file shared by every stage.

A stage directory holds `manifest.json` (what was asked for), `progress/CCCCCC.json`
(one file per committed chunk, written atomically *after* the chunk's data) and, once
every chunk is committed, `errors.jsonl` (the union of the chunks' errors, index order).
A killed run leaves at most one half-written chunk without its progress file; the rerun
writes that chunk again, so the result equals an uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from pipeline.errors import UserError

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


class StageState(Enum):
    NEW = "new"  # nothing there yet (or --force wiped it)
    RESUME = "resume"  # same manifest, some chunks still missing
    COMPLETE = "complete"  # same manifest, every chunk committed: nothing to do


@dataclass(frozen=True)
class ChunkError:
    index: int
    key: str
    reason: str


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

    def open(self, manifest: Manifest, force: bool) -> StageState:
        """Create, resume or refuse, comparing `manifest` with what is on disk; `force` redoes the stage whatever is there."""
        wanted = manifest.to_json()
        if force:
            if self.root.exists():
                shutil.rmtree(self.root)
        elif self.manifest_path.exists():
            try:
                have = json.loads(self.manifest_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{self.manifest_path} is damaged; pass --force to redo the stage.") from None
            if have != wanted:
                changed = sorted(diff_keys(have, wanted)) if isinstance(have, dict) else ["manifest"]
                raise UserError(
                    f"{self.root} holds a '{manifest.stage}' stage made with different settings "
                    f"({', '.join(changed)}); pass --force to redo it or choose another data root."
                )
            return StageState.COMPLETE if self.is_complete() else StageState.RESUME
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.manifest_path, wanted)
        except OSError as e:
            raise UserError(f"Cannot write to {self.root}: {e.strerror}.") from None
        return StageState.NEW

    def is_done(self, chunk: int) -> bool:
        return self._progress_path(chunk).exists()

    def pending(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not self.is_done(c)]

    def commit(self, chunk: int, errors: list[ChunkError], files: dict[str, str | None] | None = None) -> None:
        """Mark a chunk committed; call only after its data is fully written. `files`: the SHA-256 of each file
        the chunk wrote, by path relative to the stage (None: nothing written, as zarr skips fill-value chunks)."""
        atomic_write_json(self._progress_path(chunk), {"errors": [asdict(e) for e in errors], "sha256": files or {}})

    def _ledger(self, chunk: int) -> dict[str, Any]:
        raw = json.loads(self._progress_path(chunk).read_text())
        return {"errors": raw, "sha256": {}} if isinstance(raw, list) else raw  # a list: format 1 before checksums

    def chunk_errors(self) -> list[ChunkError]:
        out: list[ChunkError] = []
        for c in range(self.n_chunks):
            out += [ChunkError(**e) for e in self._ledger(c)["errors"]]
        return out

    def damaged_files(self) -> list[str]:
        """Files of committed chunks that are missing or differ from the SHA-256 recorded when they were written."""
        bad = []
        for c in range(self.n_chunks):
            if self.is_done(c):
                for rel, digest in self._ledger(c)["sha256"].items():
                    path = self.root / rel
                    if (sha256_file(path) if path.is_file() else None) != digest:
                        bad.append(rel)
        return bad

    def uncommit(self, files: list[str]) -> list[int]:
        """Forget the chunks that wrote `files` (a rerun of the stage writes them again); return those chunks."""
        chunks = [c for c in range(self.n_chunks) if self.is_done(c) and set(self._ledger(c)["sha256"]) & set(files)]
        for c in chunks:
            self._progress_path(c).unlink()
        self.errors_path.unlink(missing_ok=True)  # the stage is incomplete again
        return chunks

    def is_complete(self) -> bool:
        return self.errors_path.exists() and not self.pending()

    def finish(self) -> list[ChunkError]:
        """Write `errors.jsonl` once every chunk is committed; return the errors."""
        assert not self.pending(), f"finish() with {len(self.pending())} chunks missing"
        errors = self.chunk_errors()
        atomic_write_bytes(self.errors_path, "".join(json.dumps(asdict(e)) + "\n" for e in errors).encode())
        return errors


def stage_lock(stage_root: Path) -> Path:
    """The lock file of a stage: a sibling in the data root, so `--force` can wipe the stage while holding it."""
    root = Path(stage_root)
    return root.parent / f".{root.name}.lock"


def read_manifest(stage_root: Path) -> dict[str, Any]:
    path = Path(stage_root) / "manifest.json"
    if not path.exists():
        raise UserError(f"{stage_root} has no manifest.json: run the stage that writes it first.")
    return json.loads(path.read_text())


def read_errors(stage_root: Path) -> list[ChunkError]:
    path = Path(stage_root) / "errors.jsonl"
    if not path.exists():
        raise UserError(f"{stage_root} is not complete (no errors.jsonl): rerun the stage to finish it.")
    return [ChunkError(**json.loads(line)) for line in path.read_text().splitlines() if line]


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

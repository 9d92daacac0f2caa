"""Stamps: what a finished output was made from, so that a rerun with nothing to do answers at once.

A stamp (JSON) records the settings that made the output and, for each named set of files (an input stage, the
output itself), two digests: one of the files' names, sizes and modification times, one of their contents. A rerun
stats every file and compares the first; only a set whose stats changed (a copy, a touch, a rewrite) is hashed and
compared by content, so an unchanged data root costs a stat per file, a changed file is still caught by its content,
and a set that is the same after a copy has its stats recorded again. Missing files count as changed.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redi.common.atomic import atomic_write_json, sha256_file, try_read_json
from redi.common.errors import UserError
from redi.common.schema import dump, same_json, try_load

STAMP_VERSION = 1
PNG_KEY = "redi-drawn-from"  # the text chunk of our pictures that holds the digest of what they were drawn from
FileSets = dict[str, list[Path]]  # set name → its files (absolute, or relative to the working directory)


def _stat_digest(files: list[Path]) -> str:
    """SHA-256 of each file's name, size and modification time (ns), in order; a missing file is a line of its own."""
    lines = []
    for path in files:
        try:
            st = path.stat()
            lines.append(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}")
        except OSError:
            lines.append(f"{path.name}\tmissing")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def content_digest(files: list[Path], note: str = "") -> str:
    """SHA-256 of each file's name and content SHA-256, in order (and of `note`: settings that are not files)."""
    lines = [f"{path.name}\t{sha256_file(path) if path.is_file() else 'missing'}" for path in files]
    return hashlib.sha256("\n".join([*lines, note]).encode()).hexdigest()


def picture_stamp(path: Path) -> str | None:
    """The digest a PNG of ours records of what it was drawn from (its PNG_KEY text), or None: absent, unreadable, or
    drawn without one. A picture whose stamp equals the digest of its inputs now need not be drawn again."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get(PNG_KEY)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


@dataclass
class SetDigests:
    """A file set's two digests in a stamp."""

    stat: str
    sha256: str


@dataclass(frozen=True)
class Stamp:
    """A stamp file: the settings that made the output, and each file set's digests (a damaged one is no stamp)."""

    version: int
    settings: dict[str, Any]
    sets: dict[str, SetDigests]


def write_stamp(path: Path, settings: dict[str, Any], sets: FileSets) -> None:
    """Record `settings` and the digests of every file set, atomically (after the output is complete)."""
    atomic_write_json(path, dump(Stamp(STAMP_VERSION, settings, {name: SetDigests(_stat_digest(files), content_digest(files))
                                                                 for name, files in sets.items()})))


def is_current(path: Path, settings: dict[str, Any], sets: FileSets) -> bool:
    """True when the stamp at `path` records these settings and every file set has its recorded content; a set whose
    stats changed but not its content has its stats recorded anew (best effort: a read-only disk keeps the old)."""
    stamp: Stamp | None = try_load(Stamp, try_read_json(path))
    if not (stamp is not None and stamp.version == STAMP_VERSION and same_json(stamp.settings, settings)
            and set(stamp.sets) == set(sets)):
        return False
    moved = False
    for name, files in sets.items():
        recorded = stamp.sets[name]
        if recorded.stat == _stat_digest(files):
            continue
        if recorded.sha256 != content_digest(files):
            return False
        recorded.stat, moved = _stat_digest(files), True
    if moved:
        with contextlib.suppress(OSError, UserError):
            atomic_write_json(path, dump(stamp))
    return True

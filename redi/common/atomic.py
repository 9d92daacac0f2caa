"""Crash-safe file writes (write to a temporary sibling, fsync, then rename over the target), the sweep of
the temporaries a killed writer leaves, and the two ways redi reads JSON back: strictly (a damaged file is
one sentence) or, for append-only logs, skipping damaged lines."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from redi.common.errors import DiskFull, UserError, disk_full


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _umask_mode()  # read once: os.umask is process-wide, and writer threads run concurrently
NO_ROOM_BYTES = 1 << 20  # a failed write with less than this left free is a full disk, whatever the library says
# The temporaries of `_replacing` (mkstemp: ".NAME." + 8 characters + ".tmp") and of zarr's LocalStore.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|\.[0-9a-f]{32}\.partial$")


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to fill; on clean exit it is fsynced and renamed over `path`, else removed.

    A write that fails on a full disk raises `DiskFull` (one sentence naming `path`), also when the
    writing library (torch.save, numpy) dropped the OSError: the space left is checked before the
    temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_full(e, path) or e from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path) or (DiskFull(path) if isinstance(e, Exception) and _no_room(tmp.parent) else None)
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise


def _no_room(folder: Path) -> bool:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize < NO_ROOM_BYTES


def is_temporary(path: Path) -> bool:
    """A file an atomic write (ours or zarr's) is filling, or that a killed one left behind."""
    return bool(_TEMPORARY.search(Path(path).name))


def remove_temporaries(folder: Path, recursive: bool = True) -> None:
    """Delete the temporary files that writers killed half-way (kill -9, power loss) left in `folder`.

    Call it only while holding the lock of everything written there: a live writer's temporary looks the same.
    """
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.rglob("*") if recursive else folder.iterdir():
            if is_temporary(p) and p.is_file():
                p.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path`; on clean exit it replaces `path` atomically."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Atomic write for libraries that want a file name (torch.save, safetensors, PIL)."""
    with _replacing(path) as tmp:
        writer(tmp)


def decode_json(data: bytes) -> Any:
    """The JSON value of `data`; ValueError when it is not UTF-8 JSON, or nested too deep to parse (a damaged file)."""
    try:
        return json.loads(data)
    except RecursionError:  # json recurses per level: `[[[[…` 100,000 deep is a damaged file, not our crash
        raise ValueError("JSON nested too deep") from None


def try_read_json(path: Path) -> Any:
    """The JSON value of `path`, or None when it is missing, unreadable, or not UTF-8 JSON (a record to redo)."""
    try:
        return decode_json(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def read_json(path: Path, kind: type = dict, remedy: str = "") -> Any:
    """The JSON value of `path` (or of a pipeline.remote.RemotePath: anything with read_bytes); a missing, unreadable
    or damaged file, or one holding another type than `kind` (`object`: any), is one sentence ending with `remedy`
    (what the user runs to remake the file). Records check their fields with common.schema."""
    path = Path(path) if isinstance(path, str) else path
    tail = f"; {remedy}" if remedy else ""
    try:
        value = decode_json(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} is missing{tail}.") from None
    except (OSError, ValueError):
        raise UserError(f"{path} is damaged (it is not readable JSON){tail}.") from None
    if not isinstance(value, kind):
        what = {dict: "a JSON object", list: "a JSON list"}.get(kind, f"JSON {kind.__name__}")
        raise UserError(f"{path} is damaged (it does not hold {what}){tail}.")
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete object lines of an append-only .jsonl log; a line cut by a killed process, or damaged on disk
    (not UTF-8, not JSON, not an object), is skipped."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        try:
            row = decode_json(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()

"""Checkpoints: atomic writes (in a background thread from a CPU snapshot), keep-last-N plus milestones,
safe (weights_only) loading, and a SHA-256 per checkpoint (`step-N.pt.sha256`, sha256sum's format) written before
the checkpoint itself and checked when it is loaded, so a file damaged on disk is never trained or sampled from."""
from __future__ import annotations

import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from common.atomic import atomic_write_bytes, atomic_write_with, sha256_file
from common.errors import UserError

_NAME = re.compile(r"^step-(\d{7,})\.pt$")
CHECKSUM_SUFFIX = ".sha256"
log = logging.getLogger(__name__)


def checkpoint_path(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:07d}.pt"


def checksum_path(path: Path) -> Path:
    """The SHA-256 record of a checkpoint: `step-N.pt.sha256`, checkable with `sha256sum -c`."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded when `path` was saved; None when there is no record (older or foreign checkpoints)."""
    record = checksum_path(path)
    if not record.exists():
        return None
    try:
        digest = record.read_bytes().split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        digest = ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(f"{record} is damaged, so {path.name} cannot be checked: delete the record to use the "
                        "checkpoint unchecked.")
    return digest


def check_checkpoint(path: Path) -> None:
    """One sentence (UserError) when `path` differs from the SHA-256 recorded when it was saved."""
    recorded = recorded_sha256(path)
    if recorded is not None and sha256_file(path) != recorded:
        raise UserError(f"Checkpoint {path} differs from the SHA-256 recorded when it was saved: it was damaged on disk.")


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the run, oldest first."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically, its SHA-256 record first: every checkpoint in place has one."""

    def write(tmp: Path) -> None:
        torch.save(state, tmp)
        atomic_write_bytes(checksum_path(path), f"{sha256_file(tmp)}  {path.name}\n".encode())

    atomic_write_with(path, write)


def save_checkpoint(run: Path, step: int, state: dict[str, Any], keep: int, milestone_every: int) -> Path:
    """Write step-<7-digit step>.pt atomically, then delete older non-milestone checkpoints beyond `keep`."""
    path = checkpoint_path(run, step)
    try:
        write_checkpoint(path, state)
    except OSError as e:  # a full or failing disk: the temporary file is gone, older checkpoints are untouched
        raise UserError(f"Could not write checkpoint {path} ({e.strerror or e}); the older checkpoints are intact: "
                        "free space and rerun the same command to resume.") from None
    rolling = [(s, p) for s, p in list_checkpoints(run) if milestone_every <= 0 or s % milestone_every != 0]
    for _, old in rolling[:-keep] if keep > 0 else []:
        if old != path:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", unsafe: bool = False) -> dict[str, Any]:
    """Load a checkpoint without executing pickled code (unless `unsafe`, for foreign files)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"No checkpoint at {path}.")
    check_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=not unsafe)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError … for bad files
        raise UserError(f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}).") from None


def load_newest_readable(run: Path, map_location: str | torch.device) -> dict[str, Any] | None:
    """The newest checkpoint of `run` that loads (a damaged one is reported and passed over); None if there are none."""
    found = list_checkpoints(run)
    for _, path in reversed(found):
        try:
            return load_checkpoint(path, map_location=map_location)
        except UserError as e:
            log.warning(f"{e} Resuming from the checkpoint before it instead.")
    if found:
        raise UserError(f"No checkpoint in {Path(run) / 'checkpoints'} can be read: move them away to start the run over.")
    return None


def newest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


class BackgroundCheckpointer:
    """Writes checkpoints from a host snapshot in one background thread, so training goes on during the disk write.

    The snapshot goes into host buffers kept from one save to the next (pinned when the state is on a GPU,
    where the copies are queued behind the step's kernels and waited for by the writer thread), so the loop
    pays a memory copy, not an allocation or a write. At most one write is in flight: `save` first waits for
    the previous one (and re-raises its error, e.g. a full disk); leaving the context waits for the last.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[Path] | None = None
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}  # position in the state → its host copy

    def __enter__(self) -> BackgroundCheckpointer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)  # an interrupted run still finishes (or fails) its last write

    def save(self, run: Path, step: int, state: dict[str, Any], keep: int, milestone_every: int) -> None:
        self.wait()  # the buffers are free again
        snapshot = self._snapshot(state, ())
        copied = torch.cuda.Event() if torch.cuda.is_available() else None
        if copied is not None:
            copied.record()  # after the device-to-host copies queued above

        def write() -> Path:
            if copied is not None:
                copied.synchronize()
            return save_checkpoint(run, step, snapshot, keep, milestone_every)

        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _snapshot(self, obj: Any, key: tuple[Any, ...]) -> Any:
        """`obj` with every tensor copied into its reused host buffer (other values are shared)."""
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = self._buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if isinstance(obj, dict):
            return {k: self._snapshot(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._snapshot(v, (*key, i)) for i, v in enumerate(obj))
        return obj

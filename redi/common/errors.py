"""User-facing errors: one clear sentence, a non-zero exit, no traceback (the CLI catches these)."""
from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """An error the user caused and can fix (bad path, incompatible data, refused rerun)."""


class DiskFull(UserError):
    """A write failed because its file system (or the user's quota) is full."""

    def __init__(self, path: Path | str | None = None):
        where = f" while writing {path}" if path else ""
        super().__init__(f"No space left on device{where}: free some space (or point the command at another disk) "
                         "and rerun the same command, which keeps everything committed so far.")


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that drop the OSError say it: safetensors ("os error 28"), and the strerror texts.
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC}", f"os error {errno.EDQUOT}")


def disk_full(exc: BaseException, path: Path | str | None = None) -> DiskFull | None:
    """The one sentence for a write that failed on a full disk, or None for any other failure.

    Libraries wrap the OSError (torch.save: a RuntimeError with it as __context__; zarr, threads:
    re-raised as is; safetensors: only in the message), so the whole exception chain is read.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull):  # from a nested atomic write: name the file the caller writes
            return e if path is None else DiskFull(path)
        if (isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(w in str(e) for w in _FULL_WORDS):
            return DiskFull(path or (e.filename if isinstance(e, OSError) else None))
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Around a write a library makes (zarr's chunk files and metadata): a full disk is the one sentence naming `path`,
    the file being written, whatever the library's exception says."""
    try:
        yield
    except Exception as e:
        _settle_zarr()
        if (full := disk_full(e, path)) is not None:
            raise full from None
        raise


def _settle_zarr() -> None:
    """Wait for the writes zarr still runs after one of them failed. Its `asyncio.gather` raises the first error and
    leaves the other chunk and metadata writes running on its event-loop thread, each with its temporary `.partial`
    file, so the error would reach the user (or the next command in the same process) before they end: on a full
    disk under load, tests/test_disk_full.py found a `.partial` file there after the command had returned."""
    import asyncio

    from zarr.core.sync import sync

    async def others() -> None:
        me = asyncio.current_task()
        await asyncio.gather(*(task for task in asyncio.all_tasks() if task is not me), return_exceptions=True)

    sync(others())

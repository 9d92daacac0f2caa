"""One writer at a time: an advisory lock file that a second redi process finds taken.

The lock lives next to what it protects (a stage directory can be wiped by --force, so its
lock is a sibling file in the data root). The operating system drops it when the process
ends, however it ends, so a killed run never leaves a stale lock behind. A forked child
(a DataLoader worker) closes its copy at once: a worker that outlives its main process, or a
run that failed in a process that goes on (a notebook), must not keep the lock held.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from redi.common.errors import UserError

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the parent keeps its locks)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold `lock_file` for the duration; if another process holds it, one sentence naming `what`.
    `shared`: any number of shared holders at once (the parts of one job), but never with an exclusive one."""
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"Cannot write to {lock_file.parent}: {e.strerror}.") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"Another redi process is writing {what}; wait for it to finish or stop it.") from None
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing releases the lock

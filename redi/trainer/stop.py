"""Graceful stop: SIGTERM, SIGUSR1 (cluster preemption or time limit) or Ctrl-C end the run after the
current step with a checkpoint, so the same command resumes it with nothing lost.

SLURM sends SIGTERM (or, with `#SBATCH --signal=USR1@300`, SIGUSR1 five minutes early) and
torchrun forwards it to every worker. Ranks can see the signal at different steps, so they agree
with one all-reduce per step (MAX of the signal number) and all stop after the same step. A
second Ctrl-C aborts at once.

The loop reads its data through `BatchStream`s, each read in a thread of its own: a signal handler
only runs between the main thread's bytecodes and cannot end a read stuck on a stalled server or a
hung file system, so once a stop has waited STOP_GRACE_S for the step's data, the wait ends with
`StopWaiting` and the run stops after the last finished step instead.
"""
from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Generator, Iterator
from types import FrameType, TracebackType
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

from redi.common.runtime import STOP_SIGNALS

STOP_GRACE_S = 5.0  # how long a stop signal waits for the data of the step in progress before giving it up
_POLL_S = 0.25  # how often a wait for data looks at the stop signals
T = TypeVar("T")


class StopWaiting(Exception):
    """A stop signal came and the step's data did not within STOP_GRACE_S: stop after the last finished step."""


class StopRequest:
    """Context manager that records the first stop signal instead of dying from it."""

    def __init__(self) -> None:
        self.signum = 0
        self._since = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if not self.signum:
            self.signum, self._since = signum, time.monotonic()

    @property
    def overdue(self) -> bool:
        """A stop signal came STOP_GRACE_S ago or more."""
        return bool(self.signum) and time.monotonic() - self._since >= STOP_GRACE_S

    def agreed(self, device: torch.device) -> int:
        """The signal number if any rank received one (0 otherwise); the same on every rank. Under DDP this
        reads the device, so call it where the step syncs anyway (before the optimiser step, not after it)."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)  # (1,)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class BatchStream(Generic[T]):
    """An iterator read in a daemon thread of its own, so that the loop can give up waiting for it.

    One thread for the stream's whole life: DataLoader workers are forked from it, and the parent-death signal
    that ends an orphaned worker (common/runtime.py) fires when the thread that forked it ends, not the process.
    """

    def __init__(self, batches: Iterator[T], device: torch.device):
        self._asked: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: read the next item; False: close
        self._answers: queue.SimpleQueue[tuple[bool, object]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(batches, device), name="batches", daemon=True).start()

    def __enter__(self) -> BatchStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._asked.put(False)  # the thread closes the iterator (its DataLoader workers end), unless a read is stuck

    def _serve(self, batches: Iterator[T], device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # pinned memory and the loader's pinning thread: this rank's GPU
        while self._asked.get():
            try:
                self._answers.put((True, next(batches)))
            except BaseException as e:  # StopIteration and the readers' errors are raised in the loop's thread
                self._answers.put((False, e))
        if isinstance(batches, Generator):
            batches.close()

    def next(self, stop: StopRequest) -> T:
        """The next item; StopWaiting once a stop signal has waited STOP_GRACE_S for it (the read is abandoned: the
        process is about to end)."""
        self._asked.put(True)
        while True:
            try:
                ok, value = self._answers.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if stop.overdue:
                    raise StopWaiting(stop.signum) from None
        if not ok:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]

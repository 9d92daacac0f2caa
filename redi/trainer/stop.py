"""Graceful stop: SIGTERM, SIGUSR1 (cluster preemption or time limit) or Ctrl-C end the run after the
current step with a checkpoint, so the same command resumes it with nothing lost.

SLURM sends SIGTERM (or, with `#SBATCH --signal=USR1@300`, SIGUSR1 five minutes early) and
torchrun forwards it to every worker. Ranks can see the signal at different steps, so they agree
with one all-reduce per step (MAX of the signal number) and all stop after the same step. A
second Ctrl-C aborts at once.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from redi.common.runtime import STOP_SIGNALS


class StopRequest:
    """Context manager that records the first stop signal instead of dying from it."""

    def __init__(self) -> None:
        self.signum = 0
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
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int:
        """The signal number if any rank received one (0 otherwise); the same on every rank. Under DDP this
        reads the device, so call it where the step syncs anyway (before the optimiser step, not after it)."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)  # (1,)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

"""What every long command shares: choosing the torch device, and DataLoader workers (how many, and that they leave
the stop signals to the main process)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing import resource_sharer
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redi.common.errors import UserError

if TYPE_CHECKING:  # torch takes seconds to import: commands that need no device do without it
    import torch


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """None/'auto' → CUDA when available (this rank's GPU under torchrun), else CPU; an absent CUDA is a user error."""
    import torch

    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asks for CUDA, but torch sees no CUDA device here; use --device cpu.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


AUTO_WORKERS = 4  # DataLoader processes per process when not asked for: enough to keep one GPU fed with decoded data


def loader_workers(requested: int | None, loaders: int = 1) -> int:
    """DataLoader processes for each of this process's `loaders` loaders: `requested` in all (None: AUTO_WORKERS, fewer
    where this node's cores shared by its torchrun ranks are fewer), never more than the cores torch's "suggested max
    number of worker" warning counts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested is None:
        requested = min(AUTO_WORKERS, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return min(-(-requested // loaders), cores)


# Preemption (SIGTERM; SIGUSR1 with SLURM's --signal) and Ctrl-C: the main process (each torchrun rank) decides.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def loader_worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: leave the stop signals to the main process, and die with it.

    Schedulers signal the whole process group (SLURM, `kill -TERM -PGID`): a worker killed by that
    signal would fail the main process's next batch ("DataLoader worker … killed") instead of letting
    it finish the step and checkpoint. So a worker ignores SIGTERM, SIGUSR1 and SIGINT, but for a
    SIGTERM from its own main process, which is how multiprocessing and torch end their workers. A
    worker that outlived its main process (kill -9) is killed by the kernel (Linux), without a
    traceback for the batch it was handing over.
    """
    parent = os.getppid()
    sys.excepthook = _without_handover_reports(sys.excepthook)
    # Blocked before the worker starts any other thread, so that every thread inherits the mask and
    # only the waiting thread below ever receives these signals (and sees who sent them).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_end_on_the_main_process_sigterm, args=(parent,), name="stop-signals", daemon=True).start()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: torch's own watchdog ends orphaned workers within seconds
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _without_handover_reports(report: Callable[..., Any]) -> Callable[..., Any]:
    """A worker's sys.excepthook. Torch hands a batch's tensors to the main process through multiprocessing's
    descriptor-sharing thread, which reports a main process killed mid-handshake with a traceback of its own
    (EOFError or ConnectionResetError): no fault of the worker, which the kernel ends a moment later. Those are
    dropped; every other exception is reported."""
    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
        if not (issubclass(kind, (EOFError, ConnectionError)) and frames and frames[0] == resource_sharer.__file__):
            report(kind, value, tb)
    return hook


def _end_on_the_main_process_sigterm(parent: int) -> None:
    """A worker's signal thread: exit on SIGTERM sent by `parent` (its main process), drop every other stop signal."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # what terminate() asked for; 0 keeps torch's SIGCHLD check quiet at the main process's exit

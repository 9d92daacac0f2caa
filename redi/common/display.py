"""What a person sees on stderr: log lines through one rich handler, and progress bars, from rank 0 of a torchrun job.

Modules log with `logging.getLogger(__name__)`; the CLI calls `configure_logging` once per command. Results (the
summary tables) are the CLI's to print, never the library's.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

PACKAGE = "redi"  # the logger (and its children) that logs from INFO on


def process_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def configure_logging() -> None:
    """One RichHandler on stderr: our modules from INFO on rank 0, other ranks' warnings and errors (prefixed with the
    rank), and other libraries' warnings and errors; a second call (the next command in one process) replaces it."""
    rank = process_rank()
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
    if rank:
        handler.setFormatter(logging.Formatter(f"rank {rank}: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RichHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger(PACKAGE).setLevel(logging.INFO if rank == 0 else logging.WARNING)


class RateColumn(ProgressColumn):
    """Items per second of a progress task (its finished speed once done)."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else 0.0)
        return Text(f"{speed:,.1f} {self.unit}", style="progress.data.speed")


def progress_bar(unit: str | None = "img/s", *, transient: bool = False, enabled: bool = True,
                 columns: Sequence[ProgressColumn] = ()) -> Progress:
    """The one look of every command's progress on stderr: description, bar, done/total, rate in `unit` (None: no
    rate), time left. Hidden where nobody watches it live: on ranks other than 0 and when stderr is not a terminal
    (a log file; the command's summary says what was done)."""
    console = Console(stderr=True)
    shown = enabled and process_rank() == 0 and (console.is_terminal or console.is_jupyter)
    columns = columns or (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          *([RateColumn(unit)] if unit else []), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient, disable=not shown)


@contextlib.contextmanager
def counting(label: str, total: int, unit: str = "img/s", *, transient: bool = False,
             enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A one-task `progress_bar` as an advance(n) function."""
    with progress_bar(unit, transient=transient, enabled=enabled) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)

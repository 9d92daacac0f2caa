"""What a person sees on stderr: log lines through one handler, and progress, from rank 0 of a torchrun job.

On a terminal, log lines go through rich and progress is a live bar. Where stderr is a file or a pipe (a SLURM or
nohup job, `2> log`), log lines are plain, one per line with a timestamp, and progress is a plain log line every
`LINE_PERCENT` percent of a task (at most one per `LINE_MIN_SECONDS`), at least one per `LINE_SECONDS`, and one at its
end (`redi train`: one every --log-every steps), so a batch job's log says how far it is and how fast it goes.
`Progress` is the one progress object of every command.

Modules log with `logging.getLogger(__name__)`; the CLI calls `configure_logging` once per command. Results (the
summary tables) are the CLI's to print, never the library's.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import rich.progress
from rich.console import Console
from rich.errors import MarkupError
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

PACKAGE = "redi"  # the logger (and its children) that logs from INFO on
LINE_PERCENT = 5.0  # off a terminal: a progress line each time a task passes a multiple of this percentage …
LINE_MIN_SECONDS = 10.0  # … at least this long after its last line (a task of seconds logs only its end) …
LINE_SECONDS = 60.0  # … and at the latest this long after its last line
PLAIN_FORMAT, PLAIN_DATES = "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
log = logging.getLogger(__name__)


def process_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def stderr_is_live(console: Console | None = None) -> bool:
    """Whether stderr is watched live (a terminal or a notebook), so bars can redraw; else it is a file or a pipe."""
    console = console or Console(stderr=True)
    return console.is_terminal or console.is_jupyter


class PlainHandler(logging.StreamHandler):
    """One plain line per record on whatever sys.stderr is when it is written (a test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging() -> None:
    """One handler on stderr (rich on a terminal, `PlainHandler` otherwise): our modules from INFO on rank 0, other
    ranks' warnings and errors (prefixed with the rank), and other libraries' warnings and errors; a second call (the
    next command in one process) replaces it."""
    rank = process_rank()
    console = Console(stderr=True)
    message = f"rank {rank}: %(message)s" if rank else "%(message)s"
    handler: logging.Handler
    if stderr_is_live(console):
        handler = RichHandler(console=console, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter(message))
    else:
        handler = PlainHandler()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT.replace("%(message)s", message), PLAIN_DATES))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, (RichHandler, PlainHandler))]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger(PACKAGE).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def task_speed(task: Task) -> float:
    """Items per second of a task: rich's recent estimate, else the average since it was added (its finished speed
    once done)."""
    if recent := task.finished_speed or task.speed:
        return recent
    done = task.completed - task.fields.get("first", 0)
    return done / task.elapsed if task.elapsed else 0.0


class RateColumn(ProgressColumn):
    """Items per second of a progress task."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task_speed(task):,.1f} {self.unit}", style="progress.data.speed")


@dataclass
class _LastLine:
    """When a task's last plain line was written, and at what fraction done."""

    time: float
    fraction: float = 0.0
    finished: bool = False


class Progress(rich.progress.Progress):
    """rich's Progress that, where stderr is not watched live, writes plain log lines instead of redrawing a bar.

    A line (`plain_line`) when a task passes a multiple of `line_percent` percent (`LINE_MIN_SECONDS` or more after
    its last line), `LINE_SECONDS` after its last line, and when it finishes; `line_percent` 0: a line at every
    advance or update (`redi train` updates every --log-every steps). A task's `status` field goes into its line."""

    def __init__(self, *columns: str | ProgressColumn, plain: bool, unit: str | None,
                 line_percent: float = LINE_PERCENT, **options: Any):
        super().__init__(*columns, **options)
        self.plain, self.unit, self.line_percent = plain, unit, line_percent
        self._last: dict[TaskID, _LastLine] = {}

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **({"first": completed} | fields))
        self._last[task_id] = _LastLine(self.get_time(), self._fraction(self._tasks[task_id]))
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_line(task_id)

    def update(self, task_id: TaskID, **changes: Any) -> None:  # type: ignore[override]  # rich's keywords, passed on
        super().update(task_id, **changes)
        self._maybe_line(task_id)

    @staticmethod
    def _fraction(task: Task) -> float:
        return min(task.completed / task.total, 1.0) if task.total else 0.0

    def _maybe_line(self, task_id: TaskID) -> None:
        if not self.plain:
            return
        task, last, now = self._tasks[task_id], self._last[task_id], self.get_time()
        fraction, finished = self._fraction(task), task.finished
        step, since = self.line_percent / 100, now - last.time
        passed = bool(step and task.total and int(fraction / step + 1e-9) > int(last.fraction / step + 1e-9))
        due = not step or since >= LINE_SECONDS or (passed and since >= LINE_MIN_SECONDS)
        if (finished and not last.finished) or (due and not finished):
            log.info(plain_line(task, self.unit))
            self._last[task_id] = _LastLine(now, fraction, finished)


def plain_line(task: Task, unit: str | None) -> str:
    """One progress line for a log file: what, how far, its status, how fast, time spent and left.

    `encode (tiny-random) 32/64 (50%) | 12.1 img/s | 0:00:03 elapsed, ETA 0:00:03`"""
    parts = [f"{_plain_text(task.description)} {_number(task.completed)}"
             + (f"/{_number(task.total)} ({task.completed / task.total:.0%})" if task.total else "")]
    if task.fields.get("status"):
        parts.append(str(task.fields["status"]))
    speed = task_speed(task)
    if unit:
        parts.append(f"{speed:,.1f} {unit}")
    times = f"{_clock(task.finished_time if task.finished else task.elapsed)} elapsed"
    if task.total and not task.finished and speed > 0:
        times += f", ETA {_clock((task.total - task.completed) / speed)}"
    return " | ".join([*parts, times])


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _clock(seconds: float | None) -> str:
    """h:mm:ss, as rich's time columns show it."""
    return str(datetime.timedelta(seconds=round(seconds or 0.0)))


def _plain_text(markup: str) -> str:
    """A description without its rich markup ("sampling [yellow](tiny-random VAE)[/]" → "sampling (tiny-random VAE)")."""
    try:
        return Text.from_markup(markup).plain
    except MarkupError:
        return markup


def progress_bar(unit: str | None = "img/s", *, transient: bool = False, enabled: bool = True,
                 columns: Sequence[ProgressColumn] = (), line_percent: float = LINE_PERCENT,
                 console: Console | None = None) -> Progress:
    """The one progress display of every command on stderr: on a terminal a bar (description, bar, done/total, rate in
    `unit` (None: no rate), time left, or `columns`); elsewhere plain log lines (see `Progress`). Nothing on ranks
    other than 0, or when not `enabled`."""
    console = console or Console(stderr=True)
    shown = enabled and process_rank() == 0
    live = shown and stderr_is_live(console)
    columns = columns or (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          *([RateColumn(unit)] if unit else []), TimeRemainingColumn())
    return Progress(*columns, plain=shown and not live, unit=unit, line_percent=line_percent, console=console,
                    transient=transient, disable=not live)


@contextlib.contextmanager
def counting(label: str, total: int, unit: str = "img/s", *, transient: bool = False,
             enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A one-task `progress_bar` as an advance(n) function."""
    with progress_bar(unit, transient=transient, enabled=enabled) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)

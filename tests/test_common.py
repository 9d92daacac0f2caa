"""common/: the DataLoader worker count and what its workers report, the log handler, and progress: bars on a terminal,
plain lines in a log file."""
from __future__ import annotations

import datetime
import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from rich.console import Console

from redi.common.display import LINE_MIN_SECONDS, LINE_PERCENT, LINE_SECONDS, PlainHandler, configure_logging, progress_bar
from redi.common.runtime import AUTO_WORKERS, loader_workers


def test_worker_count_comes_from_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None) == 2 and loader_workers(8) == 2 and loader_workers(0) == 0
    assert loader_workers(4, loaders=4) == 1  # the trainer's accumulation loaders share the request
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on the node share its cores
    assert loader_workers(None) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert loader_workers(None) == AUTO_WORKERS and loader_workers(16) == 16


def test_the_default_worker_count_never_gets_torch_s_too_many_workers_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "This DataLoader will create N worker processes … suggested max is M"
        DataLoader(range(4), num_workers=loader_workers(None))


WORKER = """
import socket, sys
from multiprocessing import resource_sharer
from redi.common.runtime import loader_worker_init

loader_worker_init(0)
resource_sharer.DupFd(0)  # a tensor handed to the main process: the descriptor-sharing thread starts listening
with socket.socket(socket.AF_UNIX) as main:  # the main process connects for it, and is killed mid-handshake
    main.connect(resource_sharer._resource_sharer._address)
resource_sharer.stop()  # returns once the sharing thread has served that connection
try:
    raise ValueError("the worker's own error")
except ValueError:
    sys.excepthook(*sys.exc_info())
"""


def test_a_worker_reports_its_own_errors_but_not_a_main_process_killed_mid_handover() -> None:
    done = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Traceback") == 1 and "ValueError: the worker's own error" in done.stderr, done.stderr


def test_other_ranks_log_only_warnings_with_their_rank(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("redi.pipeline.test")
    try:
        monkeypatch.setenv("RANK", "3")
        configure_logging()
        log.info("an info line")
        log.warning("a warning line")
        said = capsys.readouterr().err
        assert "rank 3: a warning line" in said and "an info line" not in said
        monkeypatch.setenv("RANK", "0")
        configure_logging()
        log.info("an info line")
        assert "an info line" in capsys.readouterr().err
    finally:
        monkeypatch.delenv("RANK")
        configure_logging()


def test_progress_bars_show_on_a_terminal_of_rank_0_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    assert progress_bar().disable  # stderr is captured here: not a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as a terminal
    assert not progress_bar().disable and progress_bar(enabled=False).disable
    monkeypatch.setenv("RANK", "1")
    assert progress_bar().disable


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain_progress(clock: Clock, **options: object):
    bar = progress_bar("img/s", console=Console(file=io.StringIO()), **options)  # a file: not a terminal
    bar.get_time = clock
    return bar


def test_off_a_terminal_progress_is_a_log_line_every_few_percent_and_when_done(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="redi")
    clock = Clock()
    with plain_progress(clock) as bar:
        task = bar.add_task("encode [yellow](tiny-random)[/]", total=200)
        for _ in range(200):
            clock.now += LINE_MIN_SECONDS / 10  # a line at each 5%, 10 s apart; none from LINE_SECONDS
            bar.advance(task, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 100 / LINE_PERCENT
    assert lines[0] == "encode (tiny-random) 10/200 (5%) | 1.0 img/s | 0:00:10 elapsed, ETA 0:03:10"
    assert lines[-1] == "encode (tiny-random) 200/200 (100%) | 1.0 img/s | 0:03:20 elapsed"  # done: no ETA
    shown = [int(re.search(r" (\d+)/200 ", line).group(1)) for line in lines]
    assert shown == list(range(10, 201, 10))
    caplog.clear()
    with plain_progress(clock) as bar:  # a task of seconds: only its end
        task = bar.add_task("pca", total=100)
        for _ in range(100):
            clock.now += 0.05
            bar.advance(task, 1)
    assert [r.getMessage().split(" | ")[0] for r in caplog.records] == ["pca 100/100 (100%)"]


def test_off_a_terminal_a_slow_task_logs_every_minute_and_train_at_every_update(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="redi")
    clock = Clock()
    with plain_progress(clock) as bar:
        task = bar.add_task("shards", total=10_000)
        for _ in range(30):  # 0.3% in 300 s
            clock.now += 10
            bar.advance(task, 1)
    every = int(LINE_SECONDS // 10)  # advances between lines
    assert [r.getMessage().split(" | ")[0] for r in caplog.records] == [f"shards {n}/10,000 (0%)" for n in range(every, 31, every)]
    assert all(f"| {datetime.timedelta(seconds=n * LINE_SECONDS)} elapsed, ETA " in r.getMessage()
               for n, r in enumerate(caplog.records, 1))
    caplog.clear()
    with plain_progress(clock, line_percent=0) as bar:  # TrainProgress: its caller updates every --log-every steps
        task = bar.add_task("step", total=1000, completed=500, status="")
        for step in (510, 520):
            clock.now += 1
            bar.update(task, completed=step, status=f"loss {step / 1000}")
    assert [r.getMessage().split(" | ")[:2] for r in caplog.records] == [["step 510/1,000 (51%)", "loss 0.51"],
                                                                         ["step 520/1,000 (52%)", "loss 0.52"]]


def test_on_a_terminal_progress_is_a_bar_and_no_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="redi")
    screen = io.StringIO()
    with progress_bar("img/s", console=Console(file=screen, force_terminal=True, width=80)) as bar:
        task = bar.add_task("encode", total=4)
        bar.advance(task, 4)
    assert not bar.plain and "━" in screen.getvalue() and "4/4" in screen.getvalue()
    assert not caplog.records


def test_off_a_terminal_log_lines_are_plain_lines_with_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging()  # stderr is captured here: not a terminal
        assert any(isinstance(h, PlainHandler) for h in logging.getLogger().handlers)
        logging.getLogger("redi.test").info("a line longer than eighty columns, " * 4)
        (line,) = capsys.readouterr().err.splitlines()  # never wrapped
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO (a line longer than eighty columns, ){4}", line)
    finally:
        configure_logging()

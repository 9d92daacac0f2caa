"""common/: the DataLoader worker count, the log handler and the progress bars."""
from __future__ import annotations

import logging
import os
import warnings

import pytest
from torch.utils.data import DataLoader

from redi.common.display import configure_logging, progress_bar
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

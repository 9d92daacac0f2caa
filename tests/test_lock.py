"""One writer per stage and per run: a second redi process gets one sentence, and the lock dies with its holder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from redi.cli import app
from redi.common.errors import UserError
from redi.common.lock import exclusive
from redi.pipeline.demo_data import write_demo_images
from redi.pipeline.stage import stage_lock


def test_a_held_lock_refuses_a_second_writer_and_is_released(tmp_path: Path) -> None:
    lock = tmp_path / ".thing.lock"
    with (exclusive(lock, "the thing"), pytest.raises(UserError, match="Another redi process is writing the thing"),
          exclusive(lock, "the thing")):
        pass
    with exclusive(lock, "the thing"):  # released on exit
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    lock = tmp_path / ".latents.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from redi.common.lock import exclusive
with exclusive({str(lock)!r}, 'x'):
    print('held', flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError), exclusive(lock, "x"):
        pass
    holder.kill()
    holder.wait()
    with exclusive(lock, "x"):
        pass


def test_encode_refuses_while_another_process_writes_the_stage(tmp_path: Path) -> None:
    images = write_demo_images(tmp_path / "images", 4).out
    data = tmp_path / "data"
    args = ["encode", str(images), "--data", str(data), "--vae", "tiny-random", "--workers", "0", "--resolution", "64"]
    with exclusive(stage_lock(data / "latents"), "held by the test"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Another redi process is writing" in result.output
    assert not (data / "latents").exists()  # nothing was touched
    assert CliRunner().invoke(app, args).exit_code == 0


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked while the stage or run lock is held; a worker that outlives a failed run
    (in a process that goes on, or orphaned by kill -9) must not keep the lock held."""
    lock = tmp_path / ".run.lock"
    ready, started = os.pipe()
    with exclusive(lock, "the run"):
        child = os.fork()
        if child == 0:  # the worker: inherited the lock's descriptor, lives on
            os.write(started, b"1")
            time.sleep(30)
            os._exit(0)
        os.read(ready, 1)  # the child runs (past its at-fork hooks)
    try:
        with exclusive(lock, "the run"):  # released with the parent's descriptor, the child alive
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)

"""Where a run's metrics go besides metrics.jsonl: TensorBoard (RUN/tensorboard), Weights & Biases (RUN/wandb), or nowhere.

metrics.jsonl stays the source of truth; a tracker is a view of it, written by rank 0 only. A resumed run continues
the same curves without repeating a step: a TensorBoard event file opens with a purge at the checkpoint's step + 1
(SummaryWriter's `purge_step`), so the steps a crashed run logged after its last checkpoint are hidden from every reader, and the resumed run logs
them again; W&B resumes the same run id (RUN/wandb.json) and drops steps it already holds. A tracker started on a run
that has metrics but no tracker files yet (a run begun with `--tracker none`) is first filled from metrics.jsonl.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from redi.common.atomic import atomic_write_json, try_read_json
from redi.common.errors import UserError
from redi.common.schema import try_load
from redi.trainer.metrics import read_metrics

log = logging.getLogger(__name__)
TRACKERS = ("tensorboard", "wandb", "none")
TENSORBOARD_DIR = "tensorboard"
WANDB_RECORD = "wandb.json"  # {"id": …}: the W&B run id every resume of this run continues


class Tracker(Protocol):
    """What the training loop tells a tracker."""

    def scalars(self, row: dict[str, Any], step: int) -> None:
        """Every finite number of `row` (a metrics.jsonl line) at `step`; other values are left out."""

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) picture at `step`."""

    def close(self) -> None:
        """Flush and release."""


def default_tracker() -> str:
    """tensorboard where it is installed, else none (said once)."""
    if importlib.util.find_spec("tensorboard") is not None:
        return "tensorboard"
    log.info("TensorBoard is not installed, so this run logs to metrics.jsonl only (pip install tensorboard).")
    return "none"


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, but its step (the x axis)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class NoTracker:
    """--tracker none, and every rank but 0."""

    def scalars(self, row: dict[str, Any], step: int) -> None:
        pass

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """RUN/tensorboard event files, one scalar per metrics key (the same names), written in this thread.

    The records and protos are tensorboard's own; torch.utils.tensorboard's SummaryWriter would write them from a
    background thread, whose failure (a full disk) surfaces as a thread's traceback instead of the one sentence every
    redi command ends with. Opened like SummaryWriter(purge_step=step + 1) on a resume.
    """

    def __init__(self, run: Path, resume_step: int):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = Event, Summary
        folder = run / TENSORBOARD_DIR
        folder.mkdir(parents=True, exist_ok=True)
        # Readers take the files in name order: nanoseconds (a fixed 19 digits) put a resume's file after the last one.
        name = f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(folder / name, "ab")  # noqa: SIM115 (open for the run's life, closed by close())
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if resume_step:  # hide what a killed run logged after its checkpoint: the resumed run logs it again
            self._write(Event(wall_time=time.time(), step=resume_step + 1, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()  # rows come every --log-every steps: a reader sees each one at once

    def scalars(self, row: dict[str, Any], step: int) -> None:
        values = [self._summary.Value(tag=name, simple_value=value) for name, value in numbers(row).items()]
        self._write(self._event(wall_time=time.time(), step=step, summary=self._summary(value=values)))

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        picture = self._summary.Image(height=pixels.shape[0], width=pixels.shape[1], colorspace=3,
                                      encoded_image_string=png.getvalue())
        summary = self._summary(value=[self._summary.Value(tag=tag, image=picture)])
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class WandbRecord:
    """RUN/wandb.json: the W&B run id every resume of this run continues."""

    id: str


class WandbTracker:
    """wandb, resuming RUN/wandb.json's run id; WANDB_MODE=offline writes RUN/wandb/ without a network."""

    def __init__(self, run: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError("--tracker wandb needs wandb: pip install -e '.[wandb]' in redi's checkout (or pip install wandb).") from None
        record = try_load(WandbRecord, try_read_json(run / WANDB_RECORD))  # damaged: a new W&B run
        run_id = record.id if record is not None else None
        if run_id is None:
            run_id = secrets.token_hex(8)
            atomic_write_json(run / WANDB_RECORD, {"id": run_id})
        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "redi"), name=run.resolve().name, id=run_id,
                               resume="allow", dir=str(run), config=config)

    def scalars(self, row: dict[str, Any], step: int) -> None:
        self._run.log(numbers(row), step=step)

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        self._run.log({tag: self._wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self._run.finish()


def open_tracker(kind: str, run: Path, resume_step: int, config: dict[str, Any], is_main: bool) -> Tracker:
    """The tracker of rank 0 (the others get none), filled from metrics.jsonl up to `resume_step` when it is new."""
    if not is_main or kind == "none":
        return NoTracker()
    run = Path(run)
    fresh = not (run / (TENSORBOARD_DIR if kind == "tensorboard" else WANDB_RECORD)).exists()
    tracker: Tracker = TensorBoardTracker(run, resume_step) if kind == "tensorboard" else WandbTracker(run, config)
    if fresh and resume_step and (run / "metrics.jsonl").exists():
        for row in read_metrics(run / "metrics.jsonl"):
            if row["step"] <= resume_step:
                tracker.scalars(row, row["step"])
    return tracker

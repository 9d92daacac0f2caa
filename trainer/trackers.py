"""Where a run's metrics go besides metrics.jsonl: TensorBoard (RUN/tensorboard), Weights & Biases (RUN/wandb), or nowhere.

metrics.jsonl stays the source of truth; a tracker is a view of it, written by rank 0 only. A resumed run continues
the same curves without repeating a step: TensorBoard's writer opens with `purge_step` = the checkpoint's step + 1,
so the steps a crashed run logged after its last checkpoint are hidden from every reader, and the resumed run logs
them again; W&B resumes the same run id (RUN/wandb.json) and drops steps it already holds. A tracker started on a run
that has metrics but no tracker files yet (a run begun with `--tracker none`) is first filled from metrics.jsonl.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.atomic import atomic_write_json, read_jsonl, try_read_json
from common.errors import UserError

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
    """torch.utils.tensorboard's SummaryWriter on RUN/tensorboard, one scalar per metrics key (the same names)."""

    def __init__(self, run: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # Events of steps after the checkpoint (logged before a crash) are hidden: the resumed run logs them again.
        self._writer = SummaryWriter(log_dir=str(run / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, row: dict[str, Any], step: int) -> None:
        for name, value in numbers(row).items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()  # rows come every --log-every steps: a reader sees each one at once

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        self._writer.add_image(tag, pixels, step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """wandb, resuming RUN/wandb.json's run id; WANDB_MODE=offline writes RUN/wandb/ without a network."""

    def __init__(self, run: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError("--tracker wandb needs wandb: pip install 'redi[wandb]'.") from None
        record = try_read_json(run / WANDB_RECORD)
        run_id = record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None
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
        for row in read_jsonl(run / "metrics.jsonl"):
            if isinstance(row.get("step"), int) and row["step"] <= resume_step:
                tracker.scalars(row, row["step"])
    return tracker

"""What `redi train` shows of its progress: on a terminal one bar (step, loss, steps/s, images/s, MFU, ETA); in a
batch job's log a line every --log-every steps with every loss term, the gradient norm and the learning rate too:

`step 300/1,000 (30%) | loss 0.9123 (vae 0.8012, pcs 0.1111) | grad norm 1.23 | lr 0.0001 | 12.3 steps/s,
98 img/s | 0:00:24 elapsed, ETA 0:00:57` (one line)."""
from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

from redi.common.display import progress_bar
from redi.trainer.metrics import LOSS_TERMS


class TrainProgress:
    """The display's progress over optimiser steps, its status the latest metrics row."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.last_step = start_step
        self._progress = progress_bar(None, enabled=enabled, line_percent=0, columns=(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("{task.fields[brief]}"), TimeRemainingColumn(),
        ))
        self._task = self._progress.add_task("step", total=total_steps, completed=start_step, brief="", status="")
        self._progress.start()

    def update(self, row: dict[str, Any]) -> None:
        self._progress.update(self._task, completed=row["step"], brief=brief(row), status=status(row))
        self.last_step = row["step"]

    def close(self) -> None:
        self._progress.stop()


def brief(row: dict[str, Any]) -> str:
    """The bar's text: loss and speeds."""
    return " | ".join([f"loss {row['loss']:.4f}", speeds(row)])


def status(row: dict[str, Any]) -> str:
    """A log line's text: the loss and each of its terms, the gradient norm, the learning rate, skipped steps, speeds."""
    terms = ", ".join(f"{name} {row[name]:.4f}" for name in LOSS_TERMS[1:] if name in row)
    parts = [f"loss {row['loss']:.4f}" + (f" ({terms})" if terms else ""), f"grad norm {row['grad_norm']:.3g}",
             f"lr {row['lr']:.3g}"]
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} skipped")
    return " | ".join([*parts, speeds(row)])


def speeds(row: dict[str, Any]) -> str:
    mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
    return f"{row['steps_per_s']:.2f} steps/s, {row['images_per_s']:,.0f} img/s{mfu}"

"""The one-line rich progress display of `redi train`: step, loss, steps/s, images/s, MFU, ETA."""
from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

from redi.common.display import progress_bar


class TrainProgress:
    """A rich progress bar over optimiser steps whose description carries the latest metrics."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.last_step = start_step
        self._progress = progress_bar(enabled=enabled, columns=(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("{task.description}"), TimeRemainingColumn(),
        ))
        self._task = self._progress.add_task("", total=total_steps, completed=start_step)
        self._progress.start()

    def update(self, row: dict[str, Any]) -> None:
        mfu = f" | MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        text = (f"loss {row['loss']:.4f} | {row['steps_per_s']:.2f} steps/s | "
                f"{row['images_per_s']:.0f} img/s{mfu}")
        self._progress.update(self._task, completed=row["step"], description=text)
        self.last_step = row["step"]

    def close(self) -> None:
        self._progress.stop()

"""What every long command shares: choosing the torch device, and the items/s column of its progress bar."""
from __future__ import annotations

import torch
from rich.progress import ProgressColumn, Task
from rich.text import Text

from pipeline.errors import UserError


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """None/'auto' → CUDA when available (this rank's GPU under torchrun), else CPU; an absent CUDA is a user error."""
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


class RateColumn(ProgressColumn):
    """Items per second of a progress task (its finished speed once done)."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else 0.0)
        return Text(f"{speed:,.1f} {self.unit}", style="progress.data.speed")

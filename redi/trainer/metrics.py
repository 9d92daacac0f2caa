"""metrics.jsonl (one JSON line per logged step) and the throughput/MFU figures logged with the loss."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from redi.common.atomic import atomic_write_bytes, read_jsonl
from redi.common.schema import Range, try_load

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 dense peak, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


@dataclass(frozen=True)
class MetricsLine:
    """One metrics.jsonl line as it is read back: the step it belongs to. Its other values are numbers (plots and
    trackers take the finite ones) and an evaluation's `card` (an object)."""

    step: Annotated[int, Range(0)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl that name their step; a line cut by a crash or damaged on disk is skipped."""
    return [row for row in read_jsonl(path) if try_load(MetricsLine, row) is not None] if Path(path).exists() else []


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the checkpoint's step (or cut by a crash) are dropped first."""

    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        if self.path.exists():
            kept = [json.dumps(row) for row in read_metrics(self.path) if row["step"] <= resume_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


LOSS_TERMS = ("loss", "vae", "pcs", "vb", "repa", "cls")  # what compute_loss logs: the total, then each term

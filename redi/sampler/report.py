"""What a `redi sample` run spent and did: the work counted over every process (and, in sample.json, over every run
on the same folder), the one-screen summary, and the sample.json written once the outputs are assembled."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from rich.table import Table

from redi.sampler.outputs import ERRORS_JSONL, GRID_PNG, IMAGES_DIR, NPZ_FILE, PCS_PNG, SAMPLE_JSON
from redi.sampler.settings import SamplerChoice
from redi.trainer.checkpoint import Checkpoint

if TYPE_CHECKING:
    from redi.sampler.config import SampleConfig


@dataclass
class Work:
    """What this process (or, after `reduce`, all processes) spent."""

    images: int = 0
    """Images generated now (missing ones only; present ones are skipped)."""
    batches: int = 0
    """Batches sampled."""
    model_calls: int = 0
    """Batched network forward calls (all guidance branches share one call)."""
    nfe: int = 0
    """Per-sample network evaluations, summed over the images of every sampled batch (AutoGuidance's guide included)."""
    nfe_per_image: int = 0
    """Network evaluations per image (active guidance branches summed over the steps); the most any batch spent
    (adaptive solvers spend a different number per batch)."""
    seconds: float = 0.0
    """Wall time of sampling, decoding and writing (the slowest rank after `reduce`)."""
    sampled: int = 0
    """Images the sampled batches held (present ones recomputed with their batch included): nfe's denominator."""
    nonfinite: list[int] = field(default_factory=list)
    """Indices whose sample or decoded image held NaN or inf: listed in errors.jsonl, never written as images."""
    guide_nfe: int = 0
    """Of nfe: the evaluations of AutoGuidance's guiding network (a second network, so a guided step costs two calls)."""

    @property
    def images_per_s(self) -> float:
        """Generated images per second of wall time."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def nfe_mean_per_image(self) -> float:
        """Network evaluations per sampled image, averaged over the batches."""
        return self.nfe / self.sampled if self.sampled else 0.0

    @classmethod
    def from_record(cls, record: object) -> Work:
        """The `work` that sample.json recorded of earlier runs on the same folder; none where it has no readable one."""
        if not isinstance(record, dict):
            return cls()

        def count(name: str) -> int:
            value = record.get(name)
            return value if type(value) is int and value >= 0 else 0

        seconds = record.get("seconds")
        return cls(images=count("images"), batches=count("batches"), model_calls=count("model_calls"), nfe=count("nfe"),
                   nfe_per_image=count("nfe_per_image"), sampled=count("sampled"),
                   seconds=float(seconds) if type(seconds) in (int, float) and seconds >= 0 else 0.0,
                   guide_nfe=count("guide_nfe"))

    def after(self, earlier: Work) -> Work:
        """The work of every run on a folder: `earlier` runs' then this one's (counts and seconds summed, the most NFE
        per image any spent); the non-finite samples are this run's, the ones still missing."""
        return Work(earlier.images + self.images, earlier.batches + self.batches, earlier.model_calls + self.model_calls,
                    earlier.nfe + self.nfe, max(earlier.nfe_per_image, self.nfe_per_image),
                    earlier.seconds + self.seconds, earlier.sampled + self.sampled, self.nonfinite,
                    earlier.guide_nfe + self.guide_nfe)

    def record(self) -> dict[str, Any]:
        """sample.json's `work`."""
        return dataclasses.asdict(self) | {"images_per_s": self.images_per_s, "nfe_mean_per_image": self.nfe_mean_per_image}

    def reduce(self, device: torch.device) -> Work:
        """Sum the counts and take the longest time over the process group (identity without one)."""
        if not dist.is_initialized():
            return self
        counts = torch.tensor([self.images, self.batches, self.model_calls, self.nfe, self.sampled, self.guide_nfe],
                              dtype=torch.float64, device=device)
        peaks = torch.tensor([self.seconds, self.nfe_per_image], dtype=torch.float64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        images, batches, calls, nfe, sampled, guide_nfe = (int(v) for v in counts.tolist())
        lists: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(lists, self.nonfinite)
        return Work(images, batches, calls, nfe, int(peaks[1]), float(peaks[0]), sampled,
                    sorted(i for part in lists for i in part), guide_nfe)


@dataclass(frozen=True)
class SampleResult:
    """What a `redi sample` run did and where its outputs are."""

    out: Path
    num: int
    present: int
    """Images that were already there when this run started (over all processes)."""
    work: Work
    rank: int
    world_size: int
    device: str
    sampler: SamplerChoice
    guidance: str
    missing: int
    """Images still missing after this process (other independently launched ranks have not run yet)."""
    assembled: bool
    """This process wrote grid.png, pcs.png (with PCs) and samples.npz."""
    has_pcs: bool
    tiny_random: bool

    def table(self) -> Table:
        """The one-screen summary."""
        t = Table(title="redi sample" + (" [yellow](tiny-random VAE)[/]" if self.tiny_random else ""))
        t.add_column("")
        t.add_column("value")
        t.add_row("images", f"{self.num:,} ({self.work.images:,} generated now, {self.present:,} already there)")
        steps = "adaptive steps" if self.sampler.steps is None else f"{self.sampler.steps} steps"
        t.add_row("sampler", f"{self.sampler.label()}, {steps}, guidance {self.guidance}")
        nfe = self.work.nfe_per_image
        if self.work.images and self.sampler.options.adaptive:
            t.add_row("NFE per image", f"{self.work.nfe_mean_per_image:.1f} mean, {nfe} at most")
        else:
            guide = f" ({self.work.guide_nfe / self.work.sampled:g} of them the guide's)" if self.work.guide_nfe else ""
            t.add_row("NFE per image", f"{nfe}{guide}" if self.work.images else "–")
        t.add_row("model calls", f"{self.work.model_calls:,} in {self.work.batches:,} batches")
        t.add_row("images/s", f"{self.work.images_per_s:,.2f} ({self.world_size} process(es) on {self.device})")
        if self.work.nonfinite:
            t.add_row("[bold red]not finite[/]", f"[bold red]{len(self.work.nonfinite):,} images (NaN or inf), not written: "
                                                 f"listed in {ERRORS_JSONL}[/]")
        files = [f"{IMAGES_DIR}/"]
        if self.assembled:
            files += [NPZ_FILE, GRID_PNG] + ([PCS_PNG] if self.has_pcs else [])
        t.add_row("files", ", ".join(files + [SAMPLE_JSON] + ([ERRORS_JSONL] if self.work.nonfinite else [])))
        return t


def final_report(settings: dict[str, Any], ckpt: Checkpoint, cfg: SampleConfig, work: Work, world: int,
                 device: torch.device, has_pcs: bool) -> dict[str, Any]:
    """sample.json once the outputs are assembled: settings, run shape, file names and the work every run on the
    folder spent (`work`: Work.after)."""
    return {
        "settings": settings, "checkpoint_path": str(ckpt.path), "complete": True, "num": cfg.num,
        "batch_size": cfg.batch_size, "world_size": world, "device": str(device),
        "outputs": {"images": IMAGES_DIR, "npz": NPZ_FILE, "grid": GRID_PNG, "pcs": PCS_PNG if has_pcs else None},
        "work": work.record(),
    }


"""The one place a command joins torchrun's process group: NCCL on GPU, gloo on CPU, or a single process."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from redi.common.runtime import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[DistInfo]:
    """This process's place in the job: under torchrun (WORLD_SIZE > 1) joins the process group, and leaves it after
    if it joined it here; the device is `device` (None/'auto': this rank's GPU by LOCAL_RANK, else the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)  # one sentence for a device that is not there (cuda without a GPU, tpu)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    try:
        yield DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    finally:
        if joined:
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity in a single process."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()

"""A run directory as the training loop takes it: one job at a time (RUN/.lock, rank 0), no temporary file a killed
job left, and config.json and the shards' PCA written before the first step (a resume checked against them)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from redi.common.atomic import atomic_write_bytes, remove_temporaries
from redi.common.distributed import DistInfo, barrier
from redi.common.errors import UserError
from redi.common.lock import exclusive
from redi.pipeline.pca_file import PCA_FILE
from redi.trainer.checkpoint import RunConfig
from redi.trainer.plan import TrainPlan
from redi.trainer.resume import refuse_another_run

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Rank 0 holds RUN/.lock while it trains (a second job is refused in one sentence) and clears what a killed job
    left, e.g. a checkpoint whose write was cut: gigabytes nothing else deletes."""
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory.")
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with exclusive(run / LOCK_FILE, f"the run {run}"):
        remove_temporaries(run)
        yield


def prepare_run_dir(run: Path, plan: TrainPlan, pca: bytes | None, dist_info: DistInfo, record: RunConfig | None) -> None:
    """Write config.json for a new run, and the shards' checked `pca` beside it; refuse to resume a run (`record`)
    with another network, method or data."""
    if record is not None:
        refuse_another_run(run, record, plan.cfg)
        if changed := record.shards.differences(plan.shards):
            raise UserError(f"{run} was trained on other data than {plan.shards.root} ({', '.join(changed)} differ): "
                            "resume it on its own shards, or use another --run directory.")
    if dist_info.is_main:
        if pca is not None:  # the shards' projection, which config.json's pca_sha256 names
            atomic_write_bytes(run / PCA_FILE, pca)
        if record is None:
            plan.run_config(dist_info.world_size).save(run)
    barrier()

"""`redi verify RUN`: a run's config.json and every checkpoint against the SHA-256 recorded when it was saved."""
from __future__ import annotations

from pathlib import Path

from redi.common.atomic import sha256_file
from redi.common.errors import UserError
from redi.pipeline.verify import StageCheck
from redi.trainer.checkpoint import CHECKSUM_SUFFIX, CONFIG_JSON, RunConfig, checksum_path, list_checkpoints, recorded_sha256


def _check_config(run: Path) -> StageCheck:
    try:
        config = RunConfig.load(run)
    except UserError as e:
        return StageCheck(CONFIG_JSON, "FAILED", str(e), str(e))
    return StageCheck(CONFIG_JSON, "ok", f"{config.train.get('model')} {config.train.get('method')}")


def _check_checkpoint(path: Path, deep: bool) -> StageCheck:
    """ok when the file matches its record; warning without a record; FAILED when it differs or the record is bad."""
    name = f"checkpoints/{path.name}"
    try:
        recorded = recorded_sha256(path)
    except UserError as e:
        return StageCheck(name, "FAILED", str(e), str(e))
    if recorded is None:
        return StageCheck(name, "warning", f"no {CHECKSUM_SUFFIX} record (saved by an older redi or copied in): unchecked")
    if not deep:
        return StageCheck(name, "ok", "present, with its SHA-256 record")
    if sha256_file(path) != recorded:
        problem = (f"Checkpoint {path} differs from the SHA-256 recorded when it was saved: it was damaged on disk "
                   "(training resumes from the one before it; move it away to sample another).")
        return StageCheck(name, "FAILED", problem, problem)
    return StageCheck(name, "ok", f"sha256 {recorded[:12]} as saved")


def verify_run(run: Path, deep: bool = True) -> list[StageCheck]:
    """One check per part of the run: config.json, each checkpoint, and records whose checkpoint is gone."""
    run = Path(run)
    checkpoints = [path for _, path in list_checkpoints(run)]
    checks = [_check_config(run), *(_check_checkpoint(path, deep) for path in checkpoints)]
    have = {checksum_path(path) for path in checkpoints}
    for record in sorted((run / "checkpoints").glob(f"step-*.pt{CHECKSUM_SUFFIX}")):
        if record not in have:
            checks.append(StageCheck(f"checkpoints/{record.name}", "warning", "its checkpoint is missing (deleted, "
                                     "or its save was interrupted before the rename)"))
    if not checkpoints:
        checks.append(StageCheck("checkpoints/", "absent", "no checkpoint yet"))
    return checks

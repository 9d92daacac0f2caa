"""`redi verify RUN`: a run's config.json, its copy of the shards' PCA against the SHA-256 config.json records, and
every checkpoint (post-hoc EMA snapshots and reconstructions too) against the SHA-256 recorded when it was saved."""
from __future__ import annotations

from pathlib import Path

from redi.common.atomic import sha256_file
from redi.common.errors import UserError
from redi.pipeline.pca_file import PCA_FILE, PCARecord, load_pca
from redi.pipeline.verify import StageCheck
from redi.trainer.checkpoint import (
    CHECKSUM_SUFFIX, CONFIG_JSON, POSTHOC_DIR, RunConfig, checksum_path, list_checkpoints, list_phema_snapshots,
    recorded_sha256,
)


def _check_config(run: Path) -> tuple[StageCheck, RunConfig | None]:
    try:
        config = RunConfig.load(run)
    except UserError as e:
        return StageCheck(CONFIG_JSON, "FAILED", str(e), str(e)), None
    return StageCheck(CONFIG_JSON, "ok", f"{config.train.get('model')} {config.train.get('method')}"), config


def _check_pca(run: Path, config: RunConfig | None) -> StageCheck:
    """RUN/pca.safetensors, the run's copy of its shards' PCA, against the pca_sha256 that config.json records."""
    path = run / PCA_FILE
    if not path.exists():
        return StageCheck(PCA_FILE, "absent", "no copy of the shards' PCA (they were published without it)")
    if config is None or config.shards.pca_sha256 is None:
        return StageCheck(PCA_FILE, "warning", f"{CONFIG_JSON} records no pca_sha256 to check it against")
    try:
        load_pca(path, PCARecord(config.shards.pca_sha256, str(run / CONFIG_JSON),
                                 "rerun the run's `redi train` command, which copies its shards' PCA again"))
    except UserError as e:
        return StageCheck(PCA_FILE, "FAILED", str(e), str(e))
    return StageCheck(PCA_FILE, "ok", f"sha256 {config.shards.pca_sha256[:12]}, the PCA of the shards it trained on")


def _check_checkpoint(path: Path, deep: bool) -> StageCheck:
    """ok when the file matches its record; warning without a record; FAILED when it differs or the record is bad."""
    name = f"{path.parent.name}/{path.name}"
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
    config_check, config = _check_config(run)
    posthoc = [path for _, path in list_phema_snapshots(run)] + sorted((run / POSTHOC_DIR).glob("*.pt"))
    checks = [config_check, _check_pca(run, config), *(_check_checkpoint(path, deep) for path in checkpoints + posthoc)]
    have = {checksum_path(path) for path in checkpoints}
    for record in sorted((run / "checkpoints").glob(f"step-*.pt{CHECKSUM_SUFFIX}")):
        if record not in have:
            checks.append(StageCheck(f"checkpoints/{record.name}", "warning", "its checkpoint is missing (deleted, "
                                     "or its save was interrupted before the rename)"))
    if not checkpoints:
        checks.append(StageCheck("checkpoints/", "absent", "no checkpoint yet"))
    return checks

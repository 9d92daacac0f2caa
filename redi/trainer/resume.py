"""What a resumed run keeps, what it may change, and how a change is told and recorded.

An existing run directory resumes with the settings it records (config.json's `train` with its `changes` applied,
`RunConfig.settings`): a flag left out means "as recorded", never the flag's default. A flag given with another value
changes that setting from the resumed step on (a new learning rate, batch size, --max-steps …): one log line says so,
and config.json's `changes` records it with the step; the `train` the run started with is never rewritten. The
network and the method (`IDENTITY`) and the data are what the run is: another value is refused, naming what was
recorded and what was asked.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from redi.common.errors import UserError
from redi.trainer.checkpoint import CONFIG_JSON, RunConfig, SettingsChange
from redi.trainer.config import ARCHITECTURE_FIELDS, TrainConfig
from redi.trainer.models import DEFAULT_PATCH

IDENTITY = ARCHITECTURE_FIELDS  # the network and its objective: a resume refuses another value
NOT_SETTINGS = ("run", "init")  # where the run lives, and the weights it started from (unused once it resumes)
log = logging.getLogger(__name__)


def load_record(run: str | Path) -> RunConfig | None:
    """The run's config.json, or None for a new run."""
    return RunConfig.load(Path(run)) if (Path(run) / CONFIG_JSON).is_file() else None


def recorded_settings(record: RunConfig) -> dict[str, Any]:
    """The settings a resume keeps; a model saved before models named their patch (`SiT-debug`) had patch 2."""
    settings = record.settings
    model = str(settings.get("model", "/"))
    return settings | ({"model": f"{model}/{DEFAULT_PATCH}"} if "/" not in model else {})


def as_recorded(cfg: TrainConfig, record: RunConfig | None, given: Collection[str] | None) -> TrainConfig:
    """`cfg` with each field the user did not set (`given`: the flags typed; None: every field of `cfg` is meant)
    taken from the run's record. --init is the record's too: it only says how the run began."""
    if record is None:
        return cfg
    settings = recorded_settings(record)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kept = {k: v for k, v in settings.items()
            if k in fields and k not in ("run", "shards", "init") and given is not None and k not in given}
    init = settings.get("init")
    if cfg.init is not None and cfg.init != init and (given is None or "init" in given):
        log.warning(f"--init {cfg.init} is ignored: {cfg.run} resumes as recorded (it started from "
                    f"{init or 'fresh weights'}).")
    return cfg.replace(**kept, init=init)


def refuse_another_run(run: Path, record: RunConfig, asked: TrainConfig) -> None:
    """One sentence when `asked` (resolved against its shards) names another network or method than the record."""
    saved, now = recorded_settings(record), asked.to_json()
    if changed := [k for k in IDENTITY if k in saved and saved[k] != now[k]]:
        was, wants = (" and ".join(f"{k} {values[k]}" for k in changed) for values in (saved, now))
        raise UserError(f"{run} was trained with {was}, and this command asks for {wants}: leave those flags out to "
                        "resume the run as recorded, or use another --run directory.")


def setting_changes(record: RunConfig, asked: TrainConfig, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(new values, recorded values) of every setting `asked` changes, `world_size` included."""
    saved, now = recorded_settings(record) | {"world_size": record.current_world_size}, asked.to_json()
    now |= {"world_size": world_size}
    changed = [k for k in now if k in saved and k not in NOT_SETTINGS and saved[k] != now[k]]
    return {k: now[k] for k in changed}, {k: saved[k] for k in changed}


def note_resume(run: Path, record: RunConfig, asked: TrainConfig, step: int, world_size: int) -> RunConfig:
    """Say in one log line that `run` resumes at `step`, and how its settings change; record a change in config.json
    (rank 0 calls it). Returns the record as it now stands."""
    settings, before = setting_changes(record, asked, world_size)
    if not settings:
        log.info(f"{run}: resuming at step {step:,} with its recorded settings.")
        return record
    record = record.with_change(SettingsChange(step=step, settings=settings, before=before))
    record.save(run)
    told = ", ".join(f"{k} {before[k]} → {settings[k]}" for k in settings)
    log.info(f"{run}: resuming at step {step:,} with {len(settings)} changed setting{'s' * (len(settings) > 1)} "
             f"(recorded in {CONFIG_JSON}): {told}.")
    return record

"""Trackers: TensorBoard event files and a W&B offline run hold metrics.jsonl's numbers, resumed without repeated steps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from redi.trainer.trackers import TENSORBOARD_DIR, WANDB_RECORD, NoTracker, open_tracker


def read_events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of RUN/tensorboard as tensorboard's own reader shows it (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def row(step: int, scale: float = 1.0) -> dict:
    return {"step": step, "loss": scale / step, "vae": 0.5 / step, "grad_norm": 2.0, "mfu": None, "skipped_steps": 0}


def test_tensorboard_resume_hides_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    first = open_tracker("tensorboard", tmp_path, 0, {}, is_main=True)
    for step in (1, 2, 3, 4):
        first.scalars(row(step), step)
    first.close()  # "crashed" after step 4, its newest checkpoint at step 2
    resumed = open_tracker("tensorboard", tmp_path, 2, {}, is_main=True)
    for step in (3, 4, 5):
        resumed.scalars(row(step, scale=3.0), step)
    resumed.image("samples", np.full((8, 8, 3), 200, np.uint8), 5)
    resumed.close()
    scalars = read_events(tmp_path)
    assert set(scalars) == {"loss", "vae", "grad_norm", "skipped_steps"}  # mfu None is no number
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]  # each step once
    assert [v for _, v in scalars["loss"]] == pytest.approx([1.0, 0.5, 1.0, 0.75, 0.6])  # the resumed run's 3 and 4


def test_a_new_tracker_is_filled_from_metrics_jsonl(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row(s)) + "\n" for s in (10, 20, 30)))
    tracker = open_tracker("tensorboard", tmp_path, 20, {}, is_main=True)  # resumed at 20, begun without a tracker
    tracker.scalars(row(30, scale=7.0), 30)
    tracker.close()
    assert read_events(tmp_path)["loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)), (30, pytest.approx(7 / 30))]


def test_other_ranks_and_none_track_nothing(tmp_path: Path) -> None:
    assert isinstance(open_tracker("tensorboard", tmp_path, 0, {}, is_main=False), NoTracker)
    assert isinstance(open_tracker("none", tmp_path, 0, {}, is_main=True), NoTracker)
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_wandb_offline_writes_its_run_directory_and_resumes_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = open_tracker("wandb", tmp_path, 0, {"model": "SiT-debug"}, is_main=True)
    tracker.scalars(row(1), 1)
    tracker.image("samples", np.zeros((8, 8, 3), np.uint8), 1)
    tracker.close()
    run_id = json.loads((tmp_path / WANDB_RECORD).read_text())["id"]
    again = open_tracker("wandb", tmp_path, 1, {"model": "SiT-debug"}, is_main=True)
    again.scalars(row(2), 2)
    again.close()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)  # both sessions, one run id

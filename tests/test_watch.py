"""Watching a run: the tracker's curves, sample grids and FID during training, each continued exactly by a resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from redi.cli import app
from redi.common.errors import UserError
from redi.sampler.inception import FIDInceptionV3, he_init_
from redi.trainer.checkpoint import checkpoint_path, checksum_path
from redi.trainer.config import TrainConfig
from redi.trainer.metrics import read_metrics
from redi.sampler.grids import grid_path
from redi.sampler.outputs import LABEL_LINE
from redi.trainer.trackers import TENSORBOARD_DIR
from redi.trainer.train import train
from redi.sampler.watch import RunWatch

LOGGED = {"loss", "vae", "pcs", "grad_norm", "lr", "skipped_steps", "steps_per_s", "images_per_s"}  # mfu: None on CPU


@pytest.fixture(scope="module")
def data(small_shards: Path) -> Path:
    return small_shards


def config(data: Path, run: Path, **changes) -> TrainConfig:
    base = dict(shards=str(data), run=str(run), model="SiT-debug", method="redi", pca_rank=4, batch_size=8, max_steps=8,
                log_every=2, save_every=4, num_workers=0, seed=3, lr=1e-3, sample_every=0, sample_steps=3)
    return TrainConfig(**(base | changes))


def events(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """Scalars (step, value) and image steps of RUN/tensorboard, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def crash_after(run: Path, step: int) -> None:
    """Leave `run` as a kill after `step`'s logging but before its checkpoint would have."""
    checkpoint_path(run, step).unlink()
    checksum_path(checkpoint_path(run, step)).unlink()


def test_tensorboard_holds_every_metric_and_a_resume_repeats_no_step(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, max_steps=20, log_every=5, save_every=10, tracker="tensorboard"), device="cpu", watch=RunWatch)
    train(config(data, run, max_steps=15, log_every=5, save_every=10, tracker="tensorboard"), device="cpu", watch=RunWatch)  # no-op
    straight, _ = events(run)
    rows = read_metrics(run / "metrics.jsonl")
    assert set(straight) >= LOGGED and "mfu" not in straight
    for name in LOGGED:
        assert [s for s, _ in straight[name]] == [5, 10, 15, 20], name
        assert [v for _, v in straight[name]] == pytest.approx([r[name] for r in rows], rel=1e-6), name

    resumed = tmp_path / "resumed"
    train(config(data, resumed, max_steps=15, log_every=5, save_every=10, tracker="tensorboard"), device="cpu", watch=RunWatch)
    crash_after(resumed, 15)  # steps 15's metrics reached the tracker, its checkpoint never came: resume from 10
    train(config(data, resumed, max_steps=20, log_every=5, save_every=10, tracker="tensorboard"), device="cpu", watch=RunWatch)
    again, _ = events(resumed)
    for name in ("loss", "vae", "pcs", "grad_norm"):
        assert [s for s, _ in again[name]] == [5, 10, 15, 20], name  # each step once
        assert [v for _, v in again[name]] == pytest.approx([v for _, v in straight[name]], rel=1e-6), name


def test_sample_grids_at_their_steps_are_the_same_pixels_after_a_resume(data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(config(data, straight, sample_every=4, sample_num=4, tracker="tensorboard"), device="cpu", watch=RunWatch)
    assert sorted(p.name for p in (straight / "samples").glob("step-*.png")) == ["step-0000004.png", "step-0000008.png"]
    grid = np.asarray(Image.open(grid_path(straight, 8)))
    top = grid.shape[0] - (2 * (66 + LABEL_LINE) + 2)  # the caption's lines above 2 rows of cells and their labels
    assert grid.shape[1] == 2 * 66 + 2 and grid[top + 2:top + 66, 2:66].std() > 5  # 2×2 decoded 64×64 images
    assert not np.array_equal(grid, np.asarray(Image.open(grid_path(straight, 4))))  # other weights, same noise
    timed = [r for r in read_metrics(straight / "metrics.jsonl") if "sample_seconds" in r]
    assert [r["step"] for r in timed] == [4, 8] and all(r["sample_seconds"] > 0 for r in timed)
    assert events(straight)[1] == {"samples": [4, 8]}

    resumed = tmp_path / "resumed"
    train(config(data, resumed, sample_every=4, sample_num=4, max_steps=4), device="cpu", watch=RunWatch)
    grid_path(resumed, 4).unlink()  # as if killed between the checkpoint and the grid: the resume draws it
    train(config(data, resumed, sample_every=4, sample_num=4), device="cpu", watch=RunWatch)
    for step in (4, 8):
        assert grid_path(resumed, step).read_bytes() == grid_path(straight, step).read_bytes(), step


def test_a_model_that_cannot_be_guided_as_asked_is_refused_before_training(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--sample-guidance"):
        train(config(data, tmp_path / "run", sample_every=4, sample_guidance="rg", rep_drop=0.0), device="cpu", watch=RunWatch)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fid_during_training_equals_redi_sample_then_redi_eval(data: Path, tmp_path: Path) -> None:
    weights, ref = tmp_path / "inception.pth", tmp_path / "ref.npz"
    torch.save(he_init_(FIDInceptionV3(), seed=0).state_dict(), weights)  # random weights: the equality matters
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=r"--eval-ref REF\.npz and --inception"):
        config(data, tmp_path / "refused", eval_every=4)  # refused when the run starts, not at step 4
    with pytest.raises(UserError, match="does not exist"):
        train(config(data, tmp_path / "refused", eval_every=4, eval_ref=str(tmp_path / "nothing.npz"),
                     inception=str(weights)), device="cpu", watch=RunWatch)
    assert not (tmp_path / "refused" / "checkpoints").exists()

    run = tmp_path / "run"
    cfg = config(data, run, eval_every=4, eval_num=8, eval_ref=str(ref), inception=str(weights), tracker="tensorboard")
    train(cfg, device="cpu", watch=RunWatch)
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert {"fid", "sfid", "inception_score", "precision", "recall", "eval_seconds"} <= set(evals[-1])
    assert [s for s, _ in events(run)[0]["fid"]] == [4, 8]
    card = evals[-1]["card"]
    assert (card["sampler"], card["steps"], card["num_samples"], card["labels"]) == ("ode", 3, 8, "random")
    assert card["guidance"]["mode"] == "rg" and card["checkpoint"]["step"] == 8 and card["precision"] == "fp32"

    out = tmp_path / "samples"
    runner = CliRunner()
    sampled = runner.invoke(app, ["sample", "--ckpt", str(checkpoint_path(run, 8)), "--sampler", "ode", "--steps", "3",
                                  "--guidance", "rg", "--num", "8", "--seed", "3", "--device", "cpu", "--out", str(out)])
    assert sampled.exit_code == 0, sampled.output
    evaluated = runner.invoke(app, ["eval", str(out / "samples.npz"), "--ref", str(ref), "--inception", str(weights),
                                    "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    separate = json.loads((out / "samples.eval.json").read_text())
    for name, value in separate["metrics"].items():
        assert evals[-1][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    for key in ("sampler", "steps", "nfe_per_image", "guidance", "labels", "precision", "num_samples", "ref_sha256",
                "inception_sha256"):
        assert card[key] == separate["card"][key], key

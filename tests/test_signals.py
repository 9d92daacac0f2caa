"""kill -9 and SIGTERM at seeded points of every command, to the process and to its whole process group (as SLURM
and `kill -TERM -PGID` do: DataLoader workers included), with and without workers: the same command rerun then
leaves exactly what an uninterrupted run writes (checkpoints: the same tensors; metrics: the same values).

Each command is interrupted at four seeded points in a row (each kill lands in the run that resumed the
previous one), then rerun to the end. A run stops itself at its point (faults.StopPoint: before a file event, after
so many committed units) and is signalled there, so the kill lands mid-work however loaded the machine is. test_encode.py (kill -9 of a separately launched `redi encode`) and
test_train.py (SIGTERM to `redi train`, and to torchrun) hold the same cases for real `redi` processes.
"""
from __future__ import annotations

import dataclasses
import json
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults import (
    ENCODE, IMAGES, NUM, SHARDS, STEPS, TINY, Launcher, StopPoint, copy_in, digest_tree, file_events, interrupt, redi,
    same_value, same_metrics, same_pca, sample_args, temporaries, train_args,
)
from redi.trainer.checkpoint import Checkpoint, list_checkpoints, newest_checkpoint

SEED = 2024  # the kill points are drawn from (SEED, command)
KILL, TERM = signal.SIGKILL, signal.SIGTERM
# (signal, to the whole process group?) of each kill point, in order
EVERY_WAY = [(KILL, False), (TERM, True), (KILL, True), (TERM, False)]
SKIP = 8  # a unit makes 4 (a metrics line: 1) to 16 file events: a tmp file opened, written, renamed, recorded
PCA_FILES = ("pca.safetensors", "pca.json", "pca_explained_variance.png")


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    launcher.close()


def interrupt_repeatedly(launcher: Launcher, name: str, args: list[object], kills: list[tuple[signal.Signals, bool]],
                         units: StopPoint, total: int, log_dir: Path) -> list[tuple[int, str]]:
    """Run `redi ARGS` once per kill and interrupt it at a seeded point: once the committed units that `units` counts
    (they survive the kills) reach a target drawn from the first three quarters of `total`, before one of the next
    SKIP file events (the next unit's writes, its commit, or what comes between)."""
    rng = random.Random(f"{SEED}-{name}")
    targets = sorted(rng.sample(range(1, max(len(kills) + 1, total * 3 // 4)), len(kills)))
    return [interrupt(launcher, args, log_dir / f"{name}-{k}.log", sig, group,
                      dataclasses.replace(units, target=target, skip=rng.randrange(SKIP)))
            for k, ((sig, group), target) in enumerate(zip(kills, targets, strict=True))]


def killed_by(results: list[tuple[int, str]], kills: list[tuple[signal.Signals, bool]], on_term: int | None = None) -> None:
    """Each run ended by its signal (SIGTERM: exit `on_term` where the command stops gracefully), never by a traceback."""
    for (code, output), (sig, _) in zip(results, kills, strict=True):
        want = on_term if sig == TERM and on_term is not None else -sig
        assert code == want, f"exit {code} after {sig.name}, expected {want}:\n{output[-3000:]}"
        assert "Traceback" not in output, output[-3000:]


def test_encode_with_workers(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = pipeline["data"]
    copy_in(pipeline["ref_data"], data, ())
    args = ["encode", pipeline["images"], "--data", data, *ENCODE, "--workers", 2]
    units = StopPoint(data, files=("latents/progress/*.json", "features/progress/*.json"))
    killed_by(interrupt_repeatedly(launcher, "encode", args, EVERY_WAY, units, 2 * IMAGES, tmp_path), EVERY_WAY)
    code, out = redi(*args)  # at once: no DataLoader worker outlives its main process, holding the stage locks
    assert code == 0, out
    for stage in ("latents", "features"):
        assert digest_tree(data / stage) == digest_tree(pipeline["ref_data"] / stage), stage
    assert not temporaries(data)


def test_features_without_workers(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = pipeline["data"]
    copy_in(pipeline["ref_data"], data, ())
    args = ["features", pipeline["images"], "--data", data, "--encoder", "tiny-random", *TINY, "--workers", 0]
    kills = EVERY_WAY[:2]
    units = StopPoint(data, files=("features/progress/*.json",))
    killed_by(interrupt_repeatedly(launcher, "features", args, kills, units, IMAGES, tmp_path), kills)
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "features") == digest_tree(pipeline["ref_data"] / "features")


def test_pca_never_leaves_its_file_without_its_record(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = pipeline["data"]
    copy_in(pipeline["ref_data"], data, ("features",))
    args = ["pca", "--data", data]
    events = file_events(launcher, args, tmp_path / "pca.log", data)  # its writes: no units to count, it has one
    rng = random.Random(f"{SEED}-pca")
    for k, ((sig, group), skip) in enumerate(zip(EVERY_WAY, sorted(rng.sample(range(events), 4)), strict=True)):
        for name in PCA_FILES:  # each kill point in a fresh run: a rerun after a late kill has fewer writes
            (data / name).unlink(missing_ok=True)
        code, output = interrupt(launcher, args, tmp_path / f"pca-{k}.log", sig, group, StopPoint(data, skip=skip))
        assert code == -sig and "Traceback" not in output, output[-3000:]
        assert (data / "pca.json").exists() or not (data / "pca.safetensors").exists()
        code, out = redi(*args)
        assert code == 0, out
        same_pca(data, pipeline["ref_data"])
        assert not temporaries(data)


def test_shards(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = pipeline["data"]
    copy_in(pipeline["ref_data"], data, ("latents", "features", "pca.safetensors", "pca.json"))
    args = ["shards", "--data", data, *SHARDS]
    units = StopPoint(data, files=("shards/progress/*.json",))
    killed_by(interrupt_repeatedly(launcher, "shards", args, EVERY_WAY, units, IMAGES, tmp_path), EVERY_WAY)
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "shards") == digest_tree(pipeline["ref_data"] / "shards")
    assert not temporaries(data)


def test_train_with_workers(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    run, ref_run = pipeline["run"], pipeline["ref_run"]
    args = ["train", *train_args(pipeline["ref_data"], run)]
    results = interrupt_repeatedly(launcher, "train", args, EVERY_WAY, StopPoint(run, lines=("metrics.jsonl",)), STEPS,
                                   tmp_path)
    killed_by(results, EVERY_WAY, on_term=128 + TERM)  # SIGTERM: the current step, a checkpoint, exit 143
    for (_, output), (sig, _) in zip(results, EVERY_WAY, strict=True):
        assert sig != TERM or "Stopped by SIGTERM" in output, output[-3000:]
    code, out = redi(*args)
    assert code == 0, out
    assert list_checkpoints(run)[-1][0] == STEPS
    same_value(Checkpoint.load(newest_checkpoint(run)).to_state(), Checkpoint.load(newest_checkpoint(ref_run)).to_state())  # bitwise resume
    same_metrics(run, ref_run)
    for name in ("config.json", "pca.safetensors"):
        assert digest_tree(run / name) == digest_tree(ref_run / name), name
    assert not temporaries(run)


def test_sample(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    out = pipeline["samples"]
    args = ["sample", *sample_args(pipeline["ref_run"], out)]
    units = StopPoint(out, files=("images/*.png",))
    killed_by(interrupt_repeatedly(launcher, "sample", args, EVERY_WAY, units, NUM, tmp_path), EVERY_WAY)
    code, text = redi(*args)
    assert code == 0, text
    outputs = {k: v for k, v in digest_tree(out).items() if k != "sample.json"}
    assert outputs == {k: v for k, v in digest_tree(pipeline["ref_samples"]).items() if k != "sample.json"}
    report, ref_report = (json.loads((d / "sample.json").read_text()) for d in (out, pipeline["ref_samples"]))
    assert report["complete"] and report["settings"] == ref_report["settings"]
    assert not temporaries(out)

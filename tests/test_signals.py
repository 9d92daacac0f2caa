"""kill -9 and SIGTERM at seeded points of every command, to the process and to its whole process group (as SLURM
and `kill -TERM -PGID` do: DataLoader workers included), with and without workers: the same command rerun then
leaves exactly what an uninterrupted run writes (checkpoints: the same tensors; metrics: the same values).

Each command is interrupted at four seeded points in a row (each kill lands in the run that resumed the
previous one), then rerun to the end. test_encode.py (kill -9 of a separately launched `redi encode`) and
test_train.py (SIGTERM to `redi train`, and to torchrun) hold the same cases for real `redi` processes.
"""
from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults import (
    ENCODE, IMAGES, NUM, SHARDS, STEPS, TINY, Launcher, copy_in, count, digest_tree, interrupt, redi, same_value,
    same_metrics, same_pca, sample_args, temporaries, train_args,
)
from redi.trainer.checkpoint import Checkpoint, list_checkpoints, newest_checkpoint
from redi.trainer.metrics import read_metrics

SEED = 2024  # the kill points are drawn from (SEED, command)
KILL, TERM = signal.SIGKILL, signal.SIGTERM
# (signal, to the whole process group?) of each kill point, in order
EVERY_WAY = [(KILL, False), (TERM, True), (KILL, True), (TERM, False)]


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    launcher.close()


def interrupt_repeatedly(launcher: Launcher, name: str, args: list[object], kills: list[tuple[signal.Signals, bool]],
                         progress: Callable[[], int], total: int, log_dir: Path) -> list[tuple[int, str]]:
    """Run `redi ARGS` once per kill and interrupt it at a seeded point: once `progress()` (committed work units,
    which survive the kills) reaches a target drawn from the first three quarters of `total`, plus a random
    fraction of a tenth of a second."""
    rng = random.Random(f"{SEED}-{name}")
    targets = sorted(rng.sample(range(1, max(len(kills) + 1, total * 3 // 4)), len(kills)))
    results = []
    for k, ((sig, group), target) in enumerate(zip(kills, targets, strict=True)):
        results.append(interrupt(launcher, args, log_dir / f"{name}-{k}.log", sig, group,
                                 lambda target=target: progress() >= target, rng.uniform(0.0, 0.1)))
    return results


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
    progress = lambda: count(data / "latents" / "progress") + count(data / "features" / "progress")
    killed_by(interrupt_repeatedly(launcher, "encode", args, EVERY_WAY, progress, 2 * IMAGES, tmp_path), EVERY_WAY)
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
    progress = lambda: count(data / "features" / "progress")
    killed_by(interrupt_repeatedly(launcher, "features", args, kills, progress, IMAGES, tmp_path), kills)
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "features") == digest_tree(pipeline["ref_data"] / "features")


def test_pca_never_leaves_its_file_without_its_record(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = pipeline["data"]
    copy_in(pipeline["ref_data"], data, ("features",))
    start = time.perf_counter()
    code, out = redi("pca", "--data", data)  # how long its work takes here, once past start-up
    assert code == 0, out
    seconds = time.perf_counter() - start
    copy_in(pipeline["ref_data"], data, ("features",))
    rng = random.Random(f"{SEED}-pca")
    for k, (sig, group) in enumerate(EVERY_WAY):  # no work units to count: a random time into the run
        code, output = interrupt(launcher, ["pca", "--data", data], tmp_path / f"pca-{k}.log", sig, group, lambda: True,
                                 rng.uniform(0.0, seconds))
        assert code in (0, -sig) and "Traceback" not in output, output[-3000:]  # its work is a blink: it may end first
        assert (data / "pca.json").exists() or not (data / "pca.safetensors").exists()
        if code == 0:  # the next kill point starts over
            for name in ("pca.safetensors", "pca.json", "pca_explained_variance.png"):
                (data / name).unlink()
    code, out = redi("pca", "--data", data)
    assert code == 0, out
    same_pca(data, pipeline["ref_data"])
    assert not temporaries(data)


def test_shards(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = pipeline["data"]
    copy_in(pipeline["ref_data"], data, ("latents", "features", "pca.safetensors", "pca.json"))
    args = ["shards", "--data", data, *SHARDS]
    results = interrupt_repeatedly(launcher, "shards", args, EVERY_WAY, lambda: count(data / "shards" / "progress"), IMAGES,
                                   tmp_path)
    for (code, output), (sig, _) in zip(results, EVERY_WAY, strict=True):  # a block is milliseconds: the run may end first
        assert code in (0, -sig) and "Traceback" not in output, output[-3000:]
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "shards") == digest_tree(pipeline["ref_data"] / "shards")
    assert not temporaries(data)


def test_train_with_workers(launcher: Launcher, pipeline: dict[str, Path], tmp_path: Path) -> None:
    run, ref_run = pipeline["run"], pipeline["ref_run"]
    args = ["train", *train_args(pipeline["ref_data"], run)]
    progress = lambda: len(read_metrics(run / "metrics.jsonl")) if (run / "metrics.jsonl").exists() else 0
    results = interrupt_repeatedly(launcher, "train", args, EVERY_WAY, progress, STEPS, tmp_path)
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
    killed_by(interrupt_repeatedly(launcher, "sample", args, EVERY_WAY, lambda: count(out / "images", "*.png"), NUM, tmp_path),
              EVERY_WAY)
    code, text = redi(*args)
    assert code == 0, text
    outputs = {k: v for k, v in digest_tree(out).items() if k != "sample.json"}
    assert outputs == {k: v for k, v in digest_tree(pipeline["ref_samples"]).items() if k != "sample.json"}
    report, ref_report = (json.loads((d / "sample.json").read_text()) for d in (out, pipeline["ref_samples"]))
    assert report["complete"] and report["settings"] == ref_report["settings"]
    assert not temporaries(out)

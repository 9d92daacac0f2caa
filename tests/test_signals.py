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
from safetensors import safe_open

from faults import Launcher, copy_in, count, digest_tree, interrupt, move_aside, redi, same_value, temporaries
from pipeline.demo_data import write_demo_images
from trainer.checkpoint import list_checkpoints, load_checkpoint, newest_checkpoint
from trainer.metrics import read_metrics

SEED = 2024  # the kill points are drawn from (SEED, command)
IMAGES = 16
TINY = ["--resolution", 64, "--batch-size", 1, "--chunk-size", 1]  # 16 committed chunks per stage
ENCODE = ["--vae", "tiny-random", "--with-features", "--encoder", "tiny-random", *TINY]
SHARDS = ["--pcs", 4, "--shard-size", 1, "--format", "both"]  # 16 committed blocks
STEPS, NUM = 12, 12  # training steps (one metrics line each), images sampled
TIMING = {"steps_per_s", "images_per_s", "mfu"}
KILL, TERM = signal.SIGKILL, signal.SIGTERM
# (signal, to the whole process group?) of each kill point, in order
EVERY_WAY = [(KILL, False), (TERM, True), (KILL, True), (TERM, False)]


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted outputs of every command, each moved aside from the path the interrupted runs then use."""
    root = tmp_path_factory.mktemp("signals")
    images = write_demo_images(root / "images", IMAGES).out
    data = root / "data"
    for args in (["encode", images, "--data", data, *ENCODE, "--workers", 0], ["pca", "--data", data],
                 ["shards", "--data", data, *SHARDS]):
        code, out = redi(*args)
        assert code == 0, out
    ref_data = move_aside(data)
    code, out = redi("train", *train_args(ref_data, root / "run"))
    assert code == 0, out
    ref_run = move_aside(root / "run")
    code, out = redi("sample", *sample_args(ref_run, root / "samples"))
    assert code == 0, out
    return {"root": root, "images": images, "data": data, "ref_data": ref_data, "run": root / "run", "ref_run": ref_run,
            "samples": root / "samples", "ref_samples": move_aside(root / "samples")}


def train_args(shards: Path, run: Path) -> list[object]:
    return ["--shards", shards, "--run", run, "--model", "SiT-debug", "--method", "redi", "--pca-rank", 4, "--batch-size", 4,
            "--max-steps", STEPS, "--log-every", 1, "--save-every", 4, "--seed", 3, "--lr", "1e-3", "--device", "cpu",
            "--num-workers", 2]


def sample_args(ref_run: Path, out: Path) -> list[object]:
    ckpt = ref_run / "checkpoints" / f"step-{STEPS:07d}.pt"  # the same file for every sampler run
    return ["--ckpt", ckpt, "--out", out, "--num", NUM, "--steps", 6, "--batch-size", 1, "--device", "cpu"]


def interrupt_repeatedly(launcher: Launcher, name: str, args: list[object], kills: list[tuple[signal.Signals, bool]],
                         progress: Callable[[], int], total: int, log_dir: Path) -> list[tuple[int, str]]:
    """Run `redi ARGS` once per kill and interrupt it at a seeded point: once `progress()` (committed work units,
    which survive the kills) reaches a target drawn from the first three quarters of `total`, plus a random
    fraction of a tenth of a second."""
    rng = random.Random(f"{SEED}-{name}")
    targets = sorted(rng.sample(range(1, max(len(kills) + 1, total * 3 // 4)), len(kills)))
    results = []
    for k, ((sig, group), target) in enumerate(zip(kills, targets)):
        results.append(interrupt(launcher, args, log_dir / f"{name}-{k}.log", sig, group,
                                 lambda target=target: progress() >= target, rng.uniform(0.0, 0.1)))
    return results


def killed_by(results: list[tuple[int, str]], kills: list[tuple[signal.Signals, bool]], on_term: int | None = None) -> None:
    """Each run ended by its signal (SIGTERM: exit `on_term` where the command stops gracefully), never by a traceback."""
    for (code, output), (sig, _) in zip(results, kills):
        want = on_term if sig == TERM and on_term is not None else -sig
        assert code == want, f"exit {code} after {sig.name}, expected {want}:\n{output[-3000:]}"
        assert "Traceback" not in output, output[-3000:]


def test_encode_with_workers(launcher: Launcher, ref: dict[str, Path], tmp_path: Path) -> None:
    data = ref["data"]
    copy_in(ref["ref_data"], data, ())
    args = ["encode", ref["images"], "--data", data, *ENCODE, "--workers", 2]
    progress = lambda: count(data / "latents" / "progress") + count(data / "features" / "progress")  # noqa: E731
    killed_by(interrupt_repeatedly(launcher, "encode", args, EVERY_WAY, progress, 2 * IMAGES, tmp_path), EVERY_WAY)
    code, out = redi(*args)  # at once: no DataLoader worker outlives its main process, holding the stage locks
    assert code == 0, out
    for stage in ("latents", "features"):
        assert digest_tree(data / stage) == digest_tree(ref["ref_data"] / stage), stage
    assert not temporaries(data)


def test_features_without_workers(launcher: Launcher, ref: dict[str, Path], tmp_path: Path) -> None:
    data = ref["data"]
    copy_in(ref["ref_data"], data, ())
    args = ["features", ref["images"], "--data", data, "--encoder", "tiny-random", *TINY, "--workers", 0]
    kills = EVERY_WAY[:2]
    progress = lambda: count(data / "features" / "progress")  # noqa: E731
    killed_by(interrupt_repeatedly(launcher, "features", args, kills, progress, IMAGES, tmp_path), kills)
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "features") == digest_tree(ref["ref_data"] / "features")


def test_pca_never_leaves_its_file_without_its_record(launcher: Launcher, ref: dict[str, Path], tmp_path: Path) -> None:
    data = ref["data"]
    copy_in(ref["ref_data"], data, ("features",))
    start = time.perf_counter()
    code, out = redi("pca", "--data", data)  # how long its work takes here, once past start-up
    assert code == 0, out
    seconds = time.perf_counter() - start
    copy_in(ref["ref_data"], data, ("features",))
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
    assert pca_content(data) == pca_content(ref["ref_data"])
    assert digest_tree(data / "pca_explained_variance.png") == digest_tree(ref["ref_data"] / "pca_explained_variance.png")
    assert json.loads((data / "pca.json").read_text())["manifest"] == json.loads((ref["ref_data"] / "pca.json").read_text())["manifest"]
    assert not temporaries(data)


def pca_content(data: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """The tensors (as bytes) and metadata of DATA/pca.safetensors (the file's bytes may order its header otherwise)."""
    with safe_open(str(data / "pca.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k).tobytes() for k in f.keys()}, f.metadata()


def test_shards(launcher: Launcher, ref: dict[str, Path], tmp_path: Path) -> None:
    data = ref["data"]
    copy_in(ref["ref_data"], data, ("latents", "features", "pca.safetensors", "pca.json"))
    args = ["shards", "--data", data, *SHARDS]
    results = interrupt_repeatedly(launcher, "shards", args, EVERY_WAY, lambda: count(data / "shards" / "progress"), IMAGES,
                                   tmp_path)
    for (code, output), (sig, _) in zip(results, EVERY_WAY):  # a block is milliseconds: the run may end first
        assert code in (0, -sig) and "Traceback" not in output, output[-3000:]
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "shards") == digest_tree(ref["ref_data"] / "shards")
    assert not temporaries(data)


def test_train_with_workers(launcher: Launcher, ref: dict[str, Path], tmp_path: Path) -> None:
    run, ref_run = ref["run"], ref["ref_run"]
    args = ["train", *train_args(ref["ref_data"], run)]
    progress = lambda: len(read_metrics(run / "metrics.jsonl")) if (run / "metrics.jsonl").exists() else 0  # noqa: E731
    results = interrupt_repeatedly(launcher, "train", args, EVERY_WAY, progress, STEPS, tmp_path)
    killed_by(results, EVERY_WAY, on_term=128 + TERM)  # SIGTERM: the current step, a checkpoint, exit 143
    for (_, output), (sig, _) in zip(results, EVERY_WAY):
        assert sig != TERM or "Stopped by SIGTERM" in output, output[-3000:]
    code, out = redi(*args)
    assert code == 0, out
    assert list_checkpoints(run)[-1][0] == STEPS
    same_value(load_checkpoint(newest_checkpoint(run)), load_checkpoint(newest_checkpoint(ref_run)))  # bitwise resume
    without_timing = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]
    assert without_timing == [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(ref_run / "metrics.jsonl")]
    for name in ("config.json", "pca.safetensors"):
        assert digest_tree(run / name) == digest_tree(ref_run / name), name
    assert not temporaries(run)


def test_sample(launcher: Launcher, ref: dict[str, Path], tmp_path: Path) -> None:
    out = ref["samples"]
    args = ["sample", *sample_args(ref["ref_run"], out)]
    killed_by(interrupt_repeatedly(launcher, "sample", args, EVERY_WAY, lambda: count(out / "images", "*.png"), NUM, tmp_path),
              EVERY_WAY)
    code, text = redi(*args)
    assert code == 0, text
    outputs = {k: v for k, v in digest_tree(out).items() if k != "sample.json"}
    assert outputs == {k: v for k, v in digest_tree(ref["ref_samples"]).items() if k != "sample.json"}
    report, ref_report = (json.loads((d / "sample.json").read_text()) for d in (out, ref["ref_samples"]))
    assert report["complete"] and report["settings"] == ref_report["settings"]
    assert not temporaries(out)

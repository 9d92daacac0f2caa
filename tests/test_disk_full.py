"""A full disk: every command, run into a small tmpfs filled to leave a few bytes, then a quarter, then half of
what it has still to write, ends each time in one sentence and exit 2 with nothing half-written (no temporary
file left, every committed unit intact); rerun with space, it ends with what a run on an empty disk writes."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import (
    ENCODE, SHARDS, copy_in, digest_tree, filled, move_aside, redi, same_metrics, same_pca, same_value, sample_args,
    small_disk, temporaries, train_args,
)
from redi.sampler.inception import FIDInceptionV3, he_init_
from redi.trainer.checkpoint import Checkpoint, list_checkpoints, newest_checkpoint

PAGE = 4096  # tmpfs allocates whole pages
REDI = str(Path(sys.executable).parent / "redi")


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with small_disk(tmp_path_factory.mktemp("disk") / "tmpfs", "64m") as mounted:
        yield mounted


def size(path: Path) -> int:
    """Bytes `path` takes on the disk (whole pages per file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def run_out_of_space(args: list[object], disk: Path, room: list[int], check: Callable[[], None] | None = None,
                     names: Path | None = None) -> None:
    """Run `redi ARGS` once per entry of `room` with only that many bytes free: one sentence, exit 2, no temporary
    file, and `check()` (what was committed is whole) after each; `names`: the sentence names the file being written,
    one under that folder (zarr's chunk and metadata files included, whose library's error names none)."""
    for leave in room:
        with filled(disk, leave):
            code, out = redi(*args)
        assert code == 2, f"{leave} bytes free: exit {code}\n{out}"
        assert "No space left on device" in out and out.count("error:") == 1 and "Traceback" not in out, out
        assert names is None or f"whilewriting{names}/" in "".join(out.split()), out
        assert not temporaries(disk), temporaries(disk)
        if check is not None:
            check()


def committed_intact(data: Path) -> None:
    """Every unit a stage committed (progress/CCCCCC.json) is on disk with the SHA-256 recorded when it was written
    (encode/features: in the ledger; shards: in checksums/CCCCCC.json)."""
    for ledger in data.glob("*/progress/*.json"):
        stage = ledger.parent.parent
        sums = json.loads(ledger.read_text())["sha256"]
        if (stage / "checksums").is_dir():
            sums = json.loads((stage / "checksums" / ledger.name).read_text())
        for rel, digest in sums.items():
            path = stage / rel
            assert (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None) == digest, path


def test_encode(pipeline: dict[str, Path], disk: Path) -> None:
    data = disk / "data"
    args = ["encode", pipeline["images"], "--data", data, *ENCODE, "--workers", 0]
    assert redi(*args)[0] == 0
    ref = move_aside(data)
    need = size(ref)
    run_out_of_space(args, disk, [0, PAGE * 2, need // 4, need // 2], lambda: committed_intact(data), names=data)
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data) == digest_tree(ref)


def test_pca_commits_its_file_and_record_together(pipeline: dict[str, Path], disk: Path) -> None:
    data = disk / "pca"
    copy_in(pipeline["ref_data"], data, ("features",))
    assert redi("pca", "--data", data)[0] == 0
    ref = move_aside(data)
    copy_in(pipeline["ref_data"], data, ("features",))
    pca, record = size(ref / "pca.safetensors"), size(ref / "pca.json")

    def paired() -> None:  # never the file without the record naming it (a rerun would refuse it)
        assert (data / "pca.json").exists() or not (data / "pca.safetensors").exists()

    # room for nothing, for the file but not its record, for both but not the plot
    run_out_of_space(["pca", "--data", data], disk, [0, pca, pca + record], paired)
    assert (data / "pca.safetensors").exists() and not (data / "pca_explained_variance.png").exists()
    code, out = redi("pca", "--data", data)
    assert code == 0 and "up to date" in out, out  # the pair was committed: only the plot is drawn
    same_pca(data, ref)


def test_shards(pipeline: dict[str, Path], disk: Path) -> None:
    data = disk / "shards"
    copy_in(pipeline["ref_data"], data, ("latents", "features", "pca.safetensors", "pca.json"))
    args = ["shards", "--data", data, *SHARDS]
    assert redi(*args)[0] == 0
    ref = move_aside(data)
    copy_in(pipeline["ref_data"], data, ("latents", "features", "pca.safetensors", "pca.json"))
    need = size(ref / "shards")
    run_out_of_space(args, disk, [0, PAGE * 2, need // 4, need // 2], lambda: committed_intact(data), names=data / "shards")
    code, out = redi(*args)
    assert code == 0, out
    assert digest_tree(data / "shards") == digest_tree(ref / "shards")


def test_train_checkpoints_metrics_and_config(pipeline: dict[str, Path], disk: Path) -> None:
    run = disk / "run"
    args = ["train", *train_args(pipeline["ref_data"], run)]
    assert redi(*args)[0] == 0
    ref = move_aside(run)
    ckpt = size(newest_checkpoint(ref))

    def loadable() -> None:  # every checkpoint left is whole
        for _, path in list_checkpoints(run):
            Checkpoint.load(path)

    run_out_of_space(args, disk, [0], loadable)  # room for nothing: config.json
    with filled(disk, ckpt // 2):  # for half a checkpoint, in a real `redi`: failing with its DataLoader workers alive, it exits
        done = subprocess.run([REDI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "No space left on device" in done.stderr and "Traceback" not in done.stderr, done.stderr
    loadable()
    run_out_of_space(args, disk, [ckpt * 3 // 2], loadable)  # for one checkpoint and a half
    code, out = redi(*args)
    assert code == 0, out
    same_value(Checkpoint.load(newest_checkpoint(run)).to_state(), Checkpoint.load(newest_checkpoint(ref)).to_state())
    same_metrics(run, ref)
    for name in ("config.json", "pca.safetensors"):
        assert digest_tree(run / name) == digest_tree(ref / name), name


def test_sample(pipeline: dict[str, Path], disk: Path) -> None:
    out = disk / "samples"
    args = ["sample", *sample_args(pipeline["ref_run"], out)]
    assert redi(*args)[0] == 0
    ref = move_aside(out)
    need = size(ref)
    run_out_of_space(args, disk, [0, need // 4, need // 2])
    code, text = redi(*args)
    assert code == 0, text
    assert {k: v for k, v in digest_tree(out).items() if k != "sample.json"} == \
        {k: v for k, v in digest_tree(ref).items() if k != "sample.json"}


def test_eval_report(disk: Path, tmp_path: Path) -> None:
    weights = tmp_path / "inception.pth"  # random weights in the published layout: the report, not the numbers, matters
    torch.save(he_init_(FIDInceptionV3(), seed=0).state_dict(), weights)
    for name, seed in (("samples", 0), ("ref", 1)):
        np.savez(tmp_path / f"{name}.npz", np.random.default_rng(seed).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    report = disk / "eval.json"
    args = ["eval", tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", "--inception", weights, "--device", "cpu",
            "--out", report]
    run_out_of_space(args, disk, [0])
    assert not report.exists()
    code, out = redi(*args)
    assert code == 0, out
    assert json.loads(report.read_text())["metrics"]["fid"] > 0


def test_a_failed_zarr_write_returns_after_the_writes_zarr_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    """zarr writes an array's chunks together and raises the first error while the others go on in its event loop;
    `writing` returns the error only once they have ended, so no temporary file outlives the command (the race that
    tests above lost under load)."""
    import asyncio
    import errno

    import zarr
    from zarr.storage import LocalStore

    from redi.common.errors import DiskFull, writing

    arr = zarr.create_array(LocalStore(tmp_path / "a.zarr"), shape=(4,), chunks=(1,), dtype="int32")
    real_set = LocalStore.set

    async def set_one_failing(self: LocalStore, key: str, value: object) -> None:
        if key == "c/0":
            raise OSError(errno.ENOSPC, "No space left on device")
        if key.startswith("c/"):
            await asyncio.sleep(0.3)  # still writing when chunk 0 has failed
        await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_one_failing)
    with pytest.raises(DiskFull), writing(tmp_path / "a.zarr" / "c" / "0"):
        arr[:] = np.arange(1, 5, dtype=np.int32)  # no fill value: zarr skips chunks of it
    assert sorted(p.name for p in (tmp_path / "a.zarr" / "c").iterdir()) == ["1", "2", "3"]

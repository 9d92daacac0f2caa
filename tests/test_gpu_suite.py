"""The GPU suite (`benchmarks/gpu.py`): its --quick run takes every step's code path on a CPU, so it cannot break unseen."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from redi.benchmarks import gpu
from redi.cli import app

FILES = ["a-train-profile.json", "b-train-throughput.json", "c-sample.json", "d-encode.json"]


def read(out: Path, name: str) -> list[dict]:
    data = json.loads((out / name).read_text())
    assert data["torch"] and data["device"] and data["quick"] is True
    return data["steps"]


@pytest.mark.slow
def test_quick_suite_runs_every_step_and_writes_each_items_figures(tmp_path: Path) -> None:
    summary = gpu.run(quick=True, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    steps = {name: read(tmp_path, name) for name in FILES}
    for record in itertools.chain.from_iterable(steps.values()):
        assert record["status"] == "ok", record
        assert record["seconds"] > 0 and "peak_memory_gib" in record
    assert len(summary) == sum(map(len, steps.values())) + 2  # one line per step, the total and the folder

    profiles = steps["a-train-profile.json"]
    assert [p["config"]["micro_batch"] for p in profiles] == list(gpu.QUICK.profile_micro_batches)
    for p in profiles:
        assert abs(sum(p["figures"]["shares"].values()) - 1) < 1e-6 and p["figures"]["shares"]["matmul"] > 0
        assert any("aten::" in line for line in p["figures"]["kernels"])
    throughput = steps["b-train-throughput.json"]
    assert [(t["config"]["model"], t["config"]["micro_batch"]) for t in throughput] == [
        (gpu.QUICK.big, gpu.QUICK.big_micro_batch)] * 2 + [(gpu.QUICK.small, gpu.QUICK.small_micro_batch)] * 2
    assert all(t["figures"]["images_per_s"] > 0 for t in throughput)
    interval_on, interval_off = (s["figures"] for s in steps["c-sample.json"])
    assert interval_on["interval"] == "0,0.7" and interval_off["interval"] == "none"
    assert interval_on["nfe_per_image"] < interval_off["nfe_per_image"], "CFG outside the interval costs no second call"
    first, second = (s["figures"] for s in steps["d-encode.json"])
    assert [first["batch_size"], second["batch_size"]] == list(gpu.QUICK.encode_batches)
    assert first["one_at_a_time_images_per_s"] > 0 and "one_at_a_time_images_per_s" not in second
    assert min(first["batched_images_per_s"], second["models_alone_both_images_per_s"]) > 0


def test_a_failing_step_is_recorded_and_the_suite_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from redi.benchmarks import sample

    calls = []

    def out_of_memory(**config):
        calls.append(config["interval"])
        raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(sample, "run", out_of_memory)
    summary = gpu.run(quick=True, out=tmp_path, only="c")
    assert calls == [gpu.GUIDANCE_INTERVAL, None], "the second step ran after the first failed"
    records = read(tmp_path, "c-sample.json")
    assert [r["status"] for r in records] == ["error", "error"]
    assert records[0]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 40.00 GiB"
    assert any("out_of_memory" in line for line in records[0]["traceback"])
    assert [k[:3] for k in summary][:2] == ["c1.", "c2."]
    assert all(v.startswith("error: RuntimeError") for k, v in summary.items() if k.startswith("c"))


def test_no_step_starts_after_the_budget(tmp_path: Path) -> None:
    gpu.run(quick=True, out=tmp_path, only="d", budget=0)
    records = read(tmp_path, "d-encode.json")
    assert len(records) == len(gpu.QUICK.encode_batches) and {r["status"] for r in records} == {"skipped"}


@pytest.mark.parametrize("args, message", [
    (["bench", "gpu"], "needs a CUDA device"),
    (["bench", "gpu", "--quick", "--only", "ax"], "Unknown suite item(s) x"),
    (["bench", "train", "--only", "a"], "Not an option of `redi bench train`: --only"),
])
def test_suite_refusals_are_one_sentence(args: list[str], message: str, tmp_path: Path) -> None:
    if gpu.torch.cuda.is_available() and args == ["bench", "gpu"]:
        pytest.skip("a CUDA device is present")
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)] if "gpu" in args else args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_encoding_images_are_a_few_demo_images_and_links_to_them(tmp_path: Path) -> None:
    from redi.pipeline.images import open_source

    out = gpu.demo_images(tmp_path / "images", 10, distinct=4)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(open_source(out)) == len(files) == 10
    assert len({p.stat().st_ino for p in files}) == 4

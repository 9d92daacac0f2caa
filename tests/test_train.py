"""The training loop: learning, exact resume, DDP equivalence, clear refusals."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from redi.benchmarks.loader import make_stage_inputs
from redi.cli import app
from redi.common import plots
from redi.common.plots import curves_figure, images_seen
from redi.common.errors import UserError
from redi.pipeline.shards import ShardsConfig, build_shards
from redi.trainer.checkpoint import Checkpoint, RunConfig, SettingsChange, newest_checkpoint
from redi.trainer.config import TrainConfig
from redi.info import plot_curves
from redi.trainer.metrics import read_metrics
from redi.trainer.train import train

REPO = Path(__file__).resolve().parents[1]
TIMING = {"steps_per_s", "images_per_s", "mfu"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic stages (latent 8×8, 4×4 patch grid, D = 16) and their shards with patch tokens."""
    root = tmp_path_factory.mktemp("train-data")
    make_stage_inputs(root, 96, latent_side=8, grid=4, dim=16, num_classes=4)
    build_shards(root, ShardsConfig(pcs=6, patch_tokens=True, shard_size=32, formats=("zarr", "wds")), progress=False)
    return root


def config(data: Path, run: Path, **changes) -> TrainConfig:
    base = dict(shards=str(data), run=str(run), model="SiT-debug", method="redi", pca_rank=4, batch_size=8,
                max_steps=8, log_every=2, save_every=4, num_workers=0, seed=3, lr=1e-3)
    return TrainConfig(**(base | changes))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_debug_model_learns(data: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path / "run", max_steps=200, log_every=10, save_every=200, batch_size=16)
    train(cfg, device="cpu")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses


def test_a_logged_loss_is_the_mean_of_the_steps_since_the_last_log(data: Path, tmp_path: Path) -> None:
    """As SiT's running loss: a line every 3 steps holds the mean of the 3 per-step values a line every step holds."""
    train(config(data, tmp_path / "every", max_steps=6, log_every=1, save_every=6), device="cpu")
    train(config(data, tmp_path / "third", max_steps=6, log_every=3, save_every=6), device="cpu")
    every, third = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("every", "third"))
    assert [r["step"] for r in third] == [3, 6]
    for row, steps in zip(third, (every[:3], every[3:]), strict=True):
        for term in ("loss", "vae", "pcs"):
            assert row[term] == pytest.approx(sum(r[term] for r in steps) / 3, rel=1e-6), term
        assert row["grad_norm"] == steps[-1]["grad_norm"]  # the logged step's own
    assert len({r["loss"] for r in every[:3]}) == 3  # the mean differs from the last step's value


@pytest.mark.parametrize("method,weighting", [("redi", "uniform"), ("reg", "lognormal"), ("redi+repa", "uniform")])
def test_resume_equals_uninterrupted(data: Path, tmp_path: Path, method: str, weighting: str) -> None:
    straight = config(data, tmp_path / "straight", method=method, weighting=weighting)
    train(straight, device="cpu")
    half = config(data, tmp_path / "resumed", method=method, max_steps=4, weighting=weighting)
    train(half, device="cpu")  # stops after the step-4 checkpoint, as a killed run would have left it
    train(config(data, tmp_path / "resumed", method=method, weighting=weighting), device="cpu")
    a = Checkpoint.load(newest_checkpoint(tmp_path / "straight"))
    b = Checkpoint.load(newest_checkpoint(tmp_path / "resumed"))
    assert a.step == b.step == 8
    assert a.train["weighting"] == weighting
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["train"]["weighting"] == weighting
    for name in ("model", "ema"):
        for key, value in getattr(a, name).items():
            assert torch.equal(value, getattr(b, name)[key]), f"{name}.{key} differs after resume"
    assert without_timing(read_metrics(tmp_path / "straight" / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "resumed" / "metrics.jsonl"))


def test_a_batch_job_s_log_has_a_plain_line_every_log_every_steps(data: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "FORCE_COLOR")}
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:  # `redi train … > out 2> err`
        done = subprocess.run([sys.executable, "-m", "redi", "train", "--shards", str(data), "--run", str(tmp_path / "run"),
                               "--model", "SiT-debug", "--pca-rank", "4", "--batch-size", "8", "--max-steps", "6",
                               "--log-every", "2", "--workers", "0", "--device", "cpu"],
                              cwd=REPO, env=env, stdout=out, stderr=err, timeout=300)
    log = (tmp_path / "err").read_text()
    assert done.returncode == 0, log[-2000:]
    line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO step (\d)/6 \((\d+)%\) \| loss \d+\.\d{4} \(vae \d+\.\d{4}, "
                      r"pcs \d+\.\d{4}\) \| grad norm [\d.e+-]+ \| lr 0\.0001 \| [\d.]+ steps/s, [\d,]+ img/s \| "
                      r"\d:\d\d:\d\d elapsed(, ETA \d:\d\d:\d\d)?")
    found = [line.fullmatch(x) for x in log.splitlines() if " INFO step " in x]
    assert all(found) and [(m[1], m[2], bool(m[3])) for m in found] == [("2", "33", True), ("4", "67", True), ("6", "100", False)], log
    assert "━" not in log and " INFO step " not in (tmp_path / "out").read_text()  # no bar; stdout keeps the summary


def test_wds_reader_trains_like_zarr(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "zarr", max_steps=4), device="cpu")
    train(config(data, tmp_path / "wds", max_steps=4, data_format="wds"), device="cpu")
    a = Checkpoint.load(newest_checkpoint(tmp_path / "zarr")).model
    b = Checkpoint.load(newest_checkpoint(tmp_path / "wds")).model
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "one", micro_batch=4, max_steps=4, method="redi+repa"), device="cpu")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "--", str(Path(sys.executable).parent / "redi"), "train", "--shards", str(data), "--run", str(tmp_path / "two"), "--model", "SiT-debug",
           "--method", "redi+repa", "--pca-rank", "4", "--batch-size", "8", "--max-steps", "4", "--log-every", "2",
           "--save-every", "4", "--workers", "0", "--seed", "3", "--lr", "1e-3", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = Checkpoint.load(newest_checkpoint(tmp_path / "one")).model
    b = Checkpoint.load(newest_checkpoint(tmp_path / "two")).model
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs between 1 and 2 processes")
    la = without_timing(read_metrics(tmp_path / "one" / "metrics.jsonl"))
    lb = without_timing(read_metrics(tmp_path / "two" / "metrics.jsonl"))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output


def test_rank_larger_than_stored_components_is_refused(data: Path, tmp_path: Path) -> None:
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "r"), "--model", "SiT-debug", "--pca-rank", "7")
    assert code == 2 and "--pca-rank 7" in out and "6 components" in out


def test_repa_without_patch_tokens_is_refused(tmp_path: Path) -> None:
    make_stage_inputs(tmp_path / "d", 32, latent_side=8, grid=4, dim=16)
    build_shards(tmp_path / "d", ShardsConfig(pcs=4, shard_size=16), progress=False)
    code, out = run_cli("--shards", str(tmp_path / "d"), "--run", str(tmp_path / "r"), "--model", "SiT-debug",
                        "--method", "repa")
    assert code == 2 and "--patch-tokens" in out


def test_a_resume_keeps_the_recorded_settings_and_records_a_deliberate_change(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = ["--shards", str(data), "--run", str(run), "--model", "SiT-debug", "--pca-rank", "4", "--batch-size", "8",
             "--lr", "1e-3", "--max-steps", "2", "--log-every", "1", "--save-every", "2", "--workers", "0", "--seed", "3"]
    code, out = run_cli(*first)
    assert code == 0, out
    started = json.loads((run / "config.json").read_text())["train"]
    assert started["precision"] == "fp32", "what the CPU ran, not the flag's default (bf16 autocast is a GPU's)"

    def resume(*flags: str) -> str:  # --shards and --run only, then the flags given on purpose: its resume line
        code, out = run_cli("--shards", str(data), "--run", str(run), *flags)
        assert code == 0, out
        (line,) = [line for line in out.splitlines() if ": resuming at step" in line]
        return line

    said = resume("--max-steps", "4")  # --model, --pca-rank, --lr, --batch-size left out: as recorded, not defaults
    assert "resuming at step 2 with 1 changed setting" in said and "max_steps 2 → 4" in said
    said = resume("--max-steps", "6", "--lr", "5e-4")
    assert "resuming at step 4 with 2 changed settings" in said and "lr 0.001 → 0.0005" in said
    said = resume("--max-steps", "8", "--batch-size", "16")  # the issue: lr went back to its default here
    assert said.endswith("changed settings (recorded in config.json): batch_size 8 → 16, max_steps 6 → 8.")
    said = resume()
    assert "resuming at step 8 with its recorded settings" in said

    record = json.loads((run / "config.json").read_text())
    assert record["train"] == started, "what the run started with is never rewritten"
    assert [(c["step"], c["settings"], c["before"]) for c in record["changes"]] == [
        (2, {"max_steps": 4}, {"max_steps": 2}), (4, {"max_steps": 6, "lr": 5e-4}, {"max_steps": 4, "lr": 1e-3}),
        (6, {"max_steps": 8, "batch_size": 16}, {"max_steps": 6, "batch_size": 8})]
    rows = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-3), (2, 1e-3), (3, 1e-3), (4, 1e-3), (5, 5e-4), (6, 5e-4),
                                                   (7, 5e-4), (8, 5e-4)]
    final = Checkpoint.load(newest_checkpoint(run))
    assert (final.train["batch_size"], final.train["lr"], final.train["pca_rank"], final.model_config.pca_rank) == (16, 5e-4, 4, 4)
    assert final.opt["param_groups"][0]["lr"] == 5e-4, "the optimiser trains with the new lr, not the one it saved"
    assert RunConfig.load(run).samples_before(8) == 6 * 8 + 2 * 16


def test_another_network_or_method_on_resume_is_refused_naming_both(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "run", max_steps=2), device="cpu")
    for flags, recorded, asked in ((["--pca-rank", "2"], "pca_rank 4", "pca_rank 2"),
                                   (["--model", "SiT-S"], "model SiT-debug/2", "model SiT-S/2"),
                                   (["--method", "baseline"], "method redi", "method baseline")):
        code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "run"), "--max-steps", "4", *flags)
        out = " ".join(out.split())
        assert code == 2 and f"was trained with {recorded}, and this command asks for {asked}" in out, out
        code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "run"), *flags, "--dry-run")
        assert code == 2 and recorded in " ".join(out.split()), "--dry-run refuses it too"
    assert not (tmp_path / "run" / "checkpoints" / "step-0000004.pt").exists()


def test_samples_seen_follow_each_batch_size_of_the_run(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "run", max_steps=2), device="cpu")
    record = RunConfig.load(tmp_path / "run")
    changed = record.with_change(SettingsChange(6, {"batch_size": 16}, {"batch_size": 8}))
    assert changed.samples_before(4) == 32 and changed.samples_before(10) == 6 * 8 + 4 * 16
    later = changed.with_change(SettingsChange(20, {"batch_size": 4}, {"batch_size": 16}))
    assert later.samples_before(10) == 6 * 8 + 4 * 16, "a change after the step does not count"
    rewound = later.with_change(SettingsChange(3, {"batch_size": 32}, {"batch_size": 4}))  # resumed from step 3
    assert rewound.samples_before(5) == 3 * 8 + 2 * 32


def test_epochs_on_resume_count_the_images_seen_at_each_batch_size(data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """96 samples: 6 steps at batch 8 are half an epoch; --epochs 2 at batch 16 trains the other 144 images in 9 steps
    (not 2 × 96 / 16 = 12 steps in all, which counts the first stretch at the new batch size)."""
    run = tmp_path / "run"
    train(config(data, run, max_steps=6, save_every=6), device="cpu")
    resume = ["--shards", str(data), "--run", str(run), "--epochs", "2", "--batch-size", "16"]
    code, out = run_cli(*resume, "--dry-run")
    assert code == 0 and json.loads(out[out.index("{"):out.rindex("}") + 1])["train"]["max_steps"] == 6 + 9, out
    code, out = run_cli(*resume)
    assert code == 0 and "max_steps 6 → 15" in " ".join(out.split()), out
    record = RunConfig.load(run)
    assert Checkpoint.load(newest_checkpoint(run)).step == 15 and record.samples_before(15) == 2 * 96
    code, out = run_cli("--shards", str(data), "--run", str(run), "--epochs", "1.5")  # seen already: stays where it is
    assert code == 0 and "already at step 15 (--max-steps 15)" in " ".join(out.split()), out

    drawn: dict[str, object] = {}  # curves.png: the images-seen axis counts each stretch at its batch size
    monkeypatch.setattr(plots, "curves_figure", lambda rows, batch_sizes, terms, title: drawn.update(
        batches=batch_sizes, title=title) or curves_figure(rows, batch_sizes, terms, title))
    assert plot_curves(run, tmp_path / "curves.png") is not None
    assert drawn["batches"] == ((0, 8), (6, 16)) and "batch 8, 16 from step 6" in str(drawn["title"])
    assert images_seen(drawn["batches"])[0](15) == 2 * 96  # type: ignore[arg-type]


def test_resolution_mismatch_with_existing_run_is_refused(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "run", max_steps=2), device="cpu")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    saved["train"]["resolution"] = 512  # the run was made on shards of another resolution
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(Exception, match="resolution"):
        train(config(data, tmp_path / "run", max_steps=4), device="cpu")


def test_dry_run_prints_config_and_parameters(data: Path, tmp_path: Path) -> None:
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "r"), "--model", "SiT-debug", "--pca-rank", "4", "--dry-run")
    assert code == 0, out
    assert '"parameters"' in out and not (tmp_path / "r").exists()


def test_non_finite_losses_stop_with_a_clear_message(data: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not finite"):
        train(config(data, tmp_path / "run", lr=1e30, max_steps=40, max_bad_steps=3, grad_clip=1e30), device="cpu")


def test_info_describes_a_run_directory(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "run", max_steps=4), device="cpu")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "step-0000004.pt" in result.output and "SiT-debug" in result.output
    young = tmp_path / "young"  # crashed before its first checkpoint, mid metrics line
    young.mkdir()
    (young / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
    (young / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    result = CliRunner().invoke(app, ["info", str(young)])
    assert result.exit_code == 0 and "config.json" in result.output and "missing" in result.output, result.output


def test_resume_after_a_crash_mid_metrics_line(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "run", max_steps=4), device="cpu")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.2, "st')  # killed while appending
    train(config(data, tmp_path / "run", max_steps=8), device="cpu")
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [2, 4, 6, 8]


def test_init_starts_a_new_run_from_other_weights_and_refuses_another_network(data: Path, tmp_path: Path) -> None:
    train(config(data, tmp_path / "a", max_steps=4), device="cpu")
    source = newest_checkpoint(tmp_path / "a")
    train(config(data, tmp_path / "b", max_steps=1, save_every=1, lr=0.0, init=str(source)), device="cpu")
    a, b = Checkpoint.load(source), Checkpoint.load(newest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(a.ema[k], b.model[k]) for k in a.ema), "lr 0: the weights stay the --init EMA weights"
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "c"), "--model", "SiT-debug", "--pca-rank", "2",
                        "--init", str(source), "--workers", "0", "--max-steps", "1")
    assert code == 2 and "different network" in out and "pca_rank" in out


def test_profile_splits_the_step_time_by_kind(data: Path, tmp_path: Path) -> None:
    from redi.benchmarks.train import kernel_breakdown, profile_loop

    shares = kernel_breakdown([("sm90_xmma_gemm_bf16", 6.0), ("flash_fwd_kernel", 2.0), ("triton_poi_fused_mul_0", 1.0),
                               ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 0.5), ("Memcpy HtoD", 0.5)])
    assert shares == {"matmul": 0.6, "attention": 0.2, "fused by inductor": 0.1, "optimiser (AdamW)": 0.05, "memory copies": 0.05}
    result = profile_loop(data, tmp_path / "run", tmp_path / "profile", model="SiT-debug", method="redi", batch=8,
                          compile=False, device="cpu", warm_steps=2, active_steps=2, pca_rank=4)
    assert abs(sum(result["shares"].values()) - 1.0) < 1e-6 and result["shares"]["matmul"] > 0
    assert "aten::" in (tmp_path / "profile" / "kernels.txt").read_text()
    assert json.loads((tmp_path / "profile" / "breakdown.json").read_text())["active_steps"] == 2


def test_sigterm_checkpoints_after_the_current_step_and_the_rerun_resumes_exactly(data: Path, tmp_path: Path) -> None:
    from redi.trainer.checkpoint import list_checkpoints

    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "redi", "train", "--shards", str(data), "--run", str(run), "--model", "SiT-debug",
           "--method", "redi", "--pca-rank", "4", "--batch-size", "8", "--log-every", "1", "--save-every", "1000",
           "--workers", "0", "--seed", "3", "--lr", "1e-3", "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--max-steps", "100000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "training never logged 3 steps"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "Stopped by SIGTERM" in output and "rerun the same command" in " ".join(output.split())
    ((stop_step, _),) = list_checkpoints(run)  # the stop's own checkpoint; save_every is far away
    assert stop_step >= 3

    final = stop_step + 2
    done = subprocess.run([*cmd, "--max-steps", str(final)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    train(config(data, tmp_path / "straight", max_steps=final, log_every=1, save_every=1000), device="cpu")
    a, b = Checkpoint.load(newest_checkpoint(tmp_path / "straight")), Checkpoint.load(newest_checkpoint(run))
    assert a.step == b.step == final
    for name in ("model", "ema"):
        for key, value in getattr(a, name).items():
            assert torch.equal(value, getattr(b, name)[key]), f"{name}.{key} differs after the stop and resume"
    for index, moments in a.opt["state"].items():
        assert all(torch.equal(v, b.opt["state"][index][k]) for k, v in moments.items()), f"AdamW state {index} differs"
    assert without_timing(read_metrics(tmp_path / "straight" / "metrics.jsonl")) == without_timing(read_metrics(run / "metrics.jsonl"))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(data: Path, tmp_path: Path) -> None:
    from redi.trainer.checkpoint import list_checkpoints

    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29523",
           "--", str(Path(sys.executable).parent / "redi"), "train", "--shards", str(data), "--run", str(run),
           "--model", "SiT-debug", "--method", "redi", "--pca-rank", "4", "--batch-size", "8", "--max-steps", "100000",
           "--log-every", "1", "--save-every", "1000", "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "training never logged 3 steps"
        time.sleep(0.05)
    # As a cluster scheduler does: every process of the job gets it (torchrun, which forwards it to the ranks, the
    # ranks, which run in sessions of their own, and the ranks' DataLoader workers).
    for group in {os.getpgid(pid) for pid in descendants(proc.pid)} | {proc.pid}:
        os.killpg(group, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert output.count("Stopped by SIGTERM") == 1 and "DataLoader worker" not in output, output[-3000:]
    ((stop_step, path),) = list_checkpoints(run)
    assert Checkpoint.load(path).step == stop_step == read_metrics(run / "metrics.jsonl")[-1]["step"]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in descendants(c)]


def test_a_damaged_newest_checkpoint_is_passed_over_and_a_full_disk_is_one_sentence(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from redi.trainer.checkpoint import list_checkpoints

    train(config(data, tmp_path / "straight"), device="cpu")
    train(config(data, tmp_path / "damaged", save_every=2, max_steps=6), device="cpu")
    (newest_step, newest), *_ = reversed(list_checkpoints(tmp_path / "damaged"))
    assert newest_step == 6
    newest.write_bytes(newest.read_bytes()[:1000])  # as a failing disk might leave it
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "damaged"), "--model", "SiT-debug", "--method", "redi",
                        "--pca-rank", "4", "--batch-size", "8", "--max-steps", "8", "--log-every", "2", "--save-every", "2",
                        "--workers", "0", "--seed", "3", "--lr", "1e-3", "--device", "cpu")
    said = " ".join(out.split())
    assert code == 0 and "differs from the SHA-256 recorded when it was saved" in said and "checkpoint before it" in said, out
    a, b = Checkpoint.load(newest_checkpoint(tmp_path / "straight")), Checkpoint.load(newest_checkpoint(tmp_path / "damaged"))
    assert a.step == b.step == 8 and all(torch.equal(v, b.model[k]) for k, v in a.model.items())

    for _, path in list_checkpoints(tmp_path / "damaged"):
        path.write_bytes(b"not a checkpoint")
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "damaged"), "--model", "SiT-debug", "--method", "redi",
                        "--pca-rank", "4", "--max-steps", "10", "--workers", "0", "--device", "cpu")
    assert code == 2 and "can be read" in out

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "full"), "--model", "SiT-debug", "--method", "redi",
                        "--pca-rank", "4", "--max-steps", "2", "--workers", "0", "--device", "cpu")
    assert code == 2 and "No space left on device" in out and "rerun the same command" in " ".join(out.split())
    assert not list((tmp_path / "full" / "checkpoints").glob("*"))  # no temporary file left behind


def test_a_class_embedding_larger_than_memory_is_refused_before_allocating(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "shards", tmp_path / "d" / "shards")
    info = json.loads((tmp_path / "d" / "shards" / "shards.json").read_text())
    info["num_classes"] = 2_000_000_001  # a label of 2e9 in the data: 2e9 × hidden float32 rows, five times over
    (tmp_path / "d" / "shards" / "shards.json").write_text(json.dumps(info))
    code, out = run_cli("--shards", str(tmp_path / "d"), "--run", str(tmp_path / "run"), "--model", "SiT-debug",
                        "--pca-rank", "4", "--max-steps", "1", "--workers", "0", "--device", "cpu")
    assert code == 2 and "2,000,000,001 classes" in out and "largest label" in out and "GiB" in out, out
    assert not (tmp_path / "run" / "config.json").exists()


def test_running_out_of_gpu_memory_names_the_flag_to_lower(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redi.trainer.train

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(redi.trainer.train, "compute_loss", out_of_memory)
    code, out = run_cli("--shards", str(data), "--run", str(tmp_path / "run"), "--model", "SiT-debug", "--pca-rank", "4",
                        "--max-steps", "2", "--workers", "0", "--device", "cpu")
    assert code == 2 and "ran out of memory (CUDA out of memory)" in out and "--micro-batch" in out, out


def test_dit_learns_sigma_by_default_and_grad_clip_zero_turns_clipping_off(data: Path, tmp_path: Path) -> None:
    assert config(data, tmp_path, model="DiT-debug").learn_sigma is True  # DiT and the ReDi paper's DiT runs
    assert config(data, tmp_path, model="DiT-debug", learn_sigma=False).learn_sigma is False
    assert config(data, tmp_path).learn_sigma is False  # SiT
    with pytest.raises(UserError, match="applies to DiT"):
        config(data, tmp_path, learn_sigma=True)

    train(config(data, tmp_path / "off", grad_clip=0.0, max_steps=2, log_every=1), device="cpu")
    train(config(data, tmp_path / "tiny", grad_clip=1e-12, max_steps=2, log_every=1), device="cpu")
    off, tiny = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("off", "tiny"))
    assert off[0]["grad_norm"] == tiny[0]["grad_norm"] > 0  # the same first step, the norm logged either way
    assert off[1]["loss"] != tiny[1]["loss"]  # unclipped, the first update moved the weights much further


def test_keep_is_the_newest_resume_checkpoints_besides_the_milestones(tmp_path: Path) -> None:
    """--keep N keeps the newest N checkpoints of the --save-every grid and every --ckpt-every milestone; --keep 0 keeps
    every checkpoint."""
    from redi.trainer.checkpoint import list_checkpoints, save_checkpoint

    for step in range(1, 8):
        save_checkpoint(tmp_path, step, {"step": step}, keep=1, milestone_every=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6, 7]  # milestones 3 and 6, the newest other one
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"step-{s:07d}.pt{suffix}" for s in (3, 6, 7) for suffix in ("", ".sha256")]
    for step in (8, 9):
        save_checkpoint(tmp_path, step, {"step": step}, keep=0, milestone_every=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6, 7, 8, 9]


def test_background_checkpoint_holds_the_state_of_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from redi.trainer.checkpoint import BackgroundCheckpointer, checkpoint_path, list_checkpoints

    weights = torch.zeros(1000)
    with BackgroundCheckpointer() as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(tmp_path, step, {"model": {"w": weights}, "step": step}, keep=2, milestone_every=0)
            weights += 1  # the training loop goes on updating in place while the file is written
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]  # keep=2 rotated step 1 away
    for step in (2, 3):
        saved = torch.load(checkpoint_path(tmp_path, step), weights_only=True)  # any state: the checkpointer copies it
        assert torch.equal(saved["model"]["w"], torch.full((1000,), step - 1.0))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device"), BackgroundCheckpointer() as checkpointer:
        checkpointer.save(tmp_path, 4, {"w": weights}, keep=2, milestone_every=0)  # the error surfaces on leaving
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_one_job_per_run_directory_and_no_resume_on_other_data(data: Path, tmp_path: Path) -> None:
    from redi.common.lock import exclusive

    run = tmp_path / "run"
    with exclusive(run / ".lock", "held by the test"), pytest.raises(UserError, match="Another redi process is writing"):
        train(config(data, run, max_steps=2), device="cpu")
    train(config(data, run, max_steps=2), device="cpu")

    other = tmp_path / "other-data"
    make_stage_inputs(other, 96, latent_side=8, grid=4, dim=16, num_classes=4, seed=1)
    build_shards(other, ShardsConfig(pcs=6, patch_tokens=True, shard_size=32), progress=False)
    with pytest.raises(UserError, match="trained on other data"):
        train(config(other, run, max_steps=4), device="cpu")


def test_bad_values_are_refused_before_the_run_directory_is_written(data: Path, tmp_path: Path) -> None:
    base = ["--shards", str(data), "--run", str(tmp_path / "run"), "--model", "SiT-debug", "--max-steps", "2",
            "--workers", "0", "--device", "cpu"]
    for bad, words in ((["--ema-decay", "2"], "--ema-decay"), (["--lr", "nan"], "--lr"), (["--log-every", "0"], "--log-every"),
                       (["--epochs", "0"], "--epochs"), (["--micro-batch", "0"], "--micro-batch"),
                       (["--method", "redi", "--pca-rank", "0"], "PCA rank"), (["--weighting", "cosine"], "--weighting"),
                       (["--model", "DiT-debug", "--weighting", "lognormal"], "--weighting lognormal"),
                       (["--read-ahead", "-1"], "--read-ahead")):
        code, out = run_cli(*base, *bad)
        assert code == 2 and words in " ".join(out.split()) and "Traceback" not in out, (bad, out)
        assert not (tmp_path / "run" / "config.json").exists(), bad
    (tmp_path / "file").write_text("")
    code, out = run_cli(*base[:2], "--run", str(tmp_path / "file"), *base[4:])
    assert code == 2 and "is a file" in out


def test_align_until_fades_the_alignment_term_off_and_logs_its_weight(data: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path / "run", method="repa", max_steps=4, log_every=1, align_until=3, align_fade=1)
    assert [cfg.align_factor(s) for s in range(5)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    train(cfg, device="cpu")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["align_weight"] for r in rows] == [0.5, 0.5, 0.25, 0.0]  # --repa-weight 0.5 × the factor of each step
    for r in rows:  # the loss is the denoising term plus the alignment term at the weight in effect
        assert r["loss"] == pytest.approx(r["vae"] + r["align_weight"] * r["repa"], rel=1e-5, abs=1e-6)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["align_until"], saved["align_fade"]) == (3, 1)
    with pytest.raises(UserError, match="does not have"):
        config(data, tmp_path / "x", method="redi", align_until=3)
    with pytest.raises(UserError, match="needs --align-until"):
        config(data, tmp_path / "x", method="reg", align_fade=2)

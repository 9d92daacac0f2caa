"""`redi sample`: outputs and their formats, per-index reproducibility, multi-process split, resume, refusals."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from redi.cli import app
from redi.common.atomic import sha256_file
from redi.common.errors import UserError
from redi.common.lock import exclusive
from redi.pipeline.vaes import latent_space, tiny_sd_config
from redi.sampler.outputs import (
    CAPTION_LINE, LABEL_LINE, captioned_grid, image_path, pcs_path, pcs_to_rgb, read_png, write_adm_npz,
)
from redi.sampler.report import SampleResult
from redi.sampler.config import SampleConfig
from redi.sampler.sample import batches_of, run_sample
from redi.sampler.labels import class_labels
from redi.sampler.settings import resolve_guidance
from redi.trainer.checkpoint import Checkpoint, ShardSummary, checkpoint_path, newest_checkpoint
from redi.trainer.config import TrainConfig
from redi.trainer.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]
LATENT = 8  # latent side: 64×64 images through the tiny-random VAE
STEP = 7
VAE = {"id": "tiny-random", "revision": "0" * 64, "kind": "tiny-random"}
SD_VAE = latent_space(tiny_sd_config())  # the tiny-random VAE's: SD-VAE's 4 channels, f8, 0.18215


def make_run(root: Path, model: str = "SiT-debug", method: str = "redi", rep_drop: float = 0.2,
             learn_sigma: bool = False) -> Path:
    """A run directory holding one checkpoint in `redi train`'s format, with weights that are not DiT's zeros."""
    train = TrainConfig(shards=str(root / "data"), run=str(root), model=model, method=method, pca_rank=3,
                        rep_drop=rep_drop, learn_sigma=learn_sigma)
    mc = ModelConfig(size="debug", objective=train.objective, input_size=LATENT, pca_rank=3 if train.uses_pcs else 0,
                     num_classes=4, repa_depth=train.resolved_repa_depth, repa_dim=16, reg_token=method == "reg",
                     learn_sigma=learn_sigma)
    torch.manual_seed(0)
    net = build_model(mc)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised output layers would make every sample alike
    shards = ShardSummary(root=str(root / "data"), shards_json_sha256="0" * 64, vae=VAE, encoder={}, num_samples=96,
                          num_classes=4, resolution=8 * LATENT, latent_shape=[4, LATENT, LATENT], pcs=6, grid=4,
                          feature_dim=16, latent_space=SD_VAE.record(), latent_norm=SD_VAE.config_norm().record(),
                          pca_sha256="0" * 64)
    Checkpoint(step=STEP, train=train.to_json(), model_config=mc, shards=shards, model=net.state_dict(),
               ema=net.state_dict(), opt={}).save(checkpoint_path(root, STEP))
    return root


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("sit-redi"))


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sample", *(str(a) for a in args)])
    return result.exit_code, " ".join(result.output.split())


def sample(run: Path, out: Path, **changes: object) -> SampleResult:
    base = dict(run=run, out=out, num=8, steps=4, batch_size=8, seed=5, guidance="cfg", cfg_scale=2.0,
                interval=(0.0, 0.7), device="cpu")
    settings = base | changes
    if settings["guidance"] == "none":
        settings["interval"] = None  # an interval bounds guidance; there is none to bound
    if "cfg" not in settings["guidance"]:
        settings["cfg_scale"] = None  # a CFG scale without CFG is refused
    return run_sample(SampleConfig(**settings))


def npz(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as f:
        return f["arr_0"], f["arr_1"]


def test_cli_writes_every_output(sit_run: Path) -> None:
    code, text = cli("--run", sit_run, "--num", 5, "--batch-size", 2, "--steps", 4, "--guidance", "cfg+rg",
                     "--cfg-scale", 2, "--rg-scale", 1.5, "--interval", "0,0.7", "--class-labels", "1,2", "--seed", 3)
    assert code == 0, text
    out = sit_run / "samples" / "step0000007-sde4-cfg2-rg1.5-interval0-0.7-labelscf4dabed-seed3"
    assert out.is_dir() and "tiny-random" in text
    images, labels = npz(out)
    assert images.dtype == np.uint8 and images.shape == (5, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 2, 1, 2, 1]
    assert np.array_equal(images, np.stack([read_png(image_path(out, i)) for i in range(5)]))
    assert images.std() > 5  # real, varied pictures, not a constant
    grid = np.asarray(Image.open(out / "grid.png"))
    top = grid.shape[0] - (2 * (66 + LABEL_LINE) + 2)  # the caption's lines above 2 rows of cells and their labels
    assert grid.shape[1] == 3 * 66 + 2 and top > 0 and np.array_equal(grid[top + 2:top + 66, 2:66], images[0])
    assert grid[:top, 2:100].max() == 255 and grid[top + 66:top + 66 + LABEL_LINE, 2:66].max() == 255  # words
    assert np.asarray(Image.open(out / "pcs.png")).shape[1] == grid.shape[1]
    report = json.loads((out / "sample.json").read_text())
    s = report["settings"]
    assert s["sampler"] == "sde" and s["steps"] == 4 and s["seed"] == 3 and s["precision"] == "fp32"
    assert s["guidance"] == {"mode": "cfg+rg", "cfg_scale": 2.0, "rg_scale": 1.5, "cfg_channels": "vae", "cls_cfg_scale": None, "interval": [0.0, 0.7]}
    assert s["labels"] == {"mode": "list", "values": [1, 2]} and s["tiny_random"] is True
    ckpt = sit_run / "checkpoints" / "step-0000007.pt"
    assert s["checkpoint"] == {"sha256": sha256_file(ckpt), "step": STEP, "weights": "ema"}
    assert report["checkpoint_path"] == str(ckpt.resolve())
    assert s["model"]["name"] == "SiT-debug" and s["model"]["method"] == "redi" and s["vae"]["identity"]["kind"] == "tiny-random"
    # SDE times 1, 0.68, 0.36, 0.04: cond only at t = 1, three branches at the three inside [0, 0.7].
    assert report["work"]["nfe_per_image"] == 1 + 3 * 3
    assert report["work"]["model_calls"] == 4 * 3  # one batched call per step, 3 batches
    assert report["complete"] and report["device"] == "cpu" and report["work"]["images_per_s"] > 0


def test_dit_defaults_to_ddpm_and_has_no_pc_picture(tmp_path: Path) -> None:
    run = make_run(tmp_path / "dit", model="DiT-debug", method="baseline", learn_sigma=True)
    out = tmp_path / "out"
    code, text = cli("--run", run, "--out", out, "--num", 3, "--steps", 5, "--guidance", "cfg", "--cfg-scale", 3)
    assert code == 0, text
    report = json.loads((out / "sample.json").read_text())
    assert report["settings"]["sampler"] == "ddpm" and report["settings"]["labels"] == {"mode": "random"}
    assert report["work"]["nfe_per_image"] == 5 * 2
    images, labels = npz(out)
    assert images.shape == (3, 64, 64, 3) and labels.tolist() == class_labels(3, 0, "random", 4).tolist()
    assert (out / "grid.png").exists() and not (out / "pcs.png").exists()


def test_reg_model_samples_without_its_repa_projector(tmp_path: Path) -> None:
    run = make_run(tmp_path / "reg", method="reg")
    result = sample(run, tmp_path / "out", num=2, steps=2, guidance="none")
    assert result.assembled and not result.has_pcs and result.work.model_calls == 2
    assert npz(result.out)[0].shape == (2, 64, 64, 3)
    code, text = cli("--run", run, "--num", 2, "--steps", 2, "--guidance", "cfg", "--cfg-scale", 1.8,
                     "--cls-cfg-scale", 2.3, "--interval", "0,0.7")  # REG's recipe
    assert code == 0 and "cls2.3" in text, text


def test_reg_guides_its_class_token_at_reg_s_default_unless_told(tmp_path: Path) -> None:
    """REG generate.py: --cls-cfg-scale 1.5 unless given; only where CFG is on."""
    run = make_run(tmp_path / "reg", method="reg")
    assert cli("--run", run, "--num", 2, "--steps", 2, "--guidance", "cfg")[0] == 0
    report = json.loads((run / "samples" / "step0000007-sde2-cfg2.4cls1.5-seed0" / "sample.json").read_text())
    assert report["settings"]["guidance"]["cls_cfg_scale"] == 1.5
    ckpt = Checkpoint.load(newest_checkpoint(run))
    told = resolve_guidance(SampleConfig(run=run, guidance="cfg", cls_cfg_scale=0.0), ckpt)
    assert told.cls_cfg_scale == 0.0
    assert resolve_guidance(SampleConfig(run=run, guidance="none"), ckpt).cls_cfg_scale is None
    sit = Checkpoint.load(newest_checkpoint(make_run(tmp_path / "sit")))
    assert resolve_guidance(SampleConfig(run=run, guidance="cfg"), sit).cls_cfg_scale is None  # no class token


def test_adaptive_ode_solver_reports_what_it_spent(sit_run: Path, tmp_path: Path) -> None:
    result = sample(sit_run, tmp_path / "dopri5", num=4, batch_size=2, steps=None, sampler="ode", solver="dopri5",
                    guidance="cfg")
    report = json.loads((result.out / "sample.json").read_text())
    s, work = report["settings"], report["work"]
    assert s["sampler"] == "ode" and s["steps"] is None
    assert s["sampler_options"] == {"solver": "dopri5", "atol": 1e-6, "rtol": 1e-3}
    assert work["nfe"] == work["nfe_mean_per_image"] * 4 and work["nfe_per_image"] >= work["nfe_mean_per_image"] > 6
    assert result.sampler.label() == "ode-dopri5-atol1e-06-rtol0.001" and npz(result.out)[0].shape == (4, 64, 64, 3)
    fixed = sample(sit_run, tmp_path / "rk4", num=2, steps=3, sampler="ode", solver="rk4", guidance="none")
    assert fixed.work.nfe_per_image == 12 and fixed.sampler.label() == "ode-rk4-3"
    last = sample(sit_run, tmp_path / "none", num=2, steps=3, last_step="none", guidance="none")
    assert last.work.nfe_per_image == 2
    assert json.loads((last.out / "sample.json").read_text())["settings"]["sampler_options"] == {
        "last_step": "none", "last_step_size": 0.04}


def test_labels_depend_on_seed_and_index_only() -> None:
    a = class_labels(40, 9, "random", 1000)
    assert np.array_equal(a[10:20], class_labels(20, 9, "random", 1000)[10:20])
    assert len(set(a.tolist())) > 20 and not np.array_equal(a, class_labels(40, 10, "random", 1000))
    assert class_labels(5, 0, (7, 8), 10).tolist() == [7, 8, 7, 8, 7]
    assert class_labels(3, 0, "random", 1).tolist() == [0, 0, 0]  # unconditional
    with pytest.raises(UserError, match="no effect on an unconditional model"):
        class_labels(3, 0, (7,), 1)
    assert batches_of(8, 3, 0, 2) == [[0, 1, 2], [6, 7]] and batches_of(8, 3, 1, 2) == [[3, 4, 5]]


def test_same_pixels_for_every_batch_size(sit_run: Path, tmp_path: Path) -> None:
    runs = {b: npz(sample(sit_run, tmp_path / f"b{b}", batch_size=b).out) for b in (1, 3, 8)}
    ref_images, ref_labels = runs[8]
    for images, labels in runs.values():
        assert np.array_equal(labels, ref_labels)
        # Batched kernels may round a row differently for another batch shape (see sampler/sample.py):
        # at most one grey level, on a handful of the 8·64·64·3 values.
        diff = np.abs(images.astype(int) - ref_images.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())
    other_seed, _ = npz(sample(sit_run, tmp_path / "seed6", seed=6).out)
    assert np.abs(other_seed.astype(int) - ref_images.astype(int)).mean() > 5


def test_two_processes_equal_one_process(sit_run: Path, tmp_path: Path) -> None:
    single, single_labels = npz(sample(sit_run, tmp_path / "one", batch_size=3).out)
    second = sample(sit_run, tmp_path / "two", batch_size=3, rank=1, world_size=2)
    assert second.work.images == 3 and not second.assembled and not (tmp_path / "two" / "samples.npz").exists()
    first = sample(sit_run, tmp_path / "two", batch_size=3, rank=0, world_size=2)
    assert first.work.images == 5 and first.assembled and first.missing == 0
    images, labels = npz(tmp_path / "two")
    assert np.array_equal(images, single) and np.array_equal(labels, single_labels)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(sit_run: Path, tmp_path: Path) -> None:
    single, _ = npz(sample(sit_run, tmp_path / "one", batch_size=3, num=7, guidance="none").out)
    # "--" keeps torchrun's own parser from claiming --run/--num (it matches abbreviations of its options).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module", "--", "redi", "sample",
           "--run", str(sit_run), "--out", str(tmp_path / "two"), "--num", "7", "--batch-size", "3", "--steps", "4",
           "--seed", "5", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    images, _ = npz(tmp_path / "two")
    assert np.array_equal(images, single)
    report = json.loads((tmp_path / "two" / "sample.json").read_text())
    assert report["world_size"] == 2 and report["work"]["images"] == 7 and report["work"]["batches"] == 3


def test_resume_regenerates_only_the_missing_images(sit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    full = sample(sit_run, out, batch_size=2)
    assert full.work.model_calls == 4 * 4 and full.work.images == 8
    before, _ = npz(out)
    kept = {i: image_path(out, i).stat().st_mtime_ns for i in range(8)}
    for i in (3, 6):
        image_path(out, i).unlink()
    pcs_path(out, 1).unlink()  # a grid image whose PCs are gone is redone too
    (out / "images" / ".000006.png.crash.tmp").write_bytes(b"\x89PNG partial")  # a write killed half-way
    resumed = sample(sit_run, out, batch_size=2)
    assert resumed.work.images == 3 and resumed.present == 5
    assert resumed.work.model_calls == 3 * 4  # batches [0, 1], [2, 3], [6, 7]; four steps each
    after, _ = npz(out)
    assert np.array_equal(after, before)
    assert all(image_path(out, i).stat().st_mtime_ns == kept[i] for i in (0, 2, 4, 5, 7))
    idle = sample(sit_run, out, batch_size=2)
    assert idle.work.model_calls == 0 and idle.assembled
    (out / "samples.npz").unlink()  # an assembled output lost: rebuilt from the images, nothing resampled
    rebuilt = sample(sit_run, out, batch_size=2)
    assert rebuilt.work.model_calls == 0 and np.array_equal(npz(out)[0], before)


def test_the_work_record_survives_an_assembly_cut_short_and_any_rebuild(sit_run: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    straight = sample(sit_run, tmp_path / "straight")
    out = tmp_path / "cut"

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("redi.sampler.sample.assemble", full_disk)  # every image is written, then the disk is full
        with pytest.raises(OSError):
            sample(sit_run, out)
    assert json.loads((out / "sample.json").read_text())["complete"] is False
    for rebuild in ("after the full disk", "without grid.png and samples.npz"):
        rebuilt = sample(sit_run, out)
        assert rebuilt.work.model_calls == 0 and rebuilt.assembled, rebuild  # nothing sampled again
        report = json.loads((out / "sample.json").read_text())
        assert report["complete"] and report["work"]["images"] == 8, rebuild
        assert report["work"]["nfe_per_image"] == straight.work.nfe_per_image > 0, rebuild
        assert report["work"]["model_calls"] == straight.work.model_calls, rebuild
        (out / "grid.png").unlink()
        (out / "samples.npz").unlink()
    sample(sit_run, out)
    evaluated = CliRunner().invoke(app, ["eval", str(out / "samples.npz"), "--ref", str(out / "samples.npz"), "--metrics",
                                         "fd_dinov2", "--fd-encoder", "tiny-random", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    card = json.loads((out / "samples.eval.json").read_text())["card"]
    assert card["nfe_per_image"] == straight.work.nfe_per_image  # the card says how the samples were made


def test_refusals(sit_run: Path, tmp_path: Path) -> None:
    no_drop = make_run(tmp_path / "no-drop", rep_drop=0.0)
    code, text = cli("--run", no_drop, "--num", 2, "--steps", 2, "--guidance", "rg")
    assert code == 2 and "rep_drop 0" in text and "Traceback" not in text
    code, text = cli("--run", sit_run, "--num", 2, "--steps", 2, "--guidance", "cfg", "--cls-cfg-scale", 2)
    assert code == 2 and "needs a REG model" in text
    code, text = cli("--run", sit_run, "--num", 2, "--steps", 2, "--guidance", "rg", "--cfg-scale", 2)
    assert code == 2 and "--cfg-scale has no effect with --guidance rg" in text
    code, text = cli("--run", sit_run, "--num", 2, "--steps", 2, "--sampler", "ddpm")
    assert code == 2 and "ddpm for DiT" in text
    code, text = cli("--run", sit_run, "--num", 2, "--steps", 2, "--class-labels", "1,4")
    assert code == 2 and "classes 0…3" in text
    for flags, words in ((["--solver", "dopri5"], "needs --sampler ode"),
                         (["--sampler", "ode", "--solver", "dopri5", "--steps", "2"], "leave --steps out"),
                         (["--sampler", "ode", "--atol", "1e-4"], "--atol/--rtol apply"),
                         (["--sampler", "ode", "--solver", "rk4", "--rtol", "1e-4"], "--atol/--rtol apply"),
                         (["--sampler", "ode", "--solver", "lsoda"], "'lsoda' is not one of"),  # Typer's usage error
                         (["--sampler", "heun", "--last-step", "euler"], "need --sampler sde"),
                         (["--last-step", "none", "--last-step-size", "0.1"], "no effect with --last-step none"),
                         (["--last-step", "tweedie", "--steps", "1"], "--steps 2 or more"),
                         (["--last-step-size", "0"], "must be a number in (0, 1), not 0")):  # Typer's, when parsed
        code, text = cli("--run", sit_run, "--num", 2, *flags)
        assert code == 2 and words in text and "Traceback" not in text, (flags, text)
    out = tmp_path / "taken"
    assert cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 2)[0] == 0
    code, text = cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 3)
    assert code == 2 and "other settings (steps)" in text
    code, text = cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 3, "--force")
    assert code == 0, text
    assert json.loads((out / "sample.json").read_text())["settings"]["steps"] == 3


def test_one_sampler_per_output_directory(sit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with exclusive(out / ".lock", "held by the test"):  # another `redi sample` writing there
        code, text = cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 2)
    assert code == 2 and f"Another redi process is writing the samples in {out}" in text
    assert not (out / "sample.json").exists() and not (out / "images").exists()


def test_images_that_no_sample_json_describes_are_not_relabelled(sit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "orphans"
    assert cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 2)[0] == 0
    (out / "sample.json").unlink()  # lost: nothing says which settings made images/000000.png
    code, text = cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 3)
    assert code == 2 and "holds images but no sample.json" in text and "--force" in text
    assert cli("--run", sit_run, "--out", out, "--num", 2, "--steps", 3, "--force")[0] == 0
    report = json.loads((out / "sample.json").read_text())
    assert report["complete"] and report["settings"]["steps"] == 3 and report["work"]["images"] == 2  # made anew


def test_non_finite_samples_are_listed_and_fail_the_command(sit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "overflow"
    code, text = cli("--run", sit_run, "--out", out, "--num", 3, "--steps", 2, "--guidance", "cfg", "--cfg-scale", "1e30")
    assert code == 2 and "3 of 3 samples are not finite" in text and "Traceback" not in text
    assert "not finite" in text and "errors.jsonl" in text  # the summary table says it too
    listed = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["index"] for e in listed] == [0, 1, 2] and "NaN or inf" in listed[0]["reason"]
    assert not list(out.glob("images/*.png")) and not (out / "samples.npz").exists()  # no black images, nothing assembled
    code, text = cli("--run", sit_run, "--out", out, "--num", 3, "--steps", 2, "--guidance", "cfg", "--cfg-scale", "2",
                     "--force")
    assert code == 0 and (out / "samples.npz").exists() and not (out / "errors.jsonl").exists(), text


def test_pc_picture_and_grid_layout() -> None:
    pcs = np.zeros((2, 2, 2, 2))
    pcs[:, 0] = np.arange(8).reshape(2, 2, 2)  # PC 1 spans 0…7, PC 2 is constant, there is no PC 3
    rgb = pcs_to_rgb(pcs, side=8)
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0, 0] == 0 and rgb[1, 7, 7, 0] == 255 and (rgb[..., 1:] == 0).all()
    assert (rgb[:, :4, :4] == rgb[:, :1, :1]).all()  # nearest upsampling: each latent cell is a 4×4 block
    cells = np.full((5, 3, 3, 3), 200, np.uint8)
    labelled, plain = captioned_grid(cells, "c", np.arange(5), padding=1), captioned_grid(cells, "c", None, padding=1)
    top = CAPTION_LINE + 1  # one caption line
    assert labelled.shape == (top + 2 * (4 + LABEL_LINE) + 1, 3 * 4 + 1, 3) and labelled[top + 1:top + 4, 1:4].min() == 200
    assert plain.shape == (top + 2 * 4 + 1, 3 * 4 + 1, 3) and plain[top + 5:top + 8, 1:4].min() == 200  # 2nd row


def test_streamed_npz_reads_like_numpy_savez(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    labels = np.arange(4)
    write_adm_npz(tmp_path / "s.npz", iter(images), images.shape, labels)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].dtype == np.int64


def test_benchmark_smoke() -> None:
    from redi.benchmarks.sample import run

    figures = run(quick=True)
    assert figures["model_calls_per_step"] == 1 and figures["images_per_s"] > 0 and figures["nfe_per_image"] > 0


def test_pixels_are_quantised_as_the_reference_scripts() -> None:
    from redi.sampler.outputs import to_uint8

    x = torch.tensor([-1.5, -1.0, -0.996, 0.0, 0.5, 0.9999, 1.0, 1.2]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    nearest = to_uint8(x)[0, 0, :, 0].tolist()  # DiT/SiT/ReDi: clamp(127.5·x + 128) truncated
    floor = to_uint8(x, "floor")[0, 0, :, 0].tolist()  # REPA/REG: clamp(255·(x + 1)/2) truncated
    assert nearest == [0, 0, 1, 128, 191, 255, 255, 255]
    assert floor == [0, 0, 0, 127, 191, 254, 255, 255]


def test_balanced_labels_are_recorded_and_have_exact_counts(sit_run: Path) -> None:
    code, text = cli("--run", sit_run, "--num", 8, "--batch-size", 8, "--steps", 2, "--labels", "balanced", "--seed", 1)
    assert code == 0, text
    out = sit_run / "samples" / "step0000007-sde2-balanced-seed1"
    _, labels = npz(out)
    assert np.bincount(labels, minlength=4).tolist() == [2, 2, 2, 2]  # 8 images, 4 classes
    assert json.loads((out / "sample.json").read_text())["settings"]["labels"] == {"mode": "balanced", "num": 8}
    code, text = cli("--run", sit_run, "--num", 12, "--batch-size", 8, "--steps", 2, "--labels", "balanced", "--seed", 1)
    assert code == 2 and "other settings (labels)" in text  # 12 balanced labels are not the 8's: never mixed

    # The eval card: how these samples were made, from sample.json, next to what they were compared with.
    evaluated = CliRunner().invoke(app, ["eval", str(out / "samples.npz"), "--ref", str(out / "samples.npz"), "--metrics",
                                         "fd_dinov2", "--fd-encoder", "tiny-random", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    card = json.loads((out / "samples.eval.json").read_text())["card"]
    ckpt = sit_run / "checkpoints" / "step-0000007.pt"
    assert card["checkpoint"] == {"sha256": sha256_file(ckpt), "step": STEP, "weights": "ema"}
    assert (card["model"], card["sampler"], card["steps"], card["nfe_per_image"]) == ("SiT-debug", "sde", 2, 2)
    assert card["guidance"]["mode"] == "none" and card["labels"] == "balanced" and card["precision"] == "fp32"
    assert card["num_samples"] == 8 and card["ref_sha256"] == sha256_file(out / "samples.npz") and card["seconds"] > 0

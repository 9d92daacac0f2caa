"""The pictures: the PCA plot, a data root's channel histograms and a run's training curves (`redi info`)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from redi.benchmarks.loader import make_stage_inputs
from redi.cli import app
from redi.common.plots import curves_figure, explained_variance_figure, histograms_figure, images_seen, save_png
from redi.info import CURVES_PNG, HISTOGRAMS_PNG, channel_values
from redi.pipeline.pca import PLOT_FILE
from redi.pipeline.shards import ShardsConfig, build_shards
from redi.trainer.metrics import LOSS_TERMS


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plots-data")
    make_stage_inputs(root, 48, latent_side=4, grid=2, dim=8, num_classes=3)
    build_shards(root, ShardsConfig(pcs=6, shard_size=16, formats=("zarr",)), progress=False)
    return root


def test_the_same_pca_gives_the_same_png_bytes(tmp_path: Path) -> None:
    ratio = np.linspace(2, 1, 40) / np.linspace(2, 1, 40).sum()
    fig = explained_variance_figure(ratio, 40, k=32)
    bars = fig.axes[0].patches
    assert len(bars) == 32 and bars[0].get_height() == pytest.approx(ratio[0])
    assert fig.axes[1].lines[0].get_ydata()[-1] == pytest.approx(ratio[:32].sum())  # the cumulative line
    a, b = save_png(fig, tmp_path / "a.png"), save_png(explained_variance_figure(ratio, 40, k=32), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()  # no version or time in the metadata: equal PCAs, equal files


def test_channel_values_scale_the_latents_as_training_does(data: Path) -> None:
    import zarr

    values = channel_values(data)
    assert values is not None and values.images == "all 48 images of the shards"  # not "the first 512"
    groups = values.groups
    (latent_name, latents, latent_names), (pc_name, pcs, pc_names) = groups
    info = json.loads((data / "shards" / "shards.json").read_text())
    store = zarr.open_group(data / "shards" / "samples.zarr", mode="r")
    norm = info["latent_norm"]  # SD-VAE's config: z' = (z − 0) · 0.18215
    first = (np.asarray(store["moments"][0, 0], np.float64) - norm["shift"][0]) * norm["scale"][0]  # (h, h)
    assert latents.shape == (48 * 4 * 4, 4) and latent_names == ["c0", "c1", "c2", "c3"] and "0.18215" in latent_name
    assert np.allclose(latents[: 16, 0], first.ravel())  # image 0's channel 0, row-major
    assert pcs.shape == (48 * 2 * 2, 6) and pc_names == ["1", "2", "3", "4", "5", "6"] and pc_name == "PC"
    fig = histograms_figure(groups, "t")
    assert len(fig.axes) == 4 + 6  # one panel per channel
    assert sum(p.get_height() for p in fig.axes[0].patches) == len(latents)  # every value counted, tails included


def test_curves_plot_losses_on_a_log_scale_and_fid_against_images_seen() -> None:
    rows = [{"step": s, "loss": 2.0 / s, "vae": 1.0 / s, "pcs": 1.5 / s, "grad_norm": 0.5, "images_per_s": 100.0}
            for s in range(10, 110, 10)]
    rows += [{"step": 50, "fid": 80.0, "card": {"num_samples": 16, "sampler": "ode", "steps": 50,
                                                  "guidance": {"mode": "rg"}}}, {"step": 100, "fid": 60.0}]
    fig = curves_figure(rows, batch_sizes=[(0, 256)], loss_terms=LOSS_TERMS, title="t")
    losses, grad, speed, fid = fig.axes[:4]
    assert [line.get_label() for line in losses.lines] == ["loss", "vae", "pcs"]
    assert losses.get_yscale() == grad.get_yscale() == "log" and speed.get_yscale() == "linear"
    assert list(fid.lines[0].get_xdata()) == [50, 100] and list(fid.lines[0].get_ydata()) == [80.0, 60.0]
    assert "16 samples, ode 50 steps, guidance rg" in fid.get_title()
    fig.draw_without_rendering()  # lays out the secondary axes
    top = losses.child_axes[0]  # the secondary axis: images seen = step × batch
    assert top.get_xlabel() == "images seen" and top.get_xlim() == pytest.approx(tuple(256 * x for x in losses.get_xlim()))


def test_images_seen_count_each_stretch_at_its_own_batch_size() -> None:
    """A run resumed at step 6 with batch 16 after batch 8, then at step 10 with batch 4: the top axis counts
    6 × 8 + 4 × 16 images at step 10, and maps back."""
    images, steps = images_seen([(0, 8), (6, 16), (10, 4)])
    at = np.array([-2, 0, 3, 6, 8, 10, 12])
    seen = np.array([-16, 0, 24, 48, 80, 112, 120])
    assert np.array_equal(images(at), seen) and np.allclose(steps(seen), at)
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 13)]
    fig = curves_figure(rows, batch_sizes=[(0, 8), (6, 16), (10, 4)], loss_terms=LOSS_TERMS, title="t")
    fig.draw_without_rendering()
    losses = fig.axes[0]
    assert losses.child_axes[0].get_xlim() == pytest.approx(tuple(images(np.array(losses.get_xlim()))))
    assert not curves_figure(rows, batch_sizes=None, loss_terms=LOSS_TERMS, title="t").axes[0].child_axes  # unknown


def test_curves_draw_every_loss_term_a_signed_one_on_a_symmetric_log_scale() -> None:
    """REPA's alignment loss is a negative cosine: a log axis would drop it."""
    rows = [{"step": s, "loss": 1.0 / s - 0.5, "vae": 1.0 / s, "repa": -0.9 + 1.0 / s} for s in range(10, 110, 10)]
    losses = curves_figure(rows, batch_sizes=[(0, 16)], loss_terms=LOSS_TERMS, title="t").axes[0]
    assert [line.get_label() for line in losses.lines if not line.get_label().startswith("_")] == ["loss", "vae", "repa"]
    repa = losses.lines[2]
    assert list(repa.get_ydata()) == [r["repa"] for r in rows]  # every point, negative ones included
    assert losses.get_yscale() == "symlog" and "signed" in losses.get_title()


def test_info_draws_a_data_roots_pictures_and_a_runs_curves(data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["info", str(data)])
    assert result.exit_code == 0, result.output
    for name in (PLOT_FILE, HISTOGRAMS_PNG):
        assert f"plot: {data / name}" in " ".join(result.output.split()).replace(" ", "") or name in result.output
        with Image.open(data / name) as img:
            assert img.format == "PNG" and img.size[0] > 600
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"batch_size": 8, "model": "SiT-debug", "method": "redi"}}))
    empty = CliRunner().invoke(app, ["info", str(run)])
    assert empty.exit_code == 0 and not (run / CURVES_PNG).exists()  # nothing logged yet: no picture
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 1.0}) + "\n"
                                               for s in (1, 2, 3)))
    drawn = CliRunner().invoke(app, ["info", str(run)])
    assert drawn.exit_code == 0 and CURVES_PNG in drawn.output
    with Image.open(run / CURVES_PNG) as img:
        assert img.format == "PNG" and img.size == (1200, 750)


def test_info_draws_a_picture_again_only_when_what_it_shows_changed(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_free: Callable[[list[str]], bool]) -> None:
    """Each PNG is stamped with the digest of its inputs: a rerun leaves a current one alone (no figure drawn, the
    file untouched) and draws one whose input changed."""
    import redi.common.plots as plots
    from redi.common.stamp import picture_stamp

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"batch_size": 8, "model": "SiT-debug", "method": "repa"}}))
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "repa": -0.5}) + "\n" for s in (1, 2)))
    for root in (data, run):
        assert CliRunner().invoke(app, ["info", str(root)]).exit_code == 0
    pictures = [data / PLOT_FILE, data / HISTOGRAMS_PNG, run / CURVES_PNG]
    drawn = {p: (p.stat().st_mtime_ns, picture_stamp(p)) for p in pictures}
    assert all(stamp for _, stamp in drawn.values())

    def no_drawing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a current picture was drawn again")

    monkeypatch.setattr(plots, "save_png", no_drawing)
    for root in (data, run):
        result = CliRunner().invoke(app, ["info", str(root)])
        assert result.exit_code == 0 and "plot:" in result.output, result.output
    assert torch_free(["info", str(data)])
    assert {p: (p.stat().st_mtime_ns, picture_stamp(p)) for p in pictures} == drawn
    monkeypatch.undo()
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.2, "repa": -0.6}) + "\n")  # a new line: the curves change
    assert CliRunner().invoke(app, ["info", str(run)]).exit_code == 0
    assert picture_stamp(run / CURVES_PNG) not in (None, drawn[run / CURVES_PNG][1])

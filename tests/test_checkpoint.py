"""Checkpoints written by older redi versions keep loading, resuming and sampling (tests/fixtures/README.md)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.loader import make_stage_inputs
from pipeline.shards import ShardsConfig, build_shards
from sampler.sample import SampleConfig, read_checkpoint, run_sample
from trainer.checkpoint import list_checkpoints
from trainer.config import TrainConfig
from trainer.metrics import read_metrics
from trainer.models import ModelConfig
from trainer.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "run-v0"
STEP = 2


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A copy of the run directory written at commit 5cb68c9, and its shards rebuilt from the same seed."""
    data = tmp_path / "data"
    make_stage_inputs(data, 32, latent_side=8, grid=4, dim=16, num_classes=4)
    build_shards(data, ShardsConfig(pcs=6, shard_size=16, formats=("zarr",)), progress=False)
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def test_old_checkpoint_loads(old_run: Path) -> None:
    ckpt = read_checkpoint(old_run / "checkpoints" / f"step-{STEP:07d}.pt", "ema")
    assert ckpt.step == STEP and ckpt.train["method"] == "redi" and ckpt.rep_drop == 0.2
    assert ckpt.model_config == ModelConfig(size="debug", objective="sit", input_size=8, vae_channels=4, pca_rank=4,
                                            num_classes=4, repa_dim=16)
    assert ckpt.shards["vae"]["kind"] == "tiny-random" and ckpt.shards["latent_shape"] == [4, 8, 8]


def test_old_run_resumes(old_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(shards=str(tmp_path / "data"), run=str(old_run), model="SiT-debug", method="redi", pca_rank=4,
                      batch_size=8, max_steps=4, log_every=1, save_every=2, num_workers=0, seed=3, lr=1e-3)
    result = train(cfg, device="cpu")
    assert result.steps_run == STEP and [s for s, _ in list_checkpoints(old_run)] == [2, 4]
    assert [r["step"] for r in read_metrics(old_run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_old_checkpoint_samples(old_run: Path, tmp_path: Path) -> None:
    result = run_sample(SampleConfig(ckpt=old_run / "checkpoints" / f"step-{STEP:07d}.pt", out=tmp_path / "out",
                                     num=2, steps=2, batch_size=2, guidance="cfg+rg", device="cpu"))
    assert result.assembled and result.has_pcs and result.work.images == 2
    assert (tmp_path / "out" / "samples.npz").is_file()

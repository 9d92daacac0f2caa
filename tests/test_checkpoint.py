"""Checkpoints written by older redi versions keep loading, resuming and sampling (tests/fixtures/README.md)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from redi.benchmarks.loader import make_stage_inputs
from redi.common.errors import UserError
from faults import same_value
from redi.pipeline.pca_file import PCAModel, load_pca
from redi.pipeline.shards import ShardsConfig, build_shards
from redi.sampler.config import SampleConfig
from redi.sampler.sample import run_sample
from redi.trainer.checkpoint import CONFIG_JSON, Checkpoint, RunConfig, list_checkpoints
from redi.trainer.config import TrainConfig
from redi.trainer.metrics import read_metrics
from redi.trainer.models import ModelConfig
from redi.trainer.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "run-v0"
STEP = 2


def rebuild_shards(data: Path, pca: PCAModel) -> None:
    """The fixture's shards rebuilt under `data`: its synthetic latents and features (numpy's seeded generator gives the
    same values on every machine) projected with `pca`."""
    make_stage_inputs(data, 32, latent_side=8, grid=4, dim=16, num_classes=4)
    pca.save(data / "pca.safetensors")  # in place of the one make_stage_inputs fitted here
    build_shards(data, ShardsConfig(pcs=6, shard_size=16, formats=("zarr",)), progress=False)


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A copy of the run directory written at commit 5cb68c9, and its shards rebuilt with the PCA it trained on (the
    run's copy): a PCA fitted again has other last bits on another CPU (LAPACK's QR), so other bytes."""
    rebuild_shards(tmp_path / "data", load_pca(FIXTURE / "pca.safetensors"))
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def test_old_checkpoint_and_config_load(old_run: Path) -> None:
    ckpt = Checkpoint.load(old_run / "checkpoints" / f"step-{STEP:07d}.pt")
    assert ckpt.step == STEP and ckpt.train["method"] == "redi" and ckpt.rep_drop == 0.2  # its `config`
    assert ckpt.model_config == ModelConfig(size="debug", objective="sit", input_size=8, vae_channels=4, pca_rank=4,
                                            num_classes=4, repa_dim=16)
    assert ckpt.shards.vae["kind"] == "tiny-random" and ckpt.shards.latent_shape == [4, 8, 8]
    assert ckpt.opt is not None and ckpt.origin is None and ckpt.sha256 == (old_run / "checkpoints" / (
        f"step-{STEP:07d}.pt.sha256")).read_text().split()[0]
    config = RunConfig.load(old_run)  # its `model`
    assert (config.train, config.model_config, config.shards) == (ckpt.train, ckpt.model_config, ckpt.shards)


def test_a_checkpoint_round_trips_under_config_json_names(old_run: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint.load(old_run / "checkpoints" / f"step-{STEP:07d}.pt")
    ckpt.save(tmp_path / "again.pt")
    raw = torch.load(tmp_path / "again.pt", weights_only=True)
    assert {"train", "model_config", "shards"} <= raw.keys() and "config" not in raw
    same_value(Checkpoint.load(tmp_path / "again.pt").to_state(), ckpt.to_state())
    RunConfig.load(old_run).save(tmp_path)
    assert {"train", "model_config", "shards"} <= json.loads((tmp_path / CONFIG_JSON).read_text()).keys()
    with pytest.raises(UserError, match="not a `redi train` checkpoint"):
        torch.save({"model": ckpt.model}, tmp_path / "weights.pt")
        Checkpoint.load(tmp_path / "weights.pt")


def test_old_run_resumes(old_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(shards=str(tmp_path / "data"), run=str(old_run), model="SiT-debug", method="redi", pca_rank=4,
                      batch_size=8, max_steps=4, log_every=1, save_every=2, num_workers=0, seed=3, lr=1e-3)
    result = train(cfg, device="cpu")
    assert result.steps_run == STEP and [s for s, _ in list_checkpoints(old_run)] == [2, 4]
    assert [r["step"] for r in read_metrics(old_run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "model_config" in json.loads((old_run / CONFIG_JSON).read_text())  # rewritten in today's names


def test_old_run_refuses_shards_whose_pca_differs_in_a_last_bit(old_run: Path, tmp_path: Path) -> None:
    """Shards built on another machine with a PCA fitted there (one ulp apart): a run is resumed on the bytes it trained
    on, so this is one sentence naming what differs, not a resume on other PCs."""
    pca = load_pca(FIXTURE / "pca.safetensors")
    components = pca.components.copy()
    components[0, 0] = np.nextafter(components[0, 0], np.inf)
    rebuild_shards(tmp_path / "elsewhere", dataclasses.replace(pca, components=components))
    cfg = TrainConfig(shards=str(tmp_path / "elsewhere"), run=str(old_run), model="SiT-debug", method="redi", pca_rank=4,
                      batch_size=8, max_steps=4, num_workers=0, seed=3, lr=1e-3)
    with pytest.raises(UserError) as refusal:
        train(cfg, device="cpu")
    message = str(refusal.value)
    assert "trained on other data" in message and "(pca_sha256 differ)" in message and message.count(". ") == 0
    assert [s for s, _ in list_checkpoints(old_run)] == [STEP]


def test_old_checkpoint_samples(old_run: Path, tmp_path: Path) -> None:
    result = run_sample(SampleConfig(ckpt=old_run / "checkpoints" / f"step-{STEP:07d}.pt", out=tmp_path / "out",
                                     num=2, steps=2, batch_size=2, guidance="cfg+rg", device="cpu"))
    assert result.assembled and result.has_pcs and result.work.images == 2
    assert (tmp_path / "out" / "samples.npz").is_file()

"""The whole chain learns its data: images → encode → features → pca → shards (with their latent normalisation) →
train → sample (the inverse normalisation) gives PCs and latents far closer to the training ones than the untrained
network's (FD-PC and FD-latent, docs/METHOD.md), seeded and small (64 px: 8×8 latents, 4×4 tokens)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from redi.benchmarks.loader import make_stage_inputs
from redi.cli import app
from redi.pipeline.encoders import VAE as VAE_FAMILY
from redi.pipeline.encoders import random_init
from redi.pipeline.latent_norm import ChannelStats
from redi.pipeline.shards import ShardsConfig, build_shards
from redi.pipeline.vaes import tiny_flux_config
from redi.pipeline.shard_info import read_shard_info
from redi.sampler.guidance import GuidanceConfig
from redi.sampler.learning import TrainingSet, score_checkpoint
from redi.sampler.pc_metrics import score_pcs
from redi.sampler.sample import untrained_weights
from redi.sampler.samplers import make_noise, sample_latents
from redi.trainer.checkpoint import Checkpoint, newest_checkpoint
from redi.trainer.config import TrainConfig
from redi.trainer.models import ModelConfig, ModelOutput
from redi.trainer.objectives import prepare_batch
from redi.trainer.train import train

R = ["--resolution", "64", "--workers", "0", "--batch-size", "16", "--chunk-size", "32"]
NUM_IMAGES = 64


def redi(*args: str | Path) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"redi {' '.join(map(str, args))}\n{result.output}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("learn") / "images"
    redi("demo-data", "--out", out, "--num", NUM_IMAGES)
    return out


def data_root(images: Path, vae: str, latent_norm: str) -> Path:
    data = images.parent / f"data-{Path(vae).name.replace(':', '-')}-{latent_norm}"
    redi("encode", images, "--data", data, "--vae", vae, "--with-features", "--encoder", "tiny-random", *R)
    redi("pca", "--data", data)
    redi("shards", "--data", data, "--pcs", "4", "--shard-size", "32", "--latent-norm", latent_norm)
    return data


@pytest.fixture(scope="module")
def sd_config(images: Path) -> Path:
    """SD-VAE's latent space (4 channels, its config's scale 0.18215)."""
    return data_root(images, "tiny-random", "config")


@pytest.fixture(scope="module")
def flux_channel(images: Path) -> Path:
    """FLUX.1's latent space (16 channels) whose every channel has its own mean (−3…3) and scale (0.1…4), normalised by
    the measured per-channel statistics: far from the identity, so that the inverse has work to do."""
    vae = random_init(VAE_FAMILY, tiny_flux_config(), seed=0)
    mean_out = slice(0, vae.config.latent_channels)  # the encoder's conv_out gives the posterior means, then log-variances
    with torch.no_grad():
        vae.encoder.conv_out.weight[mean_out] *= torch.logspace(math.log10(0.5), math.log10(20), vae.config.latent_channels).view(-1, 1, 1, 1)
        vae.encoder.conv_out.bias[mean_out] = torch.linspace(-3, 3, vae.config.latent_channels)
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -4.0  # posterior std ≈ e^−2
    vae.save_pretrained(images.parent / "flux-shifted")
    return data_root(images, str(images.parent / "flux-shifted"), "channel")


@pytest.mark.parametrize("model,method,sampler,latents,steps", [
    ("SiT-debug", "redi", "ode", "sd_config", 400),
    ("SiT-debug", "baseline", "ode", "sd_config", 300),
    ("DiT-debug", "redi", "ddpm", "sd_config", 600),
    ("SiT-debug", "redi", "ode", "flux_channel", 400),
])
def test_training_brings_generated_pcs_and_latents_to_the_data(model: str, method: str, sampler: str, latents: str,
                                                               steps: int, request: pytest.FixtureRequest,
                                                               tmp_path: Path) -> None:
    data = request.getfixturevalue(latents)
    cfg = TrainConfig(shards=str(data), run=str(tmp_path / "run"), model=model, method=method, pca_rank=4,
                      batch_size=16, max_steps=steps, lr=3e-3, ema_decay=0.98, seed=0, num_workers=0,
                      save_every=steps, log_every=steps, tracker="none", sample_every=0)
    train(cfg, device="cpu")
    ckpt, training = Checkpoint.load(newest_checkpoint(tmp_path / "run")), TrainingSet.read(str(data))
    sampling = {"num": 64, "sampler": sampler, "steps": 25 if sampler == "ode" else 50}
    before, after = (score_checkpoint(ckpt, w, training, **sampling) for w in ("init", "ema"))
    data_stats = ChannelStats(ckpt.model_config.vae_channels)
    data_stats.update(training.moments)
    data_mean, data_std = np.array(data_stats.norm().shift), 1 / np.array(data_stats.norm().scale)  # (C,) each
    # the sampler's inverse normalisation brings the latents back to the VAE's own per-channel means and scales (a
    # missing or wrong inverse misses them by the normalisation's factors: 5.5 for SD-VAE's config, 0.1…4 above)
    mean, std = np.array(after.latent_mean), np.array(after.latent_std)  # (C,) each
    assert (np.abs(mean - data_mean) <= 0.5 * data_std).all() and (abs(np.log(std / data_std)) <= np.log(2)).all(), (
        mean, data_mean, std, data_std)
    if method == "redi":
        # SiT's untrained network generates its N(0, 1) noise; DiT's blows it up: both bounds, for both
        noise = score_pcs(torch.randn(64, 4, *ckpt.model_config.input_size * np.ones(2, int)), training.pcs).fd_pc
        assert after.fd_pc <= min(before.fd_pc, noise) / 3, (before, after, noise)
        assert after.nearest.closer_than_noise, after.nearest
    else:  # the latents are what it generates: with the config's scale the untrained network's are far off
        assert after.fd_pc is None and after.fd_latent <= before.fd_latent / 3, (before, after)


def test_weights_init_rebuilds_the_runs_untrained_network_projector_included(tmp_path: Path) -> None:
    """One step at learning rate 0 leaves the network as it was drawn: --weights init must give those weights back."""
    data = tmp_path / "data"
    make_stage_inputs(data, 16, latent_side=8, grid=4, dim=16, num_classes=4)
    build_shards(data, ShardsConfig(pcs=4, patch_tokens=True, shard_size=16), progress=False)
    cfg = TrainConfig(shards=str(data), run=str(tmp_path / "run"), model="SiT-debug", method="redi+repa", pca_rank=4,
                      batch_size=4, max_steps=1, lr=0.0, seed=7, num_workers=0, tracker="none", sample_every=0)
    train(cfg, device="cpu")
    ckpt = Checkpoint.load(newest_checkpoint(tmp_path / "run"))
    rebuilt = untrained_weights(ckpt)
    assert rebuilt.keys() == ckpt.model.keys() and any(k.startswith("projector.") for k in rebuilt)
    assert all(torch.equal(rebuilt[k], ckpt.model[k]) for k in rebuilt)
    other = TrainConfig(**(cfg.to_json() | {"run": str(tmp_path / "other"), "seed": 8}))
    train(other, device="cpu")
    assert not torch.equal(untrained_weights(Checkpoint.load(newest_checkpoint(tmp_path / "other")))["x_embedder.proj.weight"],
                           rebuilt["x_embedder.proj.weight"])


def test_eval_against_a_data_root_reports_fd_pc_before_and_after(pipeline: dict, tmp_path: Path) -> None:
    run, data, samples = pipeline["ref_run"], pipeline["ref_data"], pipeline["ref_samples"]
    untrained = tmp_path / "untrained"
    redi("sample", "--run", run, "--weights", "init", "--sampler", "ode", "--steps", "3", "--num", "6", "--out", untrained)
    result = CliRunner().invoke(app, ["eval", str(samples), "--ref", str(data), "--before", str(untrained), "--out",
                                      str(tmp_path / "pcs.json"), "--window", "2"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "FD-PC" in result.output and "--before" in result.output
    report = json.loads((tmp_path / "pcs.json").read_text())
    kept = np.stack([np.load(p) for p in sorted((samples / "pcs").glob("*.npy"))])  # (n, r, h, h)
    training = TrainingSet.read(str(data))
    assert report["metrics"]["fd_pc"] == pytest.approx(score_pcs(kept, training.pcs, 2).fd_pc)
    # a SiT network's zero output layer leaves its initial noise as it is: the untrained samples are that noise
    channels = Checkpoint.load(newest_checkpoint(run)).model_config.in_channels
    noise = make_noise(0, torch.arange(6), (channels, *kept.shape[2:]), "cpu")[:, channels - kept.shape[1]:]  # (6, r, h, h)
    assert report["scores"]["before"]["num_generated"] == 6
    assert all(np.array_equal(np.load(untrained / "pcs" / f"{i:06d}.npy"), noise[i].numpy()) for i in range(6))
    npz = str(samples / "samples.npz")
    for args, says in ((["eval", str(samples), "--ref", str(data), "--window", "9"], "window does not fit"),
                       (["eval", npz, "--ref", npz, "--before", str(untrained)], "pass a data root")):
        bad = CliRunner().invoke(app, args)
        assert bad.exit_code == 2 and says in " ".join(bad.output.split()), bad.output


class EmpiricalDenoiser(torch.nn.Module):
    """The exact velocity field of a finite set of joint latents X (M, C, h, h): v = (x_t − E[x0 | x_t]) / t, the
    posterior mean a softmax over the points (a perfectly trained SiT memorises them)."""

    def __init__(self, cfg: ModelConfig, points: torch.Tensor):
        super().__init__()
        self.cfg, self.points = cfg, points
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # GuidedModel reads a parameter's dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls: torch.Tensor | None = None) -> ModelOutput:
        s = float(t[0])
        d = ((x[:, None] - (1 - s) * self.points[None]) ** 2).flatten(2).sum(-1)  # (N, M)
        x0 = torch.einsum("nm,mchw->nchw", torch.softmax(-d / (2 * s * s), dim=1), self.points)  # (N, C, h, h)
        return ModelOutput(out=(x - x0) / s, cls_out=None, repa=None)


def test_the_exact_denoiser_of_the_training_set_samples_the_training_pcs(sd_config: Path) -> None:
    """The sampler and the PC metrics around a perfect model: sampling the exact velocity field of the shards' own
    joint latents (the trainer's normalisation and PC upsampling) lands on training points, whose FD-PC is that of the
    training set against itself and whose nearest training PCs are at distance 0."""
    training = TrainingSet.read(str(sd_config))
    info = read_shard_info(str(sd_config / "shards"))
    x0 = prepare_batch(torch.from_numpy(training.moments), torch.from_numpy(training.pcs), 4, info.latent_norm,
                       torch.Generator().manual_seed(0))  # (M, C + 4, h, h)
    cfg = ModelConfig(size="debug", objective="sit", input_size=x0.shape[-1], vae_channels=info.latent_shape[0],
                      pca_rank=4, num_classes=info.num_classes)
    x, _, _ = sample_latents(EmpiricalDenoiser(cfg, x0).eval(), torch.zeros(32, dtype=torch.long), torch.arange(32), 0,
                             "ode", 50, GuidanceConfig(), latent_size=x0.shape[-1])
    score = score_pcs(x[:, cfg.vae_channels:].numpy(), training.pcs)
    assert score.nearest.generated < 1e-3 * score.nearest.training, score.nearest
    # 32 training maps against all 64 on a 4×4 token grid: 16.6 (the sampling floor), noise 146
    assert score.fd_pc < 0.2 * score_pcs(torch.randn(x.shape)[:, cfg.vae_channels:].numpy(), training.pcs).fd_pc

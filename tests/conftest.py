"""Shared test set-up: one thread per test process (the CI machine has 2 cores)."""
import os
import subprocess
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every command's uninterrupted output on a tiny image set (tests/faults.py), for the fault-injection tests."""
    from faults import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic stages (latent 8×8: 64×64 images through the tiny-random VAE, 4×4 tokens of width 16, 4 classes, 64
    samples) and their Zarr shards, without patch tokens."""
    from redi.benchmarks.loader import make_stage_inputs
    from redi.pipeline.shards import ShardsConfig, build_shards

    root = tmp_path_factory.mktemp("small-shards")
    make_stage_inputs(root, 64, latent_side=8, grid=4, dim=16, num_classes=4)
    build_shards(root, ShardsConfig(pcs=6, shard_size=32, formats=("zarr",)), progress=False)
    return root


def _torch_free(args: list[str]) -> bool:
    """Whether a fresh process runs `redi ARGS` to exit 0 without importing torch (seconds of CPU); it must exit 0."""
    script = ("import sys; from typer.testing import CliRunner; from redi.cli import app; "
              f"r = CliRunner().invoke(app, {args!r}); print(r.exit_code, 'torch' in sys.modules, r.output)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("0 "), done.stdout + done.stderr
    return done.stdout.startswith("0 False")


@pytest.fixture
def torch_free() -> Callable[[list[str]], bool]:
    """`torch_free(ARGS)`: `redi ARGS` ran in a fresh process without importing torch (commands that only read
    records: `info` and `preview` with their pictures current)."""
    return _torch_free

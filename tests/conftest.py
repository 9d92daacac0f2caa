"""Shared test set-up: one thread per test process (the CI machine has 2 cores)."""
import os

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

"""The `redi` command surface: every command has help, bad input is one sentence and exit 2."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app

COMMANDS = ("demo-data", "encode", "features", "pca", "shards", "verify", "info", "train", "sample", "eval",
            "convert", "import-repa", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_defaults(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bench_rejects_an_unknown_target() -> None:
    result = CliRunner().invoke(app, ["bench", "nonsense"])
    assert result.exit_code == 2 and "Unknown benchmark" in result.output


def test_bench_quick_loader_prints_measured_figures_as_json() -> None:
    result = CliRunner().invoke(app, ["bench", "loader", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{"):])["loader"]
    assert figures["zarr_samples_per_s"] > 0 and figures["wds_samples_per_s"] > 0

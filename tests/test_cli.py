"""The `redi` command surface: every command has help, bad input is one sentence and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

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


def test_messages_keep_brackets_and_bracketed_paths_are_paths(tmp_path: Path) -> None:
    from pipeline.demo_data import write_demo_images

    folder = tmp_path / "set[1]"
    write_demo_images(folder, 3)
    result = CliRunner().invoke(app, ["encode", str(folder), "--data", str(tmp_path / "d"), "--vae", "tiny-random",
                                      "--workers", "0", "--resolution", "64"])
    assert result.exit_code == 0, result.output  # an existing folder, not a glob
    result = CliRunner().invoke(app, ["encode", str(tmp_path / "[bold]nope"), "--data", str(tmp_path / "d2")])
    assert result.exit_code == 2 and "[bold]nope" in result.output

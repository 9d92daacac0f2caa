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


def _sentence(args: list[str]) -> str:
    """Run a command that must be refused: exit 2, one `error:` sentence, no traceback; the sentence."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_impossible_flags_and_a_wrong_encoder_are_one_sentence(tmp_path: Path) -> None:
    import torch

    from pipeline.demo_data import write_demo_images
    from pipeline.encoders import tiny_vae_config

    train = ["train", "--shards", str(tmp_path), "--run", str(tmp_path / "run"), "--model", "SiT-debug"]
    assert "--epochs must be a finite positive number" in _sentence([*train, "--epochs", "inf"])
    assert "not a torch device" in _sentence([*train, "--device", "tpu"])
    if not torch.cuda.is_available():
        assert "torch sees no CUDA device" in _sentence([*train, "--device", "cuda"])
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **tiny_vae_config()}))
    images = write_demo_images(tmp_path / "images", 2).out
    said = _sentence(["features", str(images), "--data", str(tmp_path / "d"), "--encoder", str(tmp_path / "vae")])
    assert "'AutoencoderKL' model" in said and "supported encoder families" in said


def test_paths_with_markup_are_printed_as_they_are(tmp_path: Path) -> None:
    """A data root named `x[/]` or `y[red]` is a path, not rich markup (no MarkupError, nothing vanishes)."""
    from pipeline.demo_data import write_demo_images

    images = write_demo_images(tmp_path / "images", 2).out
    for name in ("x[/]", "y[red]"):
        data = tmp_path / name / "data"
        args = ["encode", str(images), "--data", str(data), "--vae", "tiny-random", "--workers", "0", "--resolution", "32"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and name in "".join(result.output.split()), result.output
        result = CliRunner().invoke(app, ["verify", str(data)])
        assert result.exit_code == 0 and f"{name}/data:everystage" in "".join(result.output.split()), result.output

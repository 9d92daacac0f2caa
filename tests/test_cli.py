"""The `redi` command surface: every command has help, bad input is one sentence and exit 2."""
from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from redi.cli import app
from redi.common.vocabulary import hidden_names

COMMANDS = ("demo-data", "encode", "features", "pca", "shards", "verify", "info", "train", "sample", "eval",
            "convert", "convert-encoder", "import-repa", "bench", "publish", "preview")


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
    from redi.pipeline.demo_data import write_demo_images

    folder = tmp_path / "set[1]"
    write_demo_images(folder, 3)
    result = CliRunner().invoke(app, ["encode", str(folder), "--data", str(tmp_path / "d"), "--vae", "tiny-random",
                                      "--workers", "0", "--resolution", "64"])
    assert result.exit_code == 0, result.output  # an existing folder, not a glob
    result = CliRunner().invoke(app, ["encode", str(tmp_path / "[bold]nope"), "--data", str(tmp_path / "d2")])
    assert result.exit_code == 2 and "[bold]nope" in result.output


def test_an_error_naming_a_long_path_is_one_unbroken_line(tmp_path: Path) -> None:
    """A refusal is never wrapped at the terminal's width: its paths stay whole, to copy into the next command."""
    missing = tmp_path / ("a-folder-long-enough-that-its-path-cannot-fit-on-one-line-of-80-columns" * 2) / "images"
    result = CliRunner().invoke(app, ["encode", str(missing), "--data", str(tmp_path / "d")], env={"COLUMNS": "80"})
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and str(missing) in lines[0], result.output


@pytest.mark.parametrize("args", [["train", "--shards", "data", "--run", "s3://bucket/run"],
                                  ["sample", "--run", "run", "--out", "http://host/samples"],
                                  ["preview", "data", "--out", "gs://bucket/preview.png"],
                                  ["eval", "samples.npz", "--ref", "ref.npz", "--out", "s3://bucket/report.json"],
                                  ["demo-data", "--out", "s3://bucket/images"]])
def test_a_url_where_a_command_writes_a_local_path_is_one_sentence(args: list[str], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL given for a path on this machine is refused before anything runs: never a folder named `s3:`."""
    monkeypatch.chdir(tmp_path)
    said = _sentence(args)
    assert "is a URL" in said and args[-1] in said and list(tmp_path.iterdir()) == []


def _sentence(args: list[str]) -> str:
    """Run a command that must be refused: exit 2, one `error:` sentence, no traceback; the sentence."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_impossible_flags_and_a_wrong_encoder_are_one_sentence(tmp_path: Path) -> None:
    import torch

    from redi.pipeline.demo_data import write_demo_images
    from redi.pipeline.vaes import tiny_sd_config

    train = ["train", "--shards", str(tmp_path), "--run", str(tmp_path / "run"), "--model", "SiT-debug"]
    assert "not a torch device" in _sentence([*train, "--device", "tpu"])
    if not torch.cuda.is_available():
        assert "torch sees no CUDA device" in _sentence([*train, "--device", "cuda"])
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **tiny_sd_config()}))
    images = write_demo_images(tmp_path / "images", 2).out
    said = _sentence(["features", str(images), "--data", str(tmp_path / "d"), "--encoder", str(tmp_path / "vae")])
    assert "'AutoencoderKL' model" in said and "supported encoder families" in said


def test_paths_with_markup_are_printed_as_they_are(tmp_path: Path) -> None:
    """A data root named `x[/]` or `y[red]` is a path, not rich markup (no MarkupError, nothing vanishes)."""
    from redi.pipeline.demo_data import write_demo_images

    images = write_demo_images(tmp_path / "images", 2).out
    for name in ("x[/]", "y[red]"):
        data = tmp_path / name / "data"
        args = ["encode", str(images), "--data", str(data), "--vae", "tiny-random", "--workers", "0", "--resolution", "32"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and name in "".join(result.output.split()), result.output
        result = CliRunner().invoke(app, ["verify", str(data)])
        assert result.exit_code == 0 and f"{name}/data:everystage" in "".join(result.output.split()), result.output


def _command(name: str) -> Any:
    """The click command `redi NAME` runs (a config command's flags built)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("redi", [name], resilient_parsing=True)
    return group.resolve_command(ctx, [name])[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_at_80_columns(command: str) -> None:
    """Every flag name whole (no "…"), and at least 30 columns left for every description."""
    text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}).output
    assert max(map(len, text.splitlines())) <= 80 and "SPEC" not in text
    shown = set(re.findall(r"(?<![\w-])--?[\w-]+\w", text))
    for param in _command(command).params:
        if param.param_type_name == "option":
            hidden = param.default is False  # a flag's --no-x that restates its default is left out
            names = set(param.opts) - hidden_names(param.opts)  # an old spelling parses but is not shown
            assert names | (set() if hidden else set(param.secondary_opts)) <= shown, (param.opts, text)
    rows = re.findall(r"^│ (?:\*  | {3})?-[-\w,]+(?: +-\w)? +(?:(?:<[^>]+>|[A-Z][A-Z_]*) +)?(?=\S)", text, re.MULTILINE)
    assert rows and all(len(row) <= 80 - 2 - 30 for row in rows), [row for row in rows if len(row) > 48]


def test_version_is_the_packages() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"redi {importlib.metadata.version('redi')}\n"


@pytest.mark.parametrize(("args", "choices"), [
    (["train", "--shards", ".", "--run", ".", "--method", "redii"], "'baseline', 'redi', 'repa', 'reg', 'redi+repa'"),
    (["sample", "--run", ".", "--guidance", "cgf"], "'none', 'cfg', 'rg', 'cfg+rg'"),
    (["shards", "--format", "tar"], "'zarr', 'wds', 'both'"),
])
def test_a_choice_typo_is_a_usage_error_listing_the_choices(args: list[str], choices: str) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and f"'{args[-1]}' is not one of {choices}" in text, result.output


def test_info_and_verify_print_results_on_stdout_and_json_with_json(pipeline: dict) -> None:
    """Tables and JSON on stdout, nothing else there: `redi info DATA > f` and `redi verify DATA --json | jq` work."""
    data, run = pipeline["ref_data"], pipeline["ref_run"]
    for picture in [*data.glob("*.png"), *run.glob("*.png")]:
        picture.unlink()
    piped = subprocess.run([sys.executable, "-m", "redi", "info", str(data), "--json"], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).parent.parent)
    info = json.loads(piped.stdout)
    assert info["kind"] == "data" and [p["name"] for p in info["parts"]] == ["latents/", "features/", "pca.safetensors", "shards/"]
    latents, shards = info["parts"][0]["contents"], info["parts"][3]
    assert type(latents["images"]) is int and type(latents["skipped images"]) is int  # numbers are numbers
    assert latents["moments"]["dtype"] == "float16" and all(type(n) is int for n in latents["moments"]["shape"])
    assert shards["status"] == "complete" and shards["contents"]["pcs"]["dtype"] == "float16"
    norm = shards["contents"]["latent norm"]  # what the trainer applies, not the VAE's `scale None, shift None`
    assert norm["kind"] == "config" and all(isinstance(v, float) for v in norm["scale"] + norm["shift"])
    assert not list(data.glob("*.png")), "--json draws nothing"
    table = CliRunner().invoke(app, ["info", str(data)], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and "shards/" in table.stdout and "…" not in table.stdout and not table.stderr
    assert "None" not in table.stdout and "z' = " in table.stdout and len(list(data.glob("*.png"))) == 2
    described = json.loads(CliRunner().invoke(app, ["info", str(run), "--json"]).stdout)
    metrics = next(p["contents"] for p in described["parts"] if p["name"] == "metrics.jsonl")
    assert described["kind"] == "run" and not list(run.glob("*.png"))
    assert isinstance(metrics["loss"], float) and type(metrics["step"]) is int and metrics["mfu"] is None
    for root, kind in ((data, "data"), (run, "run")):
        result = CliRunner().invoke(app, ["verify", str(root), "--json", "--no-deep"])
        report = json.loads(result.stdout)
        assert result.exit_code == 0 and report["kind"] == kind and report["consistent"] is True
        assert {c["status"] for c in report["checks"]} <= {"ok", "absent", "warning"}


def test_the_command_list_and_version_do_not_import_torch() -> None:
    """Commands built from configs are built when they run: `redi --help` does not wait seconds for torch."""
    code = ("import sys; from typer.testing import CliRunner; from redi.cli import app; "
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "assert CliRunner().invoke(app, ['--version']).exit_code == 0; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_summaries_at_80_columns_keep_long_paths_whole(pipeline: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A path longer than a table cell, or than a line, is printed whole: never cut with "…", never folded."""
    import shutil

    from faults import sample_args

    monkeypatch.chdir(tmp_path)
    folder = Path("a-folder-whose-name-is-longer-than-a-line-of-80-columns-" + "x" * 50)  # 106 characters
    folder.mkdir()
    (folder / "data").symlink_to(pipeline["ref_data"])
    (folder / "run").symlink_to(pipeline["ref_run"])
    shutil.copytree(pipeline["ref_samples"], folder / "samples")
    commands = {folder / "data": ["info", folder / "data"], folder / "run": ["verify", folder / "run", "--no-deep"],
                folder / "samples": ["sample", *sample_args(pipeline["ref_run"], folder / "samples")]}
    for path, args in commands.items():
        result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert str(path) in result.stdout.splitlines() or f": {path}" in result.stdout, result.stdout


# --- numeric flags: one table of ranges (the config fields' Range metadata), checked when a flag is parsed ---

def _numeric_options() -> list[tuple[str, str, Any]]:
    """(command, flag, Range) of every int or float option of every command."""
    from redi.common.flags import _in_range

    found = []
    for command in COMMANDS:
        for param in _command(command).params:
            kind = param.type_descriptor.annotation
            if param.param_type_name == "option" and kind in (int, float, int | None, float | None):
                parser = param.type_descriptor.parameter_info.parser
                assert isinstance(parser, functools.partial) and parser.func is _in_range, (command, param.opts)
                found.append((command, param.opts[0], parser.args))
    return found


NUMERIC = _numeric_options()


def _outside(bounds: Any, number: type) -> list[str]:
    """Values a flag of `bounds` must refuse: nan and inf for a float, and a number past each end."""
    values = ["nan", "inf", "-inf"] if number is float else ["1.5"]
    if bounds.lo is not None:
        values.append(str(number(bounds.lo) - 1 if number is int or not bounds.lo_open else number(bounds.lo)))
    if bounds.hi is not None:
        values.append(str(number(bounds.hi) + 1 if number is int or not bounds.hi_open else number(bounds.hi)))
    return values


def test_every_numeric_option_has_a_range() -> None:
    """The walk below covers every command; a numeric flag without a Range fails `_numeric_options` itself."""
    assert len(NUMERIC) > 60 and {c for c, _, _ in NUMERIC} >= {"train", "sample", "encode", "pca", "shards", "eval",
                                                                "demo-data", "bench", "preview", "convert"}


@pytest.mark.parametrize(("command", "flag", "rule"), NUMERIC, ids=[f"{c} {f}" for c, f, _ in NUMERIC])
def test_an_out_of_range_number_is_one_sentence_and_exit_2(command: str, flag: str, rule: Any) -> None:
    bounds, number = rule
    for value in _outside(bounds, number):
        result = CliRunner().invoke(app, [command, flag, value], env={"COLUMNS": "200"})
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "Traceback" not in said, (value, result.output)
        assert said.count("Invalid value") == 1 and re.search(rf"Invalid value for '{flag}'[^:]*: must be", said), said


@pytest.mark.parametrize(("flag", "value", "said"), [
    ("--beta1", "1", "must be a number in [0, 1), not 1."),  # were tracebacks from inside torch's AdamW
    ("--beta2", "2", "must be a number in [0, 1), not 2."),
    ("--beta1", "nan", "must be a number in [0, 1), not nan."),
    ("--weight-decay", "-1", "must be a number ≥ 0, not -1."),
    ("--weight-decay", "nan", "must be a number ≥ 0, not nan."),
    ("--keep", "-1", "must be an integer ≥ 0, not -1."),  # 0 keeps every checkpoint
    ("--epochs", "inf", "must be a number > 0, not inf."),
])
def test_optimiser_flags_out_of_range_are_refused_before_anything_runs(flag: str, value: str, said: str) -> None:
    result = CliRunner().invoke(app, ["train", "--shards", ".", "--run", ".", flag, value], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output


def test_a_config_built_in_code_is_held_to_the_same_ranges() -> None:
    from redi.common.errors import UserError
    from redi.trainer.config import TrainConfig

    with pytest.raises(UserError, match=r"^beta1 must be a number in \[0, 1\), not 1\.$"):
        TrainConfig(shards=".", run=".", beta1=1.0)

"""One name per idea across every command (common/vocabulary.py), and --help that a person can read at 80 columns:
no value placeholder on a switch, no path or URL broken or cut, and real examples at the end."""
from __future__ import annotations

import collections
import logging
import re
import shlex
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from redi.cli import EXAMPLES, app
from redi.common.vocabulary import TERMS, VOCABULARY, hidden_names


@pytest.fixture(scope="module")
def commands() -> dict[str, Any]:
    """Every command of `redi` by name (Typer's vendored click commands), config commands with their flags built."""
    group = typer.main.get_command(app)
    ctx = group.make_context("redi", ["--help"], resilient_parsing=True)
    return {name: group.resolve_command(ctx, [name])[1] for name in group.list_commands(ctx)}


def _options(commands: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(command, option, its visible name) of every option but --help."""
    found = []
    for name, command in commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                visible = [n for n in param.opts if n not in hidden_names(param.opts)]
                assert len(visible) == 1, f"redi {name}: {param.opts} are {len(visible)} visible names for one option"
                found.append((name, param, visible[0]))
    return found


def test_one_name_per_idea_in_every_command(commands: dict[str, Any]) -> None:
    options = _options(commands)
    users: dict[str, set[str]] = collections.defaultdict(set)
    for command, _, name in options:
        users[name].add(command)
    shared = {name for name, where in users.items() if len(where) > 1}
    assert not shared - set(TERMS), f"names used by several commands but not in the vocabulary: {shared - set(TERMS)}"
    single_term = collections.Counter(f for term in VOCABULARY for f in term.fields)
    for command, param, name in options:
        if name in TERMS:  # a term's name means that term: only the parameters listed as carrying it
            assert param.name in TERMS[name].fields, f"redi {command} {name} ({param.name}) is not {TERMS[name].meaning}"
        carried = [t for t in VOCABULARY if param.name in t.fields]
        if len(carried) == 1 and single_term[param.name] == 1:  # this parameter is that idea, so it has that name
            assert name == carried[0].name, f"redi {command}: {param.name} is {carried[0].name}, not {name}"


def test_old_spellings_parse_hidden_and_warned(commands: dict[str, Any],
                                               caplog: pytest.LogCaptureFixture) -> None:
    for term in VOCABULARY:
        for old in term.old:
            where = [c for c, p, name in _options(commands) if name == term.name and old in p.opts]
            assert where, f"{old} (now {term.name}) is accepted by no command"
    train = ["--shards", "data", "--run", "runs/a"]
    with caplog.at_level(logging.WARNING):
        ctx = commands["train"].make_context("train", [*train, "--num-workers", "3", "--steps=7"])
    assert ctx.params["num_workers"] == 3 and ctx.params["max_steps"] == 7
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "--num-workers is now --workers" in said and "--steps is now --max-steps" in said
    sample = commands["sample"].make_context("sample", ["--run", "runs/a", "--class-labels", "1,2"])
    assert sample.params["labels"] == "1,2"
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert "--num-workers" not in help_text and not re.search(r"(?<![\w-])--steps\b", help_text)


def test_train_flags_for_its_samples_and_evaluations_are_sample_and_eval_flags(commands: dict[str, Any]) -> None:
    names = {c: {name for command, _, name in _options(commands) if command == c} for c in ("sample", "eval")}
    for command, _, name in _options(commands):
        if command == "train" and (prefix := re.match(r"--(sample|eval)-(.+)", name)):
            which, rest = prefix.groups()
            assert rest == "every" or f"--{rest}" in names[which] | names["sample"], f"train {name}: no {which} --{rest}"


def _help_texts(command: Any) -> list[str]:
    """The prose of a command's --help: its description, every parameter's help and shown default."""
    texts = [command.help or ""]
    for param in command.params:
        texts.append(getattr(param, "help", None) or "")
        if getattr(param, "show_default", False) and param.default not in (None, False, True):
            texts.append(str(getattr(param.default, "value", param.default)))
    return texts


def _unbreakable(text: str) -> set[str]:
    """The paths, URLs, file names and hub ids in `text` (what must never be broken or cut)."""
    tokens = {t.strip(".,;:()`'\"") for t in text.split()}
    return {t for t in tokens if re.search(r"\w[/.]\w|://", t) and not t.startswith("-")}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_help_at_80_columns_keeps_paths_whole_and_ends_with_examples(name: str, commands: dict[str, Any]) -> None:
    text = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"}).output
    assert "<bool>" not in text
    for token in set().union(*map(_unbreakable, _help_texts(commands[name]))):
        assert token in text, f"redi {name} --help breaks or cuts {token!r} at 80 columns"
    tail = text[text.index("Examples:"):].splitlines()[1:]
    shown = [line.strip() for line in tail if line.strip()]
    assert shown == [line.strip() for line in EXAMPLES[name]], "every example on a line of its own, as written"
    for example in _command_lines(EXAMPLES[name]):
        words = shlex.split(example)
        words = words[words.index("redi") + 1:]  # `redi …` or `torchrun … -m redi …`
        assert words[0] == name, example
        commands[name].make_context(name, words[1:])  # parses: the flags exist and the values have their types
        assert all(len(line) <= 78 for line in EXAMPLES[name])  # the epilog's width at 80 columns: never wrapped


def _command_lines(lines: tuple[str, ...]) -> list[str]:
    """Example lines joined where one ends with a backslash."""
    joined = [""]
    for line in lines:
        joined[-1] += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            joined.append("")
    return [j.strip() for j in joined if j.strip()]


def test_group_help_shows_no_placeholder_on_switches() -> None:
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    assert "--version" in text and "<bool>" not in text

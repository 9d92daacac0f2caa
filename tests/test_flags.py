"""common/flags.py: a config dataclass's fields are a command's flags, their docstrings its help."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer
from typer.testing import CliRunner

from redi.common.flags import ConfigGroup, Flag, FromConfig, OneOf, config_command

SHAPES = ("circle", "square", "triangle-with-a-long-name")


@dataclass(frozen=True)
class Drawing:
    """A config the way redi's are written: a docstring under each field."""

    source: str
    """Where the shapes come from.

    This second paragraph is for readers of the code, not --help."""
    shape: Annotated[str, OneOf(SHAPES)] = "circle"
    """The shape to draw."""
    fill: Literal["solid", "none"] = "solid"
    """How to fill it."""
    size: int | None = None
    """Side in pixels; default: the source's."""
    outline: bool = False
    """Draw the outline."""
    centre: tuple[float, float] | None = None
    """X,Y of the centre."""
    seed: int = 0
    """Not a flag."""


seen: list[tuple[Drawing, bool]] = []
SPEC = FromConfig("test_flags:Drawing", panels={"Look": ("shape", "fill", "outline"), "Place": ("size", "centre")},
                  flags={"source": Flag(argument=True), "shape": Flag(("--form",)),
                         "centre": Flag(type=str | None, parse=lambda t: tuple(map(float, t.split(","))))},
                  skip=("seed",))


def _app() -> typer.Typer:
    app = typer.Typer(cls=ConfigGroup)

    @config_command(app, "draw", SPEC)
    def draw(cfg: Drawing, dry_run: Annotated[bool, typer.Option(help="Only say what would be drawn.")] = False) -> None:
        """Draw one shape."""
        seen.append((cfg, dry_run))

    @app.command("other")
    def other() -> None:
        """Another command, so that `draw` is a subcommand."""

    return app


def _run(*args: Any) -> Any:
    return CliRunner().invoke(_app(), [str(a) for a in args], env={"COLUMNS": "80"})


def _words(text: str) -> str:
    """Rich panel text as one line of words, whatever the wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_the_fields_are_the_flags_and_the_config_gets_plain_values() -> None:
    seen.clear()
    result = _run("draw", "here", "--form", "square", "--fill", "none", "--size", 3, "--outline", "--centre", "1,2",
                  "--dry-run")
    assert result.exit_code == 0, result.output
    assert seen == [(Drawing("here", "square", "none", 3, True, (1.0, 2.0)), True)]
    assert type(seen[0][0].shape) is str and type(seen[0][0].fill) is str  # not the flags' Enums
    assert _run("draw", "here").exit_code == 0 and seen[-1] == (Drawing("here"), False)


def test_help_is_the_docstrings_first_paragraph_grouped_in_panels() -> None:
    text = _run("draw", "--help").output
    assert "Where the shapes come from." in text and "second paragraph" not in text
    assert "Side in pixels; default: the source's." in text and "--seed" not in text
    assert text.index("Look") < text.index("--form") < text.index("Place") < text.index("--size")
    assert "<solid|none>" in text  # a short choice list is the flag's type
    assert "One of: circle, square, triangle-with-a-long-name." in _words(text)
    assert "--no-outline" not in text  # restates the default; still parses:
    assert _run("draw", "here", "--no-outline").exit_code == 0


def test_a_choice_typo_is_typers_usage_error_listing_the_choices() -> None:
    result = _run("draw", "here", "--form", "sqare")
    assert result.exit_code == 2 and "'sqare' is not one of 'circle', 'square'" in _words(result.output)


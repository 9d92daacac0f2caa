"""`redi`: one thin command per stage. Parses flags, builds a config, calls one function."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from pipeline.errors import UserError

app = typer.Typer(
    name="redi",
    help="Representation-aware latent diffusion (ReDi, REPA, REG): encode → features → pca → shards → train → sample → eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a UserError into one red sentence and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}")
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


# --- demo-data, encode, features, info ---

# --- pca ---

# --- shards, verify ---

# --- train ---

# --- sample ---

# --- eval ---

# --- bench ---


if __name__ == "__main__":
    app()

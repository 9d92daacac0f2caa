"""Command-line flags made from a config dataclass: its fields are the one source of each flag's name, type, default and help.

A field `batch_size: int = 256` with the docstring `\"\"\"Global batch over all ranks and accumulation steps.\"\"\"` becomes
`--batch-size INTEGER  Global batch over all ranks and accumulation steps. [default: 256]`. The help is the docstring's
first paragraph (a later paragraph is for readers of the code). `Annotated[str, OneOf(NAMES)]` makes the flag a str Enum
of NAMES, so --help and shell completion list them and a typo is Typer's usage error; the config still receives the
plain string, so config.json, manifests and checkpoints (read with torch.load(weights_only=True), which refuses classes
it does not know) keep today's values. `Annotated[float, Range(0, 1)]` (common/schema.py) is checked when the flag is
parsed: nan, inf or a number outside the range is Typer's usage error naming the flag (exit 2), and --help shows the
range, so the ranges of every command's numeric flags live in one table, the fields of their configs. A command says
only how its flags differ from the fields (`Flag`: another name, a positional argument, a parser) and how they are
grouped in --help (`FromConfig.panels`).

Why a small helper on Typer and not tyro (which torchtitan uses): tyro would replace Typer's parser and help for these
commands only, so `redi train --help` would look and fail unlike `redi info --help`; here every command keeps Typer's
rich help panels and usage errors and the CLI's `user_errors` wrapper.

Why lazy: a config's module imports torch and the encoders' libraries (seconds), which `redi --help` or `redi info`
should not wait for. A command made from a config is registered as a stand-in with its name and help; `ConfigGroup`
builds its real parameters when the command is resolved to run, to show its help, or to complete its flags.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import itertools
import logging
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from redi.common.schema import OneOf, Range, field_range
from redi.common.urls import local_path
from redi.common.vocabulary import RELEASE_OF_REMOVAL, TERMS, hidden_names

log = logging.getLogger(__name__)
LISTED_CHOICES = 12  # longest "a|b|c" shown as a flag's type in --help; the help of the others ends with the list
PLAIN_TYPES = (str, int, float, bool, Path)
FIELD_DEFAULT: Any = object()  # a Flag's default when the command keeps the field's
USER_SOURCES = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")  # where a value the user set comes from (click's ParameterSource)


@dataclass(frozen=True)
class Flag:
    """How a field's flag differs from the field; unset parts come from the field."""

    names: tuple[str, ...] = ()
    """Flag names, e.g. ("--format",); default: --field-name."""
    help: str | None = None
    """Help text; default: the first paragraph of the field's docstring."""
    default: Any = FIELD_DEFAULT
    """The flag's default, when the command's differs from the config's (e.g. the VAE of `encode`)."""
    type: Any = None
    """The flag's type when `parse` turns its value into the field's (e.g. str "LO,HI" → tuple)."""
    parse: Callable[[Any], Any] | str | None = None
    """Flag value → field value: a function, or "module:function" to import with the config; None stays None. A
    parsed Path flag passes the text as typed."""
    argument: bool = False
    """A positional argument instead of an option."""
    envvar: str | None = None
    """An environment variable that gives the value when the flag is absent."""


@dataclass(frozen=True)
class FromConfig:
    """A command whose flags are the fields of one config dataclass."""

    config: str
    """"module:Class", imported only when the command runs or shows its help."""
    panels: dict[str, tuple[str, ...]]
    """--help panel title → its fields, in display order; a field in no panel goes to "Options"."""
    flags: dict[str, Flag] = field(default_factory=dict)
    """Per-field differences from the config."""
    skip: tuple[str, ...] = ()
    """Fields that are not flags (the code sets them)."""


def config_command(app: typer.Typer, name: str, spec: FromConfig, guard: Callable[[Any], Any] = lambda fn: fn,
                   **command: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn(cfg, **own_flags)` as command `name`; its flags are the config's fields and its own parameters.
    `guard` wraps the call that builds the config too (the CLI's `user_errors`: a bad value is one sentence)."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        def stand_in() -> None:
            raise AssertionError(f"`redi {name}` runs through ConfigGroup, which builds its flags first")

        stand_in.build_command = functools.partial(_build_command, name, spec, fn, guard, command)  # type: ignore[attr-defined]
        app.command(name, help=reflow(fn.__doc__), **command)(stand_in)
        return fn

    return decorator


class Command(TyperCommand):
    """Typer's command as `redi` shows it: see `help_view`; an old spelling of a flag (common/vocabulary.py) still
    parses, with a warning that names the new one."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with help_view(self.get_params(ctx)):
            super().format_help(ctx, formatter)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        warn_old_spellings(self.params, args)
        return super().parse_args(ctx, args)


class ConfigGroup(TyperGroup):
    """The `redi` group: swaps a config command's stand-in for the real command when it is resolved."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with help_view(self.get_params(ctx)):
            super().format_help(ctx, formatter)

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        build = getattr(getattr(command, "callback", None), "build_command", None)  # Typer copies the stand-in's attributes
        if name is not None and build is not None:
            command = self.commands[name] = build()
        return name, command, rest


@contextlib.contextmanager
def help_view(params: list[Any]) -> Iterator[None]:
    """The parameters as --help shows them, for the time of the rendering:
    - each flag's --no-x form in its help, not in a column of its own (that column leaves the help about 17 characters
      at 80 columns); a flag that is off by default does not show --no-x (it restates the default); --no-x still parses;
    - a switch without a value placeholder (Typer writes `<bool>`, which reads as if it took one), one that is on by
      default saying so in words, not `[default: True]`;
    - a flag's old spellings (common/vocabulary.py) left out: they parse for one more release, but are not the name."""
    saved = [(p, p.opts, p.secondary_opts, p.help, p.metavar, p.show_default) for p in params]
    for param in params:
        if hidden := hidden_names(param.opts):
            param.opts = [name for name in param.opts if name not in hidden]
        if names := getattr(param, "secondary_opts", None):
            param.secondary_opts = []
            if param.default is not False and not any(n in (param.help or "") for n in names):
                param.help = f"{param.help} Off: {', '.join(names)}."
        if getattr(param, "is_flag", False):
            param.metavar = ""
            if param.default is True:
                param.show_default, param.help = False, f"{param.help} On by default."
    try:
        yield
    finally:
        for param, opts, secondary, help_text, metavar, show_default in saved:
            param.opts, param.secondary_opts, param.help, param.metavar, param.show_default = (
                opts, secondary, help_text, metavar, show_default)


def warn_old_spellings(params: list[Any], args: list[str]) -> None:
    """One warning per old spelling of a flag among `args` (before a bare --), naming the flag to use instead."""
    old = {name: term for p in params for name in hidden_names(p.opts) for term in TERMS.values()
           if name in term.old and term.name in p.opts}
    for arg in itertools.takewhile(lambda a: a != "--", args):
        if (name := arg.partition("=")[0]) in old:
            log.warning(f"{name} is now {old[name].name} ({old[name].meaning}); the old spelling is accepted until "
                        f"redi {RELEASE_OF_REMOVAL}.")


def reflow(doc: str | None) -> str:
    """A docstring's paragraphs each on one line, for rich to wrap (Typer keeps a docstring's line breaks)."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n"))


def field_help(cls: type) -> dict[str, str]:
    """Field name → the first paragraph of its docstring (the string literal under it), through the base classes."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = typing.cast(ast.ClassDef, ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]).body
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = reflow(after.value.value).split("\n\n")[0]
    return docs


def _build_command(name: str, spec: FromConfig, fn: Callable[..., Any], guard: Callable[[Any], Any],
                   command: dict[str, Any]) -> Any:
    """The real command: one parameter per config field (by panel), then `fn`'s own parameters."""
    cls = _imported(spec.config)
    class_name = cls.__name__
    flags = _config_parameters(cls, spec)
    own = list(inspect.signature(fn).parameters.values())[1:]  # the first receives the config
    hints = typing.get_type_hints(fn, localns={class_name: cls}, include_extras=True)
    own = [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    parsers = {p.name: parse for p, parse in flags}

    def run(**values: Any) -> Any:
        own_values = {p.name: values.pop(p.name) for p in own}
        return fn(cls(**{k: v if v is None else parsers[k](v) for k, v in values.items()}), **own_values)

    call = guard(functools.wraps(fn)(run))
    parameters = [p for p, _ in flags] + own
    call.__signature__ = inspect.Signature(parameters)
    call.__annotations__ = {p.name: p.annotation for p in parameters}
    del call.__wrapped__  # Typer reads the signature above, not fn's
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command(name, help=reflow(fn.__doc__), cls=Command, **command)(call)
    return typer.main.get_command(app)


def _config_parameters(cls: type, spec: FromConfig) -> list[tuple[inspect.Parameter, Callable[[Any], Any]]]:
    """(Typer parameter, flag value → field value) per field, ordered by panel."""
    docs = field_help(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in spec.skip}
    order = [n for names in spec.panels.values() for n in names]
    if unknown := set(order) - set(fields):
        raise AssertionError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    panel_of = {n: title for title, names in spec.panels.items() for n in names}
    out = []
    for name in [*order, *(n for n in fields if n not in panel_of)]:
        f, flag = fields[name], spec.flags.get(name, Flag())
        default = f.default if flag.default is FIELD_DEFAULT else flag.default
        out.append(_parameter(name, hints[name], default, flag, docs.get(name, ""), panel_of.get(name)))
    return out


def _parameter(name: str, hint: Any, default: Any, flag: Flag, doc: str,
               panel: str | None) -> tuple[inspect.Parameter, Callable[[Any], Any]]:
    """One Typer parameter for a field, and the conversion of its value back to the field's."""
    kind, choices = _unpack(flag.type if flag.type is not None else hint)
    given = _imported(flag.parse) if isinstance(flag.parse, str) else flag.parse
    parse: Callable[[Any], Any] = given or (lambda v: v)
    help_text = escape(flag.help or doc)  # "[lo, hi]" is text, not rich markup
    extra: dict[str, Any] = {}
    names = flag.names or ((f"--{name.replace('_', '-')}",) if not flag.argument else ())
    if kind in (Path, Path | None):
        extra["path_type"] = str  # the parser gets the text as typed: a Path would fold a URL's "//" into "/"
        parse = given or functools.partial(local_path, flag=names[0] if names else name.upper())
    if choices:
        enum = StrEnum("".join(w.title() for w in name.split("_")), {c: c for c in choices})  # type: ignore[misc]
        kind = enum | None if default is None else enum
        default = default if default in (None, dataclasses.MISSING) else enum(default)
        parse = functools.partial(_plain, given)
        if len("|".join(choices)) > LISTED_CHOICES:
            extra["metavar"] = name.rpartition("_")[2].upper()  # GUIDANCE for sample_guidance: narrow, for the help
            if not all(re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", help_text) for c in choices):
                help_text += f" One of: {', '.join(choices)}."
    bounds = field_range(hint) if flag.type is None else None
    if bounds is not None:
        extra |= ranged(bounds, int if kind in (int, int | None) else float)
        help_text = escape(with_range(flag.help or doc, bounds))
    if default is dataclasses.MISSING:
        default = inspect.Parameter.empty
    if kind is bool or kind == bool | None:
        names = tuple(f"{n}/--no-{n[2:]}" for n in names[:1]) + names[1:]
    show_default = default not in (None, inspect.Parameter.empty)
    info = (typer.Argument(help=help_text, show_default=show_default, **extra) if flag.argument else
            typer.Option(*names, help=help_text, show_default=show_default, rich_help_panel=panel, envvar=flag.envvar,
                         **extra))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info]), parse


def ranged(bounds: Range, number: type) -> dict[str, Any]:
    """typer.Option arguments that check a numeric flag against `bounds` when it is parsed (also a plain option's)."""
    return {"parser": functools.partial(_in_range, bounds, number)}


def with_range(help_text: str, bounds: Range) -> str:
    """A numeric flag's help, its range said at the end."""
    return f"{help_text} Range: {interval}." if (interval := bounds.interval()) else help_text


def _in_range(bounds: Range, number: type, text: Any) -> int | float:
    """A numeric flag's value, or Typer's usage error naming the flag (one sentence, exit 2)."""
    try:
        return bounds.parse(number, str(text))
    except ValueError as e:
        raise typer.BadParameter(f"{e}.") from None


def _imported(ref: str) -> Any:
    """The object that "module:name" names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _unpack(hint: Any) -> tuple[Any, tuple[str, ...]]:
    """A field's type as Typer takes it (plain or `X | None`), and its choices (`Literal` or `Annotated[str, OneOf]`)."""
    choices: tuple[str, ...] = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    if choices:
        hint = str
    elif typing.get_origin(hint) is Annotated:
        choices = next((m.values for m in hint.__metadata__ if isinstance(m, OneOf)), ())
        hint = typing.get_args(hint)[0]
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if len(inner) != 1 or inner[0] not in PLAIN_TYPES:
        raise AssertionError(f"no flag for a field of type {hint}: give its Flag a type and a parse")
    return hint, choices


def _plain(parse: Callable[[Any], Any] | None, value: StrEnum) -> Any:
    """An Enum flag's value as the config's plain str, parsed if the flag says so."""
    return parse(value.value) if parse else value.value


def given_flags(ctx: typer.Context) -> frozenset[str]:
    """The parameters of the running command that the user set (on the command line or through their environment
    variable), not left at their defaults: a resumed run keeps its recorded value of the others. A command receives
    `ctx` by declaring a `typer.Context` parameter."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return frozenset(name for name, source in sources.items() if source is not None and source.name in USER_SOURCES)

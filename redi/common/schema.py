"""Typed fields: the constraints a dataclass field may carry, and the one loader of JSON records into dataclasses.

A field's constraints are `Annotated` metadata, next to its type and its docstring:
- `OneOf(names)`: a str among `names` (its flag is an Enum of them, common/flags.py);
- `Range(lo, hi)`: a finite number in an interval (`--beta1 1`, `--weight-decay nan` are refused when the flag is
  parsed, and a config built in code is checked by `check_ranges` in its `__post_init__`);
- `Shaped(Cls)`: a JSON object checked against the dataclass `Cls` but kept as the dict it is (a stage manifest's
  parameters, compared as JSON).

Every JSON file redi reads back has one dataclass describing it, owned by the module that writes it
(docs/FORMATS.md lists them), and is read through `load` (a parsed value) or `read` (a file): a value of another
type, out of its range, or a missing field is one sentence naming the file and the field, never a traceback deep in
the code that uses it; `try_load` is the same check for a record that is redone when damaged (a chunk's ledger), and
`dump` writes a record back. JSON keys are the field names (a trailing `_` dropped: `class_` is "class"); keys a record
does not know are ignored, and a field with a default may be absent (files of older versions; a record whose layout
changed converts them in its classmethod `from_older`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from redi.common.errors import UserError


@dataclass(frozen=True)
class OneOf:
    """Field metadata: the str field takes one of `values` (its flag is an Enum of them)."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """Field metadata: a finite number in [lo, hi]; an end that is None is unbounded, an open end is excluded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def interval(self) -> str:
        """E.g. "[0, 1)", "≥ 1", "> 0" or "≤ 1"; empty when unbounded."""
        lo, hi = (_number(v) for v in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:  # a no-break space: "≥ 0" is never cut at the end of a help line
            return f"{'>' if self.lo_open else '≥'}\u00a0{lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '≤'}\u00a0{hi}"
        return ""

    def describe(self, kind: type = float) -> str:
        """E.g. "a number in [0, 1)", "an integer ≥ 1", "a finite number"."""
        what = "an integer" if kind is int else "a finite number" if not self.interval() else "a number"
        interval = self.interval()
        return f"{what} in {interval}" if interval.startswith(("[", "(")) else f"{what} {interval}".rstrip()

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def problem(self, value: float, kind: type = float) -> str | None:
        """None when `value` is in range, else "must be …, not VALUE"."""
        return None if self.contains(value) else f"must be {self.describe(kind)}, not {_number(value)}"

    def parse(self, kind: type, text: str) -> int | float:
        """A flag's text as `kind` (int or float) in this range; ValueError with the sentence otherwise."""
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"must be {self.describe(kind)}, not {text!r}") from None
        if (problem := self.problem(value, kind)) is not None:
            raise ValueError(problem)
        return value


@dataclass(frozen=True)
class Shaped:
    """Field metadata: a JSON object checked against the dataclass `record`, kept as the dict it is. `types_only`: only
    the types of the keys it holds (a saved config, whose flags' ranges and required fields were those of its day)."""

    record: type
    types_only: bool = False


def _number(value: float | None) -> str:
    """A bound or a value as a person writes it: 1 not 1.0, 1e-06, nan, inf."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def field_range(hint: Any) -> Range | None:
    """The Range of a field's type hint (`Annotated[float, Range(…)]`, also inside `X | None`), or None."""
    for part in (hint, *typing.get_args(hint)):
        if typing.get_origin(part) is Annotated:
            found = next((m for m in part.__metadata__ if isinstance(m, Range)), None)
            if found is not None:
                return found
    return None


def check_ranges(config: Any) -> None:
    """One sentence (UserError) for the first field of dataclass `config` outside its Range: configs built in code get
    the checks their flags get when parsed."""
    for name, hint in _hints(type(config)).items():
        value, bounds = getattr(config, name, None), field_range(hint)
        kind = int if isinstance(value, int) else float
        if (bounds is not None and isinstance(value, int | float) and not isinstance(value, bool)
                and (problem := bounds.problem(value, kind)) is not None):
            raise UserError(f"{name} {problem}.")


# --- the loader ---


class _Invalid(Exception):
    """A value that does not fit its type: the field path (innermost last) and what is wrong."""

    def __init__(self, problem: str, path: tuple[str, ...] = ()):
        super().__init__(problem)
        self.problem, self.path = problem, path


def load(kind: Any, value: Any, where: Path | str, remedy: str = "") -> Any:
    """`value` (parsed JSON of the file `where`) as `kind`: a dataclass (built from a JSON object), int, float, str,
    bool, None, Path, list, tuple, dict, `X | Y`, `Literal`, with OneOf, Range and Shaped metadata. A value that does
    not fit is one sentence (UserError) naming `where` and the field, ending with `remedy` (what remakes the file)."""
    try:
        return _convert(kind, value)
    except _Invalid as e:
        field = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in e.path).lstrip(".")
        at = f"its field `{field}`" if field else "its content"
        raise UserError(f"{where} is damaged: {at} {e.problem}{'; ' + remedy if remedy else ''}.") from None


def read(kind: Any, path: Path, remedy: str = "") -> Any:
    """The JSON file `path` as `kind` (see `load`); a missing, unreadable or damaged file is one sentence too."""
    from redi.common.atomic import read_json

    return load(kind, read_json(path, object, remedy), path, remedy)


def dump(record: Any) -> Any:
    """A record as JSON values, each field under the key `load` reads it by (`class_` → "class")."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name.removesuffix("_"): dump(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, dict):
        return {k: dump(v) for k, v in record.items()}
    return [dump(v) for v in record] if isinstance(record, list | tuple) else record


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON text (keys sorted): of equal types too, where Python's == takes 0 for false and 1 for 1.0."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def try_load(kind: Any, value: Any) -> Any:
    """`value` as `kind`, or None when it does not fit (records that are redone when damaged, such as a chunk's
    ledger)."""
    try:
        return _convert(kind, value)
    except _Invalid:
        return None


_JSON_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def _found(value: Any) -> str:
    """A JSON value in words: a scalar as written (cut), a list or an object by its kind."""
    if isinstance(value, list | dict):
        return _JSON_NAMES[type(value)]
    text = json.dumps(value) if isinstance(value, bool | int | float | str | None) else type(value).__name__
    return text if len(text) <= 40 else text[:39] + "…"


def _wrong(expected: str, value: Any) -> _Invalid:
    return _Invalid(f"is {_found(value)}, not {expected}")


def _convert(kind: Any, value: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        converted = _convert(args[0], value)
        for meta in kind.__metadata__:
            _check(meta, args[0], value, converted)
        return converted
    if kind is Any or kind is object:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value)
            except _Invalid as e:
                errors.append(e)
        deepest = max(errors, key=lambda e: len(e.path))
        if len(options) == 1 or deepest.path:
            raise deepest
        raise _wrong(" or ".join(_expected(a) for a in options), value)
    if origin is typing.Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise _Invalid(f"is {_found(value)}, not one of {', '.join(json.dumps(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(kind):
        return _record(kind, value)
    if kind in (int, float, str, bool, type(None), Path):
        return _plain(kind, value)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong("a list", value)
        return [_item(args[0], v, str(i)) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong("a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_item(args[0], v, str(i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Invalid(f"holds {len(value)} values, not {len(args)}")
        return tuple(_item(a, v, str(i)) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong("an object", value)
        return {k: _item(args[1], v, k) for k, v in value.items()}
    raise AssertionError(f"schema: no JSON form for {kind!r}")


def _item(kind: Any, value: Any, key: str) -> Any:
    """`value` as `kind`, its errors located under `key`."""
    try:
        return _convert(kind, value)
    except _Invalid as e:
        raise _Invalid(e.problem, (key, *e.path)) from None


def _plain(kind: type, value: Any) -> Any:
    if kind is float:
        if type(value) not in (int, float):
            raise _wrong("a number", value)
        return float(value)
    if kind is Path:
        if not isinstance(value, str):
            raise _wrong("a string (a path)", value)
        return Path(value)
    if type(value) is not kind:  # bool is not an int here, nor an int a bool
        raise _wrong(_JSON_NAMES[kind], value)
    return value


def _check(meta: Any, kind: Any, value: Any, converted: Any) -> None:
    """Apply one piece of field metadata to a converted value."""
    if isinstance(meta, Range) and isinstance(converted, int | float):
        if (problem := meta.problem(converted, int if kind is int else float)) is not None:
            raise _Invalid(problem)
    elif isinstance(meta, OneOf) and converted is not None and converted not in meta.values:
        raise _Invalid(f"is {_found(converted)}, not one of {', '.join(meta.values)}")
    elif isinstance(meta, Shaped) and meta.types_only:
        hints = _hints(meta.record)
        for f in dataclasses.fields(meta.record):
            if f.name.removesuffix("_") in value:
                _item(_without_ranges(hints[f.name]), value[f.name.removesuffix("_")], f.name.removesuffix("_"))
    elif isinstance(meta, Shaped):
        _record(meta.record, value)


def _without_ranges(kind: Any) -> Any:
    """A field's type without its Range (nor any other metadata but OneOf), inside unions too."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        kept = tuple(m for m in kind.__metadata__ if isinstance(m, OneOf))
        inner = _without_ranges(args[0])
        return Annotated[(inner, *kept)] if kept else inner  # type: ignore[return-value]
    if origin in (types.UnionType, typing.Union):
        return typing.Union[tuple(_without_ranges(a) for a in args)]  # noqa: UP007 — built from a tuple
    return kind


def _expected(kind: Any) -> str:
    """A type, in the words of `_wrong`."""
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) is dict:
        return "an object"
    if typing.get_origin(kind) in (list, tuple):
        return "a list"
    if typing.get_origin(kind) is Annotated:
        return _expected(typing.get_args(kind)[0])
    return _JSON_NAMES.get(kind, str(kind))


def _record(cls: type, value: Any) -> Any:
    """A dataclass from a JSON object: each field from its key, defaults for absent ones; `__post_init__`'s refusal
    (ValueError, UserError) is the record's problem. A record class whose files had another layout before reads them
    through its classmethod `from_older` (JSON object → today's JSON object)."""
    if not isinstance(value, dict):
        raise _wrong("an object", value)
    if (older := getattr(cls, "from_older", None)) is not None:
        try:
            value = older(value)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # an older layout with values of other types
            raise _Invalid(f"is not valid ({e})") from None
    given = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f.name.removesuffix("_")
        if key in value:
            given[f.name] = _item(_hints(cls)[f.name], value[key], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid("is missing", (key,))
    try:
        return cls(**given)
    except (ValueError, UserError) as e:
        raise _Invalid(f"is not valid ({str(e).rstrip('.')})") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)

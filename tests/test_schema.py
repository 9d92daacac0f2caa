"""common/schema.py: typed fields and the one loader of JSON records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from redi.common.atomic import decode_json
from redi.common.errors import UserError
from redi.common.schema import OneOf, Range, Shaped, check_ranges, dump, load, try_load


@dataclass(frozen=True)
class Inner:
    count: Annotated[int, Range(1)]
    mode: Annotated[str, OneOf(("a", "b"))] = "a"


@dataclass(frozen=True)
class Outer:
    inner: Inner
    scale: Annotated[float, Range(0, 1, hi_open=True)]
    class_: str | None = None
    sizes: tuple[int, ...] = ()
    kind: Literal[2, "x"] = 2
    raw: Annotated[dict[str, Any], Shaped(Inner)] = field(default_factory=lambda: {"count": 1})
    loose: Annotated[dict[str, Any], Shaped(Inner, types_only=True)] = field(default_factory=dict)

    @classmethod
    def from_older(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {"scale": value["factor"], **value} if "factor" in value else value


def said(value: Any) -> str:
    with pytest.raises(UserError) as refused:
        load(Outer, value, "f.json", "remake it")
    return str(refused.value)


def test_a_record_loads_typed_and_dumps_back_under_its_keys() -> None:
    value = {"inner": {"count": 2, "mode": "b"}, "scale": 0, "class": "C", "sizes": [1, 2], "kind": "x",
             "raw": {"count": 3}, "loose": {}, "unknown": [1]}
    record = load(Outer, value, "f.json")
    assert record == Outer(Inner(2, "b"), 0.0, "C", (1, 2), "x", {"count": 3}, {})
    assert dump(record) == {k: v for k, v in value.items() if k != "unknown"}
    assert load(Outer, {"inner": {"count": 1}, "factor": 0.5}, "f.json").scale == 0.5  # an older layout


@pytest.mark.parametrize(("value", "sentence"), [
    (1.5, "f.json is damaged: its content is 1.5, not an object; remake it."),
    ({"inner": {"count": True}, "scale": 0}, "its field `inner.count` is true, not an integer"),
    ({"inner": {"count": 0}, "scale": 0}, "its field `inner.count` must be an integer ≥\u00a01, not 0"),
    ({"inner": {"count": 1}, "scale": float("nan")}, "its field `scale` must be a number in [0, 1), not nan"),
    ({"inner": {"count": 1, "mode": "c"}, "scale": 0}, "its field `inner.mode` is \"c\", not one of a, b"),
    ({"inner": {"count": 1}}, "its field `scale` is missing"),
    ({"inner": {"count": 1}, "scale": 0, "sizes": [1, "2"]}, "its field `sizes[1]` is \"2\", not an integer"),
    ({"inner": {"count": 1}, "scale": 0, "kind": 2.0}, "its field `kind` is 2.0, not one of 2, \"x\""),
    ({"inner": {"count": 1}, "scale": 0, "raw": {"count": "1"}}, "its field `raw.count` is \"1\", not an integer"),
    ({"inner": {"count": 1}, "scale": 0, "loose": {"count": []}}, "its field `loose.count` is a list, not an integer"),
    ({"inner": {"count": 1}, "factor": "x"}, "its field `scale` is \"x\", not a number"),
])
def test_a_wrong_field_is_one_sentence_naming_it(value: Any, sentence: str) -> None:
    assert sentence in said(value) and said(value).count(". ") == 0


def test_types_only_skips_ranges_and_required_fields_and_try_load_says_none() -> None:
    assert load(Outer, {"inner": {"count": 1}, "scale": 0, "loose": {"count": -5}}, "f.json").loose == {"count": -5}
    assert try_load(Inner, {"count": "x"}) is None and try_load(Inner, {"count": 1}) == Inner(1)


def test_json_nested_too_deep_is_a_damaged_file_not_a_recursion_error() -> None:
    with pytest.raises(ValueError, match="nested too deep"):
        decode_json(b"[" * 100_000 + b"]" * 100_000)


def test_check_ranges_holds_a_config_built_in_code_to_its_fields() -> None:
    check_ranges(Inner(1))
    with pytest.raises(UserError, match=r"^count must be an integer ≥\u00a01, not 0\.$"):
        check_ranges(Inner(0))

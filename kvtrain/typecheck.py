"""Strict checks of values against type annotations and declared ranges, shared by every typed input.

A scorer's hyperparameters in a compression config, a suite's options from ``--set KEY=VALUE`` or a sweep grid,
and the same dataclasses built from Python are all checked here, so they accept the same things: a bool is not
a number, an int is a float, a list (or tuple) is a sequence whose every element fits, a string is not a list.
A dataclass field declares its range with ``field(metadata=limits(...))``; `check_fields` checks every field of
an instance against its annotation and its limits and raises a `UserError` naming the field, the value and what
would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from kvtrain.errors import UserError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def limits(*, minimum: float | None = None, maximum: float | None = None, choices: tuple | None = None,
           nonempty: bool = False) -> dict[str, Any]:
    """Field metadata declaring a range: numbers (or every element of a sequence) in [minimum, maximum] or among
    `choices`; `nonempty` for a sequence that needs at least one element."""
    return {"limits": {"minimum": minimum, "maximum": maximum, "choices": choices, "nonempty": nonempty}}


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type (strictly: see the module docstring)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        element = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return isinstance(value, (list, tuple)) and all(fits(v, element) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"kvtrain.typecheck cannot check against the annotation {hint!r}")


def describe(hint: Any) -> str:
    """What a value of the annotated type is, in words ("an integer or null", "a list of strings")."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if origin in (list, tuple):
        element = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return f"a list of {_PLURALS.get(element, 'values')}"
    if hint is None:
        return "null"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def type_error(value: Any, hint: Any) -> str | None:
    """None when `value` fits `hint`, else what it must be."""
    return None if fits(value, hint) else describe(hint)


def field_error(field: dataclasses.Field, hint: Any, value: Any) -> str | None:
    """None when `value` fits the field's annotation and limits, else what it must be (type and range)."""
    bounds = field.metadata.get("limits")
    expected = describe(hint) + ("" if bounds is None else _describe_limits(bounds))
    if not fits(value, hint):
        return expected
    if bounds is None or value is None:
        return None
    sequence = isinstance(value, (list, tuple))
    elements = value if sequence else [value]
    low, high, choices = bounds["minimum"], bounds["maximum"], bounds["choices"]
    if ((sequence and bounds["nonempty"] and not value)
            or (choices is not None and any(v not in choices for v in elements))
            or any((low is not None and v < low) or (high is not None and v > high) for v in elements)):
        return expected
    return None


def _describe_limits(bounds: dict[str, Any]) -> str:
    low, high, choices = bounds["minimum"], bounds["maximum"], bounds["choices"]
    parts = []
    if choices is not None:
        parts.append("among " + ", ".join(str(c) for c in choices))
    if low is not None and high is not None:
        parts.append(f"in [{low}, {high}]")
    elif low is not None:
        parts.append(f">= {low}")
    elif high is not None:
        parts.append(f"<= {high}")
    if bounds["nonempty"]:
        parts.append("at least one")
    return "".join(f" {p}" if i == 0 else f", {p}" for i, p in enumerate(parts))


def check_fields(instance: Any) -> None:
    """Raise a `UserError` naming the first field of the dataclass `instance` that does not fit its annotation
    and limits (called from ``__post_init__``, so a value is checked however the dataclass is built)."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        expected = field_error(f, hints[f.name], value)
        if expected is not None:
            raise UserError(f"{f.name}={value!r}: must be {expected}")

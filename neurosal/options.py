"""Typed settings from text or files: one check for every config dataclass (rules, devices, runs).

Settings arrive as ``key=value`` text on the command line or as JSON in a run folder; before a config
dataclass is built from them, each value is checked against the field's annotation, so that a typo
(``levels=abc``) is an ``error:`` naming the setting instead of a ``TypeError`` deep inside a step.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from .errors import NeurosalError


def has_type(value, hint) -> bool:
    """``isinstance`` for the simple annotations configs use: str, int, float, bool, dict, list, X | None.
    An int passes for a float; a bool never passes for a number."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if args and origin not in (dict, list, tuple):
        return any(has_type(value, a) for a in args)
    hint = origin or hint
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def typed_fields(cls, values: dict, what: str, ignore_unknown: bool = False) -> dict:
    """``values`` checked against dataclass ``cls``'s fields; ``what`` names the source in errors.

    Unknown keys are refused (or dropped with ``ignore_unknown``, for files written by newer versions);
    ints given for float fields become floats.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and not ignore_unknown:
        raise NeurosalError(f"{what} has no setting(s) {unknown}; settings: {sorted(names) or 'none'}")
    out = {}
    for key, value in values.items():
        if key not in names:
            continue
        hint = hints[key]
        if not has_type(value, hint):
            want = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise NeurosalError(f"{what}: {key}={value!r} should be {want}")
        out[key] = float(value) if hint is float else value
    return out


def check(condition: bool, what: str, message: str) -> None:
    """Raise ``NeurosalError("{what}: {message}")`` unless ``condition`` (for configs' range checks)."""
    if not condition:
        raise NeurosalError(f"{what}: {message}")


def positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def non_negative(value: float) -> bool:
    return value >= 0 and math.isfinite(value)

"""Value checks that configs run in ``__post_init__``, so a bad value fails where the config is built.

Suites build every config before any model loads (``diffrl run FILE --check``), and the strict builder
(:mod:`harness.config`) prefixes each message with the field's suite path. Messages name the field, the
value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, get_args, get_origin


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Unless ``ok``, raise ``ValueError("NAME must be ALLOWED, got VALUE")``: the one message form of every check.

    :func:`harness.config.build` reads the leading field name to report where the value came from.
    """
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _number(cfg: object, name: str) -> float:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_finite(cfg: object, *names: str) -> None:
    """Each field is a finite number (any sign)."""
    for name in names:
        _number(cfg, name)


def check_positive(cfg: object, *names: str) -> None:
    """Each field is a finite number > 0."""
    for name in names:
        if not _number(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")


def check_non_negative(cfg: object, *names: str) -> None:
    """Each field is a finite number ≥ 0."""
    for name in names:
        if not _number(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")


def check_at_least(cfg: object, minimum: int, *names: str) -> None:
    """Each field is an integer ≥ ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(cfg: object, *names: str) -> None:
    """Each field is in (0, 1]."""
    for name in names:
        if not 0 < _number(cfg, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(cfg, name)!r}")


def check_unit_interval(cfg: object, *names: str, closed_right: bool = False) -> None:
    """Each field is in [0, 1) (or [0, 1] with ``closed_right``)."""
    for name in names:
        value = _number(cfg, name)
        if not (0 <= value <= 1 if closed_right else 0 <= value < 1):
            raise ValueError(f"{name} must be in [0, 1{']' if closed_right else ')'}, got {getattr(cfg, name)!r}")


def check_literals(cfg: Any) -> None:
    """Every field annotated ``Literal[...]`` holds one of its allowed values."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        hint = hints.get(field.name)
        if get_origin(hint) is Literal:
            allowed = get_args(hint)
            value = getattr(cfg, field.name)
            if value not in allowed:
                raise ValueError(f"{field.name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")

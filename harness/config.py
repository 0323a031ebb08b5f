"""Strict construction of frozen config dataclasses from plain mappings (YAML, ``--set key=value``).

Unknown keys are errors with a did-you-mean; values are checked against the field's type
before any compute starts. Nothing is silently dropped. Each config then checks its own values in
``__post_init__`` (:func:`require`), and :func:`build` turns that ``ValueError`` into a
:class:`ConfigError` naming the full path: ``suite.methods[0].config.beta = 0: beta must be > 0, got 0.0``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and says what is allowed."""


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r}; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None):  # None matches only None (the fallthrough below accepts anything)
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r} matches none of {annotation}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}; expected a list")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where} = {value!r}; expected {len(args)} values")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping, typing.get_origin(Mapping[str, float])):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r}; expected a mapping")
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        return {_check_value(k, key_type, where): _check_value(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}; expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}; expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}; expected true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}; expected a string")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r}; expected a mapping of {annotation.__name__} fields")
        return build(annotation, value, where)
    return value


def build(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """``cls(**values)`` after checking every key and value against the dataclass's fields."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {where}.{key}.{hint} Allowed: {', '.join(fields)}")
        checked[key] = _check_value(value, hints[key], f"{where}.{key}")
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]  # fmt: skip
    missing = [name for name in required if name not in checked]
    if missing:
        raise ConfigError(f"missing key {where}.{missing[0]} (required: {', '.join(required)})")
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # the dataclass's own checks (__post_init__)
        raise ConfigError(_located(str(error), where, fields, values)) from error


def _located(message: str, where: str, fields: Mapping[str, dataclasses.Field], values: Mapping[str, Any]) -> str:
    """``where.key = value: message`` when the message is about one field (``"<field> must ..."``, as
    :func:`require` writes), with the value as given (or the field's default); else ``where: message``."""
    match = re.match(r"(\w+) must ", message)
    if match is None or match.group(1) not in fields:
        return f"{where}: {message}"
    key = match.group(1)
    if key in values:
        value = values[key]
    else:
        field = fields[key]
        value = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    return f"{where}.{key} = {list(value) if isinstance(value, tuple) else value!r}: {message}"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["beta=0.1", "decay_type=2"]`` → ``{"beta": 0.1, "decay_type": 2}`` (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def call_checked(factory: Any, options: Mapping[str, Any], where: str) -> Any:
    """``factory(**options)`` after checking the keys (did-you-mean) and annotated types against its signature.

    A ``ValueError``/``TypeError`` raised by the factory itself becomes a :class:`ConfigError` naming ``where``.
    """
    if dataclasses.is_dataclass(factory):
        return build(factory, options, where)  # type: ignore[arg-type]
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    parameters = {
        name: p
        for name, p in inspect.signature(target).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    hints = typing.get_type_hints(target)
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {where}.{key}.{hint} Allowed: {', '.join(parameters) or 'none'}")
        checked[key] = _check_value(value, hints.get(key, Any), f"{where}.{key}")
    try:
        return factory(**checked)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from error

"""One generic name → object registry, used for methods, rewards and benchmarks.

Targets are given either as objects (type-checked by mypy against the registry's type, as the method
registry does: ``Registry[type[Method]]``) or lazily as ``"module:attribute"`` strings, imported only on
``get``, so heavy optional dependencies (reward backbones) stay unloaded until a user asks for them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A registered name: where it lives and one line saying what it is."""

    key: str
    target: str
    description: str


class Registry(Generic[T]):
    """A name → lazily imported object map with did-you-mean errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, T] = {}

    def add(self, key: str, target: T | str, description: str) -> None:
        """Register ``key`` → an object, or ``"module:attribute"`` imported on first use, with a one-line description."""
        if key in self._entries:
            raise KeyError(f"{self.kind} {key!r} is already registered (-> {self._entries[key].target})")
        if key != key.lower() or " " in key:
            raise ValueError(f"{self.kind} keys are lower_snake_case, got {key!r}")
        if not isinstance(target, str):
            where = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(target).__name__)}"
            self._entries[key] = Entry(key, where, description)
            self._loaded[key] = target
            return
        if ":" not in target:
            raise ValueError(f"target for {self.kind} {key!r} must look like 'module:attribute', got {target!r}")
        self._entries[key] = Entry(key, target, description)

    def keys(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Registered entries, sorted by name."""
        return [self._entries[k] for k in self.keys()]

    def __iter__(self) -> Iterator[str]:
        """Registered names, sorted."""
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def check(self, key: str) -> None:
        """Raise a ``KeyError`` naming the allowed keys (and a close match) if ``key`` is unknown."""
        if key in self._entries:
            return
        close = difflib.get_close_matches(key, self.keys(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {self.kind} {key!r}.{hint} Registered: {', '.join(self.keys()) or '(none)'}")

    def get(self, key: str) -> T:
        """Import (once) and return the object registered under ``key``."""
        self.check(key)
        if key not in self._loaded:
            module_name, attribute = self._entries[key].target.split(":", 1)
            self._loaded[key] = getattr(importlib.import_module(module_name), attribute)
        return self._loaded[key]

    @contextmanager
    def temporarily(self, key: str, target: T | str, description: str = "test only") -> Iterator[None]:
        """Register ``key`` inside the block only (tests and examples), then remove it again."""
        self.add(key, target, description)
        try:
            yield
        finally:
            del self._entries[key]
            self._loaded.pop(key, None)

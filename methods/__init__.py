"""Method registry: one line per method (``name → "module:Class"``), imported lazily."""

from harness.registry import Registry

METHODS: Registry = Registry("method")

"""Every random generator comes from here: ``generator(seed, *keys)`` is a pure function of its arguments.

Roles ("eval", "rollout", "train", ...) and counters (iteration, prompt index) are hashed into
the seed, so two methods evaluated with the same benchmark seed see the same initial noise.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and any keys (stable across runs and platforms)."""
    text = "/".join([str(seed), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch generator seeded from ``seed`` and ``keys``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy generator seeded from ``seed`` and ``keys``."""
    return np.random.default_rng(derive_seed(seed, *keys))

"""Experiment trackers through accelerate's tracker API (tensorboard, wandb, ...), never required.

One tracker run per (variant, seed) cell, named ``<suite>/<variant>/seed<k>``: the resolved config
is stored at the start, every training iteration and every evaluation is logged with the
iteration as the step, and so is each evaluation's sample grid (with ``eval.grids``), as an image
where the tracker takes images (tensorboard, wandb, aim, clearml, swanlab; the others skip it).
The suite's result files never depend on a tracker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
from PIL import Image


class CellTrackers:
    """The suite's trackers for one cell; a no-op when the suite names none."""

    def __init__(self, names: Sequence[str], run_name: str, logging_dir: Path, config: dict[str, Any]) -> None:
        self.trackers: list[GeneralTracker] = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            kwargs = {"logging_dir": str(logging_dir)} if cls.requires_logging_directory else {}
            tracker = cls(run_name, **kwargs)
            tracker.start()
            tracker.store_init_configuration(_flatten(config))
            self.trackers.append(tracker)

    def log(self, values: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def log_image(self, key: str, image: Path | np.ndarray, step: int) -> None:
        """Log one (H, W, 3) uint8 image, or a PNG file such as a sample grid, to every tracker that takes images."""
        takers = [tracker for tracker in self.trackers if hasattr(tracker, "log_images")]
        if not takers:
            return
        if isinstance(image, Path):
            with Image.open(image) as file:
                image = np.asarray(file.convert("RGB"))
        for tracker in takers:
            values, kwargs = _image_values(tracker.name, key, image)
            tracker.log_images(values, step=step, **kwargs)  # type: ignore[attr-defined]

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _image_values(name: str, key: str, image: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """``log_images``'s arguments for tracker ``name``: accelerate's trackers take images in different forms."""
    if name == "tensorboard":  # SummaryWriter.add_images: one batch array
        return {key: image[None]}, {"dataformats": "NHWC"}
    if name in ("aim", "clearml"):  # one array per key
        return {key: image}, {}
    return {key: [image]}, {}  # wandb, swanlab, ...: a list of images per key


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat ``a.b.c`` keys of scalars (what tensorboard's hparams accept)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        elif isinstance(value, int | float | str | bool):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat

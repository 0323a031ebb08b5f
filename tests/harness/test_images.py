"""Sample grids sized by their images (small ones enlarged, large ones never), and grids logged to trackers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.images import GRID_MAX_SIDE, grid_array, grid_scale, save_grid
from harness.trackers import CellTrackers


def test_small_grids_are_enlarged_up_to_about_1024_px_and_large_ones_never():
    shapes = grid_array(torch.rand(24, 3, 32, 32), columns=6)  # 4 rows of 6 tasks at 32 px: 138 × 206 → × 4
    assert shapes.shape == (4 * 138, 4 * 206, 3) and max(shapes.shape) <= GRID_MAX_SIDE
    assert grid_scale(1028, 3086) == 1  # 2 rows of 6 tasks at 512 px (SD3): native size, not 4× (12k × 4k)
    assert grid_scale(600, 100) == 1 and grid_scale(100, 100) == 10 and grid_scale(1024, 2) == 1
    explicit = grid_array(torch.rand(2, 3, 4, 4), columns=2, scale=3, pad=1)
    assert explicit.shape == (3 * 6, 3 * 11, 3)


def test_grid_layout_padding_and_file(tmp_path):
    images = torch.zeros(3, 3, 2, 2)
    images[1] = 1.0
    grid = grid_array(images, columns=2, pad=1, scale=1)
    assert grid.shape == (7, 7, 3)
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 255).all() and (grid[4:6, 1:3] == 0).all()
    assert (grid[0] == 255).all() and (grid[4:6, 4:6] == 255).all()  # padding and the empty cell are white
    path = save_grid(torch.rand(5, 3, 32, 32), tmp_path / "g.png", columns=8)  # fewer images than columns
    with Image.open(path) as image:
        assert image.size == (172 * 5, 36 * 5)  # one row of 5 (not 8) columns, enlarged 1024 // 172 = 5 times
    with pytest.raises(ValueError, match="columns >= 1"):
        grid_array(images, columns=0)


def test_trackers_log_a_grid_as_an_image(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = CellTrackers(["tensorboard"], "suite/nft/seed0", tmp_path, {"a": {"b": 1}})
    path = save_grid(torch.rand(4, 3, 8, 8), tmp_path / "grid.png", columns=2)
    trackers.log_image("eval/samples", path, step=3)
    trackers.log_image("eval/samples", np.zeros((4, 6, 3), dtype=np.uint8), step=5)
    trackers.finish()
    logged = []
    for folder in {p.parent for p in Path(tmp_path).rglob("events.out.tfevents.*")}:  # hparams get a folder too
        accumulator = EventAccumulator(str(folder), size_guidance={"images": 0})
        accumulator.Reload()
        if "eval/samples" in accumulator.Tags()["images"]:
            logged += accumulator.Images("eval/samples")
    assert [(e.step, e.width, e.height) for e in logged] == [(3, 46 * 22, 46 * 22), (5, 6, 4)]  # 22 px × 46


def test_no_trackers_read_no_image(tmp_path):
    CellTrackers([], "run", tmp_path, {}).log_image("eval/samples", tmp_path / "absent.png", step=1)

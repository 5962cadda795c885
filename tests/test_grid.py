"""mefacial.grid: synchronised labelled grids, placeholder tiles, motion heatmaps, prior overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import FIXTURES, require
from mefacial import prior
from mefacial.grid import (AU_COLOR, BACKGROUND, HEADER, HEAT_ANCHORS, Column, colorize, fit_tile, motion_heatmaps,
                           overlay_map, prior_panels, render_grid, text_tile)

TILE = 64


def constant_clip(values: list[int], size: int = 32) -> np.ndarray:
    """A clip whose frame t is filled with values[t]: T x size x size x 3 uint8."""
    return np.repeat(np.asarray(values, dtype=np.uint8), size * size * 3).reshape(len(values), size, size, 3)


def tile_value(grid: np.ndarray, column: int, tile: int = TILE) -> np.ndarray:
    """The centre pixel of one column's tile in every frame: T x 3."""
    return grid[:, HEADER + tile // 2, column * tile + tile // 2]


def test_grid_shape_and_sync():
    long = constant_clip([10 * t for t in range(8)])
    short = constant_clip([100, 150, 200, 250])  # half as many frames: each shown twice
    still = constant_clip([77])[0]
    grid = render_grid([Column("driving", long), Column("short", short), Column("still", still)], tile=TILE)
    assert grid.shape == (8, HEADER + TILE, 3 * TILE, 3) and grid.dtype == np.uint8
    assert tile_value(grid, 0)[:, 0].tolist() == [10 * t for t in range(8)]
    assert tile_value(grid, 1)[:, 0].tolist() == [100, 100, 150, 150, 200, 200, 250, 250]
    assert tile_value(grid, 2)[:, 0].tolist() == [77] * 8
    assert render_grid([Column("a", long)], tile=TILE, num_frames=3).shape[0] == 3


def test_labels_and_placeholders_show_text():
    clip = constant_clip([0, 0])
    reason = "no weights: see checkpoints/README.md"
    grid = render_grid([Column("driving", clip), Column("fomm-awp", reason=reason)], tile=TILE)
    header = grid[0, :HEADER]
    assert len(np.unique(header[:, :TILE].reshape(-1, 3), axis=0)) > 2  # the label was drawn
    placeholder = grid[:, HEADER:, TILE:]
    assert (placeholder == placeholder[:1]).all()  # static over time
    assert len(np.unique(placeholder[0].reshape(-1, 3), axis=0)) > 2  # with text on it
    other = render_grid([Column("driving", clip), Column("fomm-awp", reason="something else")], tile=TILE)
    assert not np.array_equal(other[0, HEADER:, TILE:], placeholder[0])


def test_long_text_is_shrunk_or_cut_to_the_tile():
    tile = text_tile("word " * 200, 64, 32)
    assert tile.shape == (32, 64, 3)


def test_fit_tile_keeps_aspect():
    frames = np.full((2, 50, 100, 3), 200, dtype=np.uint8)  # wide: letterboxed top and bottom
    tile = fit_tile(frames, TILE)
    assert tile.shape == (2, TILE, TILE, 3)
    assert (tile[:, 0] == BACKGROUND).all() and (tile[:, TILE // 2] == 200).all()


def test_heatmaps_show_where_the_clip_moves():
    clip = constant_clip([100] * 4, size=TILE)
    clip[1:, :16, :16] = 160  # motion in the top-left corner from frame 1 on
    maps = motion_heatmaps(clip)
    assert maps.shape == clip.shape
    assert (maps[0] == HEAT_ANCHORS[0]).all()  # no motion at frame 0
    assert maps[2, 4, 4].astype(int).sum() > maps[2, 40, 40].astype(int).sum()
    grid = render_grid([Column("a", clip), Column("b", reason="none")], tile=TILE, heatmaps=True)
    assert grid.shape == (4, HEADER + 2 * TILE, 2 * TILE, 3)
    assert np.array_equal(grid[2, HEADER + TILE:, :TILE], maps[2])


def test_colorize_ends():
    assert np.array_equal(colorize(np.array([0.0, 1.0])), HEAT_ANCHORS[[0, -1]].astype(np.uint8))


def test_bad_columns_are_refused():
    with pytest.raises(ValueError):
        Column("x")
    with pytest.raises(ValueError):
        Column("x", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        render_grid([])


def test_overlay_map_marks_the_high_area():
    face = np.full((TILE, TILE, 3), 128, dtype=np.uint8)
    values = np.zeros((8, 8), dtype=np.float32)
    values[:2, :2] = 1  # top-left
    out = overlay_map(face, values)
    assert not np.array_equal(out[2, 2], face[2, 2])
    assert np.array_equal(out[-2, -2], face[-2, -2])


def test_prior_panels_draw_the_models_au_points():
    folder = require(FIXTURES / "landmarks", "landmarks fixture")
    data = load_file(str(folder / "landmarks.safetensors"))
    clip = sorted(k.rsplit(".", 1)[0] for k in data if k.endswith(".landmarks68"))[0]
    face, landmarks = data[f"{clip}.frames_uint8"][0], data[f"{clip}.landmarks68"][0]
    au = prior.au_points_from_landmarks(torch.from_numpy(landmarks)).numpy()  # 18 x 2
    ewp = prior.ewp_map(torch.from_numpy(au)[None], face.shape[0], face.shape[0] // 4)[0, 0].numpy()
    panels = prior_panels(face, landmarks, au, maps=[("EWP map", ewp)],
                          missing=[("AWP map", "no weights: see checkpoints/README.md")])
    assert len(panels) == 4 and all(p.shape == face.shape for p, _ in panels)
    assert "AWP" in panels[3][1] and "EWP" in panels[2][1]
    x, y = au.round().astype(int)[:, 0].clip(0, face.shape[1] - 1), au.round().astype(int)[:, 1].clip(0, face.shape[0] - 1)
    assert (panels[1][0][y, x] == AU_COLOR).all(axis=-1).mean() > 0.8  # AU dots where the model's AU points are
    assert not np.array_equal(panels[2][0], face)  # the EWP map is drawn
    with_awp = prior_panels(face, landmarks, au, maps=[("EWP map", ewp), ("AWP map", np.ones((16, 16)))])
    assert len(with_awp) == 4 and "AWP" in with_awp[3][1]

"""Side-by-side grids of clips, like the paper's comparison figure.

One labelled column per clip (driving clip first, then each variant), every
column resampled to the same number of frames so the grid plays in sync;
a column that could not be made shows a placeholder tile with the reason.
An optional second row shows per-frame motion magnitude, |frame_t - frame_0|,
as a heatmap normalised per column so that micro-expression motion (a pixel or
two) stays visible.

    grid = render_grid([Column("driving", clip), Column("warp", result.frames),
                        Column("fomm-awp", reason="no weights: see checkpoints/README.md")])
    grid  # T x H x W x 3 uint8, ready for mefacial.video.write_video

Used by the app (Generate and Compare tabs) and the `compare` command.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .video import fit_frames

TILE = 256  # default tile side in pixels
HEADER = 32  # height of the label strip above each column
MIN_FONT = 10  # labels shrink down to this size before they are cut
PLAYER_CORNER = 0.2  # x the tile: the last label keeps off the top-right corner, where video players put buttons
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
PLACEHOLDER = (58, 58, 64)
MUTED_TEXT = (200, 200, 200)
# Anchor colours of the heatmap colour scale (dark -> purple -> orange -> yellow), at 0, 1/3, 2/3, 1.
HEAT_ANCHORS = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float32)


@dataclasses.dataclass
class Column:
    """One column of a grid: a clip (T x H x W x 3), a still (H x W x 3), or the reason there is none."""

    label: str
    frames: np.ndarray | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.frames is None and not self.reason:
            raise ValueError(f"column {self.label!r} needs frames or a reason")
        if self.frames is not None:
            frames = np.asarray(self.frames)
            if frames.ndim == 3:
                frames = frames[None]  # a still: 1 x H x W x 3
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or frames.dtype != np.uint8:
                raise ValueError(f"column {self.label!r}: frames must be uint8 (T, H, W, 3), got "
                                 f"{frames.dtype} {frames.shape}")
            self.frames = frames

    @property
    def num_frames(self) -> int:
        return 0 if self.frames is None else int(self.frames.shape[0])


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def fit_tile(frames: np.ndarray, size: int = TILE) -> np.ndarray:
    """T x H x W x 3 uint8 -> T x size x size x 3: resized to fit (aspect kept), centred on the background."""
    resized = fit_frames(frames, size)  # T x h' x w' x 3 (as they are at the tile's size)
    t, new_h, new_w, _ = resized.shape
    tile = np.empty((t, size, size, 3), dtype=np.uint8)
    tile[:] = BACKGROUND
    top, left = (size - new_h) // 2, (size - new_w) // 2
    tile[:, top:top + new_h, left:left + new_w] = resized
    return tile


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines no wider than `width` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def text_tile(text: str, width: int, height: int, background=PLACEHOLDER, color=MUTED_TEXT,
              font_size: int = 16, center: bool = True, keep_right: int = 0) -> np.ndarray:
    """height x width x 3 uint8 with `text` wrapped and centred (a label strip or a placeholder tile), in all but the
    rightmost `keep_right` pixels."""
    image = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(image)
    font = _font(font_size)
    room = width - keep_right
    lines = _wrap(draw, text, font, room - 16)
    while len(lines) * (font_size + 4) > height and font_size > MIN_FONT:  # shrink a label that does not fit
        font_size -= 2
        font = _font(font_size)
        lines = _wrap(draw, text, font, room - 16)
    line_height = font_size + 4
    max_lines = max(1, height // line_height)
    if len(lines) > max_lines:  # too long for the tile: cut and mark the cut
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    top = (height - line_height * len(lines)) // 2 if center else 8
    for i, line in enumerate(lines):
        x = (room - draw.textlength(line, font=font)) / 2
        draw.text((x, top + i * line_height), line, fill=tuple(color), font=font)
    return np.asarray(image)


def colorize(values: np.ndarray) -> np.ndarray:
    """... x H x W floats in [0, 1] -> ... x H x W x 3 uint8 on the heatmap colour scale."""
    position = np.clip(values, 0, 1) * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    colors = HEAT_ANCHORS[low] * (1 - frac) + HEAT_ANCHORS[low + 1] * frac
    return colors.round().astype(np.uint8)


def motion_heatmaps(frames: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """T x H x W x 3 uint8 -> T x H x W x 3 uint8 heatmaps of |frame_t - frame_0| (mean over channels).

    Normalised by a high percentile over the whole clip, so the scale is shared by
    the frames of one column and the tiny motion of a micro-expression is visible.
    """
    clip = frames.astype(np.float32)
    magnitude = np.abs(clip - clip[:1]).mean(axis=-1)  # T x H x W
    scale = float(np.percentile(magnitude, percentile))
    return colorize(magnitude / scale if scale > 0 else magnitude)


def _resample(tiles: np.ndarray, num_frames: int) -> np.ndarray:
    """n x ... -> num_frames x ...: nearest frame in time, so clips of other lengths stay in sync."""
    index = np.arange(num_frames) * len(tiles) // num_frames
    return tiles[index]


def render_grid(columns: list[Column], tile: int = TILE, heatmaps: bool = False,
                num_frames: int | None = None) -> np.ndarray:
    """Columns -> T x H x W x 3 uint8: a label strip over each column, a row of tiles, optionally a row of heatmaps.

    T is `num_frames`, or the longest column's frame count. Stills repeat; a column
    with a reason shows it on a placeholder tile (and an empty heatmap tile).
    """
    if not columns:
        raise ValueError("a grid needs at least one column")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (video encoders need it), got {tile}")
    total = num_frames or max([c.num_frames for c in columns] + [1])
    rows = 2 if heatmaps else 1
    grid = np.empty((total, HEADER + rows * tile, len(columns) * tile, 3), dtype=np.uint8)  # T x H x W x 3
    for i, column in enumerate(columns):
        x = slice(i * tile, (i + 1) * tile)
        corner = round(PLAYER_CORNER * tile) if i == len(columns) - 1 else 0
        grid[:, :HEADER, x] = text_tile(column.label, tile, HEADER, background=BACKGROUND, color=TEXT, font_size=22,
                                        keep_right=corner)
        if column.frames is None:  # large text: grids of many columns are shown scaled down
            grid[:, HEADER:HEADER + tile, x] = text_tile(column.reason or "", tile, tile, font_size=20)
            if heatmaps:
                grid[:, HEADER + tile:, x] = BACKGROUND
            continue
        tiles = fit_tile(column.frames, tile)  # n x tile x tile x 3
        grid[:, HEADER:HEADER + tile, x] = _resample(tiles, total)
        if heatmaps:
            grid[:, HEADER + tile:, x] = _resample(motion_heatmaps(tiles), total)
    return grid


# ---- the facial prior drawn over a face (the app's Prior tab) -----------------------------------

LANDMARK_COLOR = (80, 220, 120)
AU_COLOR = (255, 70, 70)


def draw_points(image: np.ndarray, points: np.ndarray, color=LANDMARK_COLOR, radius: float = 2.0,
                numbers: bool = False) -> np.ndarray:
    """H x W x 3 uint8 with dots at `points` (N x 2 pixel (x, y)), optionally numbered from 1."""
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    for i, (x, y) in enumerate(np.asarray(points, dtype=np.float64)):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(color), outline=(0, 0, 0))
        if numbers:
            draw.text((x + radius + 1, y - radius - 6), str(i + 1), fill=tuple(color), font=font)
    return np.asarray(canvas)


def overlay_map(image: np.ndarray, values: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """H x W x 3 uint8 blended with an h x w map (resized to H x W, scaled to [0, 1]) on the heatmap colour scale.

    The map's weight is its value, so the map's low areas leave the face visible.
    """
    height, width = image.shape[:2]
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]  # 1 x 1 x h x w
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    low, high = float(resized.min()), float(resized.max())
    resized = (resized - low) / max(high - low, 1e-12)  # H x W in [0, 1] (a learned AWP map can be negative)
    weight = (alpha * resized)[..., None]
    return (image * (1 - weight) + colorize(resized) * weight).round().astype(np.uint8)


def prior_panels(face: np.ndarray, landmarks: np.ndarray, au_points: np.ndarray,
                 maps: Sequence[tuple[str, np.ndarray]] = (), missing: Sequence[tuple[str, str]] = (),
                 title: str = "source") -> list[tuple[np.ndarray, str]]:
    """The prior of one face as captioned pictures: 68 landmarks, 18 AU points, then each prior map, then a tile
    saying why each missing map is not shown.

    face: H x W x 3 uint8 as the model sees it; landmarks: 68 x 2 and au_points: 18 x 2, pixels of `face`;
    maps: (name, h x w map) as a model computed it (`Engine.prior_view`), drawn over the face;
    missing: (name, reason).
    """
    panels = [
        (draw_points(face, landmarks, LANDMARK_COLOR, radius=1.5), f"{title}: 68 landmarks"),
        (draw_points(face, au_points, AU_COLOR, radius=3), f"{title}: 18 AU points"),
    ]
    panels += [(overlay_map(face, values), f"{title}: {name}") for name, values in maps]
    panels += [(text_tile(f"{name} not shown: {reason}", face.shape[1], face.shape[0]), f"{title}: {name}")
               for name, reason in missing]
    return panels

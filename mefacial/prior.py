"""Facial priors: 18 action-unit (AU) points from 68 landmarks, and the prior maps built from them.

Everything is batched torch and reproduces the arithmetic of the original
code (FPB-FOMM `modules/mask_generator.py`, Facial-Prior-Based-FOMM `make.py`),
quirks included:

* AU points: 18 landmarks (some twice), six of them pushed outwards by half
  the inner-eye distance (`au_points_from_landmarks`).
* Per-AU maps (`per_au_maps`): AU points are scaled to the map
  (`map_size / image_size`) and compared with 1-based pixel indices, rows
  against y and columns against x; the kernel is `exp(-sqrt(d) / (2 sigma^2))`
  of the L2 (TIP 2024) or L1 (ACM MM 2021) distance d; each map is divided by
  its max and zeroed where it is below its own mean.
* Equal-weighted prior (EWP, `ewp_map`): the sum of the per-AU maps divided by
  its max. The TIP 2024 code (FPB-FOMM repository root) builds it from L2
  maps, the ACM MM 2021 code from L1 maps; `distance` selects.
* Adaptive weighted prior (AWP): the per-AU maps fused by two learned 3x3
  convolutions, which live inside the models (FOMM `kp_detector.learn`,
  `kp_detector.learn1`); this module provides their input.

Landmarks and AU points are (x, y) pixel coordinates of the model input frame.
"""

from __future__ import annotations

import torch

NUM_LANDMARKS = 68
NUM_AU_POINTS = 18

# Landmark (iBUG 68, 0-based) behind each AU point, in the reference's order: first the
# landmarks of [19, 24, 27, 38, 41, 43, 46, 48, 54, 55, 57, 59] in increasing order, then
# those of [31, 35, 41, 46, 48, 54] (41, 46, 48 and 54 appear twice).
AU_LANDMARK_INDICES = (19, 24, 27, 38, 41, 43, 46, 48, 54, 55, 57, 59, 31, 35, 41, 46, 48, 54)

# Offset of each AU point from its landmark, in units of half the inner-eye distance
# (landmark 42 x minus landmark 39 x): nose wings outwards, lower eyelids downwards,
# mouth corners outwards.
AU_HALF_EYE_OFFSETS = (
    ((0.0, 0.0),) * 12
    + ((-1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (-1.0, 0.0), (1.0, 0.0))
)
_INNER_EYE_LEFT, _INNER_EYE_RIGHT = 39, 42

DISTANCES = ("l2", "l1")


def au_points_from_landmarks(landmarks: torch.Tensor) -> torch.Tensor:
    """68 landmarks (... x 68 x 2, (x, y) pixels) -> 18 AU points (... x 18 x 2), exactly as the reference."""
    if landmarks.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected landmarks of shape ... x {NUM_LANDMARKS} x 2, got {tuple(landmarks.shape)}")
    landmarks = landmarks if landmarks.is_floating_point() else landmarks.float()
    index = torch.tensor(AU_LANDMARK_INDICES, device=landmarks.device)
    offsets = torch.tensor(AU_HALF_EYE_OFFSETS, dtype=landmarks.dtype, device=landmarks.device)  # 18 x 2
    half_eye = (landmarks[..., _INNER_EYE_RIGHT, 0] - landmarks[..., _INNER_EYE_LEFT, 0]) / 2  # ...
    return landmarks[..., index, :] + offsets * half_eye[..., None, None]  # ... x 18 x 2


def precise_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (not MPS): the references compute the maps and hull areas in numpy."""
    return torch.float32 if device.type == "mps" else torch.float64


def _distance_maps(au_points_px: torch.Tensor, image_size: int, map_size: int, sigma: float, distance: str) -> torch.Tensor:
    """Per-AU maps in the reference's float64 precision (float32 on MPS): B x P x map x map."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    dtype = precise_dtype(au_points_px.device)
    # The reference scales in the points' own precision (float32) before going to float64.
    points = (au_points_px.float() * map_size / image_size).to(dtype)  # B x P x 2, (x, y) in map pixels
    index = torch.arange(1, map_size + 1, dtype=dtype, device=points.device)  # 1-based pixel indices
    d_row = (index.view(1, 1, map_size, 1) - points[..., 1, None, None]).abs()  # B x P x map x 1 (rows vs y)
    d_col = (index.view(1, 1, 1, map_size) - points[..., 0, None, None]).abs()  # B x P x 1 x map (cols vs x)
    dist = torch.sqrt(d_row**2 + d_col**2) if distance == "l2" else d_row + d_col  # B x P x map x map
    maps = torch.exp(-torch.sqrt(dist) / (2 * sigma**2))
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True)
    return maps * (maps >= maps.mean(dim=(-2, -1), keepdim=True))


def per_au_maps(
    au_points_px: torch.Tensor, image_size: int, map_size: int, sigma: float = 0.75, distance: str = "l2",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-AU distance maps: B x P x 2 AU points (pixels of an image_size frame) -> B x P x map x map (in `dtype`:
    float32, or float64 for a model run in float64)."""
    return _distance_maps(au_points_px, image_size, map_size, sigma, distance).to(dtype)


def equal_weighted(maps: torch.Tensor) -> torch.Tensor:
    """EWP fusion: B x P x h x w per-AU maps -> B x 1 x h x w, their sum divided by its max."""
    total = maps.sum(dim=1, keepdim=True)  # B x 1 x h x w
    return total / total.amax(dim=(-2, -1), keepdim=True)


def ewp_map(
    au_points_px: torch.Tensor, image_size: int, map_size: int, sigma: float = 0.75, distance: str = "l2",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Equal-weighted prior: B x P x 2 AU points -> B x 1 x map x map (in `dtype`, as `per_au_maps`)."""
    return equal_weighted(_distance_maps(au_points_px, image_size, map_size, sigma, distance)).to(dtype)

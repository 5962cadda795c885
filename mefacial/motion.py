"""Motion transfer: how the driving clip's motion is applied to the source.

FOMM part: `normalize_kp` is the original `animate.normalize_kp` (relative or
absolute keypoints and jacobians, movement-scale adaptation by the convex hull
areas of the keypoints) plus an optional magnification of the relative motion.
Everything is batched torch on the inputs' device: the source and the clip's
first frame have batch 1 and broadcast against a batch of driving frames.

Magnification (`magnify = m`, 1 reproduces the original exactly):
* keypoint values: the relative displacement is multiplied by m,
  `value = source + m * scale * (driving - initial)`;
* jacobians: the relative deformation `R = J_d J_init^-1` is extrapolated
  linearly around the identity, `J = (I + m (R - I)) J_s`. This is the
  first-order expansion of the matrix power `R^m`, which it matches closely for
  the near-identity deformations of micro-expressions, and unlike `R^m` it is
  defined for every R (no matrix logarithm, no branch cuts).
"""

from __future__ import annotations

import torch

from .errors import InputError
from .prior import precise_dtype

KP = dict  # {"value": B x K x 2, "jacobian": B x K x 2 x 2, ...}


def convex_hull_area(points: torch.Tensor) -> torch.Tensor:
    """Area of the convex hull of ... x N x 2 points (0 for fewer than 3 or collinear points), batched.

    Computes what `scipy.spatial.ConvexHull(points).volume` computes, in float64 (float32 on MPS):
    a directed edge i -> j is a hull edge (counter-clockwise) when every other point
    lies strictly left of it or on the segment itself, and the area is the
    shoelace sum over hull edges. O(N^3) per batch item, which is nothing for the
    handful of keypoints it is used on.
    """
    p = points.to(precise_dtype(points.device))  # ... x N x 2
    n = p.shape[-2]
    eye = torch.eye(n, dtype=torch.bool, device=p.device)
    # Only the first of several identical points takes part in edges.
    same = (p[..., :, None, :] == p[..., None, :, :]).all(-1)  # ... x N x N
    valid = ~(same & torch.ones_like(eye).tril(-1)).any(-1)  # ... x N
    d = p[..., None, :, :] - p[..., :, None, :]  # ... x N x N x 2: d[i, j] = p_j - p_i
    # cross[i, j, k] = (p_j - p_i) x (p_k - p_i); > 0 when k lies left of i -> j.
    cross = d[..., :, :, None, 0] * d[..., :, None, :, 1] - d[..., :, :, None, 1] * d[..., :, None, :, 0]
    dot = (d[..., :, :, None, :] * d[..., :, None, :, :]).sum(-1)  # ... x N x N x N
    length2 = (d**2).sum(-1)  # ... x N x N
    on_segment = (cross == 0) & (dot >= 0) & (dot <= length2[..., None])
    is_edge = (cross > 0) | on_segment
    edge = is_edge.all(-1) & ~eye & (length2 > 0) & valid[..., :, None] & valid[..., None, :]  # ... x N x N
    shoelace = p[..., :, None, 0] * p[..., None, :, 1] - p[..., None, :, 0] * p[..., :, None, 1]  # x_i y_j - x_j y_i
    return 0.5 * (shoelace * edge).sum(dim=(-2, -1))


def inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Batched matrix inverse; half-precision inputs are inverted in float32 (torch has no bf16/fp16 inverse)."""
    if matrices.dtype in (torch.float32, torch.float64):
        return torch.inverse(matrices)
    return torch.inverse(matrices.float()).to(matrices.dtype)


def movement_scale(kp_source: KP, kp_driving_initial: KP) -> torch.Tensor:
    """sqrt(source hull area) / sqrt(initial driving hull area): B x 1 x 1 (1 where the latter is degenerate)."""
    source_area = convex_hull_area(kp_source["value"])
    driving_area = convex_hull_area(kp_driving_initial["value"])
    ratio = torch.sqrt(source_area) / torch.sqrt(driving_area.clamp_min(torch.finfo(driving_area.dtype).tiny))
    ratio = torch.where(driving_area > 0, ratio, torch.ones_like(ratio))
    return ratio.to(kp_source["value"].dtype)[..., None, None]


def normalize_kp(
    kp_source: KP,
    kp_driving: KP,
    kp_driving_initial: KP,
    adapt_movement_scale: bool = False,
    use_relative_movement: bool = False,
    use_relative_jacobian: bool = False,
    magnify: float = 1.0,
) -> KP:
    """The keypoints that drive the source: FOMM's `normalize_kp`, plus magnification of relative motion.

    Without relative movement the driving keypoints are used as they are
    (absolute transfer). Source and initial keypoints may have batch 1.
    """
    if magnify != 1.0 and not use_relative_movement:
        raise InputError("motion magnification needs relative motion; use the 'relative' mode or magnify=1")
    kp_new = dict(kp_driving)
    if not use_relative_movement:
        return kp_new
    scale = movement_scale(kp_source, kp_driving_initial) if adapt_movement_scale else 1.0
    displacement = (kp_driving["value"] - kp_driving_initial["value"]) * scale  # B x K x 2
    if magnify != 1.0:
        displacement = displacement * magnify
    kp_new["value"] = displacement + kp_source["value"]
    if use_relative_jacobian and "jacobian" in kp_driving:
        relative = torch.matmul(kp_driving["jacobian"], inverse(kp_driving_initial["jacobian"]))  # B x K x 2 x 2
        kp_new["jacobian"] = torch.matmul(extrapolate_deformation(relative, magnify), kp_source["jacobian"])
    return kp_new


# ---- MRAA ----------------------------------------------------------------------------------------
# Region params: {"shift": B x K x 2, "affine": B x K x 2 x 2, "covar": B x K x 2 x 2, ...}.

REGION_MODES = ("standard", "relative", "avd")


def extrapolate_deformation(relative: torch.Tensor, magnify: float) -> torch.Tensor:
    """... x 2 x 2 relative deformation R -> I + m (R - I) (R itself for m = 1); see the module docstring."""
    if magnify == 1.0:
        return relative
    identity = torch.eye(2, dtype=relative.dtype, device=relative.device)
    return identity + magnify * (relative - identity)


def transfer_regions(
    src: dict,
    drv: dict,
    init: dict,
    mode: str = "relative",
    adapt_scale: bool = False,
    magnify: float = 1.0,
    avd_network=None,
) -> dict:
    """The regions that drive the source: MRAA's `get_animation_region_params`, plus magnification.

    * standard: the driving regions as they are;
    * relative: source + scale * m * (driving - initial) for shifts and
      (I + m (A_d A_init^-1 - I)) A_s for affines. The covariance (which
      shapes the heatmaps of the dense-motion network) stays the driving
      frame's, as in the original. The original always adapts the movement
      scale (sqrt of the convex hull areas of the source and initial shifts);
      here `adapt_scale=True` does;
    * avd: `avd_network(src, drv)` (identity from the source, pose from the driving frame).

    `src` and `init` may have batch 1 and broadcast against the driving batch.
    """
    if mode not in REGION_MODES:
        raise InputError(f"motion mode {mode!r} is not one of {REGION_MODES}")
    if magnify != 1.0 and mode != "relative":
        raise InputError("motion magnification needs relative motion; use the 'relative' mode or magnify=1")
    if mode == "standard":
        return dict(drv)
    if mode == "avd":
        if avd_network is None:
            raise InputError("the 'avd' mode needs the model's AVD network")
        return avd_network(src, drv)
    new = dict(drv)
    scale = movement_scale({"value": src["shift"]}, {"value": init["shift"]}) if adapt_scale else 1.0
    displacement = (drv["shift"] - init["shift"]) * scale  # B x K x 2
    if magnify != 1.0:
        displacement = displacement * magnify
    new["shift"] = displacement + src["shift"]
    relative = torch.matmul(drv["affine"], torch.inverse(init["affine"]))  # B x K x 2 x 2
    new["affine"] = torch.matmul(extrapolate_deformation(relative, magnify), src["affine"])
    return new

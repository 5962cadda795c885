"""Training-free landmark warp: the `warp` variant, which needs no weights.

A micro-expression is a small, local motion of the face; its landmarks carry it
well enough that an image warp can transfer it without learning. For each
driving frame t:

1. Motion transfer (`target_landmarks`): the driving landmarks' motion relative
   to the clip's first frame, `driving_t - initial`, is mapped from the driving
   face to the source face by the similarity (rotation and scale) that takes
   the initial frame's eye axis onto the source's eye axis, multiplied by
   `magnify`, and added to the source landmarks: the target positions.
2. Dense backward flow (`sampling_grid`): a thin-plate spline gives, at every
   output pixel, the position at which to sample the source. Its control points
   are the *target* positions (where each landmark must appear in the output)
   with the offsets `source - target`, plus anchors on the image border with a
   zero offset so the frame edge stays put. The control points move with every
   frame, so each frame has its own (N + 3) x (N + 3) system; the systems of a
   batch are solved at once with `torch.linalg.solve` (in float64), and the
   spline is evaluated at every pixel (in float32, in chunks of frames).
3. `grid_sample` of the source by that grid. With `confine_to_prior` the
   offsets are multiplied by a weight from the source's EWP facial-prior map
   (`prior_weight`), so motion stays on the face and the background holds still.

Tuning lives in the config's `model_params` (all optional), or as keyword
arguments of `LandmarkWarp`:

    use_jaw: false          # the 17 jaw-contour points as control points too
    regularization: 0.01    # TPS smoothing (0 = exact interpolation of the landmarks)
    anchors_per_side: 5     # border anchors per image side, corners included
    confine_range: [0.05, 0.15]  # with confine_to_prior: no motion where the EWP map (max 1) is
                            # below the first value, full motion above the second, linear between
    chunk_elements: 16777216  # bound on frames x pixels x control points evaluated at once

Why the defaults (measured by self-reenactment of the shared real clips, see
tests/test_warp_quality.py): dlib's jaw points slide along the face contour
from frame to frame (a detector artefact, not motion), and a spline through
them drags the background next to the cheeks (with them, PSNR on one clip fell
to the static baseline's); without them the spline extrapolates the inner
face's motion to the contour and fades it out at the border. A little
smoothing (0.01, in the [-1, 1] frame coordinates) keeps the system well posed
when two landmarks coincide (dlib returns integer positions) while keeping
97-99 % of the displacement of a moving brow, eye or mouth (85 % of a single
point's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import BackboneSpec, ClipRunner, VariantDecl, register_backbone
from ..metrics import eye_axis
from ..prior import precise_dtype

NUM_LANDMARKS = 68
JAW = slice(0, 17)  # iBUG 68: the face contour, points 0-16
PRIOR_MAP_SCALE = 0.25  # the EWP map is built at a quarter of the frame, as the prior models' hourglass sees it

DEFAULTS: dict[str, Any] = {
    "use_jaw": False,
    "regularization": 0.01,
    "anchors_per_side": 5,
    "confine_range": (0.05, 0.15),
    "chunk_elements": 1 << 24,
}


def pixels_to_grid(points: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Pixel (x, y) -> grid_sample coordinates in [-1, 1]: ... x 2 -> ... x 2.

    Pixel centres are at integer positions (the landmark convention); with
    `align_corners=False` the image spans [-0.5, W - 0.5] in pixels.
    """
    height, width = size
    extent = points.new_tensor([width, height])
    if align_corners:
        return 2 * points / (extent - 1) - 1
    return (2 * points + 1) / extent - 1


def identity_grid(size: tuple[int, int], align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """The grid that samples every pixel at its own centre: H x W x 2 (x, y), dtype and device of `like`."""
    height, width = size
    ys = torch.arange(height, dtype=like.dtype, device=like.device)
    xs = torch.arange(width, dtype=like.dtype, device=like.device)
    pixels = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # H x W x 2
    return pixels_to_grid(pixels, size, align_corners)


def border_anchors(per_side: int, like: torch.Tensor) -> torch.Tensor:
    """Points evenly spaced on the border of [-1, 1]^2, corners included: (4 * per_side - 4) x 2."""
    if per_side < 2:
        raise ValueError(f"anchors_per_side must be >= 2 (the corners), got {per_side}")
    t = torch.linspace(-1, 1, per_side, dtype=like.dtype, device=like.device)  # per_side
    inner = t[1:-1]  # the side points that are not corners
    return torch.cat(
        [
            torch.stack([t, torch.full_like(t, -1)], -1),  # top edge
            torch.stack([t, torch.full_like(t, 1)], -1),  # bottom edge
            torch.stack([torch.full_like(inner, -1), inner], -1),  # left edge
            torch.stack([torch.full_like(inner, 1), inner], -1),  # right edge
        ]
    )


def _tps_kernel(squared_distance: torch.Tensor) -> torch.Tensor:
    """Thin-plate radial basis U(r) = r^2 log r^2 (0 at r = 0), from r^2."""
    return squared_distance * torch.log(squared_distance.clamp_min(torch.finfo(squared_distance.dtype).tiny))


def tps_fit(control: torch.Tensor, values: torch.Tensor, regularization: float = 0.0) -> torch.Tensor:
    """Fit thin-plate splines f: R^2 -> R^D with f(control_i) = values_i (smoothed by `regularization`).

    control: B x N x 2; values: B x N x D. Returns B x (N + 3) x D: the N radial
    weights, then the affine part (constant, x, y).
    """
    batch, n, _ = control.shape
    kernel = _tps_kernel(torch.cdist(control, control).square())  # B x N x N
    kernel = kernel + regularization * torch.eye(n, dtype=control.dtype, device=control.device)
    affine = torch.cat([control.new_ones(batch, n, 1), control], dim=-1)  # B x N x 3
    top = torch.cat([kernel, affine], dim=-1)  # B x N x (N + 3)
    bottom = torch.cat([affine.transpose(1, 2), control.new_zeros(batch, 3, 3)], dim=-1)  # B x 3 x (N + 3)
    rhs = torch.cat([values, values.new_zeros(batch, 3, values.shape[-1])], dim=1)  # B x (N + 3) x D
    return torch.linalg.solve(torch.cat([top, bottom], dim=1), rhs)


def tps_evaluate(control: torch.Tensor, coefficients: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Evaluate fitted splines: control B x N x 2, coefficients B x (N + 3) x D, points B x P x 2 -> B x P x D."""
    n = control.shape[1]
    radial = _tps_kernel(torch.cdist(points, control).square())  # B x P x N
    affine = torch.cat([points.new_ones(*points.shape[:2], 1), points], dim=-1)  # B x P x 3
    return radial @ coefficients[:, :n] + affine @ coefficients[:, n:]


CONFINE_REACH = 0.15  # with confine_to_prior, motion fades out over this share of the face's size outside it


def face_reach(landmarks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1 inside the convex hull of a face's landmarks (P x 2 pixels), easing (smoothstep) to 0 at CONFINE_REACH x
    the face's size outside it: H x W float32."""
    import cv2
    import numpy as np

    points = landmarks.detach().double().cpu().numpy()
    hull = cv2.convexHull(np.round(points * 4).astype(np.int32))  # quarter-pixel precision
    outside = np.full(size, 255, np.uint8)
    cv2.fillConvexPoly(outside, hull, 0, lineType=cv2.LINE_8, shift=2)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, 5)  # px to the hull, 0 inside
    reach = CONFINE_REACH * float((points.max(0) - points.min(0)).max())
    ramp = np.clip(1 - distance / max(reach, 1.0), 0, 1)
    return torch.from_numpy((ramp * ramp * (3 - 2 * ramp)).astype(np.float32))


class LandmarkWarp(nn.Module):
    """The `warp` backbone: transfers landmark motion by a thin-plate-spline warp of the source.

    It has no parameters; `animate` is the whole inference. Options come from
    `config.model_params` (see the module docstring), overridden by keyword.
    """

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        super().__init__()
        settings = config.options(DEFAULTS, **options)
        self.config = config
        self.use_jaw = bool(settings["use_jaw"])
        self.regularization = float(settings["regularization"])
        self.anchors_per_side = int(settings["anchors_per_side"])
        low, high = (float(v) for v in settings["confine_range"])
        if not 0 <= low < high <= 1:
            raise ValueError(f"config {config.name!r}: confine_range must be two values 0 <= low < high <= 1, got {settings['confine_range']}")
        self.confine_range = (low, high)
        self.chunk_elements = int(settings["chunk_elements"])
        self.align_corners = config.grid_sample_align_corners

    @staticmethod
    def target_landmarks(
        source_landmarks: torch.Tensor,
        driving_landmarks: torch.Tensor,
        initial_landmarks: torch.Tensor,
        magnify: float = 1.0,
    ) -> torch.Tensor:
        """Where the source landmarks go: source + magnify * S(driving_t - initial).

        S is the similarity (rotation and scale) taking the initial frame's eye
        axis onto the source's, so motion comes in the source face's size and
        orientation. source_landmarks, initial_landmarks: 1 x 68 x 2;
        driving_landmarks: T x 68 x 2. Returns T x 68 x 2.
        """
        src_axis, drv_axis = eye_axis(source_landmarks), eye_axis(initial_landmarks)  # 1 x 2 each
        # S is multiplication by the complex ratio src / drv = a + ib
        norm = drv_axis.square().sum(-1)  # 1
        a = (src_axis * drv_axis).sum(-1) / norm  # 1
        b = (drv_axis[:, 0] * src_axis[:, 1] - drv_axis[:, 1] * src_axis[:, 0]) / norm  # 1
        similarity = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # 1 x 2 x 2
        motion = (driving_landmarks - initial_landmarks) @ similarity.transpose(1, 2)  # T x 68 x 2
        return source_landmarks + magnify * motion

    def sampling_grid(
        self, source_landmarks: torch.Tensor, target_landmarks: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Backward grid that moves source_landmarks (1 x 68 x 2) to target_landmarks (T x 68 x 2): T x H x W x 2."""
        frames = target_landmarks.shape[0]
        points = slice(None) if self.use_jaw else slice(JAW.stop, None)
        target = pixels_to_grid(target_landmarks[:, points], size, self.align_corners)  # T x P x 2
        source = pixels_to_grid(source_landmarks[:, points], size, self.align_corners).expand_as(target)  # T x P x 2
        anchors = border_anchors(self.anchors_per_side, target).expand(frames, -1, -1)  # T x A x 2
        control = torch.cat([target, anchors], dim=1)  # T x N x 2
        offsets = torch.cat([source - target, torch.zeros_like(anchors)], dim=1)  # T x N x 2
        coefficients = tps_fit(control, offsets, self.regularization)  # T x (N + 3) x 2
        # solved in the landmarks' precision (float64 from `animate`); evaluated over the pixels in float32,
        # twice as fast, within 1e-3 px of float64 even at magnify 5
        control, coefficients = control.float(), coefficients.float()
        base = identity_grid(size, self.align_corners, control)  # H x W x 2
        pixels = base.reshape(1, -1, 2)  # 1 x HW x 2
        # frames x pixels x control points stays below chunk_elements
        step = max(1, self.chunk_elements // (pixels.shape[1] * control.shape[1]))
        flow = torch.cat(
            [
                tps_evaluate(control[i : i + step], coefficients[i : i + step], pixels.expand(min(step, frames - i), -1, -1))
                for i in range(0, frames, step)
            ]
        )  # T x HW x 2
        return base + flow.reshape(frames, *size, 2)

    def prior_maps(self, au_points: torch.Tensor, image_size: int | None = None) -> dict[str, torch.Tensor]:
        """The EWP map this warp confines motion with, from B x 18 x 2 AU points (pixels of an image_size frame,
        default the config's): {"prior": B x 1 x m x m}, m = image_size * PRIOR_MAP_SCALE."""
        from .. import prior

        side = image_size or self.config.image_size
        map_size = max(1, round(side * PRIOR_MAP_SCALE))
        return {"prior": prior.ewp_map(au_points, side, map_size, self.config.prior_sigma, self.config.prior_distance)}

    def prior_weight(self, source_landmarks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Motion weight from the source's EWP map (max 1): 0 below `confine_range[0]`, 1 above
        `confine_range[1]`, linear between, times `face_reach` (1 on the face, 0 from CONFINE_REACH x the
        face's size outside its landmarks' hull). 1 x 68 x 2 -> 1 x H x W x 1.

        On loosely framed face crops the map is about 0.3 on the cheeks, 0.15-0.3 on the nose, 0.05-0.2
        along the jaw and below 0.05 in the frame's corners. The map's Gaussians have a fixed size in
        the frame, so on a tightly framed face it stays high into the corners; the reach term follows
        the face's own size, so the background holds still however the face is framed.
        """
        from .. import prior

        side = max(size)  # the map covers a square frame; non-square frames take its top-left part
        au_points = prior.au_points_from_landmarks(source_landmarks)  # 1 x 18 x 2
        ewp = self.prior_maps(au_points, side)["prior"]  # 1 x 1 x m x m
        ewp = F.interpolate(ewp.to(source_landmarks.dtype), size=(side, side), mode="bilinear", align_corners=False)
        ewp = ewp[..., : size[0], : size[1]]  # 1 x 1 x H x W
        low, high = self.confine_range
        weight = ((ewp - low) / (high - low)).clamp(0, 1).permute(0, 2, 3, 1)  # 1 x H x W x 1
        return weight * face_reach(source_landmarks[0], size).to(weight)[None, ..., None]

    def animate(
        self,
        source: torch.Tensor,
        source_landmarks: torch.Tensor,
        driving_landmarks: torch.Tensor,
        initial_landmarks: torch.Tensor,
        magnify: float = 1.0,
        confine_to_prior: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Animate `source` (1 x 3 x H x W in [0, 1]) by the landmark motion of a batch of driving frames.

        source_landmarks: 1 x 68 x 2 pixel (x, y) in the source; driving_landmarks: T x 68 x 2 in
        the driving frames; initial_landmarks: 1 x 68 x 2, the driving clip's first frame.
        confine_to_prior: weight the flow by the source's EWP prior (`prior_weight`).
        Returns {"prediction": T x 3 x H x W, "flow": T x H x W x 2 backward sampling grid (float32),
        "landmarks": T x 68 x 2 target landmarks in source pixels}.
        """
        _check_landmarks(source_landmarks, "source_landmarks", frames=1)
        _check_landmarks(initial_landmarks, "initial_landmarks", frames=1)
        _check_landmarks(driving_landmarks, "driving_landmarks")
        if source.dim() != 4 or source.shape[:2] != (1, 3):
            raise ValueError(f"source must be 1 x 3 x H x W, got shape {tuple(source.shape)}")
        size = (source.shape[-2], source.shape[-1])
        frames = driving_landmarks.shape[0]
        # the spline systems are solved in float64 (float32 on MPS, which has no float64)
        precise = dict(dtype=precise_dtype(source.device), device=source.device)
        src_points = source_landmarks.to(**precise)
        target = self.target_landmarks(
            src_points, driving_landmarks.to(**precise), initial_landmarks.to(**precise), float(magnify)
        )  # T x 68 x 2
        grid = self.sampling_grid(src_points, target, size)  # T x H x W x 2
        if confine_to_prior:
            base = identity_grid(size, self.align_corners, grid)  # H x W x 2
            grid = base + (grid - base) * self.prior_weight(src_points, size)
        grid = grid.float()  # sampling positions stay float32 whatever the image precision (fp16 is 0.1 px coarse)
        prediction = F.grid_sample(
            source.float().expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
            align_corners=self.align_corners,
        )
        return {"prediction": prediction.to(source.dtype), "flow": grid, "landmarks": target.to(source.dtype)}


def _check_landmarks(points: torch.Tensor, name: str, frames: int | None = None) -> None:
    if points.dim() != 3 or points.shape[1:] != (NUM_LANDMARKS, 2) or (frames is not None and points.shape[0] != frames):
        expected = f"{frames or 'T'} x {NUM_LANDMARKS} x 2"
        raise ValueError(f"{name} must be {expected} pixel (x, y) landmarks, got shape {tuple(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} holds NaN or infinite values; landmarks must be found on every frame")


class WarpClip(ClipRunner):
    """A clip through the warp: 68 landmarks of the source, the clip's first frame and each batch."""

    def __init__(self, model, source, first_frame, source_points, first_points, settings, to_tensor, stage=None):
        super().__init__(model, source, first_frame, source_points, first_points, settings, to_tensor, stage)
        self.source_points, self.first_points = source_points, first_points  # 1 x 68 x 2 each

    def __call__(self, frames, points, planned=None):
        with self.stage("generator"):
            return self.model.animate(self.source, self.source_points, points, self.first_points,
                                      magnify=self.settings.magnify, confine_to_prior=self.settings.confine)["prediction"]

    @classmethod
    def original_loop(cls, model, source, driving, source_points, driving_points, settings, to_tensor, stage):
        """One frame at a time (the warp has no original code; this is its unbatched form)."""
        preds = []
        for t in range(len(driving)):
            with stage("generator", t):
                preds.append(model.animate(source, source_points, driving_points[t:t + 1], driving_points[:1],
                                           magnify=settings.magnify, confine_to_prior=settings.confine)["prediction"])
        return preds


SPEC = register_backbone(BackboneSpec(
    name="warp",
    label="Training-free warp",
    title="Training-free thin-plate-spline landmark warp",
    builder=lambda config, for_training=False: LandmarkWarp(config),
    clip=WarpClip,
    motion_modes={"relative": "relative"},
    points="landmarks",
    adapt_scale=False,  # the motion is mapped by the eye axes' similarity instead
    confine=True,
    priors=("none", "ewp"),  # no learned AWP fusion
    needs_weights=False,
    variants=(VariantDecl("warp", "warp", "Training-free landmark warp"),),
))

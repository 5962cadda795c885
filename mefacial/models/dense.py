"""Training-free dense generator: the `dense` variant (478-point face mesh, local retargeting, appearance transfer).

For a target (source) face S and a driving clip D_0 .. D_T-1 (all with their
`mefacial.mesh` points, V = 478):

1. Retargeting (`DenseMeshWarp.retarget`): the head's motion (a similarity fitted on the points
   facial actions barely move, as the readout does) is taken out of each frame; what is left, each vertex's
   motion relative to the onset frame, D_t - D_0, is carried onto the target face by a local linear map:
   the area-weighted mean, over the vertex's triangles (a Delaunay triangulation
   of the target mesh, the same vertex indices on the driving face), of the
   affine map taking the driving onset triangle onto the target's one, bounded
   to [1/2, 2] x the faces' global similarity and brought to its scale (local
   proportions steer the motion; its size in inter-ocular units is kept). The lid margins use each eye's own
   frame (width ratio along the eye, aperture ratio across it), so a lid that
   closes half of the driving eye closes half of the target eye. `magnify`
   multiplies this motion; lids never cross, and the extra motion is cut back where it would fold the skin
   (`_unfolded`: no triangle squashed below FOLD_FLOOR of its area; magnified jitter tore it). The head's
   motion is then put back, not magnified and softly bounded (HEAD_SHIFT, HEAD_TURN, HEAD_ZOOM; unchanged up
   to half of each): the background holds still, so
   a head that drifts or turns far in the driving clip would tear the face from it; the small sway of a
   still-sitting subject passes as it is.
2. Geometry (`render`): a piecewise-affine map from the source mesh to the target
   mesh of frame t on the face; around it the head's motion fades out smoothly and the rest of the mesh's
   motion through a fixed triangulation of the source mesh plus still anchors on a
   ring around the face and on the picture border (`forward_motion`), evaluated on a grid of every
   `grid_step` pixels for all frames at once (one sparse product) and inverted there
   by Newton steps (`backward_flow`: two over the grid, four more where a node has not converged), then
   upsampled bilinearly: dense, continuous
   (no tearing), the background still, one full-size sampling of the source.
   Eyes are layered: inside the target eye opening (drawn in the eyes' box only) the
   eyeball is drawn unsquashed (moved by the iris motion only), and outside it the lid skin is stretched over
   what the lids now cover. A closing lid therefore covers the iris instead of
   squeezing it into a dark band. The lid margins are drawn where the eye shows what a narrowing eye shows
   (`cover_lids`: the margins and lashes hide the eyeball below `lid_margin` of the aperture a mesh reads), a
   closing lid carries its lash band with it, stretching the lid skin beyond (`carry_lash_bands`), and a
   drawn opening under FADE_OPEN of the source's shows the lids around it (lid skin and lash line) instead of
   the eyeball (`_lid_fade`), so a closing eye reads as closed lids, to a viewer and a landmark detector; what
   the skin still takes from the source's eyeball outside that opening (a mesh contour lying on the eyeball's
   edge) is drawn no brighter than the lid skin around it, so no catch-light comes down with a closing lid.
3. Appearance (`appearance_ratios`): what geometry cannot carry (furrows, lid
   shading) as an expression-ratio image on luminance: each driving frame is
   aligned to the onset frame through the mesh (the same triangles map target
   pixels to driving pixels), their luminance ratio is smoothed, normalised by its
   median over the face (no global flicker), kept whole only beyond what the onset's own pixels within
   MISALIGNMENT give (the tracker's error is no shading: of it, MISALIGNED_SHADING stays), masked to the
   face outside the lids (whose change the layered geometry draws), magnified where it stands out of the
   frame's noise and is fine (furrows, not the light or the head's pose: `_magnified_shading`, by at most
   MAGNIFIED_SHADING) and bounded to
   exp(+-ratio_bound); the target's RGB is multiplied by it (all three scaled back alike where one would pass
   1), so colour and identity stay the target's.

Options (config `model_params` or keyword arguments): grid_step (px), ring_scale
(the still ring around the face oval), ratio_bound, ratio_blur (px), appearance
(bool: with the driving frames' ratio images), lid_margin (share of the aperture a mesh reads on a
closed eye; 0 draws the retargeted lids as they are).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix, hstack
from scipy.spatial import Delaunay
from torch import nn

from .. import mesh as M
from ..config import ModelConfig
from . import BackboneSpec, ClipRunner, VariantDecl, register_backbone

DEFAULTS: dict[str, Any] = {
    "grid_step": 2,
    "ring_scale": 1.35,
    "ratio_bound": 0.35,
    "ratio_blur": 2.5,
    "appearance": True,
    "lid_margin": 0.45,
}
MAP_BOUNDS = (0.5, 2.0)  # local maps: singular values within these multiples of the global similarity's scale
RATIO_EPS = 0.06  # luminance offset of the ratio images (dark pixels would make them noisy)
# the lid region (up to the brows' lower edge, down to MediaPipe's fifth ring below the eye): geometry's
PERIOCULAR = (((143, 35, 124, 46, 53, 52, 65, 245), (143, 111, 117, 118, 119, 120, 121, 128, 245), None),
              ((372, 265, 353, 276, 283, 282, 295, 465), (372, 340, 346, 347, 348, 349, 350, 357, 465), None))
PERIOCULAR_TIP = 0.13  # x the inter-ocular distance: the radius that rounds off the lid regions' outer tips
EYES = ((M.RIGHT_EYE_UPPER, M.RIGHT_EYE_LOWER, M.RIGHT_IRIS), (M.LEFT_EYE_UPPER, M.LEFT_EYE_LOWER, M.LEFT_IRIS))
LIDS = sorted({i for upper, lower, _ in EYES for i in upper[1:-1] + lower[1:-1]})  # the lid margins, corners left out
KEPT_SHARP = sorted(set(LIDS) | set(M.STABLE_MESH))  # vertices whose magnified motion is not averaged (`_smoothed`)
CLOSED = 0.15  # a closed eye keeps this share of its aperture (the lids meet without crossing)
LID_CURVE = 0.75  # how `cover_lids` draws a read narrowing: a share n of the way to shut drawn as n ** LID_CURVE,
LID_KNEE = 0.15  # and below this n on the straight line to there (slope 1.6: the tracker's jitter not enlarged more)
# each lid's lash band: the mesh's ring just beyond its margin (above the upper margin: the lash line and the fold;
# below the lower one: its lash line), paired with EYES' upper[1:-1] and lower[1:-1]; a closing lid carries its band
# by at least LASH_CARRY of the margin's own closing motion. Per eye: (upper lid's ring, lower lid's ring)
LASH_RINGS = ((M.RIGHT_UPPER_LID[7:14], M.RIGHT_LOWER_LID[7:14]), (M.LEFT_UPPER_LID[7:14], M.LEFT_LOWER_LID[7:14]))
LASH_CARRY = 0.7
BORDER_TAPER = 0.06  # share of the picture's size over which motion fades out towards its edge
NEWTON_STEPS = 2  # sampled Newton steps inverting the forward map on the grid
REFINE_FROM = 0.1  # px: a node whose last Newton step was longer takes REFINE_STEPS more
REFINE_STEPS = 4
MAX_STEP = 4.0  # px: the longest Newton step inverting the forward map on the grid
FADE_OPEN = 0.5  # a drawn eye opening narrower than this share of the source's starts showing lids, not eyeball
LID_BLUR = 0.2  # x the source's eye aperture: the reach (Gaussian sigma) of the lid colours filling a closing eye
HEAD_SHIFT = 0.1  # x the source's inter-ocular distance: the soft bound of the head shift carried over
HEAD_TURN = float(np.radians(3.0))  # the soft bound of the in-plane head turn carried over
HEAD_ZOOM = 0.05  # the soft bound of the head's change of scale carried over (log)
LID_RIM = 0.25  # x the source's eye aperture: the band inside each drawn lid margin that moves with the lid (see `_rim_weights`)
SMOOTHING = 3  # rounds of neighbour averaging of the extra motion `magnify` adds (see `_smoothed`)
FOLD_FLOOR = 0.3  # magnified motion squashes no triangle of the face below this share of its area (see `_unfolded`)
FINE_SHADING = 0.06  # x the inter-ocular distance: the Gaussian sigma parting fine shading from broad
MISALIGNMENT = 2.0  # px: the mesh's tracking error between a clip's frames, which the ratio images allow for
MISALIGNED_SHADING = 0.03  # log luminance: how much of what a misalignment explains the ratio images keep (below)
MAGNIFIED_SHADING = 0.1  # log luminance: the most `magnify` adds to (or takes from) the driving's shading change
SUPERSAMPLE = 4  # eye-opening masks are drawn at 4x and averaged (anti-aliased edges)


@dataclasses.dataclass(frozen=True)
class SourceGeometry:
    """What a `DenseState` holds that depends on the source mesh (and the picture's size) alone."""

    triangles: np.ndarray  # K x 3: Delaunay triangles of the source mesh
    anchors: np.ndarray  # A x 2: still points (ring around the face, picture border)
    grid: np.ndarray  # G x 2: the coarse grid (pixels)
    grid_shape: tuple[int, int]  # h x w = G
    outside: np.ndarray  # G x 2 float32: the grid points outside the mesh in grid_sample units, 0 inside it
    taper: np.ndarray  # G: motion weight, 0 on the picture's edge
    face_mask: torch.Tensor  # 1 x 1 x h x w on the grid (CPU): where ratio images apply (face, eye openings left out;
    #                          tapered to 0 at the picture's edge as the motion is)
    face_points: torch.Tensor  # n: flat grid indices where face_mask > 0.5 (the ratio images' median)
    barycentric: Any  # G x V sparse float32 (scipy CSR): grid points as barycentric combinations of mesh vertices
    motion_weights: Any  # G x (468 + A + 3) sparse (scipy CSR): grid points in the triangles of the mesh + still
    #                      anchors, then (x, y, 1) x the share of the head's motion they follow (1 on the face, 0 at
    #                      the ring)
    skin: np.ndarray  # K' x 3: triangles of the mesh + still anchors (indices past 467: anchors), the eye and mouth
    #                   openings' left out (what `_unfolded` keeps from folding)
    neighbours: Any  # N x N sparse (scipy CSR), rows summing to 1: each vertex's neighbours on the skin (`_smoothed`)
    incidence: np.ndarray  # N x D: each vertex's skin triangles, padded with K (no triangle)
    lid_blur: float  # pixels: the reach (Gaussian sigma) of the lid colours filling a closing eye (LID_BLUR)
    lid_rim: float  # pixels: the band inside the drawn lid margins that moves with the lids (LID_RIM)
    openings: np.ndarray  # H x W float32: the source's eye openings (anti-aliased coverage)

    @property
    def inside(self) -> np.ndarray:
        """G bool: grid points inside the source mesh (their barycentric row holds weights)."""
        return np.diff(self.barycentric.indptr) > 0


@dataclasses.dataclass
class DenseState:
    """What `prepare` computes once per (source, clip): meshes, local maps, and the source's geometry (whose
    fields it answers for: `state.grid` is `state.geometry.grid`)."""

    size: tuple[int, int]  # H, W
    source_mesh: np.ndarray  # V x 2 float64
    initial_mesh: np.ndarray  # V x 2
    maps: np.ndarray  # V x 2 x 2: driving motion -> target motion, per vertex
    geometry: SourceGeometry
    face_mask: torch.Tensor  # the geometry's, on the source's device
    source: torch.Tensor  # 1 x 3 x H x W
    initial_luma: torch.Tensor | None  # 1 x 1 x H x W
    # made on first use, then reused by every batch
    pixels: torch.Tensor | None = None  # H x W x 2: pixel centres (x, y)
    pixel_units: torch.Tensor | None = None  # H x W x 2: the same in grid_sample units (align_corners=False)
    grid_points: torch.Tensor | None = None  # 1 x 2 x h x w: the coarse grid's points (x, y), pixels (CPU)
    onset_luma: torch.Tensor | None = None  # 1 x 1 x h x w: the onset frame's luminance on the grid, blurred
    misaligned: torch.Tensor | None = None  # 2 x 1 x h x w: the least and most log ratio a misalignment gives there
    source_eyes: torch.Tensor | None = None  # 1 x 4 x H x W: the source and its eye openings (the eyeball layer's)
    eyeball_reach: torch.Tensor | None = None  # 1 x 1 x H x W: the openings widened by a pixel (`render`)

    def __getattr__(self, name: str) -> Any:
        if name == "geometry":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self.geometry, name)


@dataclasses.dataclass
class MeshMotion:
    """A batch's motion, from its driving meshes alone (`DenseMeshWarp.motion`): what the engine has its mesh
    tracker's thread compute ahead while earlier batches are rendered."""

    driving: np.ndarray  # T x V x 2 driving meshes
    target: np.ndarray  # T x V x 2 retargeted meshes
    drawn: np.ndarray  # T x V x 2 as drawn (lid margins covered: `cover_lids`; lash bands carried: `carry_lash_bands`)
    flow: torch.Tensor  # T x 2 x h x w: the skin's backward map on the grid, pixels (`backward_flow`)
    sampled_at: torch.Tensor | None  # T x h x w x 2: where the ratio images read the driving frames (None: no appearance)


LUMA = (0.299, 0.587, 0.114)  # BT.601 luminance weights of R, G, B


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """T x 3 x H x W in [0, 1] -> T x 1 x H x W luminance (BT.601); a T x 1 x H x W luminance as it is."""
    if frames.shape[1] == 1:
        return frames
    return (frames * frames.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)


def luminance(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """B x H x W x 3 uint8 frames -> B x 1 x H x W float32 luminance in [0, 1] (BT.601), as `_luma` of the frames
    as tensors, without making their float RGB (what the appearance transfer needs of the driving frames)."""
    luma = np.asarray(frames) @ (np.array(LUMA, np.float32) / 255)  # B x H x W
    return torch.from_numpy(luma)[:, None].to(device)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of T x C x H x W (reflect padding, the kernel cut at 3 sigma): OpenCV's on the CPU
    (5x faster than the shifted copies below, whose values it gives to 1e-7; conv2d's oneDNN path is slower still
    for these small kernels), a sum of shifted copies on other devices."""
    if sigma <= 0:
        return images
    radius = max(1, int(round(3 * sigma)))
    if images.device.type == "cpu":
        import cv2  # here, not at import: `import mefacial` must work where OpenCV is absent (a GPU box for benchmarks)

        planes = images.float().contiguous().reshape(-1, *images.shape[-2:]).numpy()
        out = np.empty_like(planes)
        for plane, blurred in zip(planes, out):
            cv2.GaussianBlur(plane, (2 * radius + 1, 2 * radius + 1), sigma, dst=blurred,
                             borderType=cv2.BORDER_REFLECT_101)
        return torch.from_numpy(out).view(images.shape)
    return _blur_shifted(images, sigma)


def _blur_shifted(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """`_blur` as sums of shifted copies (any device)."""
    radius = max(1, int(round(3 * sigma)))
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = sum(float(k) * padded[..., i:i + height, :] for i, k in enumerate(kernel))  # T x C x H x (W + 2r)
    return sum(float(k) * rows[..., i:i + width] for i, k in enumerate(kernel))


def _to_grid(points, size: tuple[int, int]):
    """Pixel (x, y) -> grid_sample coordinates (align_corners=False): ... x 2 -> ... x 2 (a tensor or an array)."""
    height, width = size
    scale = points.new_tensor([width, height]) if isinstance(points, torch.Tensor) else np.array([width, height],
                                                                                                  points.dtype)
    return (2 * points + 1) / scale - 1


def _units(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_to_grid` for channel-first tensors (T x 2 x h x w pixels): (scale, shift), each 1 x 2 x 1 x 1, with
    units = pixels x scale + shift (displacements: x scale alone)."""
    height, width = size
    scale = torch.tensor([2 / width, 2 / height]).view(1, 2, 1, 1)
    return scale, scale / 2 - 1


def _lower_median(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The lower median of each row of `values` (T x N) over `columns` (n indices): T. On the CPU by numpy's
    partition (3x faster than torch's kthvalue, itself 2x faster than its median), else by kthvalue."""
    k = (len(columns) + 1) // 2
    if values.device.type == "cpu":
        picked = values.detach().numpy()[:, columns.numpy()]  # T x n (a copy: partitioned in place)
        return torch.from_numpy(np.partition(picked, k - 1, axis=1)[:, k - 1])
    return values.index_select(1, columns.to(values.device)).kthvalue(k, 1).values


def _grid_in(state: "DenseState", meshes: np.ndarray) -> torch.Tensor:
    """Where each grid point of the source is in frames with the given meshes (T x V x 2 float32 pixels): the same
    barycentric weights in the same triangles (one sparse product), the grid itself outside the mesh; T x h x w x 2
    in grid_sample coordinates (align_corners=False)."""
    frames, (h, w) = len(meshes), state.grid_shape
    units = _to_grid(meshes, state.size)  # T x V x 2 (an affine map: barycentric weights sum to 1)
    at = state.barycentric @ units.transpose(1, 0, 2).reshape(meshes.shape[1], -1)  # G x 2T
    at += np.tile(state.outside, frames)  # (6x faster than adding it broadcast over the frames)
    return torch.from_numpy(at).view(h, w, frames, 2).permute(2, 0, 1, 3)  # (a view: grid_sample takes its strides)


def _similarity(source: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """2 x 2 rotation-and-scale taking the driving eye axis (33 -> 263) onto the source's."""
    a, b = source[263] - source[33], initial[263] - initial[33]
    ratio = complex(*a) / complex(*b)
    return np.array([[ratio.real, -ratio.imag], [ratio.imag, ratio.real]])


def _soft_bound(value: float, bound: float) -> float:
    """`value` as it is up to half the bound, then bent smoothly (tanh) towards the bound, which it never passes."""
    knee = bound / 2
    size = abs(value)
    if size <= knee:
        return value
    return float(np.copysign(knee + knee * np.tanh((size - knee) / knee), value))


def _move_head(faces: np.ndarray, heads: list, source: np.ndarray, onset: np.ndarray) -> np.ndarray:
    """Target meshes T x V x 2 moved by the driving head's motion: `heads`, per frame, the (scale, rotation,
    shift) taking frame t's stable points onto the onset's (`mesh.fit_similarity`), whose inverse is carried onto the
    source face (its shift through the faces' similarity) and softly bounded (HEAD_SHIFT, HEAD_TURN, HEAD_ZOOM: as
    it is up to half of each, bent towards it beyond)."""
    stable = list(M.STABLE_MESH)
    centre_s, centre_d = source[stable].mean(0), onset[stable].mean(0)
    faces_map = _similarity(source, onset)  # driving face -> source face (2 x 2)
    reach = HEAD_SHIFT * float(M.inter_ocular(source))
    out = np.empty_like(faces)
    for t, (scale, rotation, shift) in enumerate(heads):
        moved = rotation.T @ (centre_d - shift) / scale - centre_d  # the onset centre's motion to frame t
        moved = faces_map @ moved
        length = float(np.linalg.norm(moved))
        if length > 1e-9:
            moved *= _soft_bound(length, reach) / length
        turn = _soft_bound(-np.arctan2(rotation[1, 0], rotation[0, 0]), HEAD_TURN)
        zoom = np.exp(_soft_bound(-np.log(scale), HEAD_ZOOM))
        c, s = np.cos(turn) * zoom, np.sin(turn) * zoom
        out[t] = (faces[t] - centre_s) @ np.array([[c, -s], [s, c]]).T + centre_s + moved
    return out


def _bounded(maps: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """K x 2 x 2 maps with singular values relative to the similarity bounded to MAP_BOUNDS; reflections -> it."""
    relative = np.linalg.inv(similarity) @ maps
    u, s, vt = np.linalg.svd(relative)
    s = np.clip(s, *MAP_BOUNDS)
    fixed = u @ (s[:, :, None] * vt)
    fixed[np.linalg.det(relative) <= 0] = np.eye(2)
    return similarity @ fixed


def _skin(anchored: Delaunay) -> tuple[np.ndarray, Any, np.ndarray]:
    """The face's skin in the triangulation of the mesh and the still anchors: (K x 3 triangles, the eye and mouth
    openings' left out, oriented so that their source areas are positive; N x N sparse neighbour averaging over
    their edges, rows summing to 1; N x D each vertex's triangles, padded with K)."""
    openings = [set(u) | set(l) for u, l, _ in EYES] + [set(M.MOUTH_OPENING)]
    skin = np.array([t for t in anchored.simplices if not any(set(t) <= hole for hole in openings)])
    flipped = _doubled_areas(anchored.points, skin) < 0
    skin[flipped] = skin[flipped][:, [0, 2, 1]]
    count = len(anchored.points)
    edges = np.unique(np.sort(np.concatenate([skin[:, [0, 1]], skin[:, [1, 2]], skin[:, [2, 0]]]), 1), axis=0)
    both_ways = np.concatenate([edges, edges[:, ::-1]])
    adjacency = csr_matrix((np.ones(len(both_ways)), (both_ways[:, 0], both_ways[:, 1])), shape=(count, count))
    degree = np.maximum(np.asarray(adjacency.sum(1)).ravel(), 1)
    neighbours = csr_matrix(adjacency.multiply(1 / degree[:, None]))
    corners = skin.ravel()  # 3K: each triangle's three vertices
    order = np.argsort(corners, kind="stable")
    starts = np.searchsorted(corners[order], np.arange(count))
    slot = np.arange(len(corners)) - starts[corners[order]]  # each corner's place among its vertex's triangles
    incidence = np.full((count, slot.max() + 1), len(skin))
    incidence[corners[order], slot] = order // 3
    return skin, neighbours, incidence


def _cross(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The 2-D cross product of ... x 2 vectors: ..."""
    return u[..., 0] * w[..., 1] - u[..., 1] * w[..., 0]


def _doubled_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Twice the signed areas of `triangles` (K x 3) over `points` (... x N x 2): ... x K."""
    return _cross(points[..., triangles[:, 1], :] - points[..., triangles[:, 0], :],
                  points[..., triangles[:, 2], :] - points[..., triangles[:, 0], :])


def _first_root(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Elementwise, the first s in (0, 1] where a + b s + c s^2 reaches 0 (a >= 0), else 1; 0 where a < 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = np.sqrt(np.maximum(b * b - 4 * a * c, 0))
        roots = np.stack([np.where(np.abs(c) > 1e-12, (-b - disc) / (2 * c), -a / b),
                          np.where(np.abs(c) > 1e-12, (-b + disc) / (2 * c), np.inf)])
    real = b * b - 4 * a * c >= 0
    roots = np.where(real & (roots > 0) & (roots <= 1), roots, 1.0)
    return np.where(a < 0, 0.0, roots.min(0))


def _smoothed(state: "DenseState", motion: np.ndarray, rounds: int = SMOOTHING) -> np.ndarray:
    """T x V x 2 motion averaged with its neighbours' on the face's skin (`rounds` times, half its own and half
    theirs; the still anchors count as neighbours that do not move): what is left of the tracking's jitter, a
    different error at each vertex, cancels out while the motion of a region stays. The lid margins (a lid's
    edge moves apart from the skin around it) and the points the head's motion is read from (`M.STABLE_MESH`)
    keep their own."""
    neighbours = state.neighbours  # N x N sparse, rows summing to 1 (N: the mesh's 468 vertices + the anchors)
    n = neighbours.shape[0]
    flat = np.zeros((n, len(motion) * 2))
    flat[:M.NUM_MESH] = np.moveaxis(motion[:, :M.NUM_MESH], 0, 1).reshape(M.NUM_MESH, -1)
    for _ in range(rounds):
        smooth = 0.5 * flat + 0.5 * (neighbours @ flat)
        smooth[M.NUM_MESH:] = 0
        smooth[KEPT_SHARP] = flat[KEPT_SHARP]
        flat = smooth
    out = np.array(motion, copy=True)
    out[:, :M.NUM_MESH] = np.moveaxis(flat[:M.NUM_MESH].reshape(M.NUM_MESH, len(motion), 2), 1, 0)
    return out


def _unfolded(state: "DenseState", faithful: np.ndarray, magnified: np.ndarray, passes: int = 12) -> np.ndarray:
    """Magnified target meshes (T x V x 2) whose extra motion over the faithful ones is cut back, vertex by vertex,
    where it would squash a triangle of the face (`SourceGeometry.skin`, with the still anchors) below FOLD_FLOOR
    of its area, or of the faithful motion's where that squashes it more, or stretch it past the inverse:
    magnified tracking jitter and a lip pressed on a lip would otherwise fold the skin over itself (tears, dark
    lines). Each triangle allows the share of its corners' extra motion that keeps its area there (the first
    root of a quadratic) and each vertex keeps the least its triangles allow, over `passes` (continuous in the
    meshes: it does not flicker); the few triangles then still squashed below half the floor or stretched past
    twice the ceiling (their corners cut back unequally) have their corners keep the faithful motion. A triangle
    the faithful motion folds keeps its fold. (Lid margins are cut back too: exempt, a lower lid moved 5 times
    past its lash line folded the skin there.)"""
    skin, anchors = state.skin, state.anchors
    still = np.broadcast_to(anchors, (len(faithful),) + anchors.shape)
    base = np.concatenate([faithful[:, :M.NUM_MESH], still], 1)  # T x N x 2
    extra = np.concatenate([magnified[:, :M.NUM_MESH], still], 1) - base
    rest = _doubled_areas(np.concatenate([state.source_mesh[:M.NUM_MESH], anchors]), skin)  # K
    area = _doubled_areas(base, skin)  # T x K
    floor, ceiling = FOLD_FLOOR * np.minimum(rest, area), np.maximum(rest, area) / FOLD_FLOOR
    u, w = (base[:, skin[:, i]] - base[:, skin[:, 0]] for i in (1, 2))  # T x K x 2: the faithful edges
    keep = np.ones(base.shape[:2])  # T x N: the share of its extra motion each vertex keeps
    folded = area <= 0  # T x K: the faithful motion folds these already; their corners keep it
    t, k = np.nonzero(folded)
    keep[t[:, None], skin[k]] = 0
    for _ in range(passes):
        moved = keep[..., None] * extra
        du, dw = (moved[:, skin[:, i]] - moved[:, skin[:, 0]] for i in (1, 2))
        grow, curve = _cross(u, dw) + _cross(du, w), _cross(du, dw)  # the area at share s: area + s grow + s^2 curve
        allowed = np.minimum(_first_root(area - floor, grow, curve), _first_root(ceiling - area, -grow, -curve))
        allowed[folded] = 1
        if allowed.min() >= 0.98:  # T x K: each triangle within 2 % of its corners' extra motion from its bound
            break
        share = np.concatenate([allowed, np.ones((len(allowed), 1))], 1)[:, state.incidence].min(-1)  # T x N
        keep *= share
    for _ in range(passes):
        areas = _doubled_areas(base + keep[..., None] * extra, skin)
        out = ~folded & ((areas < floor / 2) | (areas > 2 * ceiling))  # T x K
        if not out.any():
            break
        t, k = np.nonzero(out)
        keep[t[:, None], skin[k]] = 0
    out = np.array(magnified, copy=True)
    out[:, :M.NUM_MESH] = faithful[:, :M.NUM_MESH] + keep[:, :M.NUM_MESH, None] * extra[:, :M.NUM_MESH]
    return out


def _eye_frame(points: np.ndarray, upper, lower) -> tuple[np.ndarray, float, float]:
    """(2 x 2 rotation whose columns are the eye axis and its normal, eye width, aperture) of one eye."""
    axis = points[upper[-1]] - points[upper[0]]
    width = float(np.linalg.norm(axis))
    u = axis / width
    normal = np.array([-u[1], u[0]])
    if (points[list(lower[2:7])] - points[list(upper[2:7])]).mean(0) @ normal < 0:
        normal = -normal  # from the upper lid towards the lower one, whichever way the eye's corners run
    rotation = np.stack([u, normal], axis=1)
    aperture = float(np.mean(np.linalg.norm(points[list(upper[2:7])] - points[list(lower[2:7])], axis=1)))
    return rotation, width, aperture


def _lid_normals(source: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each of the EYES' normal (2,) to its axis in the `source` mesh, from the upper lid towards the lower one:
    made once per source mesh (every batch asks for it)."""
    return _lid_normals_of(np.ascontiguousarray(source, np.float64).tobytes())


@functools.lru_cache(maxsize=8)
def _lid_normals_of(data: bytes) -> tuple[np.ndarray, ...]:
    source = np.frombuffer(data).reshape(-1, 2)
    normals = tuple(_eye_frame(source, upper, lower)[0][:, 1] for upper, lower, _ in EYES)
    for normal in normals:
        normal.flags.writeable = False
    return normals


def local_maps(source: np.ndarray, initial: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Per-vertex 2 x 2 maps (V x 2 x 2) carrying driving motion at the onset mesh `initial` onto the `source` mesh."""
    similarity = _similarity(source, initial)
    s0, s1, s2 = (source[triangles[:, k]] for k in range(3))
    d0, d1, d2 = (initial[triangles[:, k]] for k in range(3))
    edges_s = np.stack([s1 - s0, s2 - s0], axis=-1)  # K x 2 x 2 (edges as columns)
    edges_d = np.stack([d1 - d0, d2 - d0], axis=-1)
    det_d = np.linalg.det(edges_d)
    ok = np.abs(det_d) > 1e-6
    maps = np.repeat(similarity[None], len(triangles), axis=0)
    maps[ok] = _bounded(edges_s[ok] @ np.linalg.inv(edges_d[ok]), similarity)
    area = np.abs(np.linalg.det(edges_s)) / 2 + 1e-9  # K
    total = np.zeros((len(source), 2, 2))
    weight = np.zeros(len(source))
    for k in range(3):
        np.add.at(total, triangles[:, k], area[:, None, None] * maps)
        np.add.at(weight, triangles[:, k], area)
    out = np.repeat(similarity[None], len(source), axis=0)
    used = weight > 0
    out[used] = total[used] / weight[used, None, None]
    # keep each local map's shape (direction, anisotropy) at the faces' global scale: motion keeps its size
    # relative to the face (inter-ocular units), and local proportions only steer it
    scale = np.sqrt(np.abs(np.linalg.det(out)))
    out *= (np.sqrt(abs(np.linalg.det(similarity))) / np.maximum(scale, 1e-9))[:, None, None]
    # the lid margins and irises: each eye's own frame (width along it, aperture across it)
    for upper, lower, iris in EYES:
        rot_s, width_s, gap_s = _eye_frame(source, upper, lower)
        rot_d, width_d, gap_d = _eye_frame(initial, upper, lower)
        along = width_s / width_d
        across = float(np.clip(gap_s / max(gap_d, 1e-6), MAP_BOUNDS[0] * along, MAP_BOUNDS[1] * along))
        eye_map = rot_s @ np.diag([along, across]) @ rot_d.T
        out[list(set(upper[1:-1]) | set(lower[1:-1]) | set(iris))] = eye_map
    return out


def cover_lids(source: np.ndarray, target: np.ndarray, margin: float = DEFAULTS["lid_margin"], curve: float = LID_CURVE
               ) -> np.ndarray:
    """Target meshes (T x V x 2) whose lid margins are drawn where the eye shows what a narrowing eye shows.

    A mesh's lid contour lies on the lid margins, which have thickness (margin skin and lashes): a face mesh reads
    a closed eye at about 0.4-0.55 of its open aperture (measured on 256 px faces: the published FOMM outputs'
    closed eyes, our own fully closed lids), so an eye read at a share r of its aperture shows less eyeball than
    r, none at r = margin. Of the way from open (r = 1) to shut (r = margin), an eye read at r has gone
    n = (1 - r) / (1 - margin), and is drawn n ** curve of the way (below LID_KNEE, on the straight line from
    open to that point): its opening is the rest, at least CLOSED (as retargeting keeps), each lid taking the
    cut in proportion to its own closing motion (corners kept), and the lid skin, with its lash line at the
    margin, is drawn over the rest. The curve (under 1) draws small narrowings larger than the straight line
    would, because detectors read a small drawn narrowing as smaller still (a straight line asked for 0.9 of the
    aperture read back 0.94-0.98 by the face mesh, a rising lower lid least: `dense_quality.py --lid-readback`):
    with it a squint carried to another face reads about as narrow as the driving's (`--synthetic`); the knee
    keeps it from enlarging the tracker's jitter on an open eye without bound. An eye that does not narrow is
    unchanged; margin 0 with curve 1 draws the retargeted mesh as it is."""
    out = np.array(target, np.float64, copy=True)
    for (upper, lower, _), normal in zip(EYES, _lid_normals(source)):  # normal: from the upper lid to the lower one
        up, lo = list(upper[1:-1]), list(lower[1:-1])
        gap_s = np.maximum((source[lo] - source[up]) @ normal, 0)  # 7
        gap = (out[:, lo] - out[:, up]) @ normal  # T x 7
        ratio = gap[:, 1:-1].sum(1) / max(gap_s[1:-1].sum(), 1e-9)  # T: the eye's aperture share (middle pairs)
        closed = np.clip((1 - ratio) / (1 - margin), 0, 1)  # T: how far from open (0) to shut (1) it reads
        drawn = np.maximum(CLOSED, 1 - closed * np.maximum(closed, LID_KNEE) ** (curve - 1))  # T: the drawn opening
        shrink = np.clip(np.where(ratio < 1, drawn / np.maximum(ratio, 1e-9), 1.0), 0, 1)  # T: gap multiplier
        down = np.maximum((out[:, up] - source[up]) @ normal, 0).sum(1)  # T: the upper lid's closing motion
        rise = np.maximum((source[lo] - out[:, lo]) @ normal, 0).sum(1)  # T: the lower lid's
        share = np.where(down + rise > 1e-9, down / np.maximum(down + rise, 1e-9), 0.5)[:, None, None]  # upper's
        span = out[:, lo] - out[:, up]  # T x 7 x 2
        cut = (1 - shrink)[:, None, None] * span
        out[:, up] = out[:, up] + share * cut
        out[:, lo] = out[:, lo] - (1 - share) * cut
    return out


def carry_lash_bands(source: np.ndarray, target: np.ndarray, carry: float = LASH_CARRY) -> np.ndarray:
    """Target meshes (T x V x 2) whose ring beyond each lid margin (`LASH_RINGS`) follows at least `carry` of the
    margin's closing motion: a closing lid moves its lash line (and the upper lid its fold) over the eye, and the
    skin beyond them stretches, as a real lid unfolds (stretching the band itself drew the lashes as streaks across
    a closed lid, and a rising lower lid's lash line stayed below it). Lids that do not close, and the rest of the
    mesh, are unchanged."""
    out = np.array(target, np.float64, copy=True)
    for (upper, lower, _), rings, normal in zip(EYES, LASH_RINGS, _lid_normals(source)):  # normal: upper -> lower
        for margin, ring, closes in ((upper, rings[0], normal), (lower, rings[1], -normal)):
            margin, ring = list(margin[1:-1]), list(ring)
            closing = (out[:, margin] - source[margin]) @ closes  # T x 7: each margin point's closing motion
            moved = (out[:, ring] - source[ring]) @ closes  # T x 7: the ring's own motion the same way
            out[:, ring] += np.where(closing > 0, np.maximum(carry * closing - moved, 0), 0)[..., None] * closes
    return out


def _lid_fade(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """T x 2 (the EYES): how far each drawn eye opening has closed, 0 (at FADE_OPEN of the source's aperture or
    more) to 1 (the lids met, at CLOSED), smoothstepped: the share of the opening drawn as the lids around it."""
    shares = []
    for (upper, lower, _), normal in zip(EYES, _lid_normals(source)):
        up, lo = list(upper[2:7]), list(lower[2:7])
        gap_s = max(float(((source[lo] - source[up]) @ normal).sum()), 1e-9)
        shares.append(((target[:, lo] - target[:, up]) @ normal).sum(1) / gap_s)  # T
    return _smoothstep((FADE_OPEN - np.stack(shares, 1)) / (FADE_OPEN - CLOSED))


def _rim_weights(target: np.ndarray, source: np.ndarray, rim: float, offset: np.ndarray, box: tuple[int, int]
                 ) -> list[np.ndarray]:
    """Per eye, T x h x w in [0, 1] over the eyes' box (`offset`: its top-left pixel, `box`: h, w): 0 on the drawn
    lid margins, rising linearly to 1 at `rim` pixels inside the opening (0 outside the eye's own opening box).

    A face mesh's lid margins lie on the lids' rims, outside the visible edge of the opening (the lower one by up to
    a fifth of the aperture): the eyeball layer drawn right up to the drawn margin showed the source's eyeball
    where the moved lid's rim belongs, so a lid moving by less than its rim moved no visible edge, and a drawn
    narrowing was read at a fraction of itself. In this band the skin's map, which carries the rim, shows."""
    frames, (height, width) = len(target), box
    out = []
    for (upper, lower, _), normal in zip(EYES, _lid_normals(source)):
        weights = np.zeros((frames, height, width), np.float32)
        outline = target[:, list(upper) + list(lower)] - offset  # T x n x 2, in the box
        (x0, y0), (x1, y1) = np.floor(outline.min((0, 1))).astype(int), np.ceil(outline.max((0, 1))).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            out.append(weights)
            continue
        ys, xs = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None]
        axis = np.array([normal[1], -normal[0]])
        along, across = xs * axis[0] + ys * axis[1], xs * normal[0] + ys * normal[1]  # h' x w' each
        for t in range(frames):
            margins = []
            for lid in (outline[t, :len(upper)], outline[t, len(upper):]):  # upper, lower margin: n x 2
                u, v = lid @ axis, lid @ normal
                order = np.argsort(u)
                margins.append(np.interp(along, u[order], v[order]))  # the margin across, at each pixel's place
            depth = np.minimum(across - margins[0], margins[1] - across)  # inside the opening: > 0
            weights[t, y0:y1, x0:x1] = np.clip(depth / rim, 0, 1)
        out.append(weights)
    return out


def _eye_polygon(points: np.ndarray, upper, lower) -> np.ndarray:
    """The eye opening's outline (upper margin, then the lower one back): ... x n x 2."""
    return points[..., _outline(tuple(upper), tuple(lower)), :]


@functools.lru_cache(maxsize=None)
def _outline(upper: tuple, lower: tuple) -> np.ndarray:
    return np.array([*upper, *lower[-2:0:-1]])


def _fill(polygons: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage (H x W float32 in [0, 1]) of polygons in pixel coordinates (drawn in their
    bounding box only, at SUPERSAMPLE x)."""
    height, width = size
    out = np.zeros((height, width), np.float32)
    if not polygons:
        return out
    points = np.concatenate(polygons)
    x0, y0 = (max(int(np.floor(v)) - 1, 0) for v in points.min(0))
    x1, y1 = min(int(np.ceil(points[:, 0].max())) + 2, width), min(int(np.ceil(points[:, 1].max())) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return out
    import cv2  # here, not at import: `import mefacial` must work where OpenCV is absent (a GPU box for benchmarks)

    canvas = np.zeros(((y1 - y0) * SUPERSAMPLE, (x1 - x0) * SUPERSAMPLE), np.uint8)
    for polygon in polygons:  # pixel centre (x, y) -> supersampled pixel centre, in 1/16 px
        scaled = np.round(((polygon - [x0, y0] + 0.5) * SUPERSAMPLE - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [scaled], 255, lineType=cv2.LINE_8, shift=4)
    out[y0:y1, x0:x1] = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA) / 255.0
    return out


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, and 3x^2 - 2x^3 between (flat at both ends)."""
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _distance_to_edges(points: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each point's distance to the nearest of the segments: P x 2 points, E x 2 x 2 segments -> P (in blocks)."""
    start, along = edges[:, 0], edges[:, 1] - edges[:, 0]  # E x 2
    length_sq = np.maximum((along * along).sum(-1), 1e-12)
    out = np.empty(len(points))
    for block in range(0, len(points), 8192):
        offset = points[block:block + 8192, None] - start  # p x E x 2
        share = np.clip((offset * along).sum(-1) / length_sq, 0, 1)  # p x E
        out[block:block + 8192] = np.linalg.norm(offset - share[..., None] * along, axis=-1).min(1)
    return out


def _barycentric_matrix(delaunay: Delaunay, grid: np.ndarray) -> csr_matrix:
    """G x N sparse matrix of the grid points' barycentric weights in a Delaunay triangulation of N points; rows of
    points outside it are empty."""
    simplex = delaunay.find_simplex(grid)
    inside = np.flatnonzero(simplex >= 0)
    affine = delaunay.transform[simplex[inside]]  # n x 3 x 2
    bary = np.einsum("nij,nj->ni", affine[:, :2], grid[inside] - affine[:, 2])
    weights = np.concatenate([bary, 1 - bary.sum(1, keepdims=True)], 1)  # n x 3
    return csr_matrix((weights.ravel(), (np.repeat(inside, 3), delaunay.simplices[simplex[inside]].ravel())),
                      shape=(len(grid), len(delaunay.points)))


def _solve(packed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(I + J)^-1 residual per grid point: packed T x 6 x h x w (d, then I + J's columns: d/dx, d/dy, as
    `backward_flow` packs them), residual T x 2 x h x w; a near-singular (folded) Jacobian gives a bounded step.
    Written into few new tensors (the Newton steps' main cost is their element-wise passes)."""
    a, c, b, e = packed[:, 2], packed[:, 3], packed[:, 4], packed[:, 5]  # I + J = [[a, b], [c, e]]
    det = (a * e).addcmul_(b, c, value=-1)
    inverse = torch.copysign(det.abs().clamp_(min=0.05), det).reciprocal_()  # |det| >= 0.05, its sign kept
    step = torch.empty_like(residual)
    torch.mul(e, residual[:, 0], out=step[:, 0]).addcmul_(b, residual[:, 1], value=-1)
    torch.mul(a, residual[:, 1], out=step[:, 1]).addcmul_(c, residual[:, 0], value=-1)
    return step.mul_(inverse[:, None])


def _grid_nodes(size: tuple[int, int], step: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The coarse grid: (G x 2 nodes (x, y) in pixels, (h, w)). Its nodes are the centres of the picture's pixels
    gathered in blocks of about step x step (h = ceil(H / step) rows, the same extent as the picture), so a value
    per node is an image of h x w pixels that bilinear upsampling with half-pixel centres (`_upsample`) and
    grid_sample (align_corners=False) place where the nodes are."""
    (height, width), rows, cols = size, -(-size[0] // step), -(-size[1] // step)
    ys = (np.arange(rows) + 0.5) * height / rows - 0.5
    xs = (np.arange(cols) + 0.5) * width / cols - 0.5
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), (rows, cols)


def _grid_points(state: "DenseState") -> torch.Tensor:
    """The coarse grid's nodes (x, y) in pixels, 1 x 2 x h x w (made once per state)."""
    if state.grid_points is None:
        state.grid_points = torch.from_numpy(state.grid.T.reshape(1, 2, *state.grid_shape)).float().contiguous()
    return state.grid_points


def _upsample(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """T x C x h x w values at the grid's nodes -> T x H x W x C at every pixel (bilinear, half-pixel centres, the
    edges held): OpenCV's resize on the CPU (2x faster than torch's interpolate, whose values it gives to float
    rounding), torch's elsewhere."""
    height, width = size
    if values.device.type != "cpu" or not 2 <= values.shape[1] <= 4:
        return F.interpolate(values, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    import cv2  # here, not at import: `import mefacial` must work where OpenCV is absent (a GPU box for benchmarks)

    planes = values.float().permute(0, 2, 3, 1).contiguous().numpy()  # T x h x w x C
    out = np.empty((len(planes), height, width, planes.shape[-1]), np.float32)
    for plane, upsampled in zip(planes, out):
        cv2.resize(plane, (width, height), dst=upsampled, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out)


def _with_derivatives(field: torch.Tensor, step_x: float, step_y: float) -> torch.Tensor:
    """T x C x h x w samples `step_x`, `step_y` apart -> T x 3C x h x w: the field, its x and its y derivatives,
    as torch.gradient's (central differences, one-sided at the edges; the same values), written into one tensor
    (3x faster than torch.gradient and torch.cat)."""
    channels = field.shape[1]
    packed = field.new_empty(field.shape[0], 3 * channels, *field.shape[2:])
    packed[:, :channels] = field
    for dim, step, out in ((3, step_x, packed[:, channels:2 * channels]), (2, step_y, packed[:, 2 * channels:])):
        n = field.shape[dim]
        if n < 2:
            out.zero_()
            continue
        ahead, behind = field.narrow(dim, 2, n - 2), field.narrow(dim, 0, n - 2)
        torch.sub(ahead, behind, out=out.narrow(dim, 1, n - 2)).div_(2 * step)  # central, inside
        torch.sub(field.narrow(dim, 1, 1), field.narrow(dim, 0, 1), out=out.narrow(dim, 0, 1)).div_(step)
        torch.sub(field.narrow(dim, n - 1, 1), field.narrow(dim, n - 2, 1), out=out.narrow(dim, n - 1, 1)).div_(step)
    return packed


def forward_motion(state: "DenseState", target: np.ndarray) -> torch.Tensor:
    """The skin's forward map on the coarse grid: T x 2 x h x w displacement (pixels) of each source grid point in
    frames whose meshes are `target` (T x V x 2). On the face it is piecewise affine in the triangles of the source
    mesh. Around it, the head's motion (the similarity taking the source's `STABLE_MESH` points, which facial
    actions barely move, onto the target's: a dropping jaw is no head motion) fades out smoothly (the share of it
    each point follows is in `motion_weights`), and what is left of the mesh's motion fades out through the
    triangles of the mesh and the still anchors: the same map on the face, and a drifting head bends no kinks
    into its outline."""
    frames, (h, w) = len(target), state.grid_shape
    source, stable = state.source_mesh[:M.NUM_MESH], list(M.STABLE_MESH)
    scale, rotation, shift = M.fit_similarity(np.broadcast_to(source[stable], (frames, len(stable), 2)),
                                              target[:, stable])
    # the head moves a point p (a row) by p @ linear + shift
    linear = np.swapaxes(scale[:, None, None] * rotation - np.eye(2), 1, 2)  # T x 2 x 2
    points = len(state.anchors) + M.NUM_MESH
    rows = np.zeros((points + 3, frames, 2))  # what `motion_weights` weighs
    rows[:M.NUM_MESH] = (target[:, :M.NUM_MESH] - source - source @ linear - shift[:, None]).transpose(1, 0, 2)
    rows[points:] = np.concatenate([linear, shift[:, None]], 1).transpose(1, 0, 2)  # the head's motion: 3 x T x 2
    forward = state.motion_weights @ rows.reshape(points + 3, -1)  # G x 2T
    return torch.from_numpy(forward.reshape(h, w, frames, 2)).permute(2, 3, 0, 1).to(
        torch.float32, memory_format=torch.contiguous_format)


def backward_flow(state: "DenseState", target: np.ndarray, iterations: int = NEWTON_STEPS) -> torch.Tensor:
    """The backward map of the skin on the coarse grid, all frames at once: T x 2 x h x w displacement (pixels)
    from each target grid point to the source point that lands there, tapered to 0 at the picture's edge.

    The forward map (source -> target, `forward_motion`: one sparse product for every frame's grid) is inverted
    by Newton steps on the grid (x <- x - (I + J)^-1 (x + d(x) - y), d and its Jacobian J sampled bilinearly),
    batched over the frames: `iterations` over the whole grid, then REFINE_STEPS more at the nodes whose last step
    was over REFINE_FROM."""
    frames, (h, w), (height, width) = len(target), state.grid_shape, state.size
    field = forward_motion(state, target)  # T x 2 x h x w: d(x)
    packed = _with_derivatives(field, width / w, height / h)  # T x 6 x h x w: d, dd/dx, dd/dy
    packed[:, 2].add_(1)  # d/dx and d/dy of x + d(x): I + J
    packed[:, 5].add_(1)
    y = _grid_points(state).expand(frames, -1, -1, -1)  # T x 2 x h x w target grid points (pixels)
    scale, shift = _units(state.size)  # pixels -> grid_sample units
    x = y - field  # first guess: the forward motion taken back
    for _ in range(iterations):
        x, step_sq = _newton_step(packed, x, y, scale, shift)  # (x: a new tensor, `y - field`)
    # where the last step still moved a node, it has not converged (a lid closing over a short distance: up to
    # 4 px off after two steps, 0.2-0.9 % of the grid): those nodes alone take REFINE_STEPS more
    t, i, j = (step_sq > REFINE_FROM**2).nonzero(as_tuple=True)
    if len(t):
        counts = torch.bincount(t, minlength=frames)
        slot = torch.arange(len(t)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # place in its frame
        xs, ys = (torch.zeros(frames, 2, 1, int(counts.max())) for _ in range(2))  # T x 2 x 1 x n (padded)
        xs[t, :, 0, slot], ys[t, :, 0, slot] = x[t, :, i, j], y[t, :, i, j]
        for _ in range(REFINE_STEPS):
            xs, _ = _newton_step(packed, xs, ys, scale, shift)
        x[t, :, i, j] = xs[t, :, 0, slot]
    taper = torch.from_numpy(state.taper).float().view(1, 1, h, w)
    return (x - y) * taper


def _newton_step(packed: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step of `backward_flow` at the points x (T x 2 x h x w, pixels) towards landing on y: (x moved,
    T x h x w squared lengths of the step). Steps are bounded to MAX_STEP (folds)."""
    at = F.grid_sample(packed, (x * scale + shift).permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                       align_corners=False)  # T x 6 x h x w
    step = _solve(at, torch.add(x, at[:, :2]).sub_(y))
    length = (step[:, :1] * step[:, :1]).addcmul_(step[:, 1:], step[:, 1:])  # T x 1 x h x w (squared)
    bound = length.clamp(min=MAX_STEP**2).rsqrt_()  # x MAX_STEP / max(length, MAX_STEP)
    return x.sub_(step.mul_(bound.mul_(MAX_STEP))), length[:, 0]


class DenseMeshWarp(nn.Module):
    """The `dense` backbone (no parameters): `prepare` once per clip, then `animate` batches of driving frames.

    Meshes are pixel (x, y) points of `mefacial.mesh` (V = 478) in frames of the source's size. `render` is the
    geometry + appearance renderer on its own (target meshes given), for callers that make their own meshes.
    """

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        super().__init__()
        settings = config.options(DEFAULTS, **options)
        self.config = config
        self.grid_step = int(settings["grid_step"])
        self.ring_scale = float(settings["ring_scale"])
        self.ratio_bound = float(settings["ratio_bound"])
        self.ratio_blur = float(settings["ratio_blur"])
        self.appearance = bool(settings["appearance"])
        self.lid_margin = float(settings["lid_margin"])
        self._geometry: tuple[tuple, SourceGeometry] | None = None  # (size, source mesh) -> `source_geometry`
        if self.grid_step < 1 or self.ring_scale <= 1 or not 0 <= self.ratio_bound <= 1 or not 0 <= self.lid_margin < 1:
            raise ValueError(f"config {config.name!r}: need grid_step >= 1, ring_scale > 1, 0 <= ratio_bound <= 1, "
                             "0 <= lid_margin < 1")

    # ---- once per clip ---------------------------------------------------------------------------------
    def prepare(self, source: torch.Tensor, source_mesh, initial_mesh=None, initial_frame: torch.Tensor | None = None
                ) -> DenseState:
        """source 1 x 3 x H x W in [0, 1]; source_mesh V x 2; initial_mesh V x 2 (the driving clip's onset mesh,
        None when only `render` is used); initial_frame 1 x 3 x H x W (the onset frame, for ratio images)."""
        if source.dim() != 4 or source.shape[:2] != (1, 3):
            raise ValueError(f"source must be 1 x 3 x H x W, got shape {tuple(source.shape)}")
        src = _mesh(source_mesh, "source_mesh")
        init = src if initial_mesh is None else _mesh(initial_mesh, "initial_mesh")
        size = (int(source.shape[-2]), int(source.shape[-1]))
        face = self.source_geometry(size, src)
        initial_luma = None if initial_frame is None else _luma(initial_frame.float())
        return DenseState(size, src, init, local_maps(src, init, face.triangles), face, face.face_mask.to(source.device),
                          source.float(), initial_luma)

    def source_geometry(self, size: tuple[int, int], source_mesh: np.ndarray) -> "SourceGeometry":
        """What `prepare` computes from the source mesh alone (triangulation, grid weights, masks; about 15 ms),
        kept for the last source mesh: the engine has it made while the clip's onset mesh is still being found."""
        src = _mesh(source_mesh, "source_mesh")
        key = (tuple(size), src.tobytes())
        cached = self._geometry
        if cached is not None and cached[0] == key:
            return cached[1]
        delaunay = Delaunay(src[:M.NUM_MESH])
        oval = src[list(M.FACE_OVAL)]
        centre = oval.mean(0)
        ring = centre + (oval - centre) * self.ring_scale
        height, width = size
        side = np.linspace(0, 1, 9)
        border = np.concatenate([np.stack([side * (width - 1), np.full(9, v)], 1) for v in (0, height - 1)] +
                                [np.stack([np.full(9, u), side * (height - 1)], 1) for u in (0, width - 1)])
        ring = ring[(ring >= 0).all(1) & (ring[:, 0] <= width - 1) & (ring[:, 1] <= height - 1)]  # in the picture
        if len(ring):
            border = border[(np.linalg.norm(border[:, None] - ring[None], axis=-1).min(1) > 2)]  # keep them apart
        grid, shape = _grid_nodes(size, self.grid_step)
        barycentric = _barycentric_matrix(delaunay, grid).astype(np.float32)  # G x 468
        barycentric.resize(len(grid), len(src))  # G x V (the irises hold no grid point)
        inside = np.diff(barycentric.indptr) > 0  # grid points in a triangle of the mesh
        outside = np.where(inside[:, None], 0, _to_grid(grid, size)).astype(np.float32)
        # motion tapers to 0 at the picture's edge (smoothstep over BORDER_TAPER of its size): the border holds
        # still and nothing is sampled from outside the picture, however tightly the face is framed
        ramp = max(BORDER_TAPER * max(size), 1.0)
        edge = np.minimum(grid - grid.min(0), grid.max(0) - grid).min(1)  # from the outermost nodes (the edge pixels')
        taper = _smoothstep(edge / ramp)
        # ratio images apply on the face (inside its oval), not around the eyes (the layered lids draw them); the
        # lid regions end in a narrow tip at the eye's outer side, where a closing driving eye's brightening
        # leaked past them as a light spot (and, at magnify 2, above it, below the brow's tail, where a driving's
        # lid crease flattens): a disc of PERIOCULAR_TIP x the inter-ocular distance rounds it off
        radius = PERIOCULAR_TIP * float(M.inter_ocular(src))
        circle = radius * np.stack([np.cos(np.linspace(0, 2 * np.pi, 24)), np.sin(np.linspace(0, 2 * np.pi, 24))], 1)
        lids = [_eye_polygon(src, u, l) for u, l, _ in PERIOCULAR] + [src[u[0]] + circle for u, _, _ in PERIOCULAR]
        face_mask = torch.from_numpy(_fill([oval], size) * (1 - _fill(lids, size)))[None, None]
        face_mask = _blur(face_mask, 2.0)
        face_mask = F.interpolate(face_mask, size=shape, mode="area") if self.grid_step > 1 else face_mask
        # and the shading holds still at the picture's edge as the motion does (a face cut by the frame's edge kept
        # changing shading in its outer pixels while the skin there stood still)
        face_mask = face_mask * torch.from_numpy(taper).float().view(1, 1, *shape)
        anchors = np.concatenate([ring, border])
        anchored = Delaunay(np.concatenate([src[:M.NUM_MESH], anchors]))
        # the head's motion fades out around the face smoothly (a smoothstep of the distance from the mesh), reaching
        # 0 at the distance of the ring's nearest point, or at the picture's edge where that is nearer: carried
        # through the ring's triangles, a drifting head bent the face's outline
        band = max((self.ring_scale - 1) * float(np.linalg.norm(oval - centre, axis=1).min()), 1.0)
        head_weight = inside.astype(np.float32)  # G
        near = ~inside & (grid > src.min(0) - band).all(1) & (grid < src.max(0) + band).all(1)  # (the irises are inside)
        out = _distance_to_edges(grid[near], src[delaunay.convex_hull])  # n px from the mesh
        reach = (band ** -4 + (out + edge[near] + 1e-6) ** -4) ** -0.25  # n: the nearer of the two, smoothly
        head_weight[near] = _smoothstep(1 - out / reach)
        motion_weights = hstack([_barycentric_matrix(anchored, grid),
                                 csr_matrix(np.concatenate([grid, np.ones((len(grid), 1))], 1) * head_weight[:, None])],
                                format="csr")
        aperture = float(np.mean(M.eye_aperture(src)))
        face = SourceGeometry(delaunay.simplices, anchors, grid, shape, outside, taper, face_mask,
                              (face_mask.flatten() > 0.5).nonzero()[:, 0], barycentric, motion_weights,
                              *_skin(anchored), max(1.0, LID_BLUR * aperture), max(0.5, LID_RIM * aperture),
                              _fill([_eye_polygon(src, upper, lower) for upper, lower, _ in EYES], size))
        self._geometry = (key, face)
        return face

    # ---- per batch --------------------------------------------------------------------------------------
    @staticmethod
    def retarget(state: DenseState, driving_mesh: np.ndarray, magnify: float = 1.0) -> np.ndarray:
        """Target meshes T x V x 2: the source mesh moved by the driving's facial motion (T x V x 2 meshes relative
        to the onset mesh, the head's motion taken out) carried by the local maps and multiplied by `magnify` (the
        motion it adds averaged over neighbours, `_smoothed`, and cut back where it would fold the skin,
        `_unfolded`), lids never crossing, then by the driving head's motion, bounded."""
        driving = np.asarray(driving_mesh, np.float64)  # T x V x 2
        onset, source = state.initial_mesh, state.source_mesh
        stable = list(M.STABLE_MESH)
        scale, rotation, shift = M.fit_similarity(driving[:, stable], onset[stable])  # frame t -> onset: the head undone
        motion = scale[:, None, None] * driving @ np.swapaxes(rotation, 1, 2) + shift[:, None]  # T x V x 2
        heads = list(zip(scale, rotation, shift))
        faithful = source + np.einsum("vij,tvj->tvi", state.maps, motion - onset)  # T x V x 2
        extra = faithful - source  # magnify adds (magnify - 1) x this, averaged over neighbours: jitter does not grow
        target = faithful + (magnify - 1) * (_smoothed(state, extra) if magnify > 1 else extra)
        for (upper, lower, _), normal in zip(EYES, _lid_normals(source)):  # from the upper lid to the lower one
            # a lid closes the eye at most: each facing pair of margin points has its motion scaled down until it
            # does not cross (a pair by the corner, a few pixels apart, crosses with little jitter: scaling the
            # whole lid by it, as this did, left a magnified closing eye open at its ends)
            pairs = [list(upper[1:-1]), list(lower[1:-1])]
            gap_s = (source[pairs[1]] - source[pairs[0]]) @ normal  # 7
            gap = (target[:, pairs[1]] - target[:, pairs[0]]) @ normal  # T x 7
            floor = CLOSED * np.maximum(gap_s, 0)
            allowed = np.clip(np.where(gap < floor, (gap_s - floor) / np.maximum(gap_s - gap, 1e-9), 1.0), 0, 1)
            for lid in pairs:
                target[:, lid] = source[lid] + allowed[..., None] * (target[:, lid] - source[lid])
        target = _move_head(target, heads, source, onset)
        if magnify > 1:  # magnified motion does not fold the skin (`_unfolded`)
            target = _unfolded(state, _move_head(faithful, heads, source, onset), target)
        return target

    def appearance_ratios(self, state: DenseState, driving: torch.Tensor, driving_mesh: np.ndarray,
                          magnify: float = 1.0, sampled_at: torch.Tensor | None = None) -> torch.Tensor:
        """Expression-ratio images in the source's geometry, on the grid: T x 1 x h x w (1 = unchanged), bounded.

        driving: T x 3 x H x W frames in [0, 1] (the size of the source), or their luminance T x 1 x H x W
        (`luminance`); driving_mesh T x V x 2; `sampled_at`, where given, `_grid_in` of the driving meshes."""
        if state.initial_luma is None:
            raise ValueError("appearance_ratios needs the onset frame: prepare(..., initial_frame=...)")
        height, width = state.size
        drv = np.asarray(driving_mesh, np.float32)
        sigma = self.ratio_blur / self.grid_step  # blurred on the grid (grid_step px apart)
        at = _grid_in(state, drv) if sampled_at is None else sampled_at  # T x h x w x 2
        aligned = _blur(F.grid_sample(_luma(driving.float()), at.to(driving.device), mode="bilinear",
                                      padding_mode="border", align_corners=False), sigma)  # T x 1 x h x w
        if state.onset_luma is None:
            at_0 = _grid_in(state, state.initial_mesh[None].astype(np.float32)).to(driving.device)
            state.onset_luma = _blur(F.grid_sample(state.initial_luma, at_0, mode="bilinear", padding_mode="border",
                                                   align_corners=False), sigma)
        log_ratio = aligned.add_(RATIO_EPS).div_(state.onset_luma + RATIO_EPS).log_()  # T x 1 x h x w (in place)
        mask = state.face_mask
        face = state.face_points
        if len(face):  # no global brightness change: the face's median ratio is 1
            log_ratio.sub_(_lower_median(log_ratio.flatten(1), face).view(-1, 1, 1, 1).to(log_ratio))
        noise = self._noise(state, log_ratio) if magnify > 1 else None  # (measured with the misalignment in)
        # what the onset's own pixels within MISALIGNMENT of a node would give there is the tracker's error, not
        # shading: the driving's edges 1-2 px off its mesh, hair that does not move with the skin below it (kept
        # whole, it painted light and dark lines of the driving face's brows, nose, lips and hairline onto the
        # target). Of it only MISALIGNED_SHADING is kept, unmagnified: what the sub-pixel motion the mesh missed
        # makes of a facial edge (a 0.5 px shift of a 0.4 log step under the 2.5 px blur), which carries that motion
        if state.misaligned is None:
            log_onset = (state.onset_luma + RATIO_EPS).log()
            reach = max(1, round(MISALIGNMENT / self.grid_step))  # in grid nodes
            lowest = -F.max_pool2d(-log_onset, 2 * reach + 1, stride=1, padding=reach)
            highest = F.max_pool2d(log_onset, 2 * reach + 1, stride=1, padding=reach)
            state.misaligned = torch.cat([lowest, highest]) - log_onset
        low, high = state.misaligned.to(log_ratio)
        explained = torch.clamp(log_ratio, low, high)
        log_ratio.sub_(explained)  # shading: the part beyond what a misalignment gives
        # where the driving face has drifted past its frame's border, the frame holds no skin to compare: no ratio
        mesh = drv[:, :M.NUM_MESH]  # the triangles' corners: grid points lie between them
        if (mesh < 0).any() or (mesh > [width - 1, height - 1]).any():
            seen = (at[..., 0].abs() <= 1 - 1 / width) & (at[..., 1].abs() <= 1 - 1 / height)  # T x h x w: within the pixels
            mask = mask * seen[:, None].to(log_ratio)
        if magnify > 1:
            log_ratio = self._magnified_shading(state, log_ratio, magnify, noise)
        log_ratio.add_(explained.clamp_(-MISALIGNED_SHADING, MISALIGNED_SHADING))
        if magnify < 1:
            log_ratio.mul_(magnify)
        # the renderer samples the ratios where the skin comes from (bilinear)
        return log_ratio.mul_(mask).clamp_(-self.ratio_bound, self.ratio_bound).exp_()

    def _fine(self, state: DenseState, log_ratio: torch.Tensor) -> torch.Tensor:
        """The fine part of T x 1 x h x w log ratios: under FINE_SHADING x the inter-ocular distance across."""
        sigma = FINE_SHADING * float(M.inter_ocular(state.source_mesh)) / self.grid_step
        weight = state.face_mask.to(log_ratio)  # 1 x 1 x h x w: the face, where the ratios mean something
        return log_ratio - _blur(log_ratio * weight, sigma) / _blur(weight, sigma).clamp_min(1e-3)

    def _noise(self, state: DenseState, log_ratio: torch.Tensor) -> torch.Tensor | None:
        """T x 1 x 1 x 1: each frame's noise in its log ratios, 3 sigma estimated from the median absolute value of
        their fine part over the face (the camera's grain, a clip's dithering); None where no grid node is face."""
        face = state.face_points
        if not len(face):
            return None
        return 3 * 1.4826 * _lower_median(self._fine(state, log_ratio).abs().flatten(1), face).view(-1, 1, 1, 1).to(
            log_ratio)

    def _magnified_shading(self, state: DenseState, log_ratio: torch.Tensor, magnify: float,
                           noise: torch.Tensor | None) -> torch.Tensor:
        """T x 1 x h x w log ratios whose fine part (furrows, creases), where it stands out of the frame's `noise`
        (`_noise`), grows `magnify` times, the excess bent (tanh) to at most MAGNIFIED_SHADING; the broad part
        (the head's pose under the light, a drifting light) and the noise (camera grain, a clip's dithering) keep
        their faithful strength: magnified, they shaded real clips' faces in patches and bands."""
        fine = self._fine(state, log_ratio)
        if noise is not None:
            fine = fine.sign() * (fine.abs() - noise).clamp_min(0)
        return log_ratio.add_(torch.tanh(fine * ((magnify - 1) / MAGNIFIED_SHADING)).mul_(MAGNIFIED_SHADING))

    def render(self, state: DenseState, target_mesh: np.ndarray, appearance: torch.Tensor | None = None,
               flow: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Frames of the source moved to `target_mesh` (T x V x 2, pixels of the source), shaded by `appearance`
        (T x 1 x h x w luminance ratios in the source's geometry, clamped to exp(+-ratio_bound); None = 1), an
        image over the whole picture: the picture's pixels (h x w = H x W) or the coarse grid, as
        `appearance_ratios` gives. `flow`, where given, is `backward_flow` of the target meshes.

        Returns {"prediction": T x 3 x H x W in [0, 1], "flow": T x H x W x 2 backward sampling grid of the skin
        (grid_sample coordinates, align_corners=False: -1 and 1 are the picture's outer edges), "eye_layer":
        T x 1 x h x w where the eyeball layer shows in the eyes' box, "eye_box": that box's (top, left) pixel}."""
        target = np.asarray(target_mesh, np.float64)
        if target.ndim != 3 or target.shape[1:] != state.source_mesh.shape:
            raise ValueError(f"target_mesh must be T x {len(state.source_mesh)} x 2, got {target.shape}")
        if not np.isfinite(target).all():
            raise ValueError("target_mesh holds NaN / inf (frames without a face)")
        frames, (height, width) = len(target), state.size
        device = state.source.device
        if state.pixel_units is None:  # (set last: the engine's two threads may render a clip's first batches at once)
            ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                    torch.arange(width, dtype=torch.float32), indexing="ij")
            state.pixels = torch.stack([xs, ys], -1)  # H x W x 2 pixels
            state.pixel_units = _to_grid(state.pixels, state.size).to(device)  # H x W x 2 grid_sample units
        base = state.pixels
        # the skin's backward map in grid_sample units: every pixel moved by the grid's flow, upsampled
        flow = backward_flow(state, target) if flow is None else flow  # T x 2 x h x w pixels, on the coarse grid
        scale, _ = _units(state.size)  # pixel displacements -> grid_sample units
        skin = _upsample((flow * scale).to(device), state.size).add_(state.pixel_units)  # T x H x W x 2
        # the source, then its shading, sampled where the skin comes from (an expanded source takes grid_sample's
        # fast path: 2x faster than sampling the shaded frames)
        prediction = F.grid_sample(state.source.expand(frames, -1, -1, -1), skin, mode="bilinear",
                                   padding_mode="border", align_corners=False)  # T x 3 x H x W
        if appearance is not None:
            bound = float(np.exp(self.ratio_bound))
            shading = F.grid_sample(appearance.to(device).float().clamp(1 / bound, bound), skin, mode="bilinear",
                                    padding_mode="border", align_corners=False)  # T x 1 x H x W
            # shaded, the brightest channel at most 1: R, G and B scaled alike where one would pass 1, so a
            # highlight keeps its hue (a clamp per channel shifted it)
            prediction = prediction.mul_(shading)
            prediction = prediction.div_(prediction.amax(1, keepdim=True).clamp_(min=1))
        # the eyeball layer, drawn in the eyes' box only: inside the target eye opening beyond the lids' rims (and
        # where the eyeball was), the source moved by the iris motion alone
        source = state.source_mesh
        eyes = [(_eye_polygon(target, upper, lower), _eye_polygon(source, upper, lower) + target[:, iris[0], None]
                 - source[iris[0]]) for upper, lower, iris in EYES]  # per eye: T x n x 2 outlines, now and moved
        polygons = [[(now[t], was[t]) for now, was in eyes] for t in range(frames)]
        corners = np.concatenate([np.concatenate(pair) for eyes in polygons for pair in eyes])
        sigma = state.lid_blur  # the lid colours' reach
        pad = 2 + int(np.ceil(3 * sigma))  # the box holds the lids around the openings, whatever the batch
        x0, y0 = (max(int(np.floor(v)) - pad, 0) for v in corners.min(0))
        x1 = min(int(np.ceil(corners[:, 0].max())) + pad + 1, width)
        y1 = min(int(np.ceil(corners[:, 1].max())) + pad + 1, height)
        eye_layer = torch.zeros(frames, 1, max(y1 - y0, 0), max(x1 - x0, 0), device=device)
        if x1 > x0 and y1 > y0:
            box, offset = (y1 - y0, x1 - x0), np.array([x0, y0])
            rims = _rim_weights(target, source, state.lid_rim, offset, box)  # per eye: T x h x w
            fade = torch.from_numpy(_lid_fade(state.source_mesh, target)).float()  # T x 2 eyes
            irises = [iris[0] for _, _, iris in EYES]  # the irises' centres
            gaze = torch.from_numpy(target[:, irises] - source[irises]).float()  # T x 2 eyes x 2: gaze shifts
            # each pixel's eye: the side of the bisector between the eyes' centres (in the batch: the openings lie
            # far from it) it is on
            centre_a, centre_b = (target[:, list(upper) + list(lower)].mean((0, 1)) for upper, lower, _ in EYES)
            middle, towards = (torch.from_numpy(v).float() for v in ((centre_a + centre_b) / 2, centre_b - centre_a))
            first = ((base[y0:y1, x0:x1] - middle) @ towards < 0)[..., None]  # h x w x 1: the first eye's side
            gaze = gaze * (2 / gaze.new_tensor([width, height]))  # in grid_sample units
            shift = torch.where(first, gaze[:, None, None, 0], gaze[:, None, None, 1])  # T x h x w x 2 (first: h x w x 1)
            eye_grid = state.pixel_units[y0:y1, x0:x1] - shift.to(device)  # the pixels moved back
            if state.source_eyes is None:
                openings = torch.from_numpy(state.openings)[None, None].to(device)
                state.eyeball_reach = F.max_pool2d(openings, 3, 1, 1)
                state.source_eyes = torch.cat([state.source, openings], 1)  # (set last: the threads' check)
            eye_image, was = F.grid_sample(state.source_eyes.expand(frames, -1, -1, -1), eye_grid, mode="bilinear",
                                           padding_mode="reflection", align_corners=False).split([3, 1], 1)
            # the eyeball still visible (T x 1 x h x w): inside the opening beyond the lids' rims (their weights are
            # 0 outside it), where the eyeball was (`was`: the source's openings moved with the irises)
            inside = torch.minimum(torch.from_numpy(np.maximum(*rims))[:, None].to(device), was)
            region = prediction[..., y0:y1, x0:x1]
            layered = region * (1 - inside) + eye_image * inside
            closing = torch.where(first[..., 0], fade[:, None, None, 0], fade[:, None, None, 1])[:, None].to(device)
            if (fade > 0).any():  # closing eyes: the opening shows the lids around it (lid skin, lash line)
                opening = torch.from_numpy(np.stack([_fill([now - offset for now, _ in eyes], box)  # both eyes
                                                     for eyes in polygons]))[:, None].to(device)  # T x 1 x h x w
                outside = (1 - opening).clamp(min=0)
                known = outside ** 2
                weighted = _blur(torch.cat([region * known, known], 1), sigma)  # T x 4 x h x w (blurred at once)
                lids = weighted[:, :3] / weighted[:, 3:].clamp(min=1e-3)  # T x 3 x h x w
                weight = opening * closing
                layered = layered * (1 - weight) + lids * weight
                # where the mesh's lid contour lies on the eyeball, up to a pixel inside the visible opening (a
                # hooded or an older lid), the skin's map draws a closing lid's margin from the eyeball's edge: its
                # catch-lights and whites came down as the lash line of a closed eye. What the skin takes from
                # there (outside the drawn opening) is drawn no brighter than the lid skin around it (luminance,
                # the hue kept), as the eye closes; darker (the iris's edge) it stays, as lashes.
                eyeball = F.grid_sample(state.eyeball_reach.expand(frames, -1, -1, -1), skin[:, y0:y1, x0:x1],
                                        mode="bilinear", padding_mode="zeros", align_corners=False)  # T x 1 x h x w
                leaked = eyeball * outside * closing
                skin_only = known * (1 - leaked) ** 2
                luma = _luma(layered)  # T x 1 x h x w
                blurred = _blur(torch.cat([luma * skin_only, skin_only], 1), sigma)
                lid_luma = blurred[:, :1] / blurred[:, 1:].clamp(min=1e-3)
                layered = layered * (1 - leaked * (1 - lid_luma / luma.clamp(min=1e-3)).clamp(min=0))
            eye_layer = inside * (1 - closing)
            prediction[..., y0:y1, x0:x1] = layered
        return {"prediction": prediction, "flow": skin, "eye_layer": eye_layer, "eye_box": (y0, x0)}

    def motion(self, state: DenseState, driving_mesh, magnify: float = 1.0, appearance: bool | None = None
               ) -> MeshMotion:
        """What a batch needs of its driving meshes (T x V x 2) alone: the retargeted and drawn target meshes, the
        skin's backward map and where the ratio images read the driving frames (with appearance)."""
        meshes = _mesh(driving_mesh, "driving_mesh", frames=True)
        target = self.retarget(state, meshes, magnify)
        drawn = cover_lids(state.source_mesh, target, self.lid_margin) if self.lid_margin > 0 else target
        drawn = carry_lash_bands(state.source_mesh, drawn)
        use_appearance = self.appearance if appearance is None else appearance
        sampled_at = _grid_in(state, meshes.astype(np.float32)) if use_appearance else None
        return MeshMotion(meshes, target, drawn, backward_flow(state, drawn), sampled_at)

    def animate(self, state: DenseState, driving_mesh, driving: torch.Tensor | None = None, magnify: float = 1.0,
                appearance: bool | None = None, motion: MeshMotion | None = None) -> dict[str, torch.Tensor]:
        """A batch of driving frames: driving_mesh T x V x 2 (pixels of frames the source's size), driving
        T x 3 x H x W (needed with appearance, the default of the config); `motion`, where given, is `motion` of
        the same meshes, magnify and appearance, made ahead. Returns `render`'s dict plus "landmarks" (T x V x 2
        target meshes) and "ratio" (the appearance ratios, or None)."""
        use_appearance = self.appearance if appearance is None else appearance
        if motion is None:
            motion = self.motion(state, driving_mesh, magnify, use_appearance)
        ratio = None
        if use_appearance:
            if driving is None:
                raise ValueError("appearance transfer needs the driving frames; pass driving=... or appearance=False")
            ratio = self.appearance_ratios(state, driving, motion.driving, magnify, motion.sampled_at)
        out = self.render(state, motion.drawn, ratio, motion.flow)
        out.update(landmarks=torch.from_numpy(motion.target).float(), ratio=ratio)
        return out


def _mesh(points, name: str, frames: bool = False) -> np.ndarray:
    """A mesh (V x 2, or T x V x 2 with `frames`) as float64, checked."""
    array = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, np.float64)
    if not frames and array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    want = 3 if frames else 2
    if array.ndim != want or array.shape[-2:] != (M.NUM_VERTICES, 2):
        raise ValueError(f"{name} must be {'T x ' if frames else ''}{M.NUM_VERTICES} x 2 mesh points "
                         f"(mefacial.mesh.detect_mesh), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN / inf (no face found in some frame)")
    return array


def render_frames(source: np.ndarray, source_mesh: np.ndarray, target_meshes: np.ndarray,
                  appearance: np.ndarray | None = None, **options: Any) -> np.ndarray:
    """The renderer on numpy arrays: source H x W x 3 uint8 with its mesh (V x 2), target meshes T x V x 2 (pixels of
    the source), optional luminance ratios T x H x W (1 = unchanged) -> T x H x W x 3 uint8."""
    from ..config import load_config
    from ..engine import to_tensor, to_uint8

    model = DenseMeshWarp(load_config("dense"), **options)
    image = to_tensor(source, torch.device("cpu"))
    state = model.prepare(image, source_mesh)
    ratio = None if appearance is None else torch.from_numpy(np.asarray(appearance, np.float32))[:, None]
    with torch.inference_mode():
        return to_uint8(model.render(state, target_meshes, ratio)["prediction"])


class DenseClip(ClipRunner):
    """A clip through the dense generator: the meshes (478 points) of the source, the clip's onset frame and each
    batch; the onset frame and each batch's frames feed the appearance transfer."""

    def __init__(self, model, source, first_frame, source_points, first_points, settings, to_tensor, stage=None):
        super().__init__(model, source, first_frame, source_points, first_points, settings, to_tensor, stage)
        with self.stage("generator"):
            self.state = model.prepare(source.float(), source_points[0], first_points[0], first_frame.float())

    @classmethod
    def prepare_source(cls, model, source, source_points):
        model.source_geometry(source.shape[:2], source_points[0])

    def plan(self, points):
        with self.stage("generator"):
            return self.model.motion(self.state, points, magnify=self.settings.magnify)

    def __call__(self, frames, points, planned=None):
        with self.stage("generator"):
            driving = luminance(frames, self.state.source.device) if self.model.appearance else None  # B x 1 x H x W
            return self.model.animate(self.state, points, driving, magnify=self.settings.magnify,
                                      motion=planned)["prediction"]

    @classmethod
    def original_loop(cls, model, source, driving, source_points, driving_points, settings, to_tensor, stage):
        """One frame at a time (the unbatched form; the dense generator has no original code)."""
        with stage("generator", -1):
            state = model.prepare(source.float(), source_points[0], driving_points[0], to_tensor(driving[:1]).float())
        preds = []
        for t in range(len(driving)):
            with stage("generator", t):
                frame = luminance(driving[t:t + 1], state.source.device) if model.appearance else None
                preds.append(model.animate(state, driving_points[t:t + 1], frame, magnify=settings.magnify)["prediction"])
        return preds


SPEC = register_backbone(BackboneSpec(
    name="dense",
    label="Training-free dense mesh",
    title="Training-free dense face-mesh generator (local retargeting, layered lids, expression-ratio images)",
    builder=lambda config, for_training=False: DenseMeshWarp(config),
    clip=DenseClip,
    motion_modes={"relative": "relative"},
    points="mesh",
    adapt_scale=False,  # the motion is mapped by local (per-triangle) maps instead
    priors=("none",),
    needs_weights=False,
    # 8 frames a batch on the CPU: 4-13 % faster end to end than the engine's 4 on the shared clips (alternating
    # in one process, 2026-12-03: the per-batch work of the eyes' layer, the ratio images and Python is shared by
    # more frames); 12 and 16 no faster (the tracker's thread hands over fewer batches to overlap)
    cpu_batch_size=8,
    variants=(VariantDecl("dense", "dense", "Training-free dense mesh",
                          prior_label="geometry and appearance (lids, furrows, shading)"),
              VariantDecl("dense-geometry", "dense-geometry", "Dense mesh, geometry only", prior_option="geometry",
                          prior_label="geometry only (no appearance transfer)")),
))

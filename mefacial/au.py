"""Facial action units (FACS) as motion of the dense face mesh: synthesise a micro-expression from a specification.

    from mefacial import au
    spec = au.parse_aus("4:C,7:B")                       # AU4 at intensity C, AU7 at B
    timing = au.Timing(onset_ms=60, apex_ms=40, offset_ms=120, fps=200)
    plan = au.plan(spec, timing)                        # per-frame activation of every AU
    targets = au.target_meshes(neutral, plan)           # T x V x 2 pixels: the mesh at every frame

Every AU is a displacement field over MediaPipe's face mesh (468 vertices, or 478 with the irises; the
topology of `mefacial.mesh`), in face-normalised units: fractions of the inter-ocular distance (IOD), in
the face's own frame (x along the eye axis, y perpendicular to it towards the mouth), so one template fits
any face, size and in-plane rotation. A template is a few anatomical components; each moves a set of anchor
points (mesh vertices, or points placed from them) by a displacement and falls off smoothly (Gaussian in
face units) away from them, gated to its side of the face's natural seams (eyelid margins, the lip line) so
that the lids and lips part or close instead of shearing. Directions and regions follow the appearance
changes of the FACS manual (Ekman, Friesen & Hager 2002, *Facial Action Coding System: the manual*); the
magnitudes are micro-expression magnitudes, checked against the motion of the real clips (README, "Action
units": landmarks move about 1-4 % of the IOD at apex; `python benchmarks/micro_motion.py`). What geometry
cannot carry (furrows of AU4 / AU9, the lash line of AU43's closed lid, the dark mouth opening of AU25 / 26) are
appearance cues (`Cue`): luminance ratios that the dense renderer applies (`appearance`); the lid covering the
iris is the renderer's eye layer (the eyeball shows only inside the moved eye opening).

Intensities follow FACS's A-E scale (trace, slight, marked, severe, maximum): `INTENSITY` maps a letter to
the fraction of a template's maximum (E). Timing: each AU rises over its onset with a raised-cosine ease,
holds its apex, and falls over its offset (`profile`). Composition is additive except where two AUs act on
the same structure in opposite or exclusive ways (`CONFLICTS`: documented rules), and eyelids / lips never
cross (a contact rule).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import InputError, InputTooLargeError
from .mesh import LEFT_UPPER_LID, LOWER_LIP_INNER, MOUTH_OPENING, RIGHT_UPPER_LID, UPPER_LIP_INNER

log = logging.getLogger("mefacial")

# ---- mesh topology (MediaPipe face mesh; person's right = image left in an unmirrored picture) ------------------

NUM_MESH = 468
RIGHT_EYE_UPPER = (246, 161, 160, 159, 158, 157, 173)  # upper lid margin, outer to inner (corners excluded)
RIGHT_EYE_LOWER = (7, 163, 144, 145, 153, 154, 155)  # lower lid margin, the same order: pairs with the upper
LEFT_EYE_UPPER = (466, 388, 387, 386, 385, 384, 398)
LEFT_EYE_LOWER = (249, 390, 373, 374, 380, 381, 382)
EYE_CORNERS = (33, 133, 263, 362)  # right outer, right inner, left outer, left inner
# Brows (upper row 70, 63, 105, 66, 107 and lower row 46, 53, 52, 65, 55 on the right, outer to inner):
RIGHT_BROW_INNER, LEFT_BROW_INNER = (107, 55), (336, 285)  # the inner third
RIGHT_BROW_MID, LEFT_BROW_MID = (66, 65, 105, 52), (296, 295, 334, 282)
RIGHT_BROW_OUTER, LEFT_BROW_OUTER = (70, 63, 46, 53), (300, 293, 276, 283)
UPPER_LIP_OUTER = (185, 40, 39, 37, 0, 267, 269, 270, 409)  # vermilion border, left to right in the image
LOWER_LIP_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
UPPER_LIP_RINGS = (184, 74, 73, 72, 11, 302, 303, 304, 408, 183, 42, 41, 38, 12, 268, 271, 272, 407)  # between them
LOWER_LIP_RINGS = (77, 90, 180, 85, 16, 315, 404, 320, 307, 96, 89, 179, 86, 15, 316, 403, 319, 325)
MOUTH_CORNERS = (61, 76, 62, 78, 291, 306, 292, 308)  # outer to inner corner, right then left
NOSE_ALAE = (98, 129, 64, 327, 358, 294)  # the wings of the nose
NOSE_BRIDGE = (168, 6, 197, 195, 5)
NOSE_TIP = (4, 1)
GLABELLA = (9, 8, 168)  # midline between the brows, top down
CHIN = (18, 200, 199, 175, 152)  # midline below the lower lip, down to the chin's lowest point
PHILTRUM = (164, 0)  # midline below the nose, above the upper lip

UPPER_LIDS = RIGHT_EYE_UPPER + LEFT_EYE_UPPER
LOWER_LIDS = RIGHT_EYE_LOWER + LEFT_EYE_LOWER
LID_PAIRS = tuple(zip(UPPER_LIDS, LOWER_LIDS))  # (upper, lower) margin vertices facing each other
LIP_PAIRS = tuple(zip(UPPER_LIP_INNER, LOWER_LIP_INNER))
BROWS_INNER = RIGHT_BROW_INNER + LEFT_BROW_INNER
BROWS_OUTER = RIGHT_BROW_OUTER + LEFT_BROW_OUTER
BROWS_MID = RIGHT_BROW_MID + LEFT_BROW_MID
BROWS = BROWS_INNER + BROWS_MID + BROWS_OUTER
EYE_RINGS = ((33,) + RIGHT_EYE_UPPER + (133,) + RIGHT_EYE_LOWER[::-1], (263,) + LEFT_EYE_UPPER + (362,) + LEFT_EYE_LOWER[::-1])


# ---- the face's frame ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaceFrame:
    """The face's own frame: origin between the eye centres, x along the eye axis (person's right eye -> left
    eye), y perpendicular, towards the mouth; unit = the inter-ocular distance (between the eye centres) in pixels."""

    origin: np.ndarray  # 2
    axes: np.ndarray  # 2 x 2, rows: x axis, y axis (unit vectors in pixels)
    iod: float

    @classmethod
    def of(cls, mesh: np.ndarray) -> "FaceFrame":
        """The frame of one mesh (V x 2 pixels, V >= 468)."""
        mesh = np.asarray(mesh, np.float64)
        if mesh.ndim != 2 or mesh.shape[0] < NUM_MESH or mesh.shape[1] != 2 or not np.isfinite(mesh[:NUM_MESH]).all():
            raise InputError(f"a face mesh must be V x 2 with V >= {NUM_MESH} finite vertices, got {mesh.shape}")
        right = mesh[list(EYE_RINGS[0])].mean(0)
        left = mesh[list(EYE_RINGS[1])].mean(0)
        axis = left - right
        iod = float(np.linalg.norm(axis))
        if iod < 1e-6:
            raise InputError("the face mesh is degenerate (both eyes at one point)")
        x = axis / iod
        y = np.array([-x[1], x[0]])
        mouth = mesh[[61, 291]].mean(0)
        if np.dot(mouth - (left + right) / 2, y) < 0:  # a mirrored picture: keep y pointing to the mouth
            y = -y
        return cls(origin=(left + right) / 2, axes=np.stack([x, y]), iod=iod)

    def to_face(self, points: np.ndarray) -> np.ndarray:
        """... x 2 pixels -> ... x 2 face units."""
        return (np.asarray(points, np.float64) - self.origin) @ self.axes.T / self.iod

    def to_pixels(self, displacement: np.ndarray) -> np.ndarray:
        """... x 2 displacement in face units -> ... x 2 pixels."""
        return np.asarray(displacement, np.float64) @ self.axes * self.iod


# ---- templates -------------------------------------------------------------------------------------------------

Points = Callable[[np.ndarray], np.ndarray]  # face-unit mesh V x 2 -> anchor points k x 2
Moves = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (face-unit mesh, anchors k x 2) -> k x 2 displacements at E
Gate = Callable[[np.ndarray], np.ndarray]  # face-unit mesh V x 2 -> V weights in [0, 1]

KERNEL = 0.035  # face units: how far one anchor's displacement reaches among its neighbours (interpolation)


def vertices(*indices: int) -> Points:
    return lambda q: q[list(indices)]


def offset(points: Points, lateral: float, down: float) -> Points:
    """Anchor points moved by (lateral: away from the midline, down) face units."""
    return lambda q: points(q) + np.stack([np.sign(points(q)[:, 0]) * lateral, np.full(len(points(q)), down)], -1)


def between(a: Points, b: Points, t: float) -> Points:
    return lambda q: (1 - t) * a(q) + t * b(q)


def lateral_sign(x: np.ndarray) -> np.ndarray:
    """+1 on the person's left, -1 on the right, smoothly 0 at the midline (so midline anchors move only vertically)."""
    return np.tanh(np.asarray(x) / 0.05)


def move(lateral: float, down: float) -> Moves:
    """The same displacement for every anchor, its lateral part pointing away from the midline on each side."""
    return lambda q, anchors: np.stack([lateral_sign(anchors[:, 0]) * lateral, np.full(len(anchors), down)], -1)


def groups(*parts: tuple[Sequence[int], float, float]) -> tuple[Points, Moves]:
    """Anchors in groups of vertices, each group with its own (lateral, down) displacement at E."""
    indices = [i for group, _, _ in parts for i in group]
    lateral = np.concatenate([np.full(len(group), lat) for group, lat, _ in parts])
    down = np.concatenate([np.full(len(group), dn) for group, _, dn in parts])
    return vertices(*indices), lambda q, anchors: np.stack([lateral_sign(anchors[:, 0]) * lateral, down], -1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def _membership(q: np.ndarray, upper: Sequence[int], lower: Sequence[int], corners: Sequence[int],
                line_y: np.ndarray, width: float) -> np.ndarray:
    """1 on the lower side of a seam, 0 on the upper: the seam's own vertices by index, the others by position
    against the seam line (smoothly, over `width` face units)."""
    side = sigmoid((q[:, 1] - line_y) / width)
    side[list(upper)] = 0.0
    side[list(lower)] = 1.0
    side[list(corners)] = 0.5
    return side


def _seam(q: np.ndarray, pairs: Sequence[tuple[int, int]], corners: Sequence[int]) -> np.ndarray:
    """y of a seam (eyelids or lips) above each vertex: the curve through the corners and the midpoints of the
    facing (upper, lower) margin vertices, as a function of x (flat beyond the corners), V."""
    up = q[[u for u, _ in pairs]]
    low = q[[l for _, l in pairs]]
    points = np.concatenate([(up + low) / 2, q[list(corners)]])  # n x 2
    order = np.argsort(points[:, 0])
    return np.interp(q[:, 0], points[order, 0], points[order, 1])


def _eye_seams(q: np.ndarray) -> np.ndarray:
    """y of each vertex's eye seam (its side's eye), V."""
    right = _seam(q, LID_PAIRS[:len(RIGHT_EYE_UPPER)], (33, 133))
    left = _seam(q, LID_PAIRS[len(RIGHT_EYE_UPPER):], (263, 362))
    return np.where(q[:, 0] < 0, right, left)


def below_eye_seam(q: np.ndarray) -> np.ndarray:
    """Lower-lid side of the eyelid seams (1) versus upper-lid side (0)."""
    return _membership(q, UPPER_LIDS, LOWER_LIDS, EYE_CORNERS, _eye_seams(q), 0.015)


def above_eye_seam(q: np.ndarray) -> np.ndarray:
    return 1.0 - below_eye_seam(q)


def below_lip_line(q: np.ndarray) -> np.ndarray:
    """Lower-lip side of the lip line (1) versus upper-lip side (0); the line follows the lips' inner contours
    (the middle of the gap when the lips are apart)."""
    upper = UPPER_LIP_INNER + UPPER_LIP_RINGS + UPPER_LIP_OUTER
    lower = LOWER_LIP_INNER + LOWER_LIP_RINGS + LOWER_LIP_OUTER
    return _membership(q, upper, lower, MOUTH_CORNERS, _seam(q, LIP_PAIRS, (61, 291)), 0.02)


def above_lip_line(q: np.ndarray) -> np.ndarray:
    return 1.0 - below_lip_line(q)


def above_lids(q: np.ndarray) -> np.ndarray:
    """Brow and forehead: above the middle of the upper lid (between its margin and the brow), smoothly."""
    level = (q[list(UPPER_LIDS), 1].mean() + q[list(BROWS), 1].mean()) / 2
    return sigmoid((level - q[:, 1]) / 0.03)


def below_lower_lids(q: np.ndarray) -> np.ndarray:
    """Cheeks and below: under the lower lid margins, smoothly."""
    return sigmoid((q[:, 1] - q[list(LOWER_LIDS), 1].mean()) / 0.03)


def both(*gates: Gate) -> Gate:
    return lambda q: np.prod([g(q) for g in gates], axis=0)


@dataclasses.dataclass(frozen=True)
class Component:
    """One anatomical part of an AU: anchor points, their displacement at intensity E (face units), the Gaussian
    fall-off `sigma` (face units) away from the anchors, and an optional gate (which side of a seam moves)."""

    anchors: Points
    moves: Moves
    sigma: float
    gate: Gate | None = None

    def field(self, q: np.ndarray) -> np.ndarray:
        """V x 2 displacement (face units, at E) of every vertex of the face-unit mesh q (V x 2)."""
        anchors = self.anchors(q)  # k x 2
        moves = self.moves(q, anchors)  # k x 2
        dist2 = ((q[:, None, :] - anchors[None]) ** 2).sum(-1)  # V x k
        nearest = dist2.min(1)  # V
        kernel = np.exp(-(dist2 - nearest[:, None]) / (2 * KERNEL ** 2))  # V x k, 1 at the nearest anchor
        interpolated = kernel @ moves / kernel.sum(1, keepdims=True)  # V x 2: the nearby anchors' displacement
        falloff = np.exp(-nearest / (2 * self.sigma ** 2))  # V
        weight = falloff if self.gate is None else falloff * self.gate(q)
        return interpolated * weight[:, None]


def lid_move(which: str, share: float, sigma: float, extra_down: float = 0.0) -> Component:
    """A lid margin moved by `share` of the local eye aperture towards the other margin (negative: away from it),
    plus `extra_down` face units; the eye corners stay pinned, so the motion fades towards them and the lids can
    never fold over each other at the corners. `which`: "upper" or "lower"."""
    mine, other = (UPPER_LIDS, LOWER_LIDS) if which == "upper" else (LOWER_LIDS, UPPER_LIDS)

    def moves(q: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        towards = share * (q[list(other)] - q[list(mine)]) + [0.0, extra_down]  # P x 2
        return np.concatenate([towards, np.zeros((len(EYE_CORNERS), 2))])

    return Component(vertices(*mine, *EYE_CORNERS), moves, sigma, above_eye_seam if which == "upper" else below_eye_seam)


def lip_thin(which: str, share: float, sigma: float) -> Component:
    """A lip's red part thinned: its outer border moved `share` of the lip's local height towards the lip line
    (the inner contour); the mouth corners stay pinned. `which`: "upper" or "lower"."""
    outer, inner = (UPPER_LIP_OUTER, UPPER_LIP_INNER) if which == "upper" else (LOWER_LIP_OUTER, LOWER_LIP_INNER)

    def moves(q: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        towards = share * (q[list(inner)] - q[list(outer)])  # P x 2, outer and inner pair by position
        towards[:, 0] = 0.0  # across the lip only
        return np.concatenate([towards, np.zeros((2, 2))])

    return Component(vertices(*outer, 61, 291), moves, sigma, above_lip_line if which == "upper" else below_lip_line)


# AU43: the upper lid does most of a closure; the lower rises about a fifth of the aperture to meet it.
LID_CLOSE_UPPER, LID_CLOSE_LOWER = lid_move("upper", 0.8, 0.07), lid_move("lower", 0.2, 0.04)


@dataclasses.dataclass(frozen=True)
class Cue:
    """An appearance change geometry cannot carry, painted on the rendered frames (at the moved mesh).

    kind "furrow": a crease along a polyline through `points` (darker line, faint highlight beside it);
    "lid": the lash line of a closing lid (the lid skin itself covers the iris in the renderer's eye layer);
    "opening": the parted lips' gap darkened as the mouth's interior."""

    kind: str
    points: Points | None = None
    depth: float = 0.2  # share of the luminance removed at the crease at intensity E
    width: float = 0.02  # face units


@dataclasses.dataclass(frozen=True)
class ActionUnit:
    number: int
    name: str
    muscles: str
    appearance: str  # the FACS manual's appearance changes this template renders
    components: tuple[Component, ...]
    regions: tuple[str, ...]  # readout regions it moves (`REGIONS`); others stay still
    cues: tuple[Cue, ...] = ()

    def field(self, q: np.ndarray) -> np.ndarray:
        """V x 2 displacement in face units at intensity E, for the face-unit neutral mesh q."""
        return sum(c.field(q) for c in self.components)


_inner = vertices(*BROWS_INNER)
_corners = vertices(*MOUTH_CORNERS)
_lower_lids = vertices(*LOWER_LIDS)
_cheeks = offset(vertices(144, 145, 153, 373, 374, 380), 0.06, 0.22)  # the infraorbital triangle, below the lids


def _polyline(q: np.ndarray, ala: int, corner: int, side: int) -> np.ndarray:
    """The nasolabial furrow of one side: from beside the nose wing to beside the mouth corner (k x 2)."""
    start = q[ala] + [side * 0.03, 0.0]
    end = q[corner] + [side * 0.07, -0.02]
    t = np.linspace(0, 1, 8)[:, None]
    bow = np.sin(np.pi * t) * np.array([side * 0.03, 0.0])  # the fold bows outwards
    return (1 - t) * start + t * end + bow


def _glabella_lines(q: np.ndarray) -> np.ndarray:
    """AU4's vertical furrows between the brows: two lines, NaN-separated."""
    lines = []
    for inner, lower in ((107, 55), (336, 285)):
        top = 0.65 * q[9] + 0.35 * q[inner] + [0, -0.04]
        bottom = 0.65 * q[168] + 0.35 * q[lower]
        lines += [np.linspace(top, bottom, 6), np.full((1, 2), np.nan)]
    return np.concatenate(lines)


def _nose_root_lines(q: np.ndarray) -> np.ndarray:
    """AU9's transverse wrinkles across the root of the nose, NaN-separated."""
    lines = []
    for level in (0.55,):
        centre = (1 - level) * q[168] + level * q[6]
        half = 0.35 * abs(q[133, 0] - q[362, 0]) / 2
        xs = np.linspace(-half, half, 7)
        lines += [np.stack([centre[0] + xs, centre[1] + 0.02 * (xs / half) ** 2], -1), np.full((1, 2), np.nan)]
    return np.concatenate(lines)


def _dimples(q: np.ndarray) -> np.ndarray:
    lines = []
    for corner, side in ((61, -1), (291, 1)):
        start, end = q[corner] + [side * 0.05, -0.035], q[corner] + [side * 0.06, 0.035]
        lines += [np.linspace(start, end, 5), np.full((1, 2), np.nan)]
    return np.concatenate(lines)


def _nasolabial_lines(q: np.ndarray) -> np.ndarray:
    a, b = _polyline(q, 129, 61, -1), _polyline(q, 358, 291, 1)
    return np.concatenate([a, np.full((1, 2), np.nan), b])



# Magnitudes: displacement at intensity E in face units (fractions of the IOD). The real micro-expression clips
# move their most active landmarks 1-4 % of the IOD at apex (README table), i.e. a marked (C) micro-expression
# moves ~2.5-4 %; E is set at 1.6-1.7x that, the upper end of micro-expression motion. Eyelid closure (AU43)
# and lips parting (AU25 / 26) are set by the face's own aperture / by FACS's criteria instead (see each AU).
AUS: dict[int, ActionUnit] = {a.number: a for a in (
    ActionUnit(1, "inner brow raiser", "frontalis, pars medialis",
               "pulls the inner brow and the central forehead up; the brow becomes oblique (inner end higher); "
               "forehead wrinkles are not drawn",
               (Component(*groups((BROWS_INNER, 0.0, -0.055), ((66, 65, 296, 295), 0.0, -0.03)), 0.10, above_lids),),
               ("brow_inner",)),
    ActionUnit(2, "outer brow raiser", "frontalis, pars lateralis",
               "pulls the lateral brow up (arched shape); the lateral upper-lid fold is stretched",
               (Component(*groups((BROWS_OUTER, 0.005, -0.055), ((105, 52, 334, 282), 0.003, -0.035)), 0.10,
                          above_lids),),
               ("brow_outer",)),
    ActionUnit(4, "brow lowerer", "corrugator supercilii, depressor supercilii, procerus",
               "lowers the brows and draws them together; vertical furrows appear between the brows",
               (Component(*groups((BROWS_INNER, -0.03, 0.04), (BROWS_MID, -0.02, 0.035), (BROWS_OUTER, -0.005, 0.015)),
                          0.10, above_lids),
                Component(vertices(*GLABELLA[:2]), move(0.0, 0.012), 0.06, above_lids)),
               ("brow_inner", "brow_outer"),
               (Cue("furrow", _glabella_lines, depth=0.22),)),
    ActionUnit(5, "upper lid raiser", "levator palpebrae superioris",
               "raises the upper lid margin; more of the iris (and sclera above it) shows",
               (lid_move("upper", 0.0, 0.05, extra_down=-0.035),),
               ("upper_lid",)),
    ActionUnit(6, "cheek raiser", "orbicularis oculi, pars orbitalis",
               "raises the cheeks (infraorbital triangle), pushes the lower-lid skin up and narrows the eye from "
               "below; the lateral brow is pulled down slightly (crow's-feet are not drawn)",
               (Component(_cheeks, move(0.005, -0.045), 0.12, below_lower_lids),
                lid_move("lower", 0.2, 0.05),
                Component(vertices(46, 53, 276, 283), move(0.0, 0.012), 0.07, above_lids)),
               ("cheek", "lower_lid", "brow_outer")),
    ActionUnit(7, "lid tightener", "orbicularis oculi, pars palpebralis",
               "tightens the lids: the lower lid rises and straightens, the upper lid lowers slightly; the eye "
               "aperture narrows",
               (lid_move("lower", 0.3, 0.045), lid_move("upper", 0.08, 0.035)),
               ("lower_lid", "upper_lid")),
    ActionUnit(9, "nose wrinkler", "levator labii superioris alaeque nasi",
               "wrinkles the skin along the sides and root of the nose, raises the nose wings and the upper lip, "
               "lowers the inner brow; deepens the nasolabial furrow",
               (Component(vertices(*NOSE_ALAE), move(0.005, -0.045), 0.07),
                Component(vertices(*NOSE_BRIDGE[2:]), move(0.0, -0.015), 0.05),
                Component(vertices(*UPPER_LIP_OUTER[2:7], *UPPER_LIP_INNER[2:7]), move(0.0, -0.02), 0.05,
                          above_lip_line),
                Component(_inner, move(-0.005, 0.02), 0.08, above_lids)),
               ("nose", "upper_lip", "brow_inner"),
               (Cue("furrow", _nose_root_lines, depth=0.2), Cue("furrow", _nasolabial_lines, depth=0.12))),
    ActionUnit(10, "upper lip raiser", "levator labii superioris (caput infraorbitalis)",
               "raises the upper lip (its middle-lateral part most), deepens the nasolabial furrow, raises the "
               "nose wings slightly",
               (Component(vertices(*UPPER_LIP_OUTER, *UPPER_LIP_INNER), move(0.0, -0.05), 0.07, above_lip_line),),
               ("upper_lip", "lip_corner", "nose"),
               (Cue("furrow", _nasolabial_lines, depth=0.12),)),
    ActionUnit(12, "lip corner puller", "zygomaticus major",
               "pulls the lip corners up and out (obliquely, towards the cheekbone); raises the infraorbital skin "
               "a little; deepens the nasolabial furrow",
               (Component(_corners, move(0.045, -0.04), 0.09),
                Component(_cheeks, move(0.0, -0.012), 0.1, below_lower_lids)),
               ("lip_corner", "upper_lip", "lower_lip", "cheek"),
               (Cue("furrow", _nasolabial_lines, depth=0.1),)),
    ActionUnit(14, "dimpler", "buccinator",
               "tightens the lip corners and draws them slightly out and up; a dimple forms beyond each corner",
               (Component(_corners, move(0.022, -0.008), 0.05),),
               ("lip_corner", "upper_lip", "lower_lip"),
               (Cue("furrow", _dimples, depth=0.15),)),
    ActionUnit(15, "lip corner depressor", "depressor anguli oris (triangularis)",
               "pulls the lip corners down (and slightly out); the lip line bends down at the corners",
               (Component(_corners, move(0.006, 0.045), 0.08),),
               ("lip_corner", "lower_lip", "upper_lip")),
    ActionUnit(17, "chin raiser", "mentalis",
               "pushes the chin boss and the lower lip up; the mouth's line takes an inverted-U shape",
               (Component(vertices(*CHIN[:4]), move(0.0, -0.035), 0.10, below_lip_line),
                Component(vertices(*LOWER_LIP_OUTER[2:7]), move(0.0, -0.025), 0.05, below_lip_line),
                Component(vertices(*LOWER_LIP_INNER[2:7], *UPPER_LIP_INNER[2:7]), move(0.0, -0.012), 0.05)),
               ("chin", "lower_lip", "upper_lip")),
    ActionUnit(20, "lip stretcher", "risorius, platysma",
               "pulls the lip corners laterally (horizontally); the lips elongate and flatten",
               (Component(_corners, move(0.055, 0.008), 0.08),),
               ("lip_corner", "lower_lip", "upper_lip")),
    ActionUnit(23, "lip tightener", "orbicularis oris",
               "tightens the lips: the red parts narrow (the lips thin), the corners draw in slightly",
               (lip_thin("upper", 0.35, 0.035), lip_thin("lower", 0.3, 0.035),
                Component(_corners, move(-0.012, 0.0), 0.04)),
               ("upper_lip", "lower_lip", "lip_corner")),
    ActionUnit(24, "lip pressor", "orbicularis oris",
               "presses the lips together: the red parts narrow, the skin above and below the lips bulges",
               (lip_thin("upper", 0.4, 0.045), lip_thin("lower", 0.4, 0.045),
                Component(vertices(*PHILTRUM), move(0.0, 0.012), 0.03, above_lip_line),
                Component(vertices(CHIN[0]), move(0.0, -0.012), 0.03, below_lip_line)),
               ("upper_lip", "lower_lip", "lip_corner", "chin")),
    ActionUnit(25, "lips part", "depressor labii inferioris (or relaxed mentalis / orbicularis oris)",
               "the lips part: the lower lip drops away from the upper lip and the mouth's interior shows",
               (Component(vertices(*LOWER_LIP_INNER, *LOWER_LIP_OUTER), move(0.0, 0.045), 0.06, below_lip_line),
                Component(vertices(*UPPER_LIP_INNER), move(0.0, -0.008), 0.03, above_lip_line)),
               ("lower_lip", "upper_lip", "lip_corner", "chin"),
               (Cue("opening", depth=0.6),)),
    ActionUnit(26, "jaw drop", "masseter (relaxed), temporalis, internal pterygoid (relaxed)",
               "the mandible is lowered: the chin, the lower lip and the jaw move down together, the lips part",
               (Component(vertices(*LOWER_LIP_INNER, *LOWER_LIP_OUTER, *CHIN), move(0.0, 0.06), 0.16, below_lip_line),),
               ("lower_lip", "chin", "lip_corner"),
               (Cue("opening", depth=0.6),)),
    ActionUnit(43, "eyes closed", "relaxed levator palpebrae superioris (orbicularis oculi)",
               "the upper lids drop until the eyes are closed (the lower lids rise a little to meet them); the lid "
               "covers the iris. Intensity = the share of the aperture closed (E: closed)",
               (LID_CLOSE_UPPER, LID_CLOSE_LOWER),
               ("upper_lid", "lower_lid"),
               (Cue("lid"),)),
)}

SUPPORTED = tuple(sorted(AUS))
# AUs that narrow an aperture (eyelids, lips' red parts) by a share of it, and AU5 whose lid raise would show eyeball
# the source does not have: `magnify` does not push them past intensity E, so lids and lips never fold over.
CAPPED = (5, 6, 7, 23, 24, 43)

# FACS intensity scale (Ekman, Friesen & Hager 2002): A trace, B slight, C marked / pronounced, D severe /
# extreme, E maximum. The manual's intervals are unequal (B-D span most of the range, A and E are narrow);
# these are the fractions of a template's maximum used here, monotone in the letter.
INTENSITY = {"A": 0.15, "B": 0.35, "C": 0.6, "D": 0.85, "E": 1.0}
INTENSITY_NAMES = {"A": "trace", "B": "slight", "C": "marked", "D": "severe", "E": "maximum"}


# ---- readout regions (also what the tests check leakage over) ---------------------------------------------------


def _near(*indices: int, radius: float = 0.06, without: Sequence[int] = ()) -> Callable[[np.ndarray], np.ndarray]:
    """Vertices within `radius` face units of the given vertices (a region on any face, from its landmarks), less
    the vertices `without` (the other side of a seam, which a closed eye or mouth brings close)."""

    def members(q: np.ndarray) -> np.ndarray:
        dist = np.linalg.norm(q[:NUM_MESH, None] - q[None, list(indices)], axis=-1).min(1)
        inside = dist <= radius
        inside[list(without)] = False
        return np.flatnonzero(inside)

    return members


# Each region: the vertices near anatomical landmarks of the mesh. Regions do not overlap by much; a vertex in
# two regions counts for both.
REGIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "brow_inner": _near(*BROWS_INNER, radius=0.08, without=RIGHT_UPPER_LID + LEFT_UPPER_LID),  # not the lid skin
    "brow_outer": _near(*BROWS_OUTER, radius=0.06),
    "upper_lid": _near(*UPPER_LIDS, radius=0.02, without=LOWER_LIDS + EYE_CORNERS),
    "lower_lid": _near(*LOWER_LIDS, radius=0.02, without=UPPER_LIDS + EYE_CORNERS),
    "cheek": lambda q: _cheek_region(q),
    "nose": _near(*NOSE_ALAE, *NOSE_TIP, radius=0.04),
    "upper_lip": _near(*UPPER_LIP_OUTER[1:-1], *UPPER_LIP_INNER[1:-1], radius=0.02,
                       without=LOWER_LIP_INNER + LOWER_LIP_RINGS + LOWER_LIP_OUTER + MOUTH_CORNERS),
    "lip_corner": _near(61, 291, radius=0.06),
    "lower_lip": _near(*LOWER_LIP_OUTER[1:-1], *LOWER_LIP_INNER[1:-1], radius=0.02,
                       without=UPPER_LIP_INNER + UPPER_LIP_RINGS + UPPER_LIP_OUTER + MOUTH_CORNERS),
    "chin": _near(*CHIN[2:], radius=0.12),
}


def _cheek_region(q: np.ndarray) -> np.ndarray:
    anchors = _cheeks(q)
    dist = np.linalg.norm(q[:NUM_MESH, None] - anchors[None], axis=-1).min(1)
    return np.flatnonzero(dist <= 0.12)


# The same regions on the 68-point iBUG landmarks (dlib / FAN), for the readout of any clip.
REGIONS_68: dict[str, tuple[int, ...]] = {
    "brow_inner": (20, 21, 22, 23),
    "brow_outer": (17, 18, 25, 26),
    "upper_lid": (37, 38, 43, 44),
    "lower_lid": (40, 41, 46, 47),
    "nose": (31, 32, 33, 34, 35),
    "upper_lip": (50, 51, 52, 61, 62, 63),
    "lip_corner": (48, 54, 60, 64),
    "lower_lip": (56, 57, 58, 65, 66, 67),
    "chin": (7, 8, 9),
}


def region_indices(mesh: np.ndarray) -> dict[str, np.ndarray]:
    """Readout region -> vertex indices, for a face mesh (V >= 468) or 68 landmarks (V = 68)."""
    mesh = np.asarray(mesh)
    if len(mesh) == 68:
        return {name: np.array(idx) for name, idx in REGIONS_68.items()}
    q = FaceFrame.of(mesh).to_face(mesh)
    return {name: members(q) for name, members in REGIONS.items()}


# ---- specifications ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Onset, apex and offset durations (ms), the frame rate, and optional neutral lead-in / lead-out (ms).

    Defaults: a 300 ms event (onset 100, apex 60, offset 140): inside the < 500 ms total and < 260 ms onset
    that Yan et al. (2013) measured for micro-expressions, with the onset about a third of the event; 200 fps
    as CASME II / SAMM were filmed (Yan et al. 2014; Davison et al. 2018)."""

    onset_ms: float = 100.0
    apex_ms: float = 60.0
    offset_ms: float = 140.0
    fps: float = 200.0
    lead_in_ms: float = 0.0
    lead_out_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("onset_ms", "apex_ms", "offset_ms", "fps"):
            value = getattr(self, name)
            if not _real(value) or not math.isfinite(value) or value <= 0:
                raise InputError(f"{name.replace('_ms', '')} must be a positive number"
                                 f"{' of milliseconds' if name.endswith('_ms') else ' of frames per second'}, "
                                 f"got {value!r}")
        for name in ("lead_in_ms", "lead_out_ms"):
            value = getattr(self, name)
            if not _real(value) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name.replace('_ms', '').replace('_', '-')} must be 0 or more milliseconds, "
                                 f"got {value!r}")
        if self.fps > MAX_FPS:
            raise InputError(f"fps must be at most {MAX_FPS:g}, got {self.fps:g}")

    @property
    def event_ms(self) -> float:
        return self.onset_ms + self.apex_ms + self.offset_ms

    def frames(self, ms: float) -> int:
        """Milliseconds -> whole frames at this frame rate (rounded half up)."""
        return int(math.floor(ms * self.fps / 1000.0 + 0.5))

    def boundaries(self, delay_ms: float = 0.0) -> tuple[int, int, int, int]:
        """Frames where the event starts (neutral), the apex starts and ends, and the event ends (neutral again),
        counted from the clip's first frame. Each boundary is its time rounded to the nearest frame (so the event
        spans its duration in whole frames, whatever the rounding of each phase)."""
        start = self.lead_in_ms + delay_ms
        return (self.frames(start), self.frames(start + self.onset_ms), self.frames(start + self.onset_ms + self.apex_ms),
                self.frames(start + self.event_ms))


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


MAX_FPS = 1000.0
MICRO_MAX_MS = 500.0  # Yan et al. 2013: micro-expressions last at most 500 ms in total (onset at most 260 ms)


@dataclasses.dataclass(frozen=True)
class AUSpec:
    """One AU of a specification: its number, intensity (fraction of E), letter (None when given as a number),
    side ("" both, "L" the person's left, "R" the right), and optionally its own timing and a delay (ms)."""

    au: int
    intensity: float
    letter: str | None = None
    side: str = ""
    timing: Timing | None = None
    delay_ms: float = 0.0

    @property
    def label(self) -> str:
        """FACS notation: '4C', '43E', 'R12A' (one side)."""
        strength = self.letter if self.letter else f"{self.intensity:.2f}"
        return f"{self.side}{self.au}{strength}"

    @property
    def notation(self) -> str:
        """'AU4C', 'AU12A(R)'."""
        strength = self.letter if self.letter else f"{self.intensity:.2f}"
        return f"AU{self.au}{strength}" + (f"({self.side})" if self.side else "")


_TOKEN = re.compile(r"^(?:AU)?\s*([LRU]?)\s*(\d+)\s*(?::\s*([A-Za-z]|[0-9.]+))?"
                    r"(?:\s*:\s*([0-9.]+)\s*/\s*([0-9.]+)\s*/\s*([0-9.]+))?(?:\s*@\s*([0-9.]+))?$", re.IGNORECASE)


def parse_aus(text: str | Iterable, timing: Timing | None = None) -> list[AUSpec]:
    """'4:C,7:B' -> [AUSpec(4, 0.6, 'C'), AUSpec(7, 0.35, 'B')]; '+' separates as well as ','.

    Each item: [AU]number[:intensity], the intensity a FACS letter A-E (default C) or a fraction in (0, 1];
    an L / R prefix makes it unilateral (the person's left / right side: 'R12:A'); an optional
    ':onset/apex/offset' (ms) gives the AU its own timing and '@ms' delays its start ('12:C:80/40/120@20').
    A list of AUSpec (or of (au, intensity) pairs) is checked and returned as AUSpecs."""
    if isinstance(text, str):
        items = [t.strip() for t in re.split(r"[,+;]", text) if t.strip()]
        if not items:
            raise InputError(f"no action units given; write them as AU:intensity, e.g. '4:C,7:B' (AUs {_supported()})")
        specs = [_parse_one(item, timing) for item in items]
    else:
        specs = []
        for item in text:
            if isinstance(item, AUSpec):
                specs.append(_checked(item))
            elif isinstance(item, str):
                specs.append(_parse_one(item, timing))
            else:
                au_number, strength = item
                specs.append(_checked(AUSpec(int(au_number), *_strength(str(strength), f"AU{au_number}"))))
        if not specs:
            raise InputError(f"no action units given (AUs {_supported()})")
    seen: dict[tuple[int, str], str] = {}
    for spec in specs:
        sides = ("L", "R") if spec.side == "" else (spec.side,)
        for side in sides:
            if (spec.au, side) in seen:
                raise InputError(f"AU{spec.au} is given twice ({seen[(spec.au, side)]} and {spec.label}); give each "
                                 "AU once (per side)")
            seen[(spec.au, side)] = spec.label
    return specs


def _supported() -> str:
    return ", ".join(map(str, SUPPORTED))


def _strength(text: str, where: str) -> tuple[float, str | None]:
    if text.upper() in INTENSITY:
        return INTENSITY[text.upper()], text.upper()
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: intensity {text!r} is not a FACS letter A-E (trace to maximum) or a fraction "
                         "in (0, 1]") from None
    if not 0 < value <= 1:
        raise InputError(f"{where}: intensity {value:g} is outside (0, 1]; use a letter A-E or a fraction of the "
                         "maximum")
    return value, None


def _parse_one(item: str, timing: Timing | None) -> AUSpec:
    match = _TOKEN.match(item.strip())
    if not match:
        raise InputError(f"cannot read the action unit {item!r}: write AU:intensity, e.g. '4:C' or 'R12:A' "
                         f"(intensity A-E; AUs {_supported()})")
    side, number, strength, onset, apex, offset, delay = match.groups()
    side = side.upper() if side and side.upper() != "U" else ""
    intensity, letter = _strength(strength or "C", f"AU{number}")
    own = None
    if onset is not None:
        base = timing or Timing()
        own = dataclasses.replace(base, onset_ms=float(onset), apex_ms=float(apex), offset_ms=float(offset))
    return _checked(AUSpec(int(number), intensity, letter, side, own, float(delay) if delay else 0.0))


def _checked(spec: AUSpec) -> AUSpec:
    if spec.au not in AUS:
        raise InputError(f"AU{spec.au} is not in the library; supported action units: {_supported()}")
    if not 0 < spec.intensity <= 1:
        raise InputError(f"AU{spec.au}: intensity {spec.intensity:g} is outside (0, 1]")
    if spec.side not in ("", "L", "R"):
        raise InputError(f"AU{spec.au}: side must be '', 'L' or 'R', got {spec.side!r}")
    if spec.delay_ms < 0 or not math.isfinite(spec.delay_ms):
        raise InputError(f"AU{spec.au}: delay must be 0 or more milliseconds, got {spec.delay_ms!r}")
    return spec


def describe(specs: Sequence[AUSpec]) -> str:
    """'AU4C+AU7B', 'AU12A(R)+AU14A(R)' (FACS notation, the side of a unilateral AU in brackets)."""
    return "+".join(s.notation for s in specs)


# ---- timing ----------------------------------------------------------------------------------------------------


def profile(timing: Timing, delay_ms: float = 0.0, length: int | None = None) -> np.ndarray:
    """Activation (0..1) of one AU at every frame: neutral at its start, a raised-cosine onset, a flat apex, a
    raised-cosine offset, neutral after. Phase boundaries are whole frames (`Timing.boundaries`); `length` frames
    in all (default: the event and its lead-in / lead-out). An onset or offset shorter than a frame is an error."""
    start, apex, apex_end, end = timing.boundaries(delay_ms)
    frame_ms = 1000.0 / timing.fps
    for name, count, ms in (("onset", apex - start, timing.onset_ms), ("offset", end - apex_end, timing.offset_ms)):
        if count < 1:
            raise InputError(f"the {name} of {ms:g} ms is shorter than one frame at {timing.fps:g} fps "
                             f"({frame_ms:.3g} ms): lengthen it or raise the frame rate")
    total = end + 1 + timing.frames(timing.lead_out_ms)
    length = total if length is None else length
    i = np.arange(length, dtype=np.float64)
    w = np.zeros(length)
    rise = (i >= start) & (i < apex)
    w[rise] = 0.5 - 0.5 * np.cos(np.pi * (i[rise] - start) / (apex - start))
    w[(i >= apex) & (i <= apex_end)] = 1.0
    fall = (i > apex_end) & (i <= end)
    w[fall] = 0.5 + 0.5 * np.cos(np.pi * (i[fall] - apex_end) / (end - apex_end))
    return w


@dataclasses.dataclass
class Plan:
    """What to synthesise: the AUs, their per-frame activations (intensity x profile), the frame rate, and the
    frames of the event (first / apex / last) within the clip."""

    specs: list[AUSpec]
    activations: np.ndarray  # K x T, in [0, 1]
    fps: float
    timing: Timing
    apex_frames: list[tuple[int, int]]  # per AU: first and last apex frame
    event_frames: tuple[int, int]  # first frame of the event (neutral) and its last frame (neutral again)

    @property
    def num_frames(self) -> int:
        return int(self.activations.shape[1])

    @property
    def duration_ms(self) -> float:
        return 1000.0 * (self.num_frames - 1) / self.fps

    def activation(self, au: int) -> np.ndarray:
        """T: the activation of one AU (the larger of its sides when given per side), 0 where it is absent."""
        rows = [self.activations[k] for k, s in enumerate(self.specs) if s.au == au]
        return np.max(rows, axis=0) if rows else np.zeros(self.num_frames)


def plan(specs: Sequence[AUSpec] | str, timing: Timing = Timing(), *, max_frames: int | None = None,
         max_seconds: float | None = None) -> Plan:
    """The per-frame activations of a specification. All AUs share `timing` unless they carry their own (same
    frame rate); the clip spans the event exactly (first frame neutral, last frame neutral again) plus the
    lead-in / lead-out. An event over 500 ms (a macro-expression) is allowed with a warning; a clip beyond
    `max_frames` / `max_seconds` is an InputTooLargeError."""
    specs = parse_aus(specs, timing) if isinstance(specs, str) else parse_aus(list(specs), timing)
    timings = [s.timing or timing for s in specs]
    if any(t.fps != timing.fps for t in timings):
        raise InputError("every AU's own timing must use the clip's frame rate "
                         f"({timing.fps:g} fps); got {sorted({t.fps for t in timings})}")
    lead = timing.frames(timing.lead_in_ms)
    timings = [dataclasses.replace(t, lead_in_ms=timing.lead_in_ms, lead_out_ms=0.0) for t in timings]
    bounds = [t.boundaries(s.delay_ms) for s, t in zip(specs, timings)]
    event_end = max(b[3] for b in bounds)
    length = event_end + 1 + timing.frames(timing.lead_out_ms)
    event_ms = max(s.delay_ms + t.event_ms for s, t in zip(specs, timings))
    if event_ms > MICRO_MAX_MS:
        log.warning("the expression lasts %.0f ms: longer than a micro-expression (at most %.0f ms, Yan et al. 2013); "
                    "synthesising it as a macro-expression", event_ms, MICRO_MAX_MS)
    seconds = (length - 1) / timing.fps
    if max_frames is not None and length > max_frames or max_seconds is not None and seconds > max_seconds:
        raise InputTooLargeError(
            f"the clip would have {length} frames ({seconds:.2f} s at {timing.fps:g} fps), over the limit of "
            f"{max_frames} frames / {max_seconds} s: shorten the onset, apex, offset or lead-in / lead-out, or lower "
            "the frame rate")
    activations = []
    apex = []
    for spec, own, (_, first, last, _) in zip(specs, timings, bounds):
        activations.append(spec.intensity * profile(own, spec.delay_ms, length))
        apex.append((first, last))
    return Plan(list(specs), np.stack(activations), timing.fps, timing, apex, (lead, event_end))


# ---- composition -----------------------------------------------------------------------------------------------

# Where two AUs act on one structure in opposite or exclusive ways, a rule decides (applied per frame, with the
# AUs' activations a_k(t) in [0, 1]); every other combination adds the displacement fields.
CONFLICTS = {
    (5, 43): "AU43 (closure) overrides AU5 (lid raise) on the upper lid: AU5's field is scaled by 1 - a43(t); "
             "FACS scores one or the other for the same lid at the same time",
    (24, 25): "lips parted (AU25) and pressed together (AU24) exclude each other: AU24's field is scaled by "
              "1 - a25(t) (FACS scores 24 only with the lips in contact); AU23 + 25 (tightened lips, parted) adds",
    (24, 26): "as AU24 + 25: a dropped jaw parts the lips, so AU24's field is scaled by 1 - a26(t)",
    (1, 4): "AU1 + 4 (the 'sad' brow: inner brows raised and drawn together): at the inner brow AU1 takes the "
            "vertical motion and AU4 keeps its medial pull: AU4's vertical field is scaled by 1 - a1(t) m1, with m1 "
            "AU1's fall-off (1 at the inner brow, 0 away from it)",
}
CONTACT_RULE = ("the eyelid margins and the lips' inner contours never cross: where a combination would push a "
                "lower margin above its upper partner (e.g. AU6 + 7 + 43), both stop where they meet")


def templates(neutral: np.ndarray, aus: Iterable[int]) -> tuple[FaceFrame, dict[int, np.ndarray]]:
    """The face frame of a neutral mesh (V x 2 pixels) and every AU's field at E on it (V x 2 face units)."""
    frame = FaceFrame.of(neutral)
    q = frame.to_face(np.asarray(neutral, np.float64)[:NUM_MESH])
    fields = {}
    for au in sorted(set(aus)):
        field = np.zeros((len(neutral), 2))
        field[:NUM_MESH] = AUS[au].field(q)
        fields[au] = field
    return frame, fields


def side_mask(q: np.ndarray, side: str, count: int) -> np.ndarray:
    """V weights: 1 everywhere ("") or on the person's left ("L", x > 0) / right ("R") half, smooth at the midline."""
    weights = np.ones(count)
    if side:
        sign = 1.0 if side == "L" else -1.0
        weights[:NUM_MESH] = sigmoid(sign * q[:, 0] / 0.03)
    return weights


def displacements(neutral: np.ndarray, plan: Plan, *, rules: bool = True) -> np.ndarray:
    """T x V x 2 displacement (pixels) of every vertex at every frame: the AUs' fields weighted by their
    activations, combined additively except for `CONFLICTS` (when `rules`), then the contact rule."""
    neutral = np.asarray(neutral, np.float64)
    frame, fields = templates(neutral, (s.au for s in plan.specs))
    q = frame.to_face(neutral[:NUM_MESH])
    weights = {}
    for spec, activation in zip(plan.specs, plan.activations):
        weights.setdefault(spec.au, []).append((activation, side_mask(q, spec.side, len(neutral))))
    a = {au: np.minimum(plan.activation(au), 1.0) for au in fields}  # T, for the rules
    total = np.zeros((plan.num_frames, len(neutral), 2))
    for au, field in fields.items():
        for activation, mask in weights[au]:
            scale = activation.copy()  # T
            if au in CAPPED:
                scale = np.minimum(scale, 1.0)  # not past E, whatever the magnification
            if rules and au == 5 and 43 in a:
                scale *= 1 - a[43]
            if rules and au == 24:
                scale *= 1 - np.maximum(a.get(25, 0 * scale), a.get(26, 0 * scale))
            part = scale[:, None, None] * (field * mask[:, None])[None]  # T x V x 2
            if rules and au == 4 and 1 in a:
                reach = np.linalg.norm(fields[1], axis=-1)
                reach = reach / max(reach.max(), 1e-12)  # V: AU1's fall-off, 1 at its peak
                part[..., 1] *= 1 - a[1][:, None] * reach[None]
            total += part
    if rules:
        total = _contact(q, total, neutral_face=True)
    return frame.to_pixels(total)


def _contact(q: np.ndarray, total: np.ndarray, neutral_face: bool) -> np.ndarray:
    """The contact rule on T x V x 2 face-unit displacements: lower margins stay below their upper partners."""
    for pairs in (LID_PAIRS, LIP_PAIRS):
        up, low = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        y_up = q[up, 1] + total[:, up, 1]  # T x P
        y_low = q[low, 1] + total[:, low, 1]
        crossed = y_low < y_up
        if crossed.any():
            meet = (y_up + y_low) / 2
            total[:, up, 1] = np.where(crossed, meet - q[up, 1], total[:, up, 1])
            total[:, low, 1] = np.where(crossed, meet - q[low, 1], total[:, low, 1])
    return total


def target_meshes(neutral: np.ndarray, plan: Plan) -> np.ndarray:
    """T x V x 2 pixels: the neutral mesh moved by the plan at every frame (frame 0 = the neutral mesh)."""
    neutral = np.asarray(neutral, np.float64)
    return (neutral[None] + displacements(neutral, plan)).astype(np.float32)


# ---- appearance ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Appearance:
    """The appearance changes of a clip as luminance ratios (1 = unchanged), made a batch of frames at a time.

    `source_ratio(frames)` is in the source's geometry: the renderer shades the source with it before warping, so a
    furrow drawn where the skin is at rest moves with the skin (the dense renderer's `appearance` input). It is a
    sum of fixed maps weighted per frame (K x H x W log-ratio maps, K x T weights), so a long clip costs no more
    memory than a short one. `apply_output(frames, start)` darkens what geometry cannot show in the output's
    geometry: the gap of lips parting on a closed-mouth face."""

    log_maps: np.ndarray  # K x H x W
    weights: np.ndarray  # K x T
    openings: list  # (strength T, depth) of the lips-parting cues
    targets: np.ndarray  # T x V x 2, the moved meshes
    neutral: np.ndarray  # V x 2
    blur: float  # pixels, of the opening's edge

    def source_ratio(self, frames: slice) -> np.ndarray:
        """B x H x W float32 ratios of the frames in `frames`."""
        weights = self.weights[:, frames]  # K x B
        return np.exp(np.tensordot(weights.T, self.log_maps, axes=1)).astype(np.float32)

    def apply_output(self, rendered: np.ndarray, start: int = 0) -> np.ndarray:
        """B x H x W x 3 uint8 rendered frames (clip frames start, start + 1, ...) -> with the mouth's opening."""
        if not self.openings:
            return rendered
        h, w = rendered.shape[1:3]
        rest = _polygon_mask((h, w), self.neutral[list(MOUTH_OPENING)], blur=self.blur)
        out = rendered.astype(np.float32)
        for b in range(len(rendered)):
            t = start + b
            level = sum(depth * min(1.0, 2 * float(strength[t])) for strength, depth in self.openings)
            if level <= 1e-3:
                continue
            mask = _polygon_mask((h, w), np.asarray(self.targets[t], np.float64)[list(MOUTH_OPENING)], blur=self.blur)
            gap = np.clip(mask - rest, 0, 1)  # only what opened, not an opening the face had at rest
            out[b] *= (1 - min(level, 0.9) * gap)[..., None]
        return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _distance_to_polyline(shape: tuple[int, int], points: np.ndarray, box_pad: float
                          ) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Distance (pixels) from each pixel of a padded bounding box of the polyline(s) (NaN rows separate lines) to
    them, where along its line the nearest point lies (0 at one end, 1 at the other), and the box (y0, y1, x0, x1)."""
    finite = points[np.isfinite(points).all(1)]
    h, w = shape
    empty = np.zeros((0, 0)), np.zeros((0, 0)), (0, 0, 0, 0)
    if not len(finite):
        return empty
    x0, y0 = np.floor(finite.min(0) - box_pad).astype(int)
    x1, y1 = np.ceil(finite.max(0) + box_pad).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
    if x1 < x0 or y1 < y0:
        return empty
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
    pix = np.stack([xs, ys], -1)  # h' x w' x 2
    best, along = np.full(xs.shape, np.inf), np.zeros(xs.shape)
    for line in np.split(points, np.flatnonzero(~np.isfinite(points).all(1))):
        line = line[np.isfinite(line).all(1)]
        if len(line) < 2:
            continue
        lengths = np.linalg.norm(np.diff(line, axis=0), axis=1)
        starts = np.concatenate([[0], np.cumsum(lengths)]) / max(lengths.sum(), 1e-12)
        for k, (a, b) in enumerate(zip(line[:-1], line[1:])):
            ab = b - a
            t = np.clip(((pix - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
            d = np.linalg.norm(pix - (a + t[..., None] * ab), axis=-1)
            closer = d < best
            best = np.where(closer, d, best)
            along = np.where(closer, starts[k] + t * (starts[k + 1] - starts[k]), along)
    return best, along, (y0, y1 + 1, x0, x1 + 1)


def _crease(shape: tuple[int, int], line: np.ndarray, width: float, taper: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """Profiles of a crease along a polyline (pixels): the dark line and the faint highlight beside it, H x W each,
    fading out towards the line's ends (`taper`) as skin folds do."""
    crease, ridge = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    dist, along, (a, b, c, d) = _distance_to_polyline(shape, line, 4 * width)
    if dist.size:
        fade = np.sin(np.pi * np.clip(along, 0, 1)) ** 0.7 if taper else 1.0
        crease[a:b, c:d] = fade * np.exp(-dist ** 2 / (2 * width ** 2))
        ridge[a:b, c:d] = fade * np.exp(-(dist - 2.5 * width) ** 2 / (2 * width ** 2))
    return crease, ridge


def _polygon_mask(shape: tuple[int, int], polygon: np.ndarray, blur: float) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in np.asarray(polygon, np.float64)], fill=255)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image, np.float32) / 255.0


def appearance(shape: tuple[int, int], neutral: np.ndarray, targets: np.ndarray, plan: Plan,
               gain: float = 1.0) -> Appearance | None:
    """The appearance cues of the plan's AUs for frames of `shape` (H, W), scaled by each AU's activation (x `gain`):
    furrows and the closing lids' lash line in the source's geometry (at the neutral mesh, V x 2 pixels), the
    parted lips' opening in the output's (at the moved meshes `targets`, T x V x 2). None when no AU has a cue."""
    cued = [(spec, np.clip(gain * activation, 0, 1)) for spec, activation in zip(plan.specs, plan.activations)
            if AUS[spec.au].cues]
    if not cued:
        return None
    h, w = shape
    neutral = np.asarray(neutral, np.float64)
    frame = FaceFrame.of(neutral)
    q = frame.to_face(neutral[:NUM_MESH])
    maps, weights, openings = [], [], []
    for spec, strength in cued:
        for cue in AUS[spec.au].cues:
            if cue.kind == "furrow":
                face_points = cue.points(q)
                if spec.side:  # a unilateral AU creases its own side only
                    keep = (face_points[:, 0] > 0) == (spec.side == "L")
                    face_points = np.where(keep[:, None], face_points, np.nan)
                line = frame.origin + (face_points * frame.iod) @ frame.axes  # k x 2 pixels
                crease, ridge = _crease((h, w), line, cue.width * frame.iod)
                maps.append(np.log(np.clip(1 - cue.depth * crease + 0.15 * cue.depth * ridge, 0.05, None)))
                weights.append(strength)
            elif cue.kind == "lid":  # the lash line darkens along the upper margin as the lid comes down
                for ring in EYE_RINGS:
                    crease, _ = _crease((h, w), neutral[list(ring[:len(ring) // 2 + 1])], 0.008 * frame.iod, taper=False)
                    maps.append(np.log(np.clip(1 - 0.35 * crease, 0.05, None)))
                    weights.append(strength ** 2)
            elif cue.kind == "opening":  # the gap between the parted lips, darkened as the mouth's interior
                rest_gap = (q[list(LOWER_LIP_INNER), 1] - q[list(UPPER_LIP_INNER), 1]).max()
                closed = float(np.clip(1 - rest_gap / 0.05, 0, 1))  # a mouth open at rest shows its own interior
                if closed > 0:
                    openings.append((strength, closed * cue.depth))
    log_maps = np.stack(maps).astype(np.float32) if maps else np.zeros((0, h, w), np.float32)
    weights_kt = np.stack(weights).astype(np.float32) if weights else np.zeros((0, len(targets)), np.float32)
    return Appearance(log_maps, weights_kt, openings, np.asarray(targets), neutral, 0.006 * frame.iod)


# ---- presets ---------------------------------------------------------------------------------------------------

# Emotion presets of the micro-expression literature: (label, AU specification, source).
PRESETS: dict[str, tuple[str, str]] = {
    "positive": ("6:C,12:C", "CASME II labelling criteria (Yan et al. 2014, PLoS ONE 9:e86041): happiness needs AU6 "
                             "or AU12; MEGC's 'positive' class (See et al. 2019)"),
    "surprise": ("1:C,2:C,5:B", "EMFACS surprise prototype 1+2+5B (Friesen & Ekman 1983; FACS Investigator's Guide "
                                "2002); CASME II: surprise needs AU1+2"),
    "disgust": ("9:C,10:B", "CASME II labelling criteria (Yan et al. 2014): disgust needs AU9, AU10 or AU4+7"),
    "negative": ("4:C,7:C", "CASME II labelling criteria (Yan et al. 2014): disgust via AU4+7 (a "
                                    "negative micro-expression of MEGC's three classes)"),
    "repression": ("15:C,17:C", "CASME II labelling criteria (Yan et al. 2014): repression = AU15 or AU17 alone "
                                "or combined"),
    "sadness": ("1:C,4:B,15:C", "EMFACS sadness prototype 1+4+15 (Friesen & Ekman 1983)"),
    "fear": ("1:C,2:C,4:B,5:C,20:C", "EMFACS fear prototype 1+2+4+5+20 (Friesen & Ekman 1983); CASME II: fear "
                                     "needs AU1+4 or AU20"),
    "anger": ("4:C,5:B,7:C,23:C", "EMFACS anger prototype 4+5+7+23 (Friesen & Ekman 1983)"),
    "contempt": ("R12:A,R14:A", "EMFACS contempt prototype: unilateral R12A+R14A (Friesen & Ekman 1983)"),
}


PRESET_ALIASES = {"happiness": "positive", "happy": "positive", "joy": "positive", "sad": "sadness",
                  "surprised": "surprise", "angry": "anger", "afraid": "fear", "disgusted": "disgust"}


def preset_name(name: str) -> str:
    """The preset a name means (case-insensitive; common emotion words: happiness -> positive); InputError naming
    the presets where none."""
    key = name.strip().lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise InputError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} (happiness is 'positive', "
                         "MEGC's name)")
    return key


def table() -> list[dict]:
    """One row per AU: number, name, muscles, appearance, regions, cues (for the README, the app and the CLI)."""
    return [{"au": a.number, "name": a.name, "muscles": a.muscles, "appearance": a.appearance,
             "regions": list(a.regions), "cues": [c.kind for c in a.cues]} for a in AUS.values()]

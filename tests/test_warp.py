"""The training-free `warp` backbone: identity, direction and size of motion, magnification,
batching, the similarity between faces, EWP confinement, and input checks.

Faces and their dlib landmarks come from the landmarks fixture (real frames)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mefacial.config import ModelConfig, load_config
from mefacial.models import build_model
from mefacial.models.warp import JAW, LandmarkWarp, pixels_to_grid, tps_evaluate, tps_fit
from conftest import FIXTURES, require


@pytest.fixture(scope="module")
def face():
    """(image 1 x 3 x S x S in [0, 1], its landmarks 1 x 68 x 2) from the first clip of the landmarks fixture."""
    folder = require(FIXTURES / "landmarks", "landmarks fixture")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "landmarks.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    clip = sorted(meta.get("clips") or {k.split(".")[0] for k in tensors})[0]
    image = tensors[f"{clip}.frames_uint8"][:1].permute(0, 3, 1, 2).float() / 255
    return image, tensors[f"{clip}.landmarks68"][:1].float()


def make_warp(**options) -> LandmarkWarp:
    return LandmarkWarp(load_config("warp"), **options)


def blob(size: int, centre: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """A Gaussian spot at pixel (x, y) `centre`: 1 x 3 x size x size."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    spot = torch.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))
    return spot.expand(1, 3, size, size).contiguous()


def centroid(images: torch.Tensor) -> torch.Tensor:
    """Intensity centroid (x, y) of each image: T x 3 x H x W -> T x 2."""
    weights = images.mean(1)  # T x H x W
    h, w = weights.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=weights.dtype), torch.arange(w, dtype=weights.dtype), indexing="ij")
    total = weights.sum((-2, -1))
    return torch.stack([(weights * xs).sum((-2, -1)) / total, (weights * ys).sum((-2, -1)) / total], -1)


def test_config_builds_a_parameter_free_module():
    model = build_model(load_config("warp"))
    assert isinstance(model, LandmarkWarp)
    assert sum(p.numel() for p in model.parameters()) == 0


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown warp option"):
        LandmarkWarp(ModelConfig(name="w", backbone="warp", model_params={"stiffness": 1}))


@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_returns_the_source(face, align_corners):
    image, landmarks = face
    config = ModelConfig(name="w", backbone="warp", grid_sample_align_corners=align_corners)
    driving = landmarks.expand(3, -1, -1)  # the clip does not move
    out = LandmarkWarp(config).animate(image, landmarks, driving, landmarks)
    assert out["prediction"].shape == (3, *image.shape[1:])
    # align_corners=True grids (2x / (W - 1) - 1) are not exact in float32: a few 1e-6 of rounding
    assert (out["prediction"] - image).abs().max() < (1e-5 if align_corners else 1e-6)
    assert out["flow"].shape == (3, *image.shape[-2:], 2)


def test_translation_moves_the_content_with_the_landmarks(face):
    image, landmarks = face
    size = image.shape[-1]
    source = blob(size, landmarks[0, 30])  # a spot on the nose tip
    shift = torch.tensor([3.0, -2.0])
    initial = landmarks
    driving = torch.cat([landmarks, landmarks + shift])  # frame 0 still, frame 1: the whole face moves
    out = make_warp().animate(source, landmarks, driving, initial)
    moved = centroid(out["prediction"]) - centroid(source)  # 2 x 2
    assert moved[0].abs().max() < 1e-4
    assert torch.allclose(moved[1], shift, atol=0.25), f"the spot moved by {moved[1].tolist()}, expected {shift.tolist()}"


def test_local_motion_stays_local(face):
    image, landmarks = face
    size = image.shape[-1]
    mouth = slice(48, 68)
    driving = landmarks.clone()
    driving[:, mouth, 1] += 3.0  # the mouth drops by 3 px, nothing else moves
    out = make_warp().animate(blob(size, landmarks[0, 62]), landmarks, driving, landmarks)  # spot on the inner lip
    assert (centroid(out["prediction"]) - centroid(blob(size, landmarks[0, 62])))[0, 1] > 2.5
    displacement = (out["flow"] - make_warp().animate(image, landmarks, landmarks, landmarks)["flow"]).norm(dim=-1)[0]
    eyes = landmarks[0, 36:48].round().long()  # the eyes stay where they were
    assert displacement[eyes[:, 1], eyes[:, 0]].max() < 0.15 * 2 / size * 3


def test_exact_spline_interpolates_its_control_points():
    torch.manual_seed(0)
    control = torch.rand(2, 20, 2, dtype=torch.float64) * 2 - 1
    values = torch.randn(2, 20, 2, dtype=torch.float64)
    coefficients = tps_fit(control, values)
    assert torch.allclose(tps_evaluate(control, coefficients, control), values, atol=1e-9)
    # affine data is reproduced everywhere with zero bending
    affine = control @ torch.tensor([[0.3, -0.1], [0.2, 0.5]], dtype=torch.float64) + 0.25
    points = torch.rand(2, 50, 2, dtype=torch.float64) * 2 - 1
    expected = points @ torch.tensor([[0.3, -0.1], [0.2, 0.5]], dtype=torch.float64) + 0.25
    assert torch.allclose(tps_evaluate(control, tps_fit(control, affine), points), expected, atol=1e-9)


def _offset_at_targets(out: dict, size: int) -> torch.Tensor:
    """Pixel offset the flow applies at each target landmark (sampled source position - target): T x 68 x 2.

    Read by bilinear interpolation of the dense flow; exact where targets fall on pixel centres."""
    target = pixels_to_grid(out["landmarks"].double(), (size, size), False)  # T x 68 x 2
    sampled = F.grid_sample(out["flow"].permute(0, 3, 1, 2).double(), target[:, None], align_corners=False)  # T x 2 x 1 x 68
    return (sampled[:, :, 0].transpose(1, 2) - target) * size / 2


def test_magnify_scales_the_displacement_at_control_points(face):
    image, landmarks = face
    size = image.shape[-1]
    landmarks = landmarks.round()  # on pixel centres, as dlib gives them
    motion = torch.zeros(1, 68, 2)
    motion[:, 48:68] = torch.tensor([1.0, 2.0])  # the mouth moves right and down
    motion[:, 17:27] = torch.tensor([0.0, -1.0])  # the brows rise
    warp = make_warp(regularization=0.0, use_jaw=True)  # exact interpolation through every landmark
    for magnify in (1.0, 2.0):
        out = warp.animate(image, landmarks, landmarks + motion, landmarks, magnify=magnify)
        assert torch.equal(out["landmarks"] - landmarks, magnify * motion)  # targets on pixel centres too
        # the flow samples each source landmark at its target: an offset of -magnify * motion
        inside = ((out["landmarks"] >= 0) & (out["landmarks"] <= size - 1)).all(-1)  # the chin may leave the crop
        offset = _offset_at_targets(out, size)[inside]
        assert torch.allclose(offset, -magnify * motion.double()[inside], atol=1e-3), f"magnify {magnify}"


def test_smoothing_keeps_most_of_the_motion(face):
    image, landmarks = face
    size = image.shape[-1]
    driving = landmarks.clone()
    driving[:, 48:68] += torch.tensor([0.0, 2.0])  # the mouth moves down by 2 px
    out = make_warp().animate(image, landmarks, driving, landmarks)  # default smoothing
    kept = -_offset_at_targets(out, size)[0, 48:68, 1] / 2.0
    assert kept.mean() > 0.95 and kept.max() <= 1.02, f"share of the mouth motion kept: {kept.mean():.2f}"


def test_batch_equals_single_calls(face):
    image, landmarks = face
    torch.manual_seed(2)
    driving = landmarks + torch.randn(4, 68, 2)
    initial = landmarks + torch.randn(1, 68, 2) * 0.5
    warp = make_warp(chunk_elements=1)  # one frame per evaluation chunk
    batched = make_warp().animate(image, landmarks, driving, initial, magnify=1.5)["prediction"]
    single = torch.cat([warp.animate(image, landmarks, driving[i : i + 1], initial, magnify=1.5)["prediction"] for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_motion_is_mapped_by_the_similarity_between_faces(face):
    _, landmarks = face
    driving_face = landmarks
    # the source face: the driving face rotated by 90 degrees and twice as large
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    source = (landmarks - 128) @ rotation.T * 2 + 128
    motion = torch.zeros(1, 68, 2)
    motion[:, 48:68, 1] = 1.0  # the driving mouth moves down (+y) by 1 px
    target = LandmarkWarp.target_landmarks(source, driving_face + motion, driving_face, magnify=1.5)
    expected = motion @ rotation.T * 2 * 1.5  # rotated (+y -> -x) and scaled
    assert torch.allclose(target - source, expected, atol=1e-5)


def tight_crop(image: torch.Tensor, landmarks: torch.Tensor, margin: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """The face cut to its landmarks' box (+ margin x its size) and resized to the frame size: a tightly framed
    face, as some datasets and clips frame it."""
    size = image.shape[-1]
    low, high = landmarks[0].min(0).values, landmarks[0].max(0).values
    side = float((high - low).max()) * (1 + 2 * margin)
    centre = (low + high) / 2
    x0, y0 = (centre - side / 2).round().long().tolist()
    crop = F.pad(image, (max(-x0, 0), max(x0 + int(side) - size, 0), max(-y0, 0), max(y0 + int(side) - size, 0)),
                 mode="replicate")[..., max(y0, 0):max(y0, 0) + int(side), max(x0, 0):max(x0, 0) + int(side)]
    scale = size / int(side)
    return (F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False),
            ((landmarks - torch.tensor([x0, y0]) + 0.5) * scale - 0.5).round())


@pytest.mark.parametrize("framing", ["as given", "tight"])
def test_confinement_keeps_the_background_still(face, framing):
    image, landmarks = face if framing == "as given" else tight_crop(*face)
    size = image.shape[-1]
    driving = landmarks.clone()
    driving[:, JAW] += torch.tensor([4.0, 0.0])  # contour jitter only
    warp = make_warp(use_jaw=True)
    free = warp.animate(image, landmarks, driving, landmarks)["flow"]
    confined = warp.animate(image, landmarks, driving, landmarks, confine_to_prior=True)["flow"]
    identity = warp.animate(image, landmarks, landmarks, landmarks)["flow"]
    corner = (slice(None), slice(0, size // 16), slice(0, size // 16))  # background
    assert (free - identity)[corner].abs().max() > 1e-3
    assert (confined - identity)[corner].abs().max() < 0.1 * (free - identity)[corner].abs().max()
    weight = warp.prior_weight(landmarks.double(), (size, size))[0, ..., 0]  # H x W
    nose, mouth = landmarks[0, 30].round().long(), landmarks[0, 62].round().long()
    assert weight[nose[1], nose[0]] == 1 and weight[mouth[1], mouth[0]] == 1  # the face moves freely
    assert weight.min() >= 0 and weight.max() <= 1


def test_coincident_landmarks_do_not_break_the_solve(face):
    image, landmarks = face
    driving = landmarks.clone()
    driving[:, 31] = driving[:, 32]  # two landmarks at the same (integer) position
    out = make_warp().animate(image, landmarks, driving, landmarks)
    assert torch.isfinite(out["prediction"]).all()


@pytest.mark.parametrize(
    "shapes",
    [((1, 67, 2), (2, 68, 2)), ((2, 68, 2), (2, 68, 2)), ((1, 68, 2), (2, 68, 3))],
    ids=["source-points", "source-frames", "driving-coords"],
)
def test_bad_landmark_shapes_are_refused(face, shapes):
    image, _ = face
    source_shape, driving_shape = shapes
    with pytest.raises(ValueError, match="landmarks"):
        make_warp().animate(image, torch.zeros(source_shape), torch.zeros(driving_shape), torch.zeros(1, 68, 2))


def test_missing_landmarks_are_refused(face):
    image, landmarks = face
    driving = landmarks.clone()
    driving[0, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        make_warp().animate(image, landmarks, driving, landmarks)

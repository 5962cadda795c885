"""The facial priors reproduce the reference: AU mapping exactly, per-AU maps within 1e-5 (landmarks fixture)."""

from __future__ import annotations

import json

import pytest
import torch

from mefacial import prior
from conftest import FIXTURES, require

MAP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def landmarks_fixture():
    folder = require(FIXTURES / "landmarks", "landmarks fixture")
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    tensors = load_file(str(folder / "landmarks.safetensors"))
    clips = sorted(meta.get("clips") or {k.split(".")[0] for k in tensors})
    assert clips, "the landmarks fixture lists no clips"
    return clips, tensors


def _image_size(tensors: dict, clip: str) -> int:
    frames = tensors.get(f"{clip}.frames_uint8")
    return int(frames.shape[1]) if frames is not None else 256


def test_au_points_match_reference_exactly(landmarks_fixture):
    clips, tensors = landmarks_fixture
    for clip in clips:
        landmarks = tensors[f"{clip}.landmarks68"]  # T x 68 x 2
        expected = tensors[f"{clip}.au_points"]  # T x 18 x 2
        got = prior.au_points_from_landmarks(landmarks)
        assert got.shape == expected.shape
        assert torch.equal(got, expected), f"{clip}: AU points differ by {(got - expected).abs().max()}"


def test_per_au_maps_match_reference(landmarks_fixture):
    clips, tensors = landmarks_fixture
    for clip in clips:
        expected = tensors[f"{clip}.per_au_maps_frame0"]  # 18 x m x m
        au = tensors[f"{clip}.au_points"][:1]
        got = prior.per_au_maps(au, image_size=_image_size(tensors, clip), map_size=expected.shape[-1], sigma=0.75)
        assert got.shape == (1, *expected.shape)
        err = (got[0] - expected).abs().max().item()
        assert err <= MAP_TOLERANCE, f"{clip}: per-AU maps differ by {err}"


def test_au_points_accept_integer_and_batched_landmarks():
    torch.manual_seed(0)
    landmarks = torch.randint(0, 256, (2, 3, prior.NUM_LANDMARKS, 2))
    got = prior.au_points_from_landmarks(landmarks)
    assert got.shape == (2, 3, prior.NUM_AU_POINTS, 2) and got.dtype == torch.float32
    flat = prior.au_points_from_landmarks(landmarks.reshape(6, prior.NUM_LANDMARKS, 2).float())
    assert torch.equal(flat.reshape(got.shape), got)
    # The first twelve AU points are landmarks unchanged; the nose wings move by half the inner-eye distance.
    half_eye = (landmarks[..., 42, 0] - landmarks[..., 39, 0]).float() / 2
    assert torch.equal(got[..., 0, :], landmarks[..., 19, :].float())
    assert torch.equal(got[..., 12, 0], landmarks[..., 31, 0].float() - half_eye)
    with pytest.raises(ValueError, match="68"):
        prior.au_points_from_landmarks(torch.zeros(1, 18, 2))


def _random_points(batch: int, image_size: int = 256) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, prior.NUM_AU_POINTS, 2) * (image_size - 1)


@pytest.mark.parametrize("distance", prior.DISTANCES)
def test_maps_are_batched_and_normalised(distance):
    points = _random_points(3)
    maps = prior.per_au_maps(points, 256, 64, distance=distance)  # 3 x 18 x 64 x 64
    assert maps.shape == (3, prior.NUM_AU_POINTS, 64, 64)
    for i in range(3):
        assert torch.equal(prior.per_au_maps(points[i : i + 1], 256, 64, distance=distance), maps[i : i + 1])
    assert torch.allclose(maps.amax(dim=(-2, -1)), torch.ones(3, prior.NUM_AU_POINTS))
    assert (maps == 0).any(dim=(-2, -1)).all(), "each map is zeroed below its mean"
    ewp = prior.ewp_map(points, 256, 64, distance=distance)
    assert ewp.shape == (3, 1, 64, 64)
    assert torch.allclose(ewp.amax(dim=(-2, -1)), torch.ones(3, 1))
    assert torch.allclose(ewp, prior.equal_weighted(maps), atol=1e-6)


def test_map_peak_is_at_the_point_with_rows_as_y():
    # A point at map pixel (x=10, y=40) in 1-based indices peaks at row 39, column 9.
    points = torch.tensor([[[10.0, 40.0]]]) * 4  # image pixels of a 256 frame, map 64
    maps = prior.per_au_maps(points, 256, 64)
    row, col = divmod(int(maps[0, 0].argmax()), 64)
    assert (row, col) == (39, 9)


def test_l1_and_l2_differ_and_bad_distance_is_refused():
    points = _random_points(1)
    assert not torch.allclose(prior.ewp_map(points, 256, 64, distance="l1"), prior.ewp_map(points, 256, 64, distance="l2"))
    with pytest.raises(ValueError, match="distance"):
        prior.per_au_maps(points, 256, 64, distance="cosine")

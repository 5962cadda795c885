"""Frame and landmark metrics: PSNR and SSIM agree with scikit-image, landmark-motion error ignores
identity, frames with motion are chosen from the landmarks, and the self-reenactment and
motion-transfer scores rank a perfect clip above the static baseline and the static baseline
level with itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mefacial import metrics


def _pair(seed: int, shape=(3, 3, 40, 52)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related float images in [0, 1] (a smooth pattern and a noisy, shifted copy)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 6, shape[-2]), torch.linspace(0, 8, shape[-1]), indexing="ij")
    base = 0.5 + 0.4 * torch.sin(xs + torch.arange(shape[1]).view(-1, 1, 1)) * torch.cos(ys)  # C x H x W
    a = (base + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    b = (torch.roll(base, 1, -1) + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_skimage(seed):
    a, b = _pair(seed)
    got = metrics.ssim(a, b)
    for i in range(len(a)):
        expected = structural_similarity(
            a[i].permute(1, 2, 0).numpy().astype(np.float64), b[i].permute(1, 2, 0).numpy().astype(np.float64),
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1,
        )
        assert abs(float(got[i]) - expected) < 1e-6


def test_ssim_of_real_uint8_frames_matches_skimage(data_dir):
    import imageio.v3 as iio

    clip = sorted(data_dir.glob("driving/*.gif"))[0]
    frames = iio.imread(clip)[..., :3][[0, -1]]  # T x H x W x 3 uint8
    tensors = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    expected = structural_similarity(frames[0], frames[1], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255, channel_axis=-1)
    assert abs(float(metrics.ssim(tensors[1:], tensors[:1])[0]) - expected) < 1e-5
    assert float(metrics.ssim(tensors[:1], tensors[:1])[0]) == pytest.approx(1.0, abs=1e-9)


def test_psnr_and_l1_match_their_definitions():
    a, b = _pair(2)
    got = metrics.psnr(a, b)
    for i in range(len(a)):
        expected = peak_signal_noise_ratio(a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64), data_range=1.0)
        assert abs(float(got[i]) - expected) < 1e-4
    assert torch.allclose(metrics.l1(a, b), (a - b).abs().mean((1, 2, 3)))
    assert math.isinf(float(metrics.psnr(a, a)[0]))


def test_frame_metrics_refuse_mismatched_shapes():
    a, b = _pair(3)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, b[..., :-1])
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(a[..., :8, :8], b[..., :8, :8])


def _face_tracks(frames: int = 6, seed: int = 0) -> torch.Tensor:
    """A face-sized 68-point layout (eyes 40 px apart) with a mouth that opens over the clip: T x 68 x 2."""
    g = torch.Generator().manual_seed(seed)
    face = torch.rand(68, 2, generator=g) * 80 + 20
    face[36:42] = torch.tensor([40.0, 50.0]) + torch.randn(6, 2, generator=g)  # left eye
    face[42:48] = torch.tensor([80.0, 50.0]) + torch.randn(6, 2, generator=g)  # right eye
    tracks = face.repeat(frames, 1, 1)
    tracks[:, 48:68, 1] += torch.linspace(0, 3, frames).view(-1, 1)  # the mouth moves down 0 -> 3 px
    return tracks


def test_landmark_motion_error_ignores_identity_and_measures_motion():
    reference = _face_tracks()
    other_face = reference * 1.0 + torch.tensor([7.0, -4.0])  # same motion, elsewhere
    assert float(metrics.landmark_motion_error(other_face, reference)) == pytest.approx(0.0, abs=1e-6)
    still = reference[:1].expand_as(reference)
    expected = (reference - reference[:1]).norm(dim=-1).mean()  # a still face misses all the motion
    assert float(metrics.landmark_motion_error(still, reference)) == pytest.approx(float(expected), rel=1e-6)
    assert metrics.landmark_motion_errors(still, reference).shape == (len(reference),)


def test_motion_frames_follow_the_landmarks():
    tracks = _face_tracks(frames=6)  # mean motion 0, 0.18, 0.35, ... px; inter-ocular distance 40 px
    mask = metrics.motion_frames(tracks, min_motion=0.01)  # threshold 0.4 px
    assert mask.tolist() == [False, False, False, True, True, True]
    still = tracks[:1].expand_as(tracks)
    assert metrics.motion_frames(still).tolist() == [False] + [True] * 5  # nothing moves: all after the first


def test_self_reenactment_ranks_a_perfect_clip_above_the_static_baseline():
    torch.manual_seed(0)
    real = torch.rand(6, 3, 24, 24)
    tracks = _face_tracks(frames=6)
    perfect = metrics.score_self_reenactment(real, real, tracks, tracks)
    assert perfect.beats_static
    assert perfect.generated.landmark_error == pytest.approx(0.0, abs=1e-6)
    assert perfect.frames_scored == 3 and perfect.frames_total == 6
    static = metrics.score_self_reenactment(real[:1].expand_as(real), real, tracks, tracks[:1].expand_as(tracks))
    assert not static.beats_static
    assert static.generated == static.static
    no_landmarks = metrics.score_self_reenactment(real, real, tracks)
    assert no_landmarks.generated.landmark_error is None and no_landmarks.beats_static


def test_frames_equal_to_the_first_are_not_scored_as_motion():
    """A clip held still at its start (frames equal to the first, all frames counted where none moves enough):
    the static baseline's PSNR was infinite there, and every variant's comparison with it meaningless."""
    torch.manual_seed(0)
    real = torch.rand(6, 3, 24, 24)
    real[1:3] = real[0]  # frames 1-2: the onset held
    still = _face_tracks(frames=6)[:1].expand(6, -1, -1)  # no landmark motion: every frame would count
    scores = metrics.score_self_reenactment(real, real, still, still)
    assert scores.frames_scored == 3 and math.isfinite(scores.static.psnr)
    with pytest.raises(ValueError, match="still clip"):
        metrics.score_self_reenactment(real[:1].expand(6, -1, -1, -1), real[:1].expand(6, -1, -1, -1), still)


def test_motion_transfer_is_relative_to_face_size():
    driving = _face_tracks(frames=6)
    bigger = (driving - 60) * 2 + 100  # another face twice as large, same expression
    same = metrics.score_motion_transfer(bigger, driving)
    assert same.error == pytest.approx(0.0, abs=1e-6) and same.gain == pytest.approx(1.0)
    assert same.beats_static and same.as_dict()["beats_static"] is True
    still = metrics.score_motion_transfer(bigger[:1].expand_as(bigger), driving)
    assert still.gain == pytest.approx(0.0, abs=1e-9)
    assert still.error == pytest.approx(still.static_error) and not still.beats_static


def test_motion_transfer_is_measured_in_each_faces_own_axes():
    """A face tilted 20 degrees making the same expression moves its points along its own axes: no error; the same
    motion in the picture's axes on a tilted face is 20 degrees off its expression."""
    driving = _face_tracks(frames=6).double()
    angle = math.radians(20)
    turn = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    tilted = (driving - 60) @ turn.T * 1.5 + 90  # another face, tilted and larger, the same expression
    same = metrics.score_motion_transfer(tilted, driving)
    assert same.error == pytest.approx(0.0, abs=1e-9) and same.gain == pytest.approx(1.0)
    along_the_picture = tilted[:1] + (driving - driving[:1]) * 1.5  # the expression not turned with the face
    off = metrics.score_motion_transfer(along_the_picture, driving)
    assert off.error == pytest.approx(2 * math.sin(angle / 2) * off.static_error, rel=1e-6)
    assert off.gain == pytest.approx(math.cos(angle), rel=1e-6)

"""Quality metrics for generated clips, and the self-reenactment score.

Frame metrics take float tensors in [0, 1] shaped B x C x H x W and return one
value per frame (a length-B tensor), so a clip is scored in one call:

- `l1`: mean absolute error.
- `psnr`: peak signal-to-noise ratio in dB (`data_range` 1).
- `ssim`: the structural similarity of Wang et al. (2004) with an 11-tap
  Gaussian window (sigma 1.5), population covariances, K1 = 0.01, K2 = 0.03,
  averaged over channels: it equals `skimage.metrics.structural_similarity(
  a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)`.

Landmark metrics take T x 68 x 2 pixel tracks:

- `landmark_motion_error`: how far the motion of generated landmarks (relative
  to their frame 0) is from the reference motion, in pixels; identity does
  not matter, only motion does.

`score_self_reenactment` is the evaluation of a generator on real clips: a
clip's first frame is animated by the clip itself, so the real frames are the
ground truth; the generated clip is scored against them next to the *static
baseline* (the first frame repeated), over the frames where the face moves.
A generator is useful when it beats the static baseline.
`score_motion_transfer` measures, for another face animated by a clip, whether
the generated AU points move like the driving ones (relative to each face's
size). `mefacial.evaluate` runs both on clips through the engine.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .errors import InputError

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5: the 11-tap window of Wang et al.
SSIM_K1, SSIM_K2 = 0.01, 0.03

# iBUG 68-point convention: the two eyes, whose centres give the inter-ocular distance.
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two B x C x H x W tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per frame: B x C x H x W (twice) -> B."""
    _check_pair(a, b)
    return (a - b).abs().flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per frame: B x C x H x W (twice) -> B (inf for identical frames)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # B
    return (10 * torch.log10(data_range**2 / mse)).to(a.dtype)


def _gaussian_window(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian that scipy.ndimage uses for (sigma, truncate)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Gaussian SSIM per frame (mean over channels and valid pixels): B x C x H x W (twice) -> B.

    The window is applied without padding; skimage filters with reflection and
    then crops the window radius, so the pixels averaged are the same.
    """
    _check_pair(a, b)
    x, y = a.double(), b.double()
    batch, channels = x.shape[:2]
    w = _gaussian_window(SSIM_SIGMA, SSIM_TRUNCATE, x.device)
    if min(x.shape[-2:]) < w.numel():
        raise ValueError(f"SSIM needs frames of at least {w.numel()} x {w.numel()} pixels, got {tuple(x.shape[-2:])}")

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable valid Gaussian over H and W, per channel
        t = t.reshape(batch * channels, 1, *t.shape[-2:])
        t = F.conv2d(t, w.view(1, 1, -1, 1))
        return F.conv2d(t, w.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(batch, -1).mean(1).to(a.dtype)


def eye_axis(landmarks: torch.Tensor) -> torch.Tensor:
    """Vector from the left-eye centre to the right-eye centre (image left to right): ... x 68 x 2 -> ... x 2."""
    return landmarks[..., RIGHT_EYE, :].mean(-2) - landmarks[..., LEFT_EYE, :].mean(-2)


def interocular_distance(landmarks: torch.Tensor) -> torch.Tensor:
    """Distance between the eye centres of 68-point landmarks: ... x 68 x 2 -> ..."""
    return eye_axis(landmarks).norm(dim=-1)


def face_frame_motion(points: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Each point's motion from frame 0 in the face's own axes: T x P x 2 pixels and the face's eye axis at frame 0
    (2: from the eye on the picture's left to the other, `eye_axis`) -> T x P x 2 in inter-ocular distances, x
    along the eye axis, y across it (down), so that faces of any size and tilt compare."""
    length = axis.norm()
    cos, sin = axis / length
    turn = torch.stack([torch.stack([cos, sin]), torch.stack([-sin, cos])])  # 2 x 2: the eye axis onto +x
    return (points - points[:1]) @ turn.T / length


def au_point_motion(landmarks: torch.Tensor) -> torch.Tensor:
    """The 18 AU points' motion from frame 0 in the face's own axes (`face_frame_motion`, the eye axis of its
    68 landmarks at frame 0): T x 68 x 2 -> T x 18 x 2 (float64)."""
    from .prior import au_points_from_landmarks

    landmarks = landmarks.double()
    return face_frame_motion(au_points_from_landmarks(landmarks), eye_axis(landmarks[0]))


def landmark_displacement(landmarks: torch.Tensor) -> torch.Tensor:
    """Mean distance of each frame's landmarks from frame 0's, in pixels: T x P x 2 -> T."""
    return (landmarks - landmarks[:1]).norm(dim=-1).mean(-1)


def landmark_motion_errors(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per frame, the mean over points of ||(gen_t - gen_0) - (ref_t - ref_0)|| in pixels: T x P x 2 (twice) -> T."""
    if generated.shape != reference.shape or generated.dim() != 3:
        raise ValueError(f"expected two T x P x 2 tracks of the same shape, got {tuple(generated.shape)} and {tuple(reference.shape)}")
    motion_gen = generated - generated[:1]  # T x P x 2
    motion_ref = reference - reference[:1]
    return (motion_gen - motion_ref).norm(dim=-1).mean(-1)


def landmark_motion_error(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over frames and points of ||(gen_t - gen_0) - (ref_t - ref_0)|| in pixels (a scalar).

    generated, reference: T x P x 2 tracks in the same pixel frame.
    """
    return landmark_motion_errors(generated, reference).mean()


def motion_frames(landmarks: torch.Tensor, min_motion: float = 0.01) -> torch.Tensor:
    """Frames with motion: a T boolean mask, frame 0 always False.

    A frame moves when the mean displacement of its landmarks from frame 0
    exceeds `min_motion` times the inter-ocular distance of frame 0 (1 % by
    default: about 0.5 px on a 128 px face crop, above the detector's
    quantisation). When no frame qualifies, every frame after the first counts.
    """
    moved = landmark_displacement(landmarks) > min_motion * interocular_distance(landmarks[0])  # T
    moved[0] = False
    if not bool(moved.any()):
        moved = torch.ones_like(moved)
        moved[0] = False
    return moved


@dataclasses.dataclass(frozen=True)
class ClipScores:
    """Scores of one clip against the real frames, averaged over the frames with motion."""

    psnr: float
    ssim: float
    l1: float
    landmark_error: float | None  # pixels; None when no landmarks were given


@dataclasses.dataclass(frozen=True)
class SelfReenactment:
    """A generated clip and the static baseline, scored on the same frames."""

    generated: ClipScores
    static: ClipScores
    frames_scored: int
    frames_total: int

    @property
    def beats_static(self) -> bool:
        """PSNR and SSIM higher, and landmark error (when measured) lower, than the static baseline."""
        better = self.generated.psnr > self.static.psnr and self.generated.ssim > self.static.ssim
        if self.generated.landmark_error is not None and self.static.landmark_error is not None:
            better = better and self.generated.landmark_error < self.static.landmark_error
        return better

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _clip_scores(pred: torch.Tensor, real: torch.Tensor, landmark_error: torch.Tensor | None) -> ClipScores:
    return ClipScores(
        psnr=float(psnr(pred, real).mean()),
        ssim=float(ssim(pred, real).mean()),
        l1=float(l1(pred, real).mean()),
        landmark_error=None if landmark_error is None else float(landmark_error),
    )


def score_self_reenactment(
    generated: torch.Tensor,
    real: torch.Tensor,
    real_landmarks: torch.Tensor,
    generated_landmarks: torch.Tensor | None = None,
    min_motion: float = 0.01,
) -> SelfReenactment:
    """Score a self-reenactment against the static baseline (the real first frame repeated).

    generated, real: T x 3 x H x W in [0, 1]; generated[t] is real[0] animated by real[t].
    real_landmarks: T x 68 x 2 detected on the real frames (the reference motion).
    generated_landmarks: T x 68 x 2 re-detected on the generated frames with the same
    detector, or None to skip the landmark score.
    Frames scored: `motion_frames(real_landmarks, min_motion)`. The static baseline's
    landmarks are the first frame's repeated (a detector returns the same points on the
    same image), so its landmark error is the mean real motion on those frames.
    """
    if generated.shape != real.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and real {tuple(real.shape)} clips differ in shape")
    # frames equal to the first are no motion, whatever the landmarks read (the static baseline's PSNR there is
    # infinite: a clip held still at its start scored inf); where none moves enough, every frame that differs counts
    differs = (real != real[:1]).flatten(1).any(1)  # T
    mask = motion_frames(real_landmarks, min_motion) & differs
    if not bool(mask.any()):
        mask = differs
    if not bool(mask.any()):
        raise InputError("every frame of the clip equals its first: a still clip has no motion to reenact")
    static = real[:1].expand_as(real)
    static_landmarks = real_landmarks[:1].expand_as(real_landmarks)

    def motion_error(landmarks: torch.Tensor) -> torch.Tensor:
        # all frames go in (motion is relative to frame 0); the error is averaged over `mask`
        return landmark_motion_errors(landmarks, real_landmarks)[mask].mean()

    gen_error = None if generated_landmarks is None else motion_error(generated_landmarks)
    static_error = None if generated_landmarks is None else motion_error(static_landmarks)
    return SelfReenactment(
        generated=_clip_scores(generated[mask], real[mask], gen_error),
        static=_clip_scores(static[mask], real[mask], static_error),
        frames_scored=int(mask.sum()),
        frames_total=int(mask.numel()),
    )


@dataclasses.dataclass(frozen=True)
class MotionTransfer:
    """AU-point motion of a generated clip against its driving clip, in units of each face's inter-ocular distance."""

    error: float  # mean || gen motion - driving motion || over the frames with motion and the AU points
    static_error: float  # the same for a still output: the mean driving motion
    gain: float  # share of the driving motion carried over (projection of gen motion on it; 1 = all)
    frames_scored: int
    frames_total: int

    @property
    def beats_static(self) -> bool:
        return self.error < self.static_error

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "beats_static": self.beats_static}


def score_motion_transfer(generated: torch.Tensor, driving: torch.Tensor, min_motion: float = 0.01) -> MotionTransfer:
    """Cross-identity motion transfer: does the generated face move its AU points like the driving face?

    generated: T x 68 x 2 landmarks re-detected on the generated clip; driving: T x 68 x 2 on the
    driving clip. Both are reduced to the 18 AU points and their motion relative to frame 0 is
    taken in each face's own axes at frame 0 (`au_point_motion`: turned with its eye axis, divided by its
    inter-ocular distance), so faces of any size and tilt compare (a brow raised on a tilted driving face is
    raised along the target face's own up). Frames scored: `motion_frames(driving, min_motion)`.
    """
    if generated.shape != driving.shape or generated.dim() != 3:
        raise ValueError(f"expected two T x 68 x 2 tracks of the same shape, got {tuple(generated.shape)} and {tuple(driving.shape)}")
    mask = motion_frames(driving, min_motion)  # T
    gen, drv = au_point_motion(generated)[mask], au_point_motion(driving)[mask]  # scored frames x 18 x 2
    return MotionTransfer(
        error=float((gen - drv).norm(dim=-1).mean()),
        static_error=float(drv.norm(dim=-1).mean()),
        gain=float((gen * drv).sum() / drv.square().sum().clamp_min(1e-12)),
        frames_scored=int(mask.sum()),
        frames_total=int(mask.numel()),
    )

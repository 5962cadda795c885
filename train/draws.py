"""Where a training step's random draws and the transformed frame's AU points come from.

A recipe asks its `draws` object (default `StepDraws`) for

* the random warp of the equivariance losses (`transform`: affine + TPS
  parameters drawn from the step's `torch.Generator`),
* the AU points of the warped driving frame (prior variants,
  `transformed_au_points`),
* the uniform numbers of the AVD stage's random rescaling (`scale_uniform`).

`RecordedDraws` returns given values instead, e.g. those an original
implementation drew and detected in one of its steps: that is how
`tests/test_train_reference.py` feeds the reference fixtures to the real
training step. Its fields left as None fall back to `StepDraws`.

The one deliberate difference from the originals lives here: they ran dlib on
the warped (uint8-truncated) frame to get its AU points; `StepDraws` moves the
driving frame's cached landmarks by the inverse of the warp instead (no
detector in the loop, no frame where the detector misses the face; see the
README's Training section for the measured effect).
"""

from __future__ import annotations

import dataclasses

import torch

from mefacial import prior

from .losses import RandomTPS

Batch = dict[str, torch.Tensor]


def pixels_to_unit(points: torch.Tensor, size: int) -> torch.Tensor:
    """(x, y) pixels of a size x size frame -> [-1, 1] (the originals' `p * 2 / size - 1`)."""
    return points * 2 / size - 1


def unit_to_pixels(points: torch.Tensor, size: int) -> torch.Tensor:
    return (points + 1) * size / 2


class StepDraws:
    """The project's draws: random numbers from the step's generator, AU points from warped landmarks."""

    def transform(self, batch_size: int, transform_params: dict, generator: torch.Generator,
                  like: torch.Tensor) -> RandomTPS:
        """The random affine + TPS warp of one step (`like`: a tensor giving device and dtype)."""
        return RandomTPS(batch_size, **transform_params, generator=generator, device=like.device, dtype=like.dtype)

    def transformed_au_points(self, batch: Batch, tps: RandomTPS, transformed: torch.Tensor,
                              au_mode: str) -> torch.Tensor | None:
        """AU points (B x 18 x 2 pixels) of the warped driving frames; None without a prior.

        per_frame: the driving landmarks moved to where the warp puts them
        (`tps.inverse_warp`); first_frame (ACM MM 2021): the driving frame's
        points unchanged, as that code feeds its detector.
        """
        if "driving_au" not in batch:
            return None
        if au_mode == "first_frame":
            return batch["driving_au"]
        size = transformed.shape[-1]
        landmarks = pixels_to_unit(batch["driving_landmarks"].to(tps.theta.dtype), size)  # B x 68 x 2
        moved = unit_to_pixels(tps.inverse_warp(landmarks), size)  # B x 68 x 2
        return prior.au_points_from_landmarks(moved)

    def scale_uniform(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """B x 2 uniform numbers in [0, 1) of the AVD stage's random rescaling (`torch.rand`, as the original)."""
        return torch.rand(batch_size, 2, generator=generator)


@dataclasses.dataclass
class RecordedDraws(StepDraws):
    """Given draws (e.g. an original run's); None fields fall back to `StepDraws`.

    theta B x 2 x 3, control_params B x 1 x P, control_points P x 2, au_transformed
    B x 18 x 2 pixels, scale_uniform B x 2.
    """

    theta: torch.Tensor | None = None
    control_params: torch.Tensor | None = None
    control_points: torch.Tensor | None = None
    au_transformed: torch.Tensor | None = None
    scale_uniform_values: torch.Tensor | None = None

    def transform(self, batch_size, transform_params, generator, like):
        if self.theta is None:
            return super().transform(batch_size, transform_params, generator, like)
        if self.theta.shape[0] != batch_size:
            raise ValueError(f"recorded theta is for a batch of {self.theta.shape[0]}, the step has {batch_size}")
        theta = self.theta.to(device=like.device, dtype=like.dtype)
        return RandomTPS.from_params(theta, self.control_params, self.control_points)

    def transformed_au_points(self, batch, tps, transformed, au_mode):
        if self.au_transformed is None:
            return super().transformed_au_points(batch, tps, transformed, au_mode)
        return self.au_transformed.to(device=transformed.device, dtype=transformed.dtype)

    def scale_uniform(self, batch_size, generator):
        if self.scale_uniform_values is None:
            return super().scale_uniform(batch_size, generator)
        return self.scale_uniform_values

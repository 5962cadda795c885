"""Typed errors of the package. Each message names the cause and the remedy.

The app turns any `MefacialError` into a `gr.Error` with its message; the CLI
prints it and exits with status 2.
"""


class MefacialError(Exception):
    """Base class of every error the package raises on purpose."""


class ConfigError(MefacialError, ValueError):
    """A config file or field is invalid."""


class UnknownVariantError(MefacialError, KeyError):
    """A variant id that the registry does not know."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class CheckpointError(MefacialError):
    """A checkpoint is not a checkpoint, or does not fit the chosen architecture."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Weights are neither on disk nor downloadable (offline, missing, unreachable)."""


class InputError(MefacialError, ValueError):
    """A user input (image, clip, option) cannot be used."""


class NotAnImageError(InputError):
    """The source file is not a readable image."""


class UnreadableVideoError(InputError):
    """The driving file is not a readable video or image sequence."""


class InputTooLargeError(InputError):
    """An input exceeds a configured limit (pixels, frames, bytes, duration)."""


class NoFaceError(InputError):
    """No face was found where one is needed."""

    def __init__(self, message: str, frame_index: int | None = None):
        super().__init__(message)
        self.frame_index = frame_index

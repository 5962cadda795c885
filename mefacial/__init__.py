"""mefacial: facial-prior-guided micro-expression generation (FOMM / MRAA with EWP / AWP priors,
and a training-free landmark warp).

    import mefacial
    engine = mefacial.Engine(device="auto", precision="fp32")
    result = engine.animate("face.png", "clip.mp4", variant="warp")

    clip = engine.prepare("face.png", "clip.mp4", mefacial.AnimateOptions(magnify=2))   # once
    for variant in ("warp", "fomm-awp"):
        result = engine.collect(clip, variant)                                           # every variant on it
"""

from .engine import AnimationResult, ClipRun, Engine, PreparedClip, PriorView
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InputTooLargeError,
    MefacialError,
    NoFaceError,
    NotAnImageError,
    UnknownVariantError,
    UnreadableVideoError,
    WeightsNotFoundError,
)
from .options import AnimateOptions
from .variants import get_variant, list_variants

__version__ = "0.1.0"
__all__ = [
    "AnimateOptions", "AnimationResult", "ClipRun", "Engine", "PreparedClip", "PriorView", "list_variants",
    "get_variant",
    "MefacialError", "ConfigError", "UnknownVariantError", "CheckpointError", "WeightsNotFoundError",
    "InputError", "NotAnImageError", "UnreadableVideoError", "InputTooLargeError", "NoFaceError",
]

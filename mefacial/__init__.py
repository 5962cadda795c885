"""mefacial: facial-prior-guided micro-expression generation (FOMM / MRAA with EWP / AWP priors), and two
training-free generators that need no weights: the face-mesh `dense` (the default) and the 68-point `warp`.

    import mefacial
    engine = mefacial.Engine(device="auto", precision="fp32")
    result = engine.animate("face.png", "clip.mp4")                       # dense; result.frames: T x H x W x 3
    au = engine.synthesize("face.png", "6:C,12:C")                        # from FACS action units, no clip

    clip = engine.prepare("face.png", "clip.mp4", mefacial.AnimateOptions(magnify=2))   # once
    for variant in ("dense", "warp", "fomm-awp"):
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

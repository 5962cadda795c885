"""Motion backbones. Each one is an `nn.Module` built from a `ModelConfig`,
whose sub-modules carry the original checkpoint names, so an original
checkpoint `{generator: sd, kp_detector: sd, ...}` loads as
`{f"{part}.{key}": tensor}` with `load_state_dict(strict=True)`.

Every backbone implements the same four batched steps, which the engine
drives (the source is encoded once per clip, driving frames go in batches):

    src  = model.detect(source, au_points)            # motion params of frames (B x ...)
    init = model.detect(driving[:1], au_points[:1])   # of the clip's first frame
    cache = model.encode_source(source)               # generator encoder features, once per clip
    for batch in driving:
        drv = model.detect(batch, au_batch)
        new = model.transfer(src, drv, init, mode=..., adapt_scale=..., magnify=...)
        out = model.generate(source, cache, src, new)  # {"prediction": B x 3 x H x W, ...}

`au_points` are the 18 AU points in pixel units of the model input
(B x 18 x 2, (x, y)); backbones without a prior ignore them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from ..config import ModelConfig

# Which sub-modules an original checkpoint of each backbone holds, and which inference needs.
CHECKPOINT_PARTS = {
    "fomm": ("generator", "kp_detector", "discriminator"),
    "mraa": ("generator", "region_predictor", "bg_predictor", "avd_network"),
}
INFERENCE_PARTS = {
    "fomm": ("generator", "kp_detector"),
    "mraa": ("generator", "region_predictor", "bg_predictor", "avd_network"),
}


def build_model(config: "ModelConfig", for_training: bool = False) -> "nn.Module":
    """Build the backbone of `config` (with its discriminator when `for_training`)."""
    if config.backbone == "fomm":
        from .fomm import FOMM

        return FOMM(config, with_discriminator=for_training)
    if config.backbone == "mraa":
        from .mraa import MRAA

        return MRAA(config)
    if config.backbone == "warp":
        from .warp import LandmarkWarp

        return LandmarkWarp(config)
    if config.backbone == "dense":
        from .dense import DenseMeshWarp

        return DenseMeshWarp(config)
    raise ValueError(f"unknown backbone {config.backbone!r}")

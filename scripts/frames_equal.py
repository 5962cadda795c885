"""Save (or compare) the frames every variant makes from a fixed input with seeded random weights.

    python frames_equal.py save OUT.npz      # in a checkout (base commit)
    python frames_equal.py check OUT.npz     # in another checkout: identical frames?
Run from the checkout's root (imports mefacial from the working directory).
"""
import inspect
import sys

import numpy as np
import torch

sys.path.insert(0, ".")
from mefacial.bench import random_model  # noqa: E402
from mefacial.engine import Engine  # noqa: E402
from mefacial.video import read_clip, read_image  # noqa: E402

try:
    from mefacial.variants import get_variant  # noqa: E402
except ImportError:
    get_variant = None

VARIANTS = ["warp", "fomm-none", "fomm-ewp", "fomm-awp", "fomm-ewp-mm21", "mraa-none", "mraa-ewp", "mraa-awp"]
CASES = {
    "warp": [{}, {"magnify": 2.0, "confine": True, "paste_back": True}, {"crop": False}],
    "fomm-none": [{}, {"motion": "absolute"}, {"adapt_scale": True, "magnify": 1.5}],
    "fomm-awp": [{}, {"paste_back": True}],
    "fomm-ewp": [{}], "fomm-ewp-mm21": [{}],
    "mraa-none": [{}, {"motion": "avd"}, {"motion": "standard", "adapt_scale": False}],
    "mraa-ewp": [{}], "mraa-awp": [{}, {"crop": False, "smooth": False}],
}


def frames() -> dict[str, np.ndarray]:
    source = read_image("examples/astronaut.png")
    clip = read_clip("examples/brow_raise.mp4").frames[:6]
    out = {}
    for variant in VARIANTS:
        engine = Engine(device="cpu", landmarks="dlib", batch_size=4)
        config = get_variant(variant).config
        engine.use_model(variant, random_model(config, seed=0))
        for i, options in enumerate(CASES[variant]):
            if "confine_to_prior" in inspect.signature(Engine.animate).parameters:  # the base commit's name
                options = {("confine_to_prior" if k == "confine" else k): v for k, v in options.items()}
            result = engine.animate(source, clip, variant=variant, **options)
            out[f"{variant}/{i}"] = result.frames
            if result.prior_map is not None:
                out[f"{variant}/{i}/prior"] = result.prior_map
            if result.driving_au is not None:
                out[f"{variant}/{i}/au"] = result.driving_au
            print(variant, options, result.frames.shape, flush=True)
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    mode, path = sys.argv[1], sys.argv[2]
    now = frames()
    if mode == "save":
        np.savez_compressed(path, **now)
    else:
        before = dict(np.load(path))
        assert set(before) == set(now), (sorted(set(before) ^ set(now)))
        bad = [k for k in before if not np.array_equal(before[k], now[k])]
        for k in bad:
            print("DIFFERENT", k, np.abs(before[k].astype(float) - now[k].astype(float)).max())
        print(f"{len(before) - len(bad)}/{len(before)} arrays identical")
        sys.exit(1 if bad else 0)

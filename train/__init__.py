"""Training of the FOMM and MRAA backbones with facial priors: `python -m train --config configs/train/<variant>.yaml`.

    config.py         configs/train/*.yaml -> TrainConfig (validated; `--set section.key=value` overrides)
    datasets.py       videos (frame folders or files), landmarks cached on disk, reproducible frame pairs, sampler
    losses.py         VGG19 perceptual pyramid, equivariance with a random TPS, LSGAN + feature matching
    recipes.py        one training step per backbone / stage (FOMM, MRAA, MRAA's AVD stage)
    draws.py          where a step's random draws and the warped frame's AU points come from (a seam for tests)
    checkpointing.py  self-describing checkpoints in the original part layout, written atomically
    monitor.py        JSONL + TensorBoard losses, visualisation PNGs, tqdm
    trainer.py        the loop: single process or DDP under torchrun
    prepare.py        python -m train.prepare SRC OUT: dataset clips -> onset-frame face crops in DIR/train|test/

Run `python -m train --help` for the options.
"""

from .config import TrainConfig, load_train_config
from .trainer import run

__all__ = ["TrainConfig", "load_train_config", "run", "main"]


def main(argv: list[str] | None = None) -> int:
    """The command line (see `train/__main__.py`)."""
    from .__main__ import main as _main

    return _main(argv)

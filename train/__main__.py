"""python -m train --config configs/train/<variant>.yaml [--data DIR] [--out DIR] [--max-steps N] [--resume CKPT]

Single process:      python -m train --config configs/train/fomm-awp.yaml --data data/casme2 --out runs/fomm-awp
Several GPUs / CPUs: torchrun --nproc_per_node=4 -m train --config configs/train/fomm-awp.yaml --data ...
MRAA's second stage: python -m train --config configs/train/mraa-awp.yaml --stage avd --out runs/mraa-awp
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mefacial.console import CliParser, one_line
from mefacial.errors import MefacialError


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m train",
        description="Train FOMM / MRAA (with none / EWP / AWP facial priors) on face videos. "
                    "Under torchrun each process trains one DDP replica.",
        epilog="Checkpoints (<out>/last.pth.tar, best.pth.tar) load in the engine: "
               "python -m mefacial animate --variant V --checkpoint <out>/best.pth.tar ...")
    parser.add_argument("--config", required=True, help="training config: a path or a name in configs/train/")
    parser.add_argument("--data", type=Path, help="dataset folder (DIR/train/<video>, DIR/test/<video>); "
                                                  "default: dataset.root_dir of the config")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, help="stop at this global step (the schedule stays that of the config)")
    parser.add_argument("--resume", type=Path, help="continue a run exactly from one of its checkpoints")
    parser.add_argument("--init", type=Path, help="start from the weights of a checkpoint (the AVD stage: "
                                                  "the reconstruction model; default <out>/last.pth.tar)")
    parser.add_argument("--stage", choices=("reconstruction", "avd"), help="MRAA: reconstruction (default) or avd")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="mixed precision (fp16: GPU only)")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers per process")
    parser.add_argument("--landmarks", choices=("auto", "fan", "dlib"), help="landmark backend (prior variants)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set train.batch_size=4 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    for flag, key in (("stage", "stage"), ("precision", "runtime.precision"), ("device", "runtime.device"),
                      ("seed", "runtime.seed"), ("num_workers", "runtime.num_workers"),
                      ("landmarks", "dataset.landmarks")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    from .checkpointing import LAST
    from .config import load_train_config
    from .trainer import DEFAULT_RUNS_DIR, run

    cfg = None
    try:
        cfg = load_train_config(args.config, overrides)
        summary = run(cfg, data_dir=args.data, out_dir=args.out, max_steps=args.max_steps, resume=args.resume,
                      init=args.init)
    except MefacialError as exc:
        print(f"error: {one_line(exc.cli_message)}", file=sys.stderr)  # one line: cause and remedy, as `mefacial`'s
        return 2
    except KeyboardInterrupt:  # Ctrl-C: where the run can go on from (its last checkpoint is whole: written atomically)
        if rank == 0:
            out = args.out or DEFAULT_RUNS_DIR / (cfg.name if cfg else "")
            last = (out / "avd" if cfg and cfg.stage == "avd" else out) / LAST
            print("interrupted" + (f": continue with --resume {last}" if cfg and last.is_file() else
                                   " before the first checkpoint"), file=sys.stderr)
        return 130
    if rank == 0:
        best = f", best {summary['best']} (L1 {summary['best_metric']:.4f})" if summary["best"] else ""
        print(f"done: step {summary['step']}, last checkpoint {summary['last']}{best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

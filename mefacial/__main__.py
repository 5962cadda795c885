"""Command line: python -m mefacial animate | checkpoints | variants ..."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import MefacialError


def _cmd_variants(args: argparse.Namespace) -> int:
    from .variants import list_variants

    print(json.dumps(list_variants(), indent=2))
    return 0


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--landmarks", default="auto", choices=["auto", "dlib", "fan"], help="landmark backend")
    parser.add_argument("--batch-size", type=int, default=None, help="driving frames per network batch")


def _add_animation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--motion", default="relative", help="relative | absolute (FOMM) | standard | avd (MRAA)")
    parser.add_argument("--adapt-scale", action="store_true", help="FOMM movement-scale adaptation")
    parser.add_argument("--magnify", type=float, default=1.0, help="multiply the relative motion (1 = faithful)")
    parser.add_argument("--no-crop", dest="crop", action="store_false", help="use the frames as they are, resized")
    parser.add_argument("--margin", type=float, default=0.0, help="extra face-box margin (fraction of the face)")
    parser.add_argument("--no-smooth", dest="smooth", action="store_false", help="keep raw landmark tracks")
    parser.add_argument("--fps", type=float, default=None, help="frame rate of the driving clip, if the file lacks it")
    parser.add_argument("--slowdown", type=float, default=1.0, help="play the output this many times slower")


def _cmd_animate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine import Engine
    from .video import write_video

    engine = Engine(device=args.device, precision=args.precision, batch_size=args.batch_size, landmarks=args.landmarks)
    with tqdm(total=100, unit="%", desc=args.variant, bar_format="{l_bar}{bar}| {postfix}") as bar:
        def progress(fraction: float, message: str) -> None:
            bar.update(round(100 * fraction) - bar.n)
            bar.set_postfix_str(message)

        result = engine.animate(args.source, args.driving, variant=args.variant, checkpoint=args.checkpoint,
                                motion=args.motion, adapt_scale=args.adapt_scale, magnify=args.magnify,
                                crop=args.crop, margin=args.margin, paste_back=args.paste_back,
                                smooth=args.smooth, fps=args.fps, progress=progress)
    out = write_video(args.out, result.frames, result.fps, slowdown=args.slowdown)
    print(f"{out}: {result.num_frames} frames at {result.fps:g} fps (played at {result.fps / args.slowdown:g}), "
          f"{result.timings['ms_per_frame']:.0f} ms/frame, weights: {result.weights}, "
          f"landmarks: {result.landmark_backend or 'not needed'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mefacial", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list the variants and what each needs").set_defaults(func=_cmd_variants)

    animate = sub.add_parser("animate", help="animate a face with a driving clip")
    animate.add_argument("--source", required=True, help="image of the target face")
    animate.add_argument("--driving", required=True, help="driving clip: video, GIF or folder of frames")
    animate.add_argument("--variant", default="warp", help="e.g. warp, fomm-awp, mraa-awp (see `variants`)")
    animate.add_argument("--checkpoint", default=None, help="weights file (default: resolved from the registry)")
    animate.add_argument("--out", required=True, help="output .mp4 or .gif")
    animate.add_argument("--paste-back", action="store_true", help="paste the face back into the source picture")
    _add_animation_options(animate)
    _add_engine_options(animate)
    animate.set_defaults(func=_cmd_animate)
    from . import checkpoints

    checkpoints.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MefacialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

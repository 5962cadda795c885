"""Command line: python -m mefacial (or `mefacial`) animate | synthesize | compare | evaluate | generate | readout |
variants | bench | checkpoints.

The animation flags of every subcommand are generated from `mefacial.options.AnimateOptions`. A user error
(a bad flag or value, a missing file, no weights, no face) prints one line naming the cause and the remedy and
exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .console import CliParser, counted, one_line
from .errors import InputError, MefacialError
from .options import AnimateOptions, magnified


def _tile(text: str) -> int:
    """--tile: a positive multiple of 16 (video encoders need it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"the tile side must be a multiple of 16 (video encoders need it), got "
                                         f"{value}; e.g. {max(16, round(value / 16) * 16)}")
    return value


def _frame_list(text: str) -> list[int]:
    """--strip-frames I,J,...: frame indices."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame numbers such as 0,10,20, got {text!r}") \
            from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _cmd_variants(args: argparse.Namespace) -> int:
    from .console import table
    from .variants import list_variants

    variants = list_variants()
    if args.json:
        print(json.dumps(variants, indent=2))
        return 0
    rows = [[v["id"], v["label"], v["backbone"], v["prior"], "yes" if v["needs_weights"] else "no",
             "yes" if v["needs_landmarks"] else "no", ", ".join(v["motion_modes"])] for v in variants]
    print(table(rows, ["id", "label", "backbone", "prior", "weights", "landmarks", "motion modes"]))
    print("\n--json prints these as JSON; `python -m mefacial checkpoints list` shows where each variant's weights are.")
    return 0


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])


def _engine(args: argparse.Namespace, options: AnimateOptions, checkpoints: dict[str, str] | None = None,
            device: str | None = None):
    """The engine of a command: --device / --precision, and the options' batch size and landmark backend."""
    from .engine import Engine

    return Engine(device=device or args.device, precision=args.precision, batch_size=options.batch_size,
                  landmarks=options.landmarks or "auto", checkpoints=checkpoints)


def _cmd_animate(args: argparse.Namespace) -> int:
    from .console import ConsoleProgress
    from .video import VideoWriter, check_output

    options = AnimateOptions.from_args(args)
    options.for_variant(args.variant)  # an unknown variant or a motion mode it lacks fails before any work
    out = check_output(args.out)
    engine = _engine(args, options)
    started = time.perf_counter()
    model, _ = engine.model(args.variant, args.checkpoint)  # missing weights fail before any face search
    with ConsoleProgress(args.variant) as progress:  # a bar on a terminal, plain lines in a log
        prepared = engine.prepare(args.source, args.driving, options, size=model.config.image_size,
                                  progress=progress)
        # the frames go to the file as they are made: pasted back into a large photo they are tens of MB each
        with VideoWriter(out, prepared.fps, options.slowdown) as writer:
            result = engine.collect(prepared, args.variant, options, checkpoint=args.checkpoint, progress=progress,
                                    started=started, sink=writer.write)
    print(f"{out}: {counted(result.num_frames, 'frame')} at {result.fps:g} fps "
          f"(played at {result.fps / options.slowdown:g}), "
          + (f"{magnified(options.magnify)} (magnified), " if options.magnify != 1 else "")
          + f"{_time_taken(result.timings)}, weights: {result.weights}, "
          f"landmarks: {result.landmark_backend or 'not needed'}"
          + (_still_driving_note(args.driving) if result.num_frames == 1 and options.motion == "relative"
             else _playback_hint(result, options.slowdown)))
    return 0


def _still_driving_note(driving: str) -> str:
    """Where the driving 'clip' was a single frame (a photo given for the clip): relative motion is measured from
    its first frame, so there was none to carry."""
    return (f"; note: the driving clip {driving} is a single frame (a still image?), and motion is measured from "
            "its first frame, so the face is unchanged: pass a video or GIF of the micro-expression")


def _time_taken(timings: dict[str, float]) -> str:
    """The run's time and time a frame, and how much of it went to reading the clip where that is a good part (a
    large raw clip: 2 s of 5 for 100 frames of 2048 x 1088)."""
    read = timings.get("read_s", 0.0)
    reading = f", {read:.1f} s of it reading the clip" if read > 0.2 * timings["total_s"] else ""
    return f"{timings['total_s']:.1f} s ({timings['ms_per_frame']:.0f} ms/frame{reading})"


def _playback_hint(result, slowdown: float) -> str:
    """A hint where the video was written at real time and plays for less than PLAYBACK_S (a micro-expression at
    100-200 fps is over before a viewer sees it): the slow-down the app would start it with."""
    from .video import suggested_slowdown

    seconds = result.num_frames / result.fps
    suggested = suggested_slowdown(seconds)
    if slowdown != 1 or suggested == 1:
        return ""
    return f"; at real time it plays for {seconds:.2f} s: --slowdown {suggested} plays it for {seconds * suggested:.1f} s"


def _split_variants(text: str) -> list[str]:
    from .variants import get_variant

    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants:
        raise InputError("--variants is empty; give comma-separated variant ids (see `python -m mefacial variants`)")
    for variant in variants:
        get_variant(variant)  # an unknown id fails here, listing the known ones
    return variants


def _checkpoint_overrides(items: list[str] | None) -> dict[str, str]:
    """--checkpoint VARIANT=PATH (repeatable) -> {variant: path}."""
    from .variants import get_variant

    overrides = {}
    for item in items or []:
        variant, sep, path = item.partition("=")
        if not sep or not variant or not path:
            raise InputError(f"--checkpoint expects VARIANT=PATH (e.g. fomm-awp=weights/fomm-awp.pth.tar), got {item!r}")
        overrides[get_variant(variant.strip()).id] = os.path.abspath(os.path.expanduser(path.strip()))  # as in manifests
    return overrides


def _cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import generate as gen

    if not args.out and not args.write_pairs:
        raise InputError("give the output folder: --out DIR")
    if args.merge:
        path = gen.merge_manifest(args.out)
        print(f"{path}: {gen.manifest_totals(path)}")
        return 0
    if args.aus:
        return _generate_aus(args)
    if not args.pairs and not args.megc:
        raise InputError("give the pairs: --pairs CSV or --megc FACES_DIR CLIPS_DIR, or action units: --aus CSV "
                         "(or --merge to merge manifests)")
    pairs = gen.read_pairs(args.pairs) if args.pairs else gen.megc_pairs(*args.megc)
    if args.write_pairs:
        print(f"{gen.write_pairs(pairs, args.write_pairs)}: {len(pairs)} pairs")
        return 0
    variants = _split_variants(args.variants)
    settings = gen.Settings.from_args(args, format=args.format, precision=args.precision)
    checkpoints = _checkpoint_overrides(args.checkpoint)
    ranks = gen.Ranks.from_env()
    total = len(ranks.shard(range(len(pairs) * len(variants))))
    bar = tqdm(total=total, desc=f"rank {ranks.rank}/{ranks.world}", unit="video", position=ranks.local_rank,
               disable=None)

    with bar:
        summary = gen.run(pairs, variants, args.out, lambda device: _engine(args, settings, checkpoints, device),
                          settings, device=args.device, on_item=lambda record: bar.update(1))
    print(f"rank {ranks.rank}/{ranks.world}: {summary.describe()}")
    if summary.manifest is not None:
        print(f"{summary.manifest}: {gen.manifest_totals(summary.manifest)}")
    return _generation_status(summary)


def _generation_status(summary) -> int:
    """The exit status of a generation run: 1 where every item failed (nothing made or done before; a script must
    notice), else 0 (failed items are in the manifest, and a rerun retries them)."""
    if summary.failed and not (summary.ok or summary.skipped):
        print(f"error: nothing was generated, all {summary.failed} failed: their errors are in the manifest's "
              "\"status\": \"error\" lines", file=sys.stderr)
        return 1
    return 0


def _generate_aus(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import generate as gen
    from .engine import Engine

    rows = gen.read_au_rows(args.aus, _timing(args))
    ranks = gen.Ranks.from_env()
    bar = tqdm(total=len(ranks.shard(rows)), desc=f"rank {ranks.rank}/{ranks.world}", unit="video",
               position=ranks.local_rank, disable=None)

    def make_engine(device: str) -> Engine:
        return Engine(device=device, precision=args.precision, batch_size=args.batch_size, landmarks=args.landmarks)

    with bar:
        summary = gen.run_aus(rows, args.out, make_engine, _synthesis_options(args), args.format, args.slowdown,
                              device=args.device, on_item=lambda record: bar.update(1))
    print(f"rank {ranks.rank}/{ranks.world}: {summary.describe()}")
    if summary.manifest is not None:
        print(f"{summary.manifest}: {gen.manifest_totals(summary.manifest)}; labels: "
              f"{os.path.join(args.out, gen.AU_LABELS)}")
    return _generation_status(summary)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate as ev
    from .generate import find_clips, find_faces

    settings = ev.EvalSettings.from_args(args, max_frames=args.max_frames, min_motion=args.min_motion)
    engine = _engine(args, settings, _checkpoint_overrides(args.checkpoint))
    variants = _split_variants(args.variants)
    faces = find_faces(args.faces) if args.faces else []
    report = ev.evaluate(engine, find_clips(args.clips), variants, faces, settings,
                         learned=() if args.no_learned else ("lpips", "fid"), readout_dir=args.readout)
    paths = ev.write_report(report, args.out)
    print(ev.markdown(report))
    print(f"written: {paths[0]}, {paths[1]}")
    scored = any(entry["self_reenactment"]["clips"] or entry.get("motion_transfer", {}).get("pairs")
                 for entry in report["variants"].values())
    if not scored:  # (a script must notice: every variant failed on every clip)
        errors = [f"{v}: {next(iter(e['errors'].values()))}" for v, e in report["variants"].items() if e["errors"]]
        print(f"error: nothing was scored: {'; '.join(errors) or 'no clip could be read'}", file=sys.stderr)
        return 1
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from . import evaluate as ev
    from .grid import render_grid
    from .video import check_output, write_video

    options = AnimateOptions.from_args(args)
    check_output(args.out)
    if args.strip:
        check_output(args.strip, (".png", ".jpg", ".jpeg"))
    variants = _split_variants(args.variants)
    engine = _engine(args, options, _checkpoint_overrides(args.checkpoint))
    comparison = ev.compare_columns(engine, args.source, args.driving, variants, options)
    grid = render_grid(comparison.columns, tile=args.tile, heatmaps=args.heatmaps)
    out = write_video(args.out, grid, comparison.fps, slowdown=options.slowdown)
    for variant, outcome in comparison.outcomes.items():
        print(f"{variant}: " + (f"not run: {ev.first_line(outcome)}" if isinstance(outcome, Exception) else
                                f"{ev.compare_time(outcome)}, weights: {outcome.weights}"))
    if any(not isinstance(outcome, Exception) for outcome in comparison.outcomes.values()):
        print(f"({ev.COMPARE_TIMES})")
    print(f"{out}: {grid.shape[0]} frames, {grid.shape[2]}x{grid.shape[1]}, {len(comparison.columns)} columns")
    if args.strip:
        from PIL import Image

        driving = comparison.columns[0].frames
        indices = args.strip_frames if args.strip_frames else ev.strip_indices(driving, args.strip_count)
        Image.fromarray(ev.frame_strip(grid, indices, tile=args.tile)).save(args.strip)
        print(f"{args.strip}: frames {indices}")
    return 0


def _add_timing_options(parser: argparse.ArgumentParser, required_fps: bool = False) -> None:
    from .au import Timing

    d = Timing()
    parser.add_argument("--onset-ms", type=float, default=d.onset_ms, help=f"onset duration (default {d.onset_ms:g})")
    parser.add_argument("--apex-ms", type=float, default=d.apex_ms, help=f"apex duration (default {d.apex_ms:g})")
    parser.add_argument("--offset-ms", type=float, default=d.offset_ms, help=f"offset duration (default {d.offset_ms:g})")
    parser.add_argument("--lead-in-ms", type=float, default=0.0, help="neutral frames before the event (ms)")
    parser.add_argument("--lead-out-ms", type=float, default=0.0, help="neutral frames after the event (ms)")


def _timing(args: argparse.Namespace):
    from .au import Timing

    return Timing(onset_ms=args.onset_ms, apex_ms=args.apex_ms, offset_ms=args.offset_ms, fps=args.au_fps,
                  lead_in_ms=args.lead_in_ms, lead_out_ms=args.lead_out_ms)


def _synthesis_options(args: argparse.Namespace):
    from .synthesis import SynthesisOptions

    given = {name: getattr(args, name, None) for name in ("crop", "margin", "paste_back", "magnify", "appearance",
                                                          "landmarks")}
    return SynthesisOptions(**{name: value for name, value in given.items() if value is not None})


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from . import au, readout
    from .engine import Engine
    from .errors import InputError
    from .video import VideoWriter, check_output

    if args.list:
        for row in au.table():
            print(f"AU{row['au']:<3} {row['name']:<22} {row['appearance']}")
        print("\npresets (--preset NAME):")
        for name, (spec, source) in au.PRESETS.items():
            print(f"  {name:<18} {spec:<22} {source}")
        return 0
    if not args.source or not args.out or not (args.au or args.preset):
        raise InputError("give --source FACE, --au SPEC (e.g. 4:C,7:B) or --preset NAME, and --out VIDEO "
                         "(--list shows the action units and presets)")
    if args.au and args.preset:
        raise InputError("give either --au or --preset, not both")
    spec = au.PRESETS[au.preset_name(args.preset)][0] if args.preset else args.au
    out = check_output(args.out)
    engine = Engine(device=args.device, precision=args.precision, batch_size=args.batch_size, landmarks=args.landmarks)
    options, timing = _synthesis_options(args), _timing(args)
    with VideoWriter(out, timing.fps, args.slowdown) as writer:  # batch by batch (pasted back: tens of MB a frame)
        result = engine.synthesize(args.source, spec, timing, options, sink=writer.write)
    units = result.action_units
    apex = ", ".join("AU{} {}-{}".format(a["au"], *a["apex_frames"]) for a in units["aus"])
    print(f"{out}: {units['spec']}, {result.num_frames} frames at {result.fps:g} fps "
          f"({1000 * (result.num_frames - 1) / result.fps:.0f} ms; played at {result.fps / args.slowdown:g} fps), "
          f"apex frames {apex}, {result.timings['ms_per_frame']:.0f} ms/frame"
          + (f", {magnified(options.magnify)} (magnified)" if options.magnify != 1 else "")
          + _playback_hint(result, args.slowdown))
    if args.readout:
        motion = readout.region_motion(result.meshes, result.fps)
        readout.plot(motion, args.readout, title=f"{units['spec']}: AU-region motion (% IOD)")
        print(f"{args.readout}: AU-region motion over time")
    return 0


def _cmd_readout(args: argparse.Namespace) -> int:
    from . import readout
    from .video import read_clip

    clip = read_clip(args.clip, fps=args.fps)
    motion = readout.clip_motion(clip.frames, clip.fps)
    readout.plot(motion, args.out, title=f"{os.path.basename(args.clip)}: AU-region motion (% IOD)")
    print(readout.table(motion))
    print(f"{args.out}: AU-region motion over time")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m mefacial", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)
    variants = sub.add_parser("variants", help="list the variants and what each needs")
    variants.add_argument("--json", action="store_true", help="print JSON instead of a table")
    variants.set_defaults(func=_cmd_variants)

    animate = sub.add_parser("animate", help="animate a face with a driving clip")
    animate.add_argument("--source", required=True, help="image of the target face")
    animate.add_argument("--driving", required=True, help="driving clip: video, GIF or folder of frames")
    animate.add_argument("--variant", default="dense", help="e.g. dense, warp, fomm-awp, mraa-awp (see `variants`)")
    animate.add_argument("--checkpoint", default=None, help="weights file (default: resolved from the registry)")
    animate.add_argument("--out", required=True, help="output .mp4 or .gif")
    AnimateOptions.add_arguments(animate)
    _add_engine_options(animate)
    animate.set_defaults(func=_cmd_animate)

    generate = sub.add_parser("generate", help="generate a dataset: pairs x variants -> videos + manifest "
                              "(shards over ranks under torchrun)")
    pairs = generate.add_mutually_exclusive_group(required=False)
    pairs.add_argument("--pairs", help="CSV with a header: source,driving[,label]; paths relative to the CSV")
    pairs.add_argument("--megc", nargs=2, metavar=("FACES_DIR", "CLIPS_DIR"),
                       help="every target face x every source clip (MEGC layout; labels from clip names)")
    pairs.add_argument("--aus", metavar="CSV", help="synthesise from action units: CSV with a header face,aus,label "
                       "(optional name, onset_ms, apex_ms, offset_ms, fps); writes au/<label>/*.mp4 + labels.csv")
    generate.add_argument("--au-fps", type=float, default=200.0, help="--aus: frame rate of the clips (default 200)")
    _add_timing_options(generate)
    generate.add_argument("--no-appearance", dest="appearance", action="store_false",
                          help="--aus: geometry only (no furrows, lash line or mouth opening)")
    generate.add_argument("--variants", default="dense", help="comma-separated variant ids (see `variants`)")
    generate.add_argument("--out", help="output folder: <variant>/<label>/<clip>-<face>.<format> + manifest.jsonl")
    generate.add_argument("--format", default="mp4", choices=["mp4", "gif"])
    generate.add_argument("--checkpoint", action="append", metavar="VARIANT=PATH",
                          help="weights of one variant (repeatable; default: resolved from the registry)")
    generate.add_argument("--merge", action="store_true", help="only merge the ranks' manifest parts and exit")
    generate.add_argument("--write-pairs", metavar="CSV", help="write the pairs as a CSV and exit (e.g. for --megc)")
    AnimateOptions.add_arguments(generate)
    _add_engine_options(generate)
    generate.set_defaults(func=_cmd_generate)

    evaluate = sub.add_parser("evaluate", help="score variants on real clips: self-reenactment and motion transfer")
    evaluate.add_argument("--clips", required=True, help="folder of clips (videos, GIFs, folders of frames; recursive), "
                          "or one clip")
    evaluate.add_argument("--variants", default="dense", help="comma-separated variant ids")
    evaluate.add_argument("--out", required=True, help="output folder for scores.json and scores.md")
    evaluate.add_argument("--faces", help="folder of other faces, or one face image: adds cross-identity "
                          "motion-transfer scores")
    evaluate.add_argument("--checkpoint", action="append", metavar="VARIANT=PATH", help="weights of one variant (repeatable)")
    evaluate.add_argument("--max-frames", type=_positive_int, default=None,
                          help="score only the first N frames of each clip")
    evaluate.add_argument("--min-motion", type=float, default=0.01,
                          help="frames scored: landmark motion above this fraction of the inter-ocular distance")
    evaluate.add_argument("--no-learned", action="store_true", help="skip LPIPS and FID even when available")
    evaluate.add_argument("--readout", metavar="DIR", help="also plot the AU-region motion over time of every real clip "
                          "and self-reenactment output: DIR/<clip>/<variant or 'real'>.png")
    AnimateOptions.add_arguments(evaluate, exclude=("paste_back", "slowdown"))  # scored at the model size
    _add_engine_options(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)

    compare = sub.add_parser("compare", help="side-by-side grid video (and image strip) of several variants")
    compare.add_argument("--source", required=True, help="image of the target face")
    compare.add_argument("--driving", required=True, help="driving clip: video, GIF or folder of frames")
    compare.add_argument("--variants", default="dense,dense-geometry,warp", help="comma-separated variant ids, in column order")
    compare.add_argument("--out", required=True, help="grid video, .mp4 or .gif")
    compare.add_argument("--checkpoint", action="append", metavar="VARIANT=PATH", help="weights of one variant (repeatable)")
    compare.add_argument("--heatmaps", action="store_true", help="add a row of motion heatmaps |frame_t - frame_0|")
    compare.add_argument("--tile", type=_tile, default=256, help="tile side in pixels (a multiple of 16)")
    compare.add_argument("--strip", metavar="PNG", help="also save an image strip of selected frames (for papers)")
    compare.add_argument("--strip-frames", metavar="I,J,...", type=_frame_list,
                         help="frame indices of the strip (default: onset to apex)")
    compare.add_argument("--strip-count", type=_positive_int, default=5, help="frames in the strip when not chosen")
    AnimateOptions.add_arguments(compare, exclude=("paste_back",))
    _add_engine_options(compare)
    compare.set_defaults(func=_cmd_compare)

    synth = sub.add_parser("synthesize", help="a micro-expression from FACS action units, no driving clip")
    synth.add_argument("--source", help="image of the face")
    synth.add_argument("--au", help="action units with FACS intensities A-E, e.g. 4:C,7:B (R12:A: right side only)")
    synth.add_argument("--preset", help="an emotion preset of the literature instead of --au (see --list)")
    synth.add_argument("--fps", dest="au_fps", type=float, default=200.0, help="frame rate of the clip (default 200)")
    _add_timing_options(synth)
    synth.add_argument("--out", help="output .mp4 or .gif")
    synth.add_argument("--readout", metavar="PNG", help="also plot the AU-region motion over time")
    synth.add_argument("--magnify", type=float, default=1.0, help="multiply every AU's motion (1 = as specified)")
    synth.add_argument("--no-appearance", dest="appearance", action="store_false",
                       help="geometry only: no furrows, lash line or mouth opening")
    synth.add_argument("--no-crop", dest="crop", action="store_false", help="use the picture as it is, resized")
    synth.add_argument("--margin", type=float, default=0.0, help="extra face-box margin (fraction of the face)")
    synth.add_argument("--paste-back", action="store_true", help="paste the face back into the source picture")
    synth.add_argument("--slowdown", type=float, default=1.0, help="play the output this many times slower")
    synth.add_argument("--list", action="store_true", help="list the action units and presets, and exit")
    _add_engine_options(synth)
    synth.add_argument("--landmarks", default="auto", choices=["auto", "dlib", "fan"], help="landmark backend")
    synth.add_argument("--batch-size", type=_positive_int, default=None, help="frames per network batch")
    synth.set_defaults(func=_cmd_synthesize)

    read = sub.add_parser("readout", help="plot the AU-region motion of any clip over time (PNG)")
    read.add_argument("--clip", required=True, help="video, GIF or folder of frames (a generated or a real clip)")
    read.add_argument("--out", required=True, help="output PNG")
    read.add_argument("--fps", type=float, default=None, help="frame rate, if the file lacks it")
    read.set_defaults(func=_cmd_readout)

    from . import bench, checkpoints

    checkpoints.register_cli(sub)
    bench.add_parser(sub)  # python -m mefacial bench: fast path against the per-frame loop
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a one-line usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():  # a log, not a terminal: no Hub download bars (our own progress writes plain lines)
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        return int(args.func(args) or 0)
    except MefacialError as exc:
        print(f"error: {one_line(exc.cli_message)}", file=sys.stderr)  # one line: cause and remedy
        logging.getLogger("mefacial").debug("traceback", exc_info=True)
        return 2
    except BrokenPipeError:  # the output went to a pager or `head` that stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file the user named cannot be read or written
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def cli() -> None:
    """Entry point of the `mefacial` console script (pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()

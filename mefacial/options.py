"""`AnimateOptions`: the one definition of how a clip is animated.

Frozen and validated on construction (an error names the option and the remedy). The engine takes it
(`Engine.prepare` / `run` / `animate`), the CLI's flags are generated from its fields (`add_arguments`,
`from_args`), the app passes its controls to it by name, and `generate` / `evaluate` record it in their
manifests and reports (`record()`).

    opts = AnimateOptions(magnify=2, slowdown=4)
    engine.animate("face.png", "clip.mp4", variant="warp", options=opts)
    engine.animate("face.png", "clip.mp4", variant="warp", magnify=2)      # the same, by keyword
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Mapping

from .errors import InputError

MAX_MAGNIFY = 10.0
MAX_MARGIN = 2.0
MAX_SLOWDOWN = 1000.0
LANDMARK_BACKENDS = ("auto", "dlib", "fan")  # mefacial.landmarks.BACKENDS (kept import-light here)


def _option(default: Any, help: str, *, flag: str | None = None, cli: bool = True) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


@dataclasses.dataclass(frozen=True)
class AnimateOptions:
    """How a clip is animated: motion transfer, preprocessing, batching and playback."""

    motion: str = _option("relative", "motion transfer: relative (all), absolute (FOMM), standard or avd (MRAA)")
    adapt_scale: bool | None = _option(
        None, "movement-scale adaptation (default: as each backbone's original code, off for FOMM, on for MRAA)")
    magnify: float = _option(1.0, f"multiply the relative motion (1 = faithful, at most {MAX_MAGNIFY:g})")
    crop: bool = _option(True, "crop both inputs to the face (the clip's box from its first frame)")
    paste_back: bool = _option(False, "paste the generated face back into the source picture (needs crop)")
    margin: float = _option(0.0, f"extra face-box margin, a fraction of the face (0 to {MAX_MARGIN:g})")
    landmarks: str | None = _option(None, "landmark backend: auto, dlib or fan (default: the engine's)")
    smooth: bool = _option(True, "smooth landmark tracks over time (Savitzky-Golay, window set by the fps)")
    confine: bool = _option(False, "warp: fade the motion out with the face's EWP map (the background holds still)")
    batch_size: int | None = _option(None, "driving frames per network batch (default: the engine's)")
    fps: float | None = _option(None, "frame rate of the driving clip, if its file lacks one")
    slowdown: float = _option(1.0, "play the written video this many times slower (1 = real time)")

    def __post_init__(self) -> None:
        from .models import backbones

        modes = list(dict.fromkeys(m for spec in backbones().values() for m in spec.motion_modes))
        _check(self.motion in modes, "motion", self.motion, f"choose one of {modes}")
        _check(self.adapt_scale in (None, True, False), "adapt_scale", self.adapt_scale,
               "use True, False or None (the backbone's default)")
        for name in ("crop", "paste_back", "smooth", "confine"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "use True or False")
        _check(_number(self.magnify) and 0 < self.magnify <= MAX_MAGNIFY, "magnify", self.magnify,
               f"use a number in (0, {MAX_MAGNIFY:g}]: 1 = faithful motion, 2-5 to inspect a subtle expression")
        _check(_number(self.margin) and 0 <= self.margin <= MAX_MARGIN, "margin", self.margin,
               f"use a fraction of the face size between 0 and {MAX_MARGIN:g} (0 frames the face as the paper)")
        _check(self.landmarks is None or self.landmarks in LANDMARK_BACKENDS, "landmarks", self.landmarks,
               f"choose one of {list(LANDMARK_BACKENDS)}")
        _check(self.batch_size is None or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                           and self.batch_size >= 1), "batch_size", self.batch_size,
               "use a whole number of frames >= 1 (smaller batches need less memory)")
        _check(self.fps is None or (_number(self.fps) and self.fps > 0), "fps", self.fps,
               "use a positive frame rate, e.g. 200 for a 200 fps clip")
        _check(_number(self.slowdown) and 0 < self.slowdown <= MAX_SLOWDOWN, "slowdown", self.slowdown,
               f"use a positive factor up to {MAX_SLOWDOWN:g} (1 = real time, 4 plays four times slower)")
        if self.magnify != 1 and self.motion != "relative":
            raise InputError(f"option 'magnify' = {self.magnify!r} multiplies relative motion; use motion='relative' "
                             "or magnify=1")
        if self.paste_back and not self.crop:
            raise InputError("option 'paste_back' needs crop=True (the face is pasted back into the box it was cut "
                             "from); turn cropping on or paste_back off")

    # ---- derived ----------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "AnimateOptions":
        """A copy with some options changed (validated); unknown names are an InputError listing the known ones."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise InputError(f"unknown animation option(s) {unknown}; known: {self.names()}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def for_variant(self, variant: Any) -> "AnimateOptions":
        """These options checked against a variant (its motion modes), with adapt_scale resolved to its default."""
        from .variants import get_variant

        variant = get_variant(variant)
        if self.motion not in variant.motion_modes:
            raise InputError(f"motion mode {self.motion!r} is not available for {variant.id}; choose one of "
                             f"{variant.motion_modes}")
        if self.adapt_scale is None:
            return dataclasses.replace(self, adapt_scale=variant.adapt_scale_default)
        return self

    def record(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (manifests, reports)."""
        return dataclasses.asdict(self)

    # ---- command line -----------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        """One flag per option (`--magnify`, `--no-crop`, `--adapt-scale/--no-adapt-scale`, ...), defaults None so
        that `from_args` keeps the dataclass defaults for flags not given."""
        for f in dataclasses.fields(cls):
            if f.name in exclude or not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            help = f.metadata["help"]
            if f.type in ("bool", bool) and f.default is True:
                parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_const",
                                    const=False, default=None, help=f"do not {help}")
            elif f.type in ("bool", bool):
                parser.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help)
            elif f.type == "bool | None":
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
            else:
                kind = {"float": float, "float | None": float, "int | None": int}.get(str(f.type), str)
                choices = list(LANDMARK_BACKENDS) if f.name == "landmarks" else None
                parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices, metavar=None,
                                    help=f"{help} (default: {f.default})" if f.default is not None else help)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed: Any) -> "AnimateOptions":
        """The options of parsed flags (those not given keep their defaults), plus `fixed` ones."""
        given = {name: getattr(args, name) for name in cls.names() if getattr(args, name, None) is not None}
        return cls(**{**given, **fixed})


def magnified(magnify: float) -> str:
    """How a result's motion relates to the driving's, for its labels and summaries: '' when faithful (1), else
    'motion x2' (a magnified clip must not pass for the driving's own motion)."""
    return "" if magnify == 1 else f"motion x{magnify:g}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: Any, remedy: str) -> None:
    if not ok:
        raise InputError(f"option {name!r} = {value!r} is not valid: {remedy}")


def as_options(options: AnimateOptions | Mapping[str, Any] | None = None, **changes: Any) -> AnimateOptions:
    """`options` (an AnimateOptions or a dict of its fields; default AnimateOptions()) with keyword changes,
    validated."""
    if isinstance(options, Mapping):
        options, changes = None, {**options, **changes}
    elif options is not None and not isinstance(options, AnimateOptions):
        raise InputError(f"options must be an AnimateOptions or a dict of its fields, got {type(options).__name__}")
    return (options or AnimateOptions()).replace(**changes)

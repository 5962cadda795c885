"""mefacial demo: animate a face with a micro-expression clip, inspect the facial prior, compare every variant.

    python app.py                      # http://127.0.0.1:7860
    python app.py --checkpoint fomm-awp=weights/fomm-awp.pth.tar --device cuda

The UI only calls the engine (`mefacial.Engine`) and renders its results; any
`MefacialError` becomes a `gr.Error` with the error's page wording (a short title and at most
three plain sentences: `MefacialError.page_message`), logged as one line.
Handlers share no mutable state: each request writes into its own temporary folder.
Every action has an `api_name`, so `gradio_client` can call it (see the README).
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()  # before the slow imports: the start-up time logged when the page serves
if __name__ == "__main__" and not sys.stderr.isatty():  # a log, not a terminal: no progress bars (read at import)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import atexit
import ctypes
import ctypes.util
import faulthandler
import functools
import inspect
import logging
import shutil
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

import mefacial
from mefacial import checkpoints as weights_registry
from mefacial import hardware
from mefacial.console import CliParser, counted, monotone
from mefacial.errors import ONSET_FIX, ONSET_PAGE, MefacialError, NoFaceError, UnreadableVideoError, sentence
from mefacial.evaluate import COMPARE_TIMES, compare_columns, compare_time, first_line
from mefacial.grid import Column, prior_panels, render_grid
from mefacial.landmarks import get_detector
from mefacial.models import backbones
from mefacial.options import AnimateOptions, magnified
from mefacial.variants import find_variant, get_variant, variant_ids
from mefacial.video import Limits as VideoLimits
from mefacial.video import suggested_slowdown as video_slowdown
from mefacial.video import PLAYBACK_S, VideoWriter, fit_frames, read_clip, read_image, write_video

log = logging.getLogger("mefacial.app")

REPO = Path(__file__).resolve().parent
EXAMPLES = REPO / "examples"
EXAMPLE_FACE = EXAMPLES / "astronaut.png"
EXAMPLE_CLIP = EXAMPLES / "brow_raise.mp4"
PREVIEW_SIDE = 512  # px: the uploaded clip's playable copy is at most this long a side (the page shows it smaller)
# px: a picture the results are pasted back into is fitted to this long a side first (a 12-megapixel photo's
# frames are 36 MB each: 300 of them held 11 GB, and browsers play H.264 only up to about 4096 x 2304)
PASTE_SIDE = 1280
CLIP_TYPES = [".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".m4v"]

# Labels and capabilities come from the backbone specs and the variant registry (mefacial.models, mefacial.variants).
BACKBONES = {name: spec.label for name, spec in backbones().items()}
PRIORS = {v.prior_option: v.prior_label for v in map(get_variant, variant_ids())}
MOTIONS = {mode: label for spec in backbones().values() for mode, label in spec.motion_modes.items()}
LANDMARKS = {"dlib": "dlib (fast, CPU)", "fan": "FAN (face-alignment)", "auto": "auto"}
SLOWDOWN_LABEL = f"Playback: slow down by (1 = real time; set per clip to play about {PLAYBACK_S:g} s)"
LANDMARKS_LABEL = "Landmark backend (68 points: the warp, FOMM, MRAA; the dense mesh tracks its own)"


def data_dir() -> Path:
    """Real micro-expression clips: $MEFACIAL_DATA, default ../shared/data/microexpression next to the repo."""
    return Path(os.environ.get("MEFACIAL_DATA") or REPO / "../shared/data/microexpression").resolve()


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; uploads larger than max_upload_mb are refused by the server."""

    max_upload_mb: int = 50
    max_frames: int = 300
    max_seconds: float = 60.0
    queue_size: int = 16
    output_max_age_s: int = 3600

    @property
    def files(self) -> VideoLimits:
        """The same limits for mefacial.video's readers (checked from file headers before decoding)."""
        return VideoLimits(max_frames=self.max_frames, max_seconds=self.max_seconds,
                           max_bytes=self.max_upload_mb * 2**20)


# ---- variants -----------------------------------------------------------------------------------


def variant_id(backbone: str, prior: str) -> str:
    """The id of the variant with this backbone and prior choice, or a gr.Error listing the valid choices."""
    try:
        return find_variant(backbone, prior).id
    except MefacialError as exc:
        raise titled_error("Invalid option", exc.page_message) from None


def weights_rows() -> dict[str, dict]:
    """Variant id -> its `checkpoints list` row (local files and the registry only: no network)."""
    return {row["variant"]: row for row in weights_registry.list_checkpoints()}


def readiness(engine: mefacial.Engine, variants: list[dict],
              rows: dict[str, dict] | None = None) -> dict[str, str | None]:
    """Variant id -> None when it can run on this server now without network (no weights needed, given with
    --checkpoint, on disk or in the local Hub cache), else the one reason why not, in words for the page."""
    rows = weights_rows() if rows is None else rows
    status: dict[str, str | None] = {}
    for v in variants:
        row = rows.get(v["id"], {})
        if not v["needs_weights"] or v["id"] in engine.checkpoint_overrides or row.get("present"):
            status[v["id"]] = None
        elif row.get("hub") and not weights_registry.hub_offline():
            status[v["id"]] = "its weights are not on this server yet (the first run fetches them, if online)"
        elif row.get("hub"):
            status[v["id"]] = "its weights are not on this server, and downloads are off"
        else:
            status[v["id"]] = "no weights on this server and none to download (the operator can add them)"
    return status


def weights_where(engine: mefacial.Engine, variant: dict, row: dict, reason: str | None) -> str:
    """Where a ready variant's weights come from, or why it cannot run (markdown)."""
    if reason:
        return f"not ready: {reason}"
    if not variant["needs_weights"]:
        return "ready (no weights needed)"
    if variant["id"] in engine.checkpoint_overrides:
        return f"ready: `{Path(engine.checkpoint_overrides[variant['id']]).name}` (given by the operator)"
    return f"ready: `{Path(row['path']).name}` ({row['source']})"


def variants_markdown(engine: mefacial.Engine, variants: list[dict]) -> str:
    """A table of every variant, with where its weights come from or why it cannot run."""
    rows = weights_rows()
    ready = readiness(engine, variants, rows)
    lines = ["| variant | id | motion modes | weights |", "|---|---|---|---|"]
    for v in variants:
        where = weights_where(engine, v, rows.get(v["id"], {}), ready[v["id"]])
        lines.append(f"| {v['label']} | `{v['id']}` | {', '.join(v['motion_modes'])} | {where} |")
    return "\n".join(lines) + "\n\nHow to add weights: the README's \"Weights\" section (for whoever runs this server)."


# ---- requests and errors ------------------------------------------------------------------------


def page_error(title: str, *sentences: str) -> gr.Error:
    """A gr.Error as the page shows it: a short title and at most three plain sentences (no traceback printed:
    `user_errors` logs one line)."""
    return titled_error(title, " ".join(sentence(s) for s in sentences[:3]))


def titled_error(title: str, text: str) -> gr.Error:
    """The toast: the short title in bold on its own line (Gradio's toast header only says "Error"), then the
    sentences; `title` also travels to API clients (`AppError.title`)."""
    return gr.Error(f"<strong>{title}</strong><br>{text}", title=title, print_exception=False)


def inputs_by_name(handler: Callable, **components: Any) -> list:
    """The components of a handler's parameters, in the order Gradio passes them, matched by name: every
    parameter but `progress` needs one, and every component must name a parameter."""
    import inspect

    names = [n for n in inspect.signature(handler).parameters if n != "progress"]
    missing, unknown = sorted(set(names) - set(components)), sorted(set(components) - set(names))
    if missing or unknown:
        raise TypeError(f"{handler.__name__}: controls missing for {missing}, controls for unknown parameters {unknown}")
    return [components[n] for n in names]


def upload_path(payload: Any, what: str) -> str:
    """The server-side path of an uploaded file (a FileData dict from an unprocessed input), or a gr.Error."""
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not path:
        raise page_error("Missing input", f"No {what} was given", "Upload one, use the webcam or pick an example")
    return str(path)


def number(value: Any, what: str, low: float, high: float) -> float:
    """A float option within [low, high], or a gr.Error naming the allowed range."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise page_error("Invalid option", f"The {what} must be a number between {low:g} and {high:g}, "
                                           f"not {value!r}") from None
    if not low <= result <= high:
        raise page_error("Invalid option", f"The {what} must be between {low:g} and {high:g}, not {result:g}")
    return result


# Movement-scale adaptation: by default as each backbone's original code does (FOMM off, MRAA on), so that an
# API call that leaves it out gets the backbone's behaviour rather than the form's initial value.
ADAPT_SCALE = {"default": None, "on": True, "off": False}


def choice(value: Any, options: dict | list, what: str) -> str:
    if value not in options:
        raise page_error("Invalid option", f"The {what} must be one of {', '.join(map(str, options))}, not {value!r}")
    return value


def user_message(message: str, uploads: list[Any]) -> str:
    """`message` with server-side upload paths replaced by the names the user uploaded."""
    for payload in uploads:
        if isinstance(payload, dict) and payload.get("path") and payload.get("orig_name"):
            message = message.replace(str(payload["path"]), str(payload["orig_name"]))
    return message


def handled(exc: MefacialError, uploads: list[Any], where: str) -> gr.Error:
    """The gr.Error the page shows for an engine error (its page wording, upload names instead of server paths),
    logged as one line (the traceback only at debug level)."""
    log.info("%s: %s: %s", where, exc.title, user_message(first_line(exc), uploads))
    log.debug("%s: traceback", where, exc_info=exc)
    return titled_error(exc.title, user_message(exc.page_message, uploads))


def _freed_memory_returner() -> Callable[[], Any]:
    """glibc's `malloc_trim(0)`: hands the heap pages a request freed back to the system. Without it the frames
    and tensors of each request leave freed holes that glibc keeps, and a long-serving app's resident memory
    climbs (measured: +240 MiB over 200 requests, flat with it). A no-op where the C library is not glibc."""
    try:
        return functools.partial(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim, 0)
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (macOS, musl)
        return lambda: None


return_freed_memory = _freed_memory_returner()


def user_errors(fn: Callable) -> Callable:
    """Turn errors into page messages (a short title, what happened, what to do); the server keeps serving.
    After each request, the memory it freed goes back to the system."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        uploads = [*args, *kwargs.values()]
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            log.info("%s: %s: %s", fn.__name__, exc.title, str(exc.message).split("<br>")[-1])
            raise
        except MefacialError as exc:
            raise handled(exc, uploads, fn.__name__) from None
        except MemoryError:
            log.info("%s: out of memory", fn.__name__)
            raise page_error("Out of memory", "The server ran out of memory on this request",
                             "Try a shorter clip or a smaller face image") from None
        except RuntimeError as exc:  # torch reports CUDA out-of-memory as a RuntimeError subclass
            if "out of memory" in str(exc).lower():
                log.info("%s: GPU out of memory", fn.__name__)
                raise page_error("Out of memory", "The GPU ran out of memory on this request",
                                 "Try a shorter clip") from None
            log.exception("unexpected error in %s", fn.__name__)
            raise page_error("Unexpected error", f"Something went wrong on the server ({type(exc).__name__})",
                             "Try again, or report it with the inputs that caused it") from None
        except Exception as exc:  # noqa: BLE001 - a bug: logged in full, the visitor gets a plain message
            log.exception("unexpected error in %s", fn.__name__)
            raise page_error("Unexpected error", f"Something went wrong on the server ({type(exc).__name__})",
                             "Try again, or report it with the inputs that caused it") from None
        finally:
            return_freed_memory()

    return wrapper


def zero_gpu_handlers(demo: "Demo") -> None:
    """On a ZeroGPU Space, run the handlers that use the engine as `@spaces.GPU` tasks (`mefacial.hardware`),
    each asking for GPU time in proportion to its request's frames and variants; elsewhere nothing changes.

    Engine errors become gr.Error inside the GPU call, so that their message (not just their class) reaches
    the page."""
    if not hardware.on_zero_gpu():
        return

    def frames(driving: Any) -> int:
        try:
            return read_clip(upload_path(driving, "driving clip"), limits=demo.limits.files).num_frames
        except Exception:  # noqa: BLE001 - the handler reports the problem; ask for the longest clip allowed
            return demo.limits.max_frames

    durations = {
        "generate": lambda source, driving=None, *a, **k: hardware.gpu_seconds(frames(driving)),
        "compare": lambda source, driving=None, variants=None, *a, **k: hardware.gpu_seconds(
            frames(driving), len(variants or demo.variants)),
        "prior": lambda *a, **k: hardware.gpu_seconds(2, 2),
    }
    for name, duration in durations.items():
        setattr(demo, name, hardware.gpu_handler(user_errors(getattr(demo, name)), demo.engine, duration))


class Demo:
    """The handlers of the demo, bound to one engine; the only state is the read-only configuration."""

    def __init__(self, engine: mefacial.Engine, limits: Limits):
        self.engine = engine
        self.limits = limits
        self.variants = mefacial.list_variants()
        self.root = Path(tempfile.mkdtemp(prefix="mefacial-app-"))
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    # ---- per-request output folders ------------------------------------------------------------
    def request_dir(self) -> Path:
        """A new folder for one request's outputs; folders older than output_max_age_s are removed (the example
        clip's preview, beside them, stays)."""
        cutoff = time.time() - self.limits.output_max_age_s
        for old in self.root.glob("req-*"):
            try:
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:  # another request removed it first
                pass
        return Path(tempfile.mkdtemp(prefix="req-", dir=self.root))

    def progress_fn(self, progress: gr.Progress) -> Callable[[float, str], None]:
        """The engine's reports on the page's progress bar, never going backwards across stages."""
        return monotone(lambda fraction, message: progress(fraction, desc=message))

    def read_inputs(self, source: Any, driving: Any) -> tuple[Any, Any]:
        """The uploaded face (H x W x 3 uint8) and clip (frames and fps), read within the limits."""
        image = read_image(upload_path(source, "source face"), limits=self.limits.files)
        clip = read_clip(upload_path(driving, "driving clip"), limits=self.limits.files)
        return image, clip

    @staticmethod
    def paste_target(image: Any, paste_back: bool) -> tuple[Any, str]:
        """The source picture as the results are pasted back into it: fitted to PASTE_SIDE where it is larger
        (the face itself is drawn at the model's 256 px either way); and a note saying so, or ""."""
        height, width = image.shape[:2]
        if not paste_back or max(height, width) <= PASTE_SIDE:
            return image, ""
        image = fit_frames(image[None], PASTE_SIDE)[0]
        return image, (f"pasted back into the picture fitted to {image.shape[1]}x{image.shape[0]} "
                       f"(from {width}x{height})")

    @staticmethod
    def options(**controls: Any) -> AnimateOptions:
        """The AnimateOptions of the form's controls, matched by name; a bad value is an InputError naming it."""
        if "landmarks" in controls:
            controls["landmarks"] = choice(controls["landmarks"], LANDMARKS, "landmark backend")
        for name in ("crop", "paste_back", "smooth", "confine"):
            if name in controls:
                controls[name] = bool(controls[name])
        return AnimateOptions(**controls)  # an InputError becomes the page's error (user_errors)

    # ---- Generate -------------------------------------------------------------------------------
    def generate(self, source, driving, backbone="dense", prior="none", confine=False, motion="relative",
                 adapt_scale="default", magnify=1.0, crop=True, paste_back=False, landmarks="dlib", smooth=True,
                 slowdown=1.0, format="mp4", progress=gr.Progress()):
        """Animate the face with the clip; returns (result mp4, side-by-side mp4, download file, status)."""
        variant = variant_id(choice(backbone, BACKBONES, "backbone"), prior)
        format = choice(format, ["mp4", "gif"], "output format")
        options = self.options(
            motion=motion, adapt_scale=ADAPT_SCALE[choice(adapt_scale, ADAPT_SCALE, "movement-scale adaptation")],
            magnify=number(magnify, "magnification", 1, 5), crop=crop, paste_back=paste_back, landmarks=landmarks,
            smooth=smooth, confine=confine, slowdown=number(slowdown, "slow-down factor", 1, 20))
        image, clip = self.read_inputs(source, driving)
        image, pasted = self.paste_target(image, options.paste_back)
        result = self.engine.animate(image, clip.frames, variant=variant, options=options.replace(fps=clip.fps),
                                     progress=self.progress_fn(progress))
        out = self.request_dir()
        slowdown = options.slowdown
        label = ", ".join(filter(None, (get_variant(variant).label, magnified(options.magnify))))
        columns = [Column("source", result.model_source), Column("driving", result.model_driving),
                   Column(label, result.frames)]
        with ThreadPoolExecutor(1, thread_name_prefix="side-by-side") as pool:  # two encoders at once (ffmpeg)
            grid = pool.submit(lambda: write_video(out / "side_by_side.mp4", render_grid(columns), result.fps,
                                                   slowdown=slowdown))
            video = write_video(out / "result.mp4", result.frames, result.fps, slowdown=slowdown)
            download = video if format == "mp4" else write_video(out / "result.gif", result.frames, result.fps,
                                                                slowdown=slowdown)
            grid = grid.result()
        return str(video), str(grid), str(download), self.status_line(result, slowdown, options.magnify, pasted)

    def status_line(self, result, slowdown: float, magnify: float = 1.0, pasted: str = "") -> str:
        timings = result.timings
        speed = "real time" if slowdown == 1 else f"slowed down x{slowdown:g}"
        motion = f" · **{magnified(magnify)}** (magnified, not the driving's own)" if magnify != 1 else ""
        notes = [pasted] if pasted else []
        if result.num_frames == 1 and result.options is not None and result.options.motion == "relative":
            # (a still picture uploaded as the clip: relative motion is measured from its only frame)
            notes.append("the driving clip is a single frame, so there was no motion to carry: upload a clip")
        return (f"**{get_variant(result.variant).label}**{motion}: {counted(result.num_frames, 'frame')} in "
                f"{timings.get('total_s', 0):.2f} s "
                f"({timings.get('ms_per_frame', 0):.0f} ms/frame) on {self.engine.device} {self.engine.precision} · "
                f"landmarks: {result.landmark_backend or 'none'} · weights: {result.weights} · "
                f"{result.fps:g} fps, {speed}" + "".join(f" · {note}" for note in notes))

    # ---- Compare --------------------------------------------------------------------------------
    def compare(self, source, driving, variants=None, magnify=1.0, crop=True, paste_back=False, landmarks="dlib",
                smooth=True, heatmaps=False, slowdown=1.0, progress=gr.Progress()):
        """Every chosen variant (default: those ready on this server) on one face and clip -> (grid mp4, status
        table); a chosen variant that cannot run gets a column saying why."""
        known = [v["id"] for v in self.variants]
        if variants is None:
            ready = readiness(self.engine, self.variants)
            variants = [v for v in known if ready[v] is None]
        unknown = sorted(set(variants) - set(known))
        if unknown:
            raise page_error("Unknown variant", f"There is no variant {', '.join(map(repr, unknown))} (unknown)",
                             "Tick variants from the list")
        chosen = [v for v in known if v in variants]
        if not chosen:
            raise page_error("No variant chosen", "No variant is ticked", "Tick at least one variant")
        options = self.options(magnify=number(magnify, "magnification", 1, 5), crop=crop, paste_back=paste_back,
                               landmarks=landmarks, smooth=smooth, slowdown=number(slowdown, "slow-down factor", 1, 20))
        image, clip = self.read_inputs(source, driving)
        image, pasted = self.paste_target(image, options.paste_back)
        comparison = compare_columns(self.engine, image, clip.frames, chosen, options.replace(fps=clip.fps),
                                     progress=self.progress_fn(progress))
        for column, outcome in zip(comparison.columns[1:], comparison.outcomes.values()):  # driving first
            if isinstance(outcome, MefacialError):
                column.reason = short_reason(outcome)  # the page's words on the placeholder, as in the table
        lines = ["| variant | result |", "|---|---|"]
        for variant, outcome in comparison.outcomes.items():
            label = get_variant(variant).label
            if isinstance(outcome, MefacialError):
                lines.append(f"| {label} | not run: {short_reason(outcome)} |")
            else:
                lines.append(f"| {label} | {compare_time(outcome)}, landmarks "
                             f"{outcome.landmark_backend or 'none'}, weights {Path(str(outcome.weights)).name} |")
        if any(not isinstance(outcome, MefacialError) for outcome in comparison.outcomes.values()):
            lines += ["", COMPARE_TIMES[0].upper() + COMPARE_TIMES[1:] + "."]
        if pasted:
            lines += ["", pasted[0].upper() + pasted[1:] + "."]
        out = self.request_dir()
        grid = write_video(out / "compare.mp4", render_grid(comparison.columns, heatmaps=bool(heatmaps)),
                           comparison.fps, slowdown=options.slowdown)
        return str(grid), "\n".join(lines)

    # ---- Prior ----------------------------------------------------------------------------------
    def prior(self, source, driving=None, frame=0, landmarks="dlib", crop=True):
        """Landmarks, AU points and prior maps over the face (and a driving frame) -> (gallery, status).

        Everything drawn is what the models compute (`Engine.prior_view`): the EWP map the warp confines motion
        with, and the AWP map of an AWP model's learned fusion when one has weights on this machine.
        """
        options = self.options(crop=crop, landmarks=landmarks, smooth=False)
        image = read_image(upload_path(source, "face"), limits=self.limits.files)
        index, clip = 0, None
        if driving is not None:
            clip = read_clip(upload_path(driving, "driving clip"), limits=self.limits.files)
            index = min(int(number(frame, "driving frame", 0, self.limits.max_frames - 1)), clip.num_frames - 1)
        awp_variant, awp_reason = self.awp_model()
        variants = ["warp"] + ([awp_variant] if awp_variant else [])
        views = self.engine.prior_view(image, variants, driving=None if clip is None else clip.frames, frame=index,
                                       options=options)
        gallery = []
        for view, title in zip(views, ["source", f"driving frame {index}"]):
            maps = [("EWP map (equal-weighted)", view.maps["warp"]["prior"])]  # the map the warp confines with
            missing = []
            if awp_variant in view.maps:
                maps.append(("AWP map (adaptive weighted)", view.maps[awp_variant]["prior"]))  # its learned fusion
            else:
                reason = awp_reason or short_reason(view.unavailable.get(awp_variant, "unavailable"))
                missing.append(("AWP map", reason))
            gallery += prior_panels(view.face, view.landmarks, view.au_points, maps, missing, title=title)
        status = (f"landmarks: {views[0].landmark_backend or 'none'} · AWP map: "
                  + (f"{mefacial.get_variant(awp_variant).label} ({self.engine.model(awp_variant)[1]})"
                     if awp_variant in views[0].maps else awp_reason or "not available"))
        return gallery, status

    def awp_model(self) -> tuple[str | None, str | None]:
        """An AWP variant whose weights are on this machine (its learned fusion draws the AWP map), or why none."""
        status = readiness(self.engine, self.variants)
        awp = [v for v in self.variants if v["prior"] == "awp"]
        for v in awp:
            if status[v["id"]] is None:
                return v["id"], None
        return None, f"it needs the weights of {' or '.join(v['label'] for v in awp)} (its learned fusion), " \
                     "which are not on this server"

    # ---- checks when a file arrives (upload, webcam, paste), with Generate's limits and detector --------
    def find_face(self, frames, role: str, landmarks: str) -> None:
        """A NoFaceError unless the detector finds a face (frames: 1 x H x W x 3), as Generate would."""
        backend = choice(landmarks or "dlib", LANDMARKS, "landmark backend")
        get_detector(backend, self.engine.device).detect(frames, role=role)

    def check_source(self, source, landmarks="dlib"):
        """A face just uploaded, taken with the webcam or pasted: readable, within the limits, with a face (the
        picture shows it: no note, except which face moves in a picture of several); a problem is raised at once
        (a toast), not when Generate is pressed."""
        if source is None:
            return
        image = read_image(upload_path(source, "source face"), limits=self.limits.files)
        self.find_face(image[None], "source", landmarks)
        faces = self.engine.count_faces(image)
        if faces > 1:  # (a group photo: say which face moves)
            gr.Info(f"{faces} faces in this picture: the largest is animated. To animate another, crop the picture "
                    "to that face.")

    def check_driving(self, driving, landmarks="dlib"):
        """A clip just uploaded or recorded: readable, within the limits, a face in its first (onset) frame.
        Returns (the clip, its description)."""
        clip = read_clip(upload_path(driving, "driving clip"), limits=self.limits.files)
        try:
            self.find_face(clip.frames[:1], "driving", landmarks)
        except NoFaceError as exc:  # worded for the clip, not for a one-frame check
            raise NoFaceError(f"no face in the first (onset) frame of the driving clip: {exc}", frame_index=0,
                              page=ONSET_PAGE, fix=ONSET_FIX) from None
        return clip, clip_info(clip)

    def preview(self, driving, landmarks=None):
        """The uploaded clip checked (with `landmarks`, else the default landmark backend) and made playable (GIFs
        and other formats do not play in every browser) at the slow-down its results start with, so that the two
        play alike: (mp4, its size and length, that slow-down)."""
        if driving is None:
            return None, "", gr.skip()
        clip, _ = self.check_driving(driving, landmarks or default_landmarks(self.engine))
        return self.playable(clip, self.request_dir() / "driving.mp4")

    @staticmethod
    def playable(clip, path: Path) -> tuple[str, str, int]:
        """A clip's preview written to `path` (mp4, at most PREVIEW_SIDE a side, slowed down as its results start),
        the line under it and that slow-down."""
        frames, slowdown = clip.frames, suggested_slowdown(clip)
        if max(frames.shape[1:3]) > PREVIEW_SIDE:  # (a 2048 x 1088 clip's copy at its size took 6 s to encode)
            frames = fit_frames(frames, PREVIEW_SIDE)
        video = write_video(path, frames, clip.fps, slowdown=slowdown)
        note = f"; the preview plays x{slowdown} slower" if slowdown > 1 else ""
        return str(video), clip_info(clip) + note, slowdown

    def prior_clip(self, driving, frame=0, landmarks="dlib"):
        """The Prior tab's clip checked and made playable; the frame slider set to its length -> (slider update,
        the preview, its size and length)."""
        if driving is None:
            return gr.update(maximum=self.limits.max_frames - 1), None, ""
        clip, _ = self.check_driving(driving, landmarks)
        video, info, _ = self.playable(clip, self.request_dir() / "driving.mp4")
        last = clip.num_frames - 1
        return gr.update(maximum=max(last, 1), value=min(int(frame or 0), last), interactive=last > 0), video, info

    def use_recording(self, recording, landmarks="dlib"):
        """A clip recorded with the webcam becomes the driving clip, checked like an upload."""
        if recording is None:
            return gr.skip()
        try:
            self.check_driving(recording, landmarks)
        except UnreadableVideoError as exc:  # the browser stopped before it handed over any video (an empty file)
            raise UnreadableVideoError(f"the webcam recording is empty or cut short: {exc}",
                                       title="Empty recording", page="The recording came through empty",
                                       fix="Record again and let it run a few seconds before you stop it") from None
        return upload_path(recording, "recording")


def short_reason(error: MefacialError) -> str:
    """Why a variant did not run, in one plain sentence (its page wording's first)."""
    return error.page_message.split(". ")[0].rstrip(".") + "."


# ---- Action units tab (synthesis from FACS action units, no driving clip) ----------------------------------------

AU_FPS = [25, 30, 50, 60, 100, 120, 200]
AU_OFF = "-"
# One choice per AU: not used, an intensity A-E on both sides, or on the person's right / left side only.
AU_CHOICES = [AU_OFF, "A", "B", "C", "D", "E"] + [f"{side} {letter}" for side in "RL" for letter in "ABCDE"]


def au_spec_from_choices(*choices) -> str:
    """The per-AU choices (in `au.SUPPORTED` order: '-', 'C', 'R A' ...) -> '4:C,R12:A'."""
    from mefacial import au

    items = []
    for number, choice_ in zip(au.SUPPORTED, choices):
        if choice_ and choice_ != AU_OFF:
            side, _, letter = str(choice_).rpartition(" ")
            items.append(f"{side}{number}:{letter}")
    return ",".join(items)


def au_choices_from_spec(spec: str) -> list[str]:
    """'4:C,R12:A' -> one choice per library AU ('-' for the absent ones); a numeric intensity shows as the nearest
    letter."""
    from mefacial import au

    chosen = {}
    for item in au.parse_aus(spec):
        letter = item.letter or min(au.INTENSITY, key=lambda k: abs(au.INTENSITY[k] - item.intensity))
        chosen[item.au] = f"{item.side} {letter}" if item.side else letter
    return [chosen.get(n, AU_OFF) for n in au.SUPPORTED]


def au_preset_note(spec: str) -> str:
    """The note under the presets for a specification that is one of them ('**surprise** = 1:C,2:C,5:B: its
    source'), else ''."""
    from mefacial import au

    text = str(spec or "").replace(" ", "")
    return next((f"**{name}** = {preset}: {source}" for name, (preset, source) in au.PRESETS.items()
                 if preset == text), "")


def au_text_changed(spec: str) -> list:
    """What the page makes of a specification typed, pasted or written by the page (a preset, a choice): [the note
    under the presets, Synthesise, one choice per AU]. The choices follow a specification that parses (Synthesise
    reads them, not the text); one that does not leaves them as they were, says why in the note and turns
    Synthesise off until it parses, so a typo never synthesises the previous choices. What the choices cannot hold
    (a fraction, an AU's own timing or delay, one AU at two intensities per side) is named in the note as what
    Synthesise uses instead; a preset's text is named as that preset."""
    from mefacial import au

    unchanged = [gr.update() for _ in au.SUPPORTED]
    if not str(spec or "").strip():  # cleared: nothing chosen (Synthesise then asks for an AU)
        return ["", gr.update(interactive=True), *[AU_OFF for _ in au.SUPPORTED]]
    try:
        items = au.parse_aus(spec)
    except MefacialError as error:
        return [f"**Not a specification yet**: {error.page_message} Synthesise is off until it is.",
                gr.update(interactive=False), *unchanged]
    choices = au_choices_from_spec(spec)
    used = au_spec_from_choices(*choices)
    kept = {(item.au, item.side) for item in items}
    lost = (any(item.letter is None or item.timing is not None or item.delay_ms for item in items)
            or len(kept) != len({item.au for item in items}))
    note = (f"The page's choices take an intensity letter per AU (one side or both) and the timing below: "
            f"**{used}** is synthesised (the command line and the Python API take fractions and an AU's own "
            "timing)." if lost else au_preset_note(spec))
    return [note, gr.update(interactive=True), *choices]


def synthesis_endpoint(demo: "Demo") -> Callable:
    """The /synthesize handler: the face, one bounded choice per AU (au1 ... au43: '-', 'A'-'E', 'R A', 'L E' ...),
    the timing, magnification, appearance and playback speed (no free-text parameter) -> `synthesize_clip`."""
    import inspect

    from mefacial import au

    count = len(au.SUPPORTED)

    def handler(source, *values, progress=gr.Progress()):
        choices, rest = values[:count], values[count:]
        for number, value in zip(au.SUPPORTED, choices):
            choice(value or AU_OFF, AU_CHOICES, f"AU{number}")
        spec = au_spec_from_choices(*choices)
        return synthesize_clip(demo, source, spec, *rest, progress=progress)

    defaults = inspect.signature(synthesize_clip).parameters
    timing = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[name].default)
              for name in ("onset_ms", "apex_ms", "offset_ms", "fps", "lead_in_ms", "lead_out_ms", "magnify",
                           "appearance", "slowdown", "paste_back")]
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(f"au{n}", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=AU_OFF) for n in au.SUPPORTED]
        + timing + [inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())])
    return user_errors(handler)


def synthesize_clip(demo: "Demo", source, aus="6:C,12:C", onset_ms=100.0, apex_ms=60.0, offset_ms=140.0, fps=200,
                    lead_in_ms=0.0, lead_out_ms=0.0, magnify=1.0, appearance=True, slowdown=10.0, paste_back=False,
                    progress=gr.Progress()):
    """Synthesise the face performing the AU specification -> (mp4, readout png, download, status). With
    `paste_back`, the face is pasted back into the picture (fitted to PASTE_SIDE), the video written as it is made."""
    from mefacial import au, readout

    image = read_image(upload_path(source, "source face"), limits=demo.limits.files)
    if not str(aus or "").strip():
        raise page_error("No action unit chosen", "No action unit is chosen",
                         "Choose at least one (or a preset) and try again")
    timing = au.Timing(onset_ms=number(onset_ms, "onset (ms)", 1, 2000), apex_ms=number(apex_ms, "apex (ms)", 1, 2000),
                       offset_ms=number(offset_ms, "offset (ms)", 1, 2000), fps=number(fps, "frame rate", 1, 1000),
                       lead_in_ms=number(lead_in_ms, "lead-in (ms)", 0, 2000),
                       lead_out_ms=number(lead_out_ms, "lead-out (ms)", 0, 2000))
    slowdown = number(slowdown, "slow-down factor", 1, 20)
    magnify = number(magnify, "magnification", 0.5, 5)
    au.plan(str(aus), timing, max_frames=demo.limits.max_frames, max_seconds=demo.limits.max_seconds)  # the app's limits
    image, pasted = demo.paste_target(image, bool(paste_back))
    out = demo.request_dir()
    video = out / "synthesized.mp4"
    with VideoWriter(video, timing.fps, slowdown) as writer:
        result = demo.engine.synthesize(image, str(aus), timing, magnify=magnify, appearance=bool(appearance),
                                        paste_back=bool(paste_back), progress=demo.progress_fn(progress),
                                        sink=writer.write)
    units = result.action_units
    motion = readout.region_motion(result.meshes, result.fps)
    marks = {"apex": 1000 * min(a["apex_frames"][0] for a in units["aus"]) / result.fps,
             "end of apex": 1000 * max(a["apex_frames"][1] for a in units["aus"]) / result.fps}
    plot = out / "readout.png"
    readout.plot(motion, plot, title=f"{units['spec']}: AU-region motion of the face mesh (% IOD)", marks=marks)
    duration = 1000 * (result.num_frames - 1) / result.fps
    kind = "micro-expression" if duration <= au.MICRO_MAX_MS else "macro-expression: over 500 ms"
    status = (f"**{units['spec']}**: {result.num_frames} frames at {result.fps:g} fps = {duration:.0f} ms "
              f"({kind}), first frame neutral; apex frames "
              + ", ".join("AU{} {}-{}".format(a["au"], *a["apex_frames"]) for a in units["aus"])
              + f" · {result.timings.get('total_s', 0):.1f} s · "
              + ("real time" if slowdown == 1 else f"slowed down x{slowdown:g}")
              + (f" · **{magnified(magnify)}** (magnified)" if magnify != 1 else "")
              + (f" · {pasted}" if pasted else ""))
    return str(video), str(plot), str(video), status


def timing_preview(demo: "Demo", aus, onset_ms, apex_ms, offset_ms, fps, lead_in_ms, lead_out_ms):
    """The specification's timing before rendering (each AU's activation over time) -> png, or None while the
    specification or the timing is incomplete (typing)."""
    from mefacial import au, readout

    try:
        timing = au.Timing(onset_ms=float(onset_ms), apex_ms=float(apex_ms), offset_ms=float(offset_ms),
                           fps=float(fps), lead_in_ms=float(lead_in_ms), lead_out_ms=float(lead_out_ms))
        plan = au.plan(str(aus or ""), timing, max_frames=demo.limits.max_frames, max_seconds=demo.limits.max_seconds)
    except (MefacialError, TypeError, ValueError):
        return None
    path = demo.request_dir() / "timing.png"
    readout.plot_plan(plan, path)
    return str(path)


def readout_clip(demo: "Demo", clip, slowdown=1.0):
    """The AU-region motion over time of any clip (a result video of another tab, or an upload) -> png."""
    from mefacial import readout

    path = upload_path(clip, "clip")
    loaded = read_clip(path, limits=demo.limits.files)
    fps = loaded.fps * float(slowdown or 1)  # a slowed-down result video plays at fps / slowdown
    motion = readout.clip_motion(loaded.frames, fps)
    out = demo.request_dir() / "readout.png"
    readout.plot(motion, out, title="AU-region motion of the re-detected face mesh (% IOD)")
    return str(out)


def readout_panel(demo: "Demo", video: gr.components.Component, slowdown: gr.components.Component | None = None):
    """A button and a plot under a result video: the AU-region motion of what the video shows, over time."""
    with gr.Accordion("AU-region motion (readout)", open=False):
        button = gr.Button("Plot what moved, and when", size="sm")
        image = gr.Image(label="AU-region motion (% of the inter-ocular distance)", interactive=False, type="filepath")
    inputs = [video] + ([slowdown] if slowdown is not None else [])
    # UI only (api_name=False): the plot reads the result video the page already shows, no file parameter in the API
    button.click(user_errors(functools.partial(readout_clip, demo)), inputs, image, api_name=False,
                 concurrency_limit=1)
    return image


def action_units_tab(demo: "Demo", default_face: str | None, blocks: gr.Blocks) -> gr.Image:
    """The 'Action units' tab: pick AUs and FACS intensities (or a preset of the literature), the timing and the
    playback speed; the synthesised clip plays next to its AU-region readout. Returns its face input."""
    from mefacial import au

    with gr.Tab("Action units", id="action-units"):
        gr.Markdown("Synthesise a micro-expression from FACS action units, with no driving clip: choose the AUs and "
                    "their intensities (A trace, B slight, C marked, D severe, E maximum), the timing, and play it "
                    "slowed down. The first frame is the neutral face; the clip spans exactly onset + apex + offset "
                    "(plus any lead-in / lead-out). Micro-expressions last at most 500 ms (Yan et al. 2013).")
        with gr.Row():
            with gr.Column(scale=1):
                a_source = gr.Image(value=default_face, label="Face", type="filepath", image_mode=None, height=256,
                                    sources=["upload", "webcam", "clipboard"], elem_id="a-source")
                gr.Markdown("**Presets** (one click; source below)")
                with gr.Row():
                    preset_buttons = [gr.Button(name, size="sm") for name in au.PRESETS]
                a_preset_note = gr.Markdown(elem_id="a-preset-note")
                a_spec = gr.Textbox("", label="AU specification (AU:intensity, comma-separated; R/L prefix "
                                    "= one side)", elem_id="a-spec")
                default = au.Timing()  # the literature's defaults (mefacial.au.Timing)
                with gr.Row():
                    a_onset = gr.Slider(5, 500, value=default.onset_ms, step=5, label="Onset (ms)", elem_id="a-onset")
                    a_apex = gr.Slider(5, 500, value=default.apex_ms, step=5, label="Apex (ms)", elem_id="a-apex")
                    a_offset = gr.Slider(5, 500, value=default.offset_ms, step=5, label="Offset (ms)", elem_id="a-offset")
                with gr.Row():
                    a_fps = gr.Dropdown(AU_FPS, value=default.fps, label="Frame rate (fps)")
                    a_lead_in = gr.Slider(0, 500, value=0, step=10, label="Neutral lead-in (ms)")
                    a_lead_out = gr.Slider(0, 500, value=0, step=10, label="Neutral lead-out (ms)")
                with gr.Row():
                    a_magnify = gr.Slider(0.5, 5, value=1, step=0.5, label="Magnification (1 = as specified)")
                    a_slowdown = gr.Slider(1, 20, value=10, step=1, label="Playback: slow down by (1 = real time)")
                    a_appearance = gr.Checkbox(True, label="Appearance (furrows, lash line, mouth opening)")
                    a_paste = gr.Checkbox(False, label="Paste back into the full image", elem_id="a-paste")
                a_timing = gr.Image(label="Timing preview (each AU's activation over time)", show_label=False,
                                    interactive=False, type="filepath", elem_id="a-timing")  # (its title says it)
                a_button = gr.Button("Synthesise", variant="primary", elem_id="a-button")
            with gr.Column(scale=1):
                a_result = gr.Video(label="Result", interactive=False, autoplay=True, loop=True, height=320,
                                    elem_id="a-result")
                a_readout = gr.Image(label="AU-region motion over time (% of the inter-ocular distance)",
                                     interactive=False, type="filepath", elem_id="a-readout")
                a_download = gr.File(label="Download", interactive=False, height=70, elem_id="a-download")
                a_status = gr.Markdown(elem_id="a-status")
        with gr.Accordion("Action units and intensities (R / L: the person's right / left side only)", open=True):
            radios = []
            rows = list(au.AUS.values())
            for start in range(0, len(rows), 6):
                with gr.Row():
                    for unit in rows[start:start + 6]:  # '-' by default: an AU left out of an API call is not used
                        radios.append(gr.Dropdown(AU_CHOICES, value=AU_OFF, label=f"AU{unit.number} {unit.name}",
                                                  info=unit.muscles, min_width=150))
    def chosen(*choices) -> str:  # a choice made: the text follows it (and the rest follows the text, below)
        return au_spec_from_choices(*choices)

    for radio in radios:
        radio.input(chosen, radios, a_spec, api_name=False, queue=False)
    # The text is where the choices, the note and Synthesise's state come from, however it was written (typed,
    # pasted, by a preset or a choice): `change`, not `input`, whose Gradio event follows keys (a pasted
    # specification was left unread, and Synthesise ran the choices before it).
    a_spec.change(au_text_changed, a_spec, [a_preset_note, a_button, *radios], api_name=False, queue=False,
                  trigger_mode="always_last")
    for name, button in zip(au.PRESETS, preset_buttons):
        button.click(lambda name=name: au.PRESETS[name][0], None, a_spec, api_name=False, queue=False)
    blocks.load(lambda: au.PRESETS["positive"][0], None, a_spec, api_name=False,
                queue=False)  # the page opens with a preset chosen
    timing_inputs = [a_onset, a_apex, a_offset, a_fps, a_lead_in, a_lead_out]
    count = len(radios)
    gr.on([c.change for c in [*radios, *timing_inputs]],
          lambda *values: timing_preview(demo, au_spec_from_choices(*values[:count]), *values[count:]),
          [*radios, *timing_inputs], a_timing, api_name=False, trigger_mode="always_last")
    a_button.click(synthesis_endpoint(demo),
                   [a_source, *radios, a_onset, a_apex, a_offset, a_fps, a_lead_in, a_lead_out, a_magnify,
                    a_appearance, a_slowdown, a_paste],
                   [a_result, a_readout, a_download, a_status], api_name="synthesize", concurrency_limit=1,
                   preprocess=False)
    return a_source


# ---- layout -------------------------------------------------------------------------------------


def examples() -> list[list[str]]:
    """(face, clip) pairs that work offline: the bundled ones, plus the real clips of MEFACIAL_DATA when present."""
    pairs = []
    if EXAMPLE_FACE.exists() and EXAMPLE_CLIP.exists():
        pairs.append([str(EXAMPLE_FACE), str(EXAMPLE_CLIP)])
    data = data_dir()
    clips = sorted((data / "driving").glob("*.gif")) if data.is_dir() else []
    faces = sorted((data / "faces").glob("*.png")) if data.is_dir() else []
    for i, clip in enumerate(clips):
        face = faces[i % len(faces)] if faces and i % 2 else EXAMPLE_FACE
        if face.exists():
            pairs.append([str(face), str(clip)])
    if faces and EXAMPLE_CLIP.exists():
        pairs.append([str(faces[0]), str(EXAMPLE_CLIP)])
    return pairs


def default_landmarks(engine: mefacial.Engine) -> str:
    """The landmark backend the page starts with: the engine's, dlib for "auto"."""
    return engine.landmarks if engine.landmarks in LANDMARKS and engine.landmarks != "auto" else "dlib"


def clip_info(clip) -> str:
    """A clip's description, shown under it: frames, size, rate and length."""
    t, h, w, _ = clip.frames.shape
    return f"{counted(t, 'frame')}, {w}x{h}, {clip.fps:g} fps ({t / clip.fps:.2f} s)"


def suggested_slowdown(clip) -> int:
    """The playback slow-down a clip's results start with (`mefacial.video.suggested_slowdown`: about PLAYBACK_S
    of playback)."""
    return video_slowdown(clip.num_frames / clip.fps)


def example_clip():
    """The bundled clip (None where it cannot be read), shown when the page opens."""
    try:
        return read_clip(EXAMPLE_CLIP)
    except MefacialError:
        return None


def not_ready_markdown(variants: list[dict], ready: dict[str, str | None]) -> str:
    """The variants that cannot run here, one reason each (they stay tickable: their column says why)."""
    by_reason: dict[str, list[str]] = {}
    for v in variants:
        if ready[v["id"]]:
            by_reason.setdefault(ready[v["id"]], []).append(v["label"])
    if not by_reason:
        return ""
    lines = [f"- **{', '.join(labels)}**: {reason}" for reason, labels in by_reason.items()]
    return "Not ready on this server (tick one to show its column with the reason):\n" + "\n".join(lines)


def build_demo(engine: mefacial.Engine, limits: Limits | None = None) -> gr.Blocks:
    """The Blocks app: Generate, Prior and Compare tabs over `engine`, opening with the bundled example loaded.
    Launch it with `launch(demo, ...)`."""
    limits = limits or Limits()
    demo_state = Demo(engine, limits)
    zero_gpu_handlers(demo_state)
    variants = demo_state.variants
    pairs = examples()
    landmarks0 = default_landmarks(engine)
    has_example = EXAMPLE_FACE.exists() and EXAMPLE_CLIP.exists()
    face0, clip0 = (str(EXAMPLE_FACE), str(EXAMPLE_CLIP)) if has_example else (None, None)
    example = example_clip() if has_example else None
    clip0_frames = example.num_frames if example is not None else limits.max_frames
    preview0, preview0_info, slowdown0 = (Demo.playable(example, demo_state.root / f"{EXAMPLE_CLIP.stem}.mp4")
                                          if example is not None else (None, "", 1))

    def offers(backbone: str | None, v: dict) -> bool:
        """Whether a backbone's menus offer the choices of variant v (a backbone with one variant shows them all,
        disabled)."""
        own = [w for w in variants if w["backbone"] == backbone]
        return backbone is None or len(own) <= 1 or v["backbone"] == backbone

    def prior_choices(backbone: str | None = None) -> list[tuple[str, str]]:
        """The prior choices of one backbone (all of them when None, or when it has one variant, shown disabled),
        each in its own variant's words."""
        labels = {v["prior_option"]: v["prior_label"] for v in variants if backbone and v["backbone"] == backbone}
        keys = [v["prior_option"] for v in variants if offers(backbone, v)]
        return [(labels.get(k) or PRIORS.get(k, k), k) for k in dict.fromkeys(["none", *keys])]

    def prior_title(backbone: str | None) -> str:
        """What the prior radio chooses for a backbone: a facial prior where it has one (EWP, AWP), else a variant
        (the dense mesh: with or without appearance transfer)."""
        return ("Facial prior" if backbone is None or any(v["prior"] != "none" for v in variants
                                                           if v["backbone"] == backbone) else "Variant")

    def motion_choices(backbone: str | None = None) -> list[tuple[str, str]]:
        modes = [m for v in variants if offers(backbone, v) for m in v["motion_modes"]]
        return [(MOTIONS.get(m, m), m) for m in dict.fromkeys(["relative", *modes])]

    def variant_note(backbone: str, prior: str) -> str:
        """Which variant the choice runs, and where its weights come from (or why it cannot run here)."""
        matches = [v for v in variants if v["backbone"] == backbone and v["prior_option"] == prior]
        if not matches:
            return ""
        rows = weights_rows()
        v = matches[0]
        reason = readiness(engine, [v], rows)[v["id"]]
        return f"Runs **{v['label']}** · {weights_where(engine, v, rows.get(v['id'], {}), reason)}"

    def compare_defaults():
        """The Compare tab's ticks (the variants ready here) and the list of the others with their reasons."""
        ready = readiness(engine, variants)
        return (gr.update(value=[v["id"] for v in variants if ready[v["id"]] is None]),
                not_ready_markdown(variants, ready))

    def on_backbone(backbone: str, prior: str):
        """Offer only what this backbone has (its spec): its priors and motion modes (shown where there is a choice),
        the EWP confinement where it applies, and movement-scale adaptation (where it applies) back to the backbone's
        original default (FOMM off, MRAA on).
        The prior goes back to none only where this backbone has no choice of the one chosen (setting it anyway
        undid a prior picked while this answer was on its way: a slow server)."""
        spec = backbones()[choice(backbone, BACKBONES, "backbone")]
        several = len([v for v in variants if v["backbone"] == backbone]) > 1
        priors = prior_choices(backbone)
        kept = several and prior in {key for _, key in priors}
        return (gr.update(choices=priors, interactive=several, label=prior_title(backbone),
                          **({} if kept else {"value": "none"})),
                gr.update(visible=spec.confine, value=False),
                gr.update(choices=motion_choices(backbone), value=spec.default_motion,
                          interactive=len(spec.motion_modes) > 1, visible=len(spec.motion_modes) > 1),
                gr.update(interactive=spec.adapt_scale, visible=spec.adapt_scale, value="default"))

    def face_input(prefix: str, label: str) -> gr.Image:
        return gr.Image(face0, label=label, type="filepath", sources=["upload", "webcam", "clipboard"],
                        image_mode=None, height=256, elem_id=f"{prefix}-source")

    def clip_input(prefix: str, label: str) -> tuple[gr.File, gr.Video]:
        """A driving clip: a file (any video, GIF) or a recording from the webcam, which becomes the file."""
        file = gr.File(clip0, label=label, file_types=CLIP_TYPES, elem_id=f"{prefix}-driving", height=100)
        with gr.Accordion("Record a clip with the webcam", open=False):
            record = gr.Video(sources=["webcam"], include_audio=False, label="Recording", height=200,
                              elem_id=f"{prefix}-record")
        return file, record

    def clip_preview(prefix: str) -> tuple[gr.Video, gr.Markdown]:
        """The driving clip playing (slowed down as its results start) and the line under it."""
        preview = gr.Video(preview0, label="Driving clip", interactive=False, autoplay=True, loop=True, height=160,
                           elem_id=f"{prefix}-preview")
        return preview, gr.Markdown(preview0_info, elem_id=f"{prefix}-clip-info")

    landmark_choices = [(label, k) for k, label in LANDMARKS.items()]
    ready0 = readiness(engine, variants)

    # Gradio's copies of uploads and outputs go with the same age as the request folders (checked twice per age).
    delete_cache = (max(1, min(1800, limits.output_max_age_s // 2)), limits.output_max_age_s)
    with gr.Blocks(title="mefacial: micro-expression generation", delete_cache=delete_cache) as demo:
        gr.Markdown("# mefacial: facial-prior-guided micro-expression generation\n"
                    "Give a face and a micro-expression clip; get the face performing that micro-expression. "
                    "Backbones FOMM and MRAA with a facial prior (none, EWP, AWP), or the training-free generators "
                    "that need no weights: the dense face mesh (the default) and the 68-point landmark warp. The "
                    "example below is ready: press **Generate**.")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        g_source = face_input("g", "Source face")
                        with gr.Column():
                            g_driving, g_record = clip_input("g", "Driving clip (mp4, gif, webm, avi, mov)")
                            g_preview, g_clip_info = clip_preview("g")
                    with gr.Group():
                        with gr.Row():
                            g_backbone = gr.Radio([(label, b) for b, label in BACKBONES.items()], value="dense",
                                                  label="Backbone", elem_id="g-backbone")
                            g_prior = gr.Radio(prior_choices("dense"), value="none", label=prior_title("dense"),
                                               interactive=True, elem_id="g-prior")
                        g_confine = gr.Checkbox(False, label="Confine the warp to the face (EWP map)", visible=False)
                        g_variant = gr.Markdown(variant_note("dense", "none"), padding=True, elem_id="g-variant")
                        with gr.Row():
                            dense = backbones()["dense"]  # (what the page opens on: shown where it has a choice)
                            g_motion = gr.Radio(motion_choices("dense"), value="relative", label="Motion", elem_id="g-motion",
                                                interactive=False, visible=len(dense.motion_modes) > 1)
                            g_adapt = gr.Radio([("as the original (FOMM off, MRAA on)", "default"), ("on", "on"),
                                                ("off", "off")], value="default", label="Movement-scale adaptation",
                                               interactive=False, visible=dense.adapt_scale, elem_id="g-adapt")
                        g_magnify = gr.Slider(1, 5, value=1, step=0.5, label="Magnification (1 = faithful)")
                    with gr.Accordion("Face and output", open=False):
                        with gr.Row():
                            g_crop = gr.Checkbox(True, label="Crop around the face")
                            g_paste = gr.Checkbox(False, label="Paste back into the full image")
                            g_smooth = gr.Checkbox(True, label="Smooth landmark tracks")
                        g_landmarks = gr.Radio(landmark_choices, value=landmarks0, label=LANDMARKS_LABEL)
                        with gr.Row():
                            g_slowdown = gr.Slider(1, 20, value=1, step=1, label=SLOWDOWN_LABEL,
                                                   elem_id="g-slowdown")
                            g_format = gr.Radio(["mp4", "gif"], value="mp4", label="Download format")
                    g_button = gr.Button("Generate", variant="primary", elem_id="g-button")
                    if pairs:
                        gr.Examples(pairs, inputs=[g_source, g_driving], label="Examples (work offline)")
                with gr.Column(scale=1):
                    g_result = gr.Video(label="Result", interactive=False, autoplay=True, loop=True, height=360,
                                        elem_id="g-result")
                    g_grid = gr.Video(label="Source | driving | result", show_label=False, interactive=False,
                                      autoplay=True, loop=True, elem_id="g-grid")
                    g_download = gr.File(label="Download", interactive=False, height=70, elem_id="g-download")
                    g_status = gr.Markdown(label="Status", elem_id="g-status")
                    readout_panel(demo_state, g_result, g_slowdown)

        with gr.Tab("Prior", id="prior"):
            gr.Markdown("What guides the motion: the 68 landmarks, the 18 action-unit (AU) points derived from them, "
                        "and the prior maps built from the AU points, drawn over the face as the model sees it.")
            with gr.Row():
                p_source = face_input("p", "Face")
                with gr.Column():
                    p_driving, p_record = clip_input("p", "Driving clip (optional)")
                    p_preview, p_clip_info = clip_preview("p")
                    p_frame = gr.Slider(0, max(clip0_frames - 1, 1), value=0, step=1, label="Driving frame",
                                        elem_id="p-frame")
                    p_landmarks = gr.Radio(landmark_choices, value=landmarks0, label="Landmark backend")
                    p_crop = gr.Checkbox(True, label="Crop around the face")
                    p_button = gr.Button("Show the prior", variant="primary", elem_id="p-button")
            p_gallery = gr.Gallery(label="Prior", columns=4, height="auto", object_fit="contain",
                                   elem_id="p-gallery")
            p_status = gr.Markdown(label="Status", elem_id="p-status")
            if pairs:  # below the results, which then show right under the button
                gr.Examples(pairs, inputs=[p_source, p_driving], label="Examples")

        with gr.Tab("Compare", id="compare"):
            gr.Markdown("One face and one clip through several variants, as one synchronised video: the driving clip "
                        "first, then a labelled column per variant.")
            with gr.Row():
                with gr.Column(scale=1):
                    c_source = face_input("c", "Source face")
                with gr.Column(scale=1):
                    c_driving, c_record = clip_input("c", "Driving clip")
                    c_preview, c_clip_info = clip_preview("c")
                    c_landmarks = gr.Radio(landmark_choices, value=landmarks0, label=LANDMARKS_LABEL)
                with gr.Column(scale=2):
                    c_variants = gr.CheckboxGroup([(v["label"], v["id"]) for v in variants],
                                                  value=[v["id"] for v in variants if ready0[v["id"]] is None],
                                                  label="Variants", info="Ticked: those that can run on this server",
                                                  elem_id="c-variants")
                    c_not_ready = gr.Markdown(not_ready_markdown(variants, ready0), elem_id="c-not-ready")
                    with gr.Row():
                        c_magnify = gr.Slider(1, 5, value=1, step=0.5, label="Magnification")
                        c_slowdown = gr.Slider(1, 20, value=1, step=1, label=SLOWDOWN_LABEL,
                                               elem_id="c-slowdown")
                    with gr.Row():
                        c_crop = gr.Checkbox(True, label="Crop around the face")
                        c_paste = gr.Checkbox(False, label="Paste back")
                        c_smooth = gr.Checkbox(True, label="Smooth landmarks")
                        c_heatmaps = gr.Checkbox(False, label="Motion heatmaps row")
                    c_button = gr.Button("Compare", variant="primary", elem_id="c-button")
            c_grid = gr.Video(label="Comparison", show_label=False, interactive=False, autoplay=True, loop=True,
                              height=420, elem_id="c-grid")
            c_status = gr.Markdown(label="Status", elem_id="c-status")
            if pairs:
                gr.Examples(pairs, inputs=[c_source, c_driving], label="Examples")

        a_source = action_units_tab(demo_state, str(EXAMPLE_FACE) if EXAMPLE_FACE.exists() else None, demo)

        with gr.Accordion("Variants and weights", open=False):
            v_table = gr.Markdown(variants_markdown(engine, variants), elem_id="variants")

        # ---- events: preprocess=False so every upload reaches the engine's own readers and errors ----
        # A handled error is a toast; `.failure` then puts the panes back to normal (no red "Error" badges).
        raw = {"preprocess": False}

        def reset(*outputs, clear: bool = False) -> dict:
            """A `.failure` follow-up: the outputs back to a normal state (cleared when `clear`)."""
            values = [None if clear else gr.update() for _ in outputs]
            return dict(fn=lambda: values[0] if len(values) == 1 else values, inputs=None, outputs=list(outputs),
                        api_name=False, queue=False, show_progress="hidden")

        g_backbone.change(on_backbone, [g_backbone, g_prior], [g_prior, g_confine, g_motion, g_adapt], api_name=False,
                          queue=False)
        gr.on([g_backbone.change, g_prior.change], variant_note, [g_backbone, g_prior], g_variant, api_name=False,
              queue=False, trigger_mode="always_last")  # the latest choice wins
        # A face is checked when it arrives (upload, webcam, paste): a broken file or no face says so at once.
        for source, landmarks in ((g_source, g_landmarks), (p_source, p_landmarks), (c_source, c_landmarks)):
            source.input(user_errors(demo_state.check_source), [source, landmarks], None, api_name=False,
                         show_progress="minimal", **raw).failure(**reset(source, clear=True))
        a_source.input(user_errors(demo_state.check_source), a_source, None, api_name=False, show_progress="minimal",
                       **raw).failure(**reset(a_source, clear=True))
        g_driving.change(user_errors(demo_state.preview), g_driving, [g_preview, g_clip_info, g_slowdown],
                         api_name="preview_driving", **raw).failure(  # a refused clip leaves its box, like a face
                             **reset(g_driving, g_preview, g_clip_info, clear=True))
        p_driving.change(user_errors(demo_state.prior_clip), [p_driving, p_frame, p_landmarks],
                         [p_frame, p_preview, p_clip_info], api_name=False, **raw).failure(
                             **reset(p_driving, p_preview, p_clip_info, clear=True))
        c_driving.change(user_errors(demo_state.preview), [c_driving, c_landmarks], [c_preview, c_clip_info, c_slowdown],
                         api_name=False, **raw).failure(
                             **reset(c_driving, c_preview, c_clip_info, clear=True))
        for record, driving, landmarks in ((g_record, g_driving, g_landmarks), (p_record, p_driving, p_landmarks),
                                           (c_record, c_driving, c_landmarks)):
            record.change(user_errors(demo_state.use_recording), [record, landmarks], driving, api_name=False,
                          **raw).failure(**reset(record, clear=True))
        # Controls are matched to the handlers' parameters by name (inputs_by_name), never by position.
        g_button.click(
            user_errors(demo_state.generate),
            inputs_by_name(demo_state.generate, source=g_source, driving=g_driving, backbone=g_backbone, prior=g_prior,
                           confine=g_confine, motion=g_motion, adapt_scale=g_adapt, magnify=g_magnify, crop=g_crop,
                           paste_back=g_paste, landmarks=g_landmarks, smooth=g_smooth, slowdown=g_slowdown,
                           format=g_format),
            [g_result, g_grid, g_download, g_status], api_name="generate", concurrency_limit=1, **raw
        ).failure(**reset(g_result, g_grid, g_download, g_status))
        p_button.click(
            user_errors(demo_state.prior),
            inputs_by_name(demo_state.prior, source=p_source, driving=p_driving, frame=p_frame, landmarks=p_landmarks,
                           crop=p_crop),
            [p_gallery, p_status], api_name="prior", concurrency_limit=1, **raw).failure(**reset(p_gallery, p_status))
        c_button.click(
            user_errors(demo_state.compare),
            inputs_by_name(demo_state.compare, source=c_source, driving=c_driving, variants=c_variants,
                           magnify=c_magnify, crop=c_crop, paste_back=c_paste, landmarks=c_landmarks, smooth=c_smooth,
                           heatmaps=c_heatmaps, slowdown=c_slowdown),
            [c_grid, c_status], api_name="compare", concurrency_limit=1, **raw).failure(**reset(c_grid, c_status))
        demo.load(functools.partial(variants_markdown, engine, variants), None, v_table, api_name="variants",
                  queue=False)
        demo.load(compare_defaults, None, [c_variants, c_not_ready], api_name=False, queue=False)
        # the example's playback slow-down is set on the page only: the API's default stays real time
        demo.load(lambda: (slowdown0, slowdown0), None, [g_slowdown, c_slowdown], api_name=False, queue=False)
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    demo.mefacial_limits = limits  # read by launch()
    return demo


# The Prior gallery shows every panel and caption: no fixed height with a scroll bar inside it.
CSS = "#p-gallery .grid-wrap { max-height: none !important; overflow-y: visible !important; }"


def theme() -> gr.themes.Base:
    """Gradio's default theme with its fonts' regular faces only: the semi-bold faces Gradio ships hold 55 and 75
    glyphs (of the Latin letters only 'A' and 'B', 'a' and 'b'), so bold text mixed two fonts ("MRAA" read as "MR"
    and two small capitals); bold is drawn from the regular faces instead, every letter alike, nothing downloaded."""
    return gr.themes.Default(
        font=(gr.themes.LocalFont("Source Sans Pro", weights=(400,)), "ui-sans-serif", "system-ui", "sans-serif"),
        font_mono=(gr.themes.LocalFont("IBM Plex Mono", weights=(400,)), "ui-monospace", "Consolas", "monospace"))


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False, **kwargs):
    """Launch with the upload limit of the demo's Limits (the server refuses larger files), the page's CSS and theme.

    Gradio probes its own page once the server runs and stops the program ("When localhost is not accessible, a
    shareable link must be created") where the first answer takes over 3 s (a busy or cold machine: seen here on
    2 cores right after a test run) or a proxy setting catches localhost; the page itself serves either way, so the
    probe (launch's `_frontend`, which it only serves) is skipped."""
    limits: Limits = getattr(demo, "mefacial_limits", Limits())
    probe = {"_frontend": False} if "_frontend" in inspect.signature(demo.launch).parameters else {}
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=f"{limits.max_upload_mb}mb",
                       css=CSS, theme=theme(), **probe, **kwargs)


def parse_checkpoint(text: str) -> tuple[str, str]:
    variant, sep, path = text.partition("=")
    if not sep or not variant or not path:
        raise argparse.ArgumentTypeError(f"expected VARIANT=PATH (e.g. fomm-awp=weights/fomm-awp.pth.tar), got {text!r}")
    return variant, path


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--landmarks", default="auto", choices=sorted(LANDMARKS), help="default landmark backend")
    parser.add_argument("--checkpoint", action="append", default=[], type=parse_checkpoint, metavar="VARIANT=PATH",
                        help="weights of a variant (repeatable); overrides checkpoints/ and the Hub")
    parser.add_argument("--queue-size", type=int, default=Limits.queue_size, help="requests waiting at most")
    parser.add_argument("--max-upload-mb", type=int, default=Limits.max_upload_mb, help="largest upload accepted")
    parser.add_argument("--max-frames", type=int, default=Limits.max_frames, help="longest driving clip, in frames")
    parser.add_argument("--max-seconds", type=float, default=Limits.max_seconds, help="longest driving clip, in seconds")
    parser.add_argument("--debug", action="store_true", help="log the traceback of every refused request too")
    parser.add_argument("--output-max-age", type=int, default=Limits.output_max_age_s, metavar="SECONDS",
                        help="delete uploads and results older than this")
    return parser


def handle_signals() -> None:
    """Shut down on SIGTERM (docker stop, a Space restart) as on Ctrl-C: Gradio closes the server and
    deletes its cached files, and the request folders are removed at exit. On SIGUSR1 (`kill -USR1 PID`),
    write every thread's stack to standard error and go on serving: where a request that never ends is."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if hasattr(signal, "SIGUSR1"):  # (not on Windows)
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def warm_up(engine: mefacial.Engine) -> float | None:
    """Animate the bundled example with the default generator (the face-mesh models load) and show its face's
    prior (dlib's landmark models load and its detector threads start: the warp, the Compare tab and the prior
    view use them), so that the first visitor does not wait for them (the first request took 5.3 s instead of
    1.0 s on a 2-core CPU). Returns the seconds it took; a failure is logged, never raised. `main` runs it in
    the background while the page already serves."""
    started = time.perf_counter()
    try:
        clip = read_clip(EXAMPLE_CLIP)
        face = read_image(EXAMPLE_FACE)
        engine.animate(face, clip.frames, variant=mefacial.engine.DEFAULT_VARIANT, fps=clip.fps)
        engine.prior_view(face)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the app
        log.warning("warm-up skipped: %s", first_line(exc))
        return None
    seconds = time.perf_counter() - started
    log.info("warmed up in %.1f s (landmark models loaded)", seconds)
    return seconds


def start_up_work(engine: mefacial.Engine) -> None:
    """After the server starts: the warm-up, then on a ZeroGPU Space the models of every learned variant that
    can load (weights present or downloadable), on the CPU, so that each GPU call only moves them."""
    warm_up(engine)
    if hardware.on_zero_gpu():
        hardware.preload(engine, [v["id"] for v in mefacial.list_variants() if v["needs_weights"]])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mefacial").setLevel(logging.DEBUG if args.debug else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes, one line each
    if hardware.on_zero_gpu():
        hardware.import_spaces()  # before anything touches CUDA
    try:
        for variant, path in args.checkpoint:
            weights_registry.resolve_checkpoint(get_variant(variant).id, path)  # unknown ids and missing files fail now
        engine = mefacial.Engine(device=hardware.startup_device(args.device), precision=args.precision,
                                 landmarks=args.landmarks, checkpoints=dict(args.checkpoint))
    except MefacialError as exc:
        raise SystemExit(f"error: {exc.cli_message}") from None
    limits = Limits(max_upload_mb=args.max_upload_mb, max_frames=args.max_frames, max_seconds=args.max_seconds,
                    queue_size=args.queue_size, output_max_age_s=args.output_max_age)
    handle_signals()
    demo = build_demo(engine, limits)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share, prevent_thread_lock=True)
    except OSError as exc:  # Gradio's own words name launch()'s parameters, not this program's flags
        if "port" not in str(exc).lower():
            raise
        port = args.port or os.environ.get("GRADIO_SERVER_PORT") or 7860
        raise SystemExit(f"error: port {port} is taken (another app.py still running?): stop that one, or start "
                         "this one on another port with --port, e.g. --port 7861") from None
    log.info("serving %s, %.1f s after start", demo.local_url, time.monotonic() - STARTED)
    # The warm-up runs beside the server, once it serves: the page never waits for it.
    threading.Thread(target=start_up_work, args=(engine,), name="warm-up", daemon=True).start()
    demo.block_thread()  # until Ctrl-C or SIGTERM


if __name__ == "__main__":
    main()

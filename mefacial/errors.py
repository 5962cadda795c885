"""Typed errors of the package, each worded twice: once for the command line, once for the web page.

    raise NotAnImageError(
        f"cannot read {path}: not an image ({err}). Use a PNG or JPEG photo.",   # str(exc), .cli_message
        page=f"{path} is not an image",                                           # what happened, plainly
        fix="Upload a photo of a face (PNG or JPEG)")                             # what to do from the page

- `cli_message` (= `str(exc)`): the full message with flags, paths and environment variables; the
  CLI prints it and exits with status 2.
- `page_message`: what a visitor of the demo reads under the error's short `title`: at most three
  plain sentences (what happened; what to do from the page; for the operator, one pointer to a
  README section), without flags or environment variables. Errors raised with a message only get a
  page wording cut from that message (`plain_sentences`), so every error has one.
"""

from __future__ import annotations

import re

# A sentence that names a flag, an environment variable, a code identifier or a shell command is for the
# command line, not for the page.
_CLI_ONLY = re.compile(r"(^|\s|\()--?[a-z]|\$[A-Z_]|`|\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b|\bpython -m\b|\bpip install\b|"
                       r"\bLimits\.\w|\b\w+=\w|\bkwarg|\b[Pp]ass (the )?path\b")
_ENV_OR_FLAG = re.compile(r"--[a-z]|\$[A-Z_]|\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])|\n+")
_DETAIL = re.compile(r"\s*\([^()]*[/\\:][^()]*\)")  # "(cannot identify image file '/tmp/x')": a detail for logs
MAX_PAGE_SENTENCES = 3


def sentence(text: str) -> str:
    """`text` as one sentence: trimmed, without a dangling ',' ';' ':' or '-', capitalised, ending in '.'."""
    text = " ".join(str(text).split()).strip(" ,;:-\u2013")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def plain_sentences(message: str, limit: int = 2) -> list[str]:
    """The first `limit` sentences of `message` that a page can show: no flags, variables, code or commands;
    parenthesised details with paths or colons dropped."""
    text = _DETAIL.sub("", str(message))
    kept = []
    for part in _SENTENCE_END.split(text):
        part = part.strip().lstrip("-* ").strip()
        if part and not _CLI_ONLY.search(part) and part.lower() not in {"looked in:", "what to do:"}:
            kept.append(sentence(part))
        if len(kept) == limit:
            break
    return kept


class MefacialError(Exception):
    """Base class of every error the package raises on purpose.

    Keyword parts (all optional) give the page its own wording: `page` (what happened), `fix` (what
    to do from the page; the class's `default_fix` otherwise), `operator` (README section for whoever
    runs the server; the class's `readme` otherwise), `title` (the class's otherwise).
    """

    title = "Something went wrong"
    default_fix: str | None = None
    readme: str | None = None  # README section named to the operator

    def __init__(self, *args, page: str | None = None, fix: str | None = None, operator: str | None = None,
                 title: str | None = None):
        super().__init__(*args)
        self.page = page
        self.fix = fix
        if operator is not None:
            self.readme = operator or None
        if title is not None:
            self.title = title

    @property
    def cli_message(self) -> str:
        """The command line's wording: cause and remedy with flags, paths and variables."""
        return str(self)

    @property
    def page_message(self) -> str:
        """At most three plain sentences: what happened, what to do from the page, where the operator reads more."""
        parts = [sentence(self.page)] if self.page else plain_sentences(str(self), limit=1)
        if not parts:  # the whole message was for the command line
            parts = [sentence(f"{self.title} (the server log has the details)")]
        fix = self.fix or self.default_fix
        if fix and sentence(fix) not in parts:
            parts.append(sentence(fix))
        if self.readme:
            parts.append(sentence(f'Operator: see "{self.readme}" in the README'))
        return " ".join(parts[:MAX_PAGE_SENTENCES])


class ConfigError(MefacialError, ValueError):
    """A config file or field is invalid."""

    title = "Configuration error"
    readme = "Weights"


class UnknownVariantError(MefacialError, KeyError):
    """A variant id that the registry does not know."""

    title = "Unknown variant"
    default_fix = "Choose one of the variants the page offers"

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class CheckpointError(MefacialError):
    """A checkpoint is not a checkpoint, or does not fit the chosen architecture."""

    title = "Unusable weights"
    default_fix = "Choose a training-free backbone (the dense mesh or the warp), or another variant marked as ready"
    readme = "Weights"


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Weights are neither on disk nor downloadable (offline, missing, unreachable)."""

    title = "Weights missing"


class InputError(MefacialError, ValueError):
    """A user input (image, clip, option) cannot be used."""

    title = "Cannot use this input"


class NotAnImageError(InputError):
    """The source file is not a readable image."""

    title = "Not an image"
    default_fix = "Upload a photo of a face (PNG or JPEG), take one with the webcam or paste one"


class UnreadableVideoError(InputError):
    """The driving file is not a readable video or image sequence."""

    title = "Unreadable clip"
    default_fix = "Upload the clip as mp4 (H.264) or GIF, or record one with the webcam"


class InputTooLargeError(InputError):
    """An input exceeds a configured limit (pixels, frames, bytes, duration)."""

    title = "Too large"
    default_fix = "Trim or downscale it and try again"
    readme = "Limits"


class CutInClipError(InputError):
    """The driving clip cuts to another person's face, or to another shot of the face."""

    title = "Cut in the driving clip"
    default_fix = "Use a clip of one shot of one face: trim it before or after the cut"


class NoFaceError(InputError):
    """No face was found where one is needed."""

    title = "No face found"

    def __init__(self, message: str, frame_index: int | None = None, **parts):
        super().__init__(message, **parts)
        self.frame_index = frame_index


def face_remedy(detector: str, smallest: float, width: int, height: int) -> tuple[str, str]:
    """(what the command line says to do, what the page says) where `detector` found no face in a `width` x
    `height` picture and finds faces from about `smallest` px tall: a picture too small to hold one is named so,
    not sent to be cropped closer."""
    if min(width, height) < smallest:
        return (f"this {width}x{height} picture is too small to hold a face the {detector} finds (at least about "
                f"{smallest:.0f} px tall): use a larger picture of the face",
                f"Use a larger picture of the face (at least about {smallest:.0f} px tall)")
    return (f"the {detector} needs a frontal, well-lit face at least about {smallest:.0f} px tall in this "
            f"{width}x{height} picture: crop closer to the face, avoid strong profile views, occlusions and deep "
            "shadows", "Use a frontal, well-lit face, cropped close, without strong shadows or a profile view")


ONSET_PAGE = "No face in the first frame of the driving clip"
ONSET_FIX = "Use a clip that starts with a frontal, well-lit face in the picture (trim any frames before it)"


def no_face_at_onset(remedy: str) -> NoFaceError:
    """No face in the driving clip's first (onset) frame, where its face box is placed: one wording for every
    detector (`remedy`: `face_remedy`'s command-line half)."""
    return NoFaceError(f"no face in the driving clip's first frame, where its face box is placed. "
                       f"{sentence(remedy)[:-1]}; trim the frames before the face is in the picture.", frame_index=0,
                       page=ONSET_PAGE, fix=ONSET_FIX)


def is_cli_free(text: str) -> bool:
    """Whether `text` names no flag or environment variable (what a page may show)."""
    return not _ENV_OR_FLAG.search(text)

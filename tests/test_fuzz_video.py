"""Property test of the readers on mutated real files (hypothesis).

A real driving GIF and a short H.264 mp4 written from its frames get byte
mutations (flips, insertions, deletions, truncation) at positions hypothesis
chooses. `read_clip` and `read_image` must then either return well-formed
pixels or raise a `MefacialError` subclass: never a foreign exception. The
examples are bounded and derandomized so CI runs the same cases every time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DATA, left_open, open_files, require
from mefacial import video
from mefacial.errors import MefacialError
from mefacial.video import Limits

pytestmark = pytest.mark.slow  # hypothesis over mutated real clips

FRAMES = 8  # frames of the real clip kept in the seed files (small: every example decodes the whole file)
FUZZ_LIMITS = Limits(max_frames=500, max_pixels=4_000_000, max_seconds=60.0)  # a mutated header may claim anything
FUZZ_SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of a real GIF and a real mp4 (FRAMES frames each, from a shared driving clip)."""
    gifs = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    assert gifs, "no driving GIFs in the shared data"
    clip = video.read_clip(gifs[0])
    folder = tmp_path_factory.mktemp("seeds")
    frames = clip.frames[:FRAMES]
    gif = video.write_video(folder / "seed.gif", frames, min(clip.fps, 50.0))
    mp4 = video.write_video(folder / "seed.mp4", frames, clip.fps)
    return {".gif": gif.read_bytes(), ".mp4": mp4.read_bytes()}


@st.composite
def mutations(draw) -> list[tuple[str, float, int]]:
    """1-4 edits: (kind, relative position in the file, byte value or length)."""
    edit = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "zero_run"]),
                     st.floats(0.0, 1.0, allow_nan=False), st.integers(0, 255))
    return draw(st.lists(edit, min_size=1, max_size=4))


def mutate(data: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, where, value in edits:
        if not buffer:
            break
        at = min(int(where * len(buffer)), len(buffer) - 1)
        if kind == "flip":
            buffer[at] ^= value or 0xFF
        elif kind == "insert":
            buffer[at:at] = bytes([value]) * (1 + value % 16)
        elif kind == "delete":
            del buffer[at:at + 1 + value % 64]
        elif kind == "truncate":
            del buffer[at:]
        else:  # zero_run: a block of zeros, as a disk or network error leaves
            buffer[at:at + 1 + value] = bytes(len(buffer[at:at + 1 + value]))
    return bytes(buffer)


def check_clip(clip: video.Clip) -> None:
    frames = clip.frames
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.ndim == 4 and frames.shape[0] >= 1 and frames.shape[-1] == 3 and 0 not in frames.shape
    assert math.isfinite(clip.fps) and clip.fps > 0


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_mutated_clips_read_or_raise_typed_errors(seeds, tmp_path, suffix):
    outcomes = {"read": 0, "refused": 0}

    @FUZZ_SETTINGS
    @given(edits=mutations())
    def read_mutated(edits):
        path = tmp_path / f"mutated{suffix}"
        path.write_bytes(mutate(seeds[suffix], edits))
        try:
            clip = video.read_clip(path, limits=FUZZ_LIMITS)
        except MefacialError:
            outcomes["refused"] += 1
        else:
            check_clip(clip)
            outcomes["read"] += 1
        try:
            image = video.read_image(path, limits=FUZZ_LIMITS)
        except MefacialError:
            pass
        else:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3 and 0 not in image.shape

    before = open_files()
    read_mutated()
    assert sum(outcomes.values()) > 0
    assert not left_open(before, tmp_path), "a refused file was left open (or its ffmpeg pipe)"
    print(f"{suffix}: {outcomes}")


def test_mutation_changes_the_file(seeds):
    """The mutator does edit (the fuzz test is not reading the seed over and over)."""
    data = seeds[".gif"]
    assert mutate(data, [("truncate", 0.5, 0)]) == data[: len(data) // 2]
    assert mutate(data, [("flip", 0.0, 1)])[0] == data[0] ^ 1
    assert len(mutate(data, [("insert", 0.3, 3)])) == len(data) + 4
    assert len(mutate(data, [("delete", 0.3, 3)])) == len(data) - 4

"""Errors and CLI output for people: the page wording of every error (a short title, at most three plain
sentences, no flags), the CLI wording of missing weights, progress that never goes back, readable tables."""

from __future__ import annotations

import io
import json
import re

import pytest

from mefacial import errors
from mefacial.__main__ import main
from mefacial.checkpoints import checkpoint_env_var, resolve_checkpoint
from mefacial.console import ConsoleProgress, monotone, table
from mefacial.errors import MefacialError, WeightsNotFoundError, is_cli_free
from mefacial.video import Limits, read_clip, read_image
from mefacial.variants import list_variants

ERROR_TYPES = [t for t in vars(errors).values() if isinstance(t, type) and issubclass(t, MefacialError)]
# Messages as the package words them for the command line: flags, variables, code, paths, lists.
CLI_MESSAGES = [
    "give the output folder: --out DIR",
    "fp16 needs a GPU; on the CPU use bf16 (fast on CPUs with AVX512-BF16/AMX) or fp32",
    "cannot read the source image /tmp/a/b.png: it is not an image Pillow can decode (cannot identify image file "
    "'/tmp/a/b.png'). Use a PNG or JPEG photo.",
    "No weights for variant 'x':\nLooked in:\n  - $MEFACIAL_CHECKPOINT_X: not set\nWhat to do:\n  - pass --checkpoint PATH,",
    "out of CPU memory on batches of 4 frames; use a smaller batch size (Engine(batch_size=...) / --batch-size)",
    "",
]


def page_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text) if s]


def assert_page_wording(text: str) -> None:
    assert 1 <= len(page_sentences(text)) <= errors.MAX_PAGE_SENTENCES, text
    assert text.endswith(".") and not re.search(r"[,;:-]\.$|\.\.$|\s\.$", text), text
    assert is_cli_free(text) and "`" not in text and "\n" not in text, text


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("message", CLI_MESSAGES)
def test_every_error_has_a_plain_page_wording(error_type, message):
    error = error_type(message)
    assert_page_wording(error.page_message)
    assert error.cli_message == message  # the command line keeps every detail
    assert error.title and len(error.title) <= 24 and not error.title.endswith("Error")


def test_page_parts_are_used_and_punctuation_mended():
    error = errors.InputTooLargeError("clip.mp4 has 301 frames, above the limit of 300; raise Limits.max_frames.",
                                      page="the clip clip.mp4 has 301 frames, more than the 300 this server takes,",
                                      fix="trim it and try again;")
    assert error.page_message == ('The clip clip.mp4 has 301 frames, more than the 300 this server takes. '
                                  'Trim it and try again. Operator: see "Limits" in the README.')
    assert "Limits.max_frames" in error.cli_message


@pytest.fixture
def no_weights_here(monkeypatch, tmp_path):
    monkeypatch.setenv("MEFACIAL_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for v in list_variants():
        monkeypatch.delenv(checkpoint_env_var(v["id"]), raising=False)


@pytest.mark.parametrize("offline", ["1", None])
@pytest.mark.parametrize("variant", ["fomm-none", "fomm-awp", "mraa-none"])
def test_missing_weights_are_worded_for_the_cli_and_the_page(no_weights_here, monkeypatch, variant, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsNotFoundError) as caught:
        resolve_checkpoint(variant, offline=True)
    cli, page = caught.value.cli_message, caught.value.page_message
    assert cli.count("--checkpoint PATH") <= 1, cli  # no advice twice
    assert not re.search(r"[,;:]\s*$", cli) and not any(line.rstrip().endswith(",") for line in cli.splitlines())
    assert offline or "unset HF_HUB_OFFLINE" not in cli  # advised only when it is set
    if variant == "fomm-none":  # weights on the Hub: what to do about the network
        assert ("unset HF_HUB_OFFLINE" in cli) == bool(offline) and "HF_ENDPOINT" in cli
    assert_page_wording(page)
    assert "has no weights on this server" in page and '"Weights"' in page


def test_readers_give_page_wordings_naming_the_file(tmp_path):
    text = tmp_path / "face.png"
    text.write_text("not a picture")
    with pytest.raises(errors.NotAnImageError) as caught:
        read_image(text)
    assert_page_wording(caught.value.page_message)
    assert str(text) in caught.value.page_message  # the app replaces the path with the uploaded name
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00" * 3000)
    with pytest.raises(errors.UnreadableVideoError) as caught:
        read_clip(broken)
    assert_page_wording(caught.value.page_message)
    from app import EXAMPLE_CLIP

    with pytest.raises(errors.InputTooLargeError) as caught:
        read_clip(EXAMPLE_CLIP, limits=Limits(max_frames=3))
    assert_page_wording(caught.value.page_message)
    assert "more than the 3 this server takes" in caught.value.page_message


def test_progress_never_goes_back_across_stages():
    seen = []
    report = monotone(lambda fraction, message: seen.append(fraction))
    for fraction in (0.0, 0.01, 0.02, 0.05, 0.04, 0.5, 0.3, 1.2):
        report(fraction, "x")
    assert seen == sorted(seen) and seen[-1] == 1.0 and seen[4] == 0.05


def test_console_progress_writes_plain_lines_when_not_on_a_terminal():
    stream = io.StringIO()
    with ConsoleProgress("warp", stream=stream, every=0.0, tty=False) as progress:
        for fraction in (0.0, 0.05, 0.04, 0.5):
            progress(fraction, f"step {fraction}")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines[-1] == "warp: 100% done"
    percents = [int(re.search(r"(\d+)%", line)[1]) for line in lines]
    assert percents == sorted(percents)


def test_variants_and_checkpoints_list_are_tables_with_json_behind_a_flag(no_weights_here, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:2] == ["id", "label"] and not out.lstrip().startswith("[")
    for v in list_variants():
        assert re.search(rf"^{re.escape(v['id'])}\s+{re.escape(v['label'])}\s", out, re.M)
    assert main(["variants", "--json"]) == 0
    assert [v["id"] for v in json.loads(capsys.readouterr().out)] == [v["id"] for v in list_variants()]
    assert main(["checkpoints", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["variant", "licence", "weights"]
    assert "downloads on first use" not in out and "downloads are off" in out  # offline: says so
    assert "How to get the missing weights:" in out and "how to get missing weights: --json" not in out


def test_table_pads_columns():
    assert table([["a", "bb"], ["ccc", "d"]], ["x", "y"]).splitlines() == ["x    y", "---  --", "a    bb", "ccc  d"]

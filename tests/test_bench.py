"""The benchmark machinery on tiny models, and the streamed animation it relies on for long clips.

No wall-clock asserts: the report's fields, the fast path equal to the per-frame loop, GFLOP counts,
and streamed memory that does not grow with the clip's length.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest
import torch
import yaml

from conftest import FIXTURES, REPO, fixture_meta, model_fixture_dirs, require
from mefacial import Engine, bench
from mefacial.__main__ import main as cli
from mefacial.config import config_from_reference
from mefacial.engine import StreamingSmoother
from mefacial.landmarks import smooth_tracks
from mefacial.models import build_model
from mefacial.variants import get_variant


def fixture_config(name: str):
    """The tiny config of the reference fixture `name` (skips without fixtures)."""
    folder = next((d for d in model_fixture_dirs() if d.name == name), None)
    if folder is None:
        require(FIXTURES / name / "meta.json", f"reference fixture {name}")
    return config_from_reference(yaml.safe_load((folder / "config.yaml").read_text()), fixture_meta(folder), name=name)


@pytest.fixture(scope="module")
def inputs():
    """Four frames of the synthetic swaying face at 256 px (dlib landmarks), shared by the tests."""
    return bench.bench_inputs(256, 4, data=None)


@pytest.mark.parametrize("fixture,variant", [("mraa_awp", "mraa-awp"), ("fomm_ewp_mm21", "fomm-ewp-mm21"),
                                             (None, "warp")])
def test_report_has_every_figure_and_fast_path_equals_the_loop(fixture, variant, inputs):
    configs = {} if fixture is None else {variant: fixture_config(fixture)}
    report = bench.run([variant], frames=4, batch_size=2, precisions=["fp32", "fp16"], device="cpu", repeats=2,
                       configs=configs, inputs=inputs)
    json.loads(json.dumps(report, allow_nan=False))  # strict JSON
    assert report["settings"]["skipped_precisions"].keys() == {"fp16"}  # no fp16 on a CPU: said, not measured
    assert report["machine"]["torch"] == torch.__version__
    loop, fast = report["rows"]
    assert (loop["path"], fast["path"], fast["precision"]) == ("loop", "fast", "fp32")
    stages = bench.STAGES if fixture else ("landmarks", "generator", "end_to_end")  # the warp: no prior, no network
    for row in (loop, fast):
        assert set(bench.STAGES) <= set(row["ms_per_frame"])
        assert all(row["ms_per_frame"][stage] > 0 for stage in stages)
        assert row["fps"] > 0 and row["peak_memory_mib"] > 0 and len(row["runs_s"]) == 2
    assert fast["max_abs_diff_vs_loop"] <= 1e-4
    assert fast["speedup_vs_loop"] > 0 and fast["psnr_vs_fp32_db"] is None
    if fixture is not None:
        # The loop encodes the source for every frame (and MRAA's runs the dead hourglass): more work per frame.
        assert loop["gflop_per_frame"] > fast["gflop_per_frame"] > 0 and fast["achieved_gflops"] > 0
    assert {(c["target"], c["precision"]) for c in report["targets"]} >= {("speedup", "fp32"), ("max_abs_diff", "fp32")}
    table = bench.format_table(report)
    assert variant in table and "end-to-end" in table and "Not measured: fp16" in table


def test_loop_of_mraa_with_prior_runs_the_hourglass_the_original_discards(inputs):
    model = build_model(fixture_config("mraa_awp")).eval()
    engine = Engine(device="cpu")
    spec = get_variant("mraa-awp")
    hourglass_calls = []
    model.region_predictor.predictor.register_forward_hook(lambda *args: hourglass_calls.append(1))
    with torch.no_grad():
        fast, _ = bench.fast_path(engine, spec, model, inputs, 2, adapt_scale=True)
        assert hourglass_calls == []  # the engine skips it
        loop, _ = bench.per_frame_loop(engine, spec, model, inputs, adapt_scale=True)
    assert len(hourglass_calls) == len(inputs.driving)
    assert torch.allclose(fast, loop, atol=1e-4)


@pytest.mark.parametrize("length", [1, 2, 5, 9, 10, 23, 40])
@pytest.mark.parametrize("jump", [0.0, 20.0])
def test_streaming_smoother_equals_whole_clip_smoothing(length, jump):
    """Chunk by chunk, the same tracks as the whole clip's, also where the face jumps (kept whole) half way."""
    tracks = np.random.default_rng(length).normal(size=(length, 68, 2)).astype(np.float32)
    tracks[length // 2:] += jump
    for chunk in (1, 4, 9, 64):
        smoother = StreamingSmoother()
        parts = [smoother.push(tracks[i:i + chunk]) for i in range(0, length, chunk)] + [smoother.finish()]
        np.testing.assert_allclose(np.concatenate(parts), smooth_tracks(tracks), atol=1e-5)


@pytest.mark.parametrize("fixture,variant", [(None, "warp"), ("fomm_ewp_mm21", "fomm-ewp-mm21")])
def test_streamed_animation_equals_animate(fixture, variant, data_dir):
    """Chunked reading, per-chunk landmarks with smoothing across chunk borders, paste-back: same frames."""
    engine = Engine(device="cpu", landmarks="dlib")
    if fixture is not None:
        torch.manual_seed(0)
        engine.use_model(variant, build_model(fixture_config(fixture)))
    face = sorted((data_dir / "faces").iterdir())[0]
    clip = sorted((data_dir / "driving").glob("*.gif"))[0]
    from mefacial.video import read_clip

    frames = read_clip(clip).frames[:14]
    options = dict(batch_size=4, paste_back=True)
    expected = engine.animate(face, frames, variant=variant, **options).frames
    streamed = list(engine.run(engine.prepare(face, frames, stream=True, chunk=5, **options), variant))
    assert max(len(part) for part in streamed) <= 4
    np.testing.assert_array_equal(np.concatenate(streamed), expected)


def _warp_engine(size: int, inputs) -> tuple[Engine, np.ndarray, np.ndarray]:
    """The warp variant at `size` px, its source and the source's 68 landmarks at that size."""
    engine = Engine(device="cpu")
    config = dataclasses.replace(get_variant("warp").config, image_size=size)
    engine.use_model("warp", build_model(config))
    scale = size / inputs.source.shape[0]
    from mefacial.video import resize_frames

    source = resize_frames(inputs.source[None], size, size)[0]
    return engine, source, (inputs.source_points[0] + 0.5) * scale - 0.5


def _stream_peak(engine: Engine, source: np.ndarray, points: np.ndarray, frames: int, chunk: int = 50) -> int:
    """tracemalloc peak (bytes) while streaming a synthetic `frames`-frame clip through the engine."""
    rng = np.random.default_rng(0)
    motion = 0.5 * np.sin(np.linspace(0, 6, frames))[:, None, None] * np.ones((1, 68, 2), np.float32)
    driving_points = (points[None] + motion).astype(np.float32)  # T x 68 x 2 (small, held by the caller)

    def clip():
        for start in range(0, frames, chunk):
            yield rng.integers(0, 255, (min(chunk, frames - start), *source.shape), dtype=np.uint8)

    tracemalloc.start()
    try:
        count = 0
        prepared = engine.prepare(source, clip(), size=source.shape[0], crop=False, smooth=False, chunk=chunk,
                                  source_landmarks=points, driving_landmarks=driving_points, batch_size=chunk)
        for part in engine.run(prepared, "warp"):
            count += len(part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == frames
    return peak


def test_streamed_memory_does_not_grow_with_clip_length(inputs):
    size = 32  # small frames: the warp's cost is per frame, the memory per chunk
    engine, source, points = _warp_engine(size, inputs)
    _stream_peak(engine, source, points, 10)  # first-call imports and caches out of the measurement
    short = _stream_peak(engine, source, points, 200)
    long = _stream_peak(engine, source, points, 1000)
    whole_clip = 1000 * size * size * 3  # bytes of the 1000 output frames alone (animate holds twice that)
    assert long < 1.1 * short + 2**16, (short, long)
    assert long < whole_clip / 2, (long, whole_clip)


def test_cli_rejects_unknown_variants_and_precisions(capsys):
    assert cli(["bench", "--variants", "fomm-awp,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli(["bench", "--variants", "warp", "--precisions", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err


def test_training_free_bench_times_any_face_and_clip(tmp_path, capsys):
    """`bench --training-free --source --driving --frames`: the generators end to end on the given face and clip
    (here the app's bundled example), side by side with the warp, their sizes named."""
    examples = REPO / "examples"
    report = tmp_path / "report.json"
    assert cli(["bench", "--training-free", "--source", str(examples / "astronaut.png"), "--driving",
                str(examples / "brow_raise.mp4"), "--frames", "6", "--repeats", "1", "--window", "0",
                "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "brow_raise.mp4 (12 frames of 256 x 256) driving astronaut.png (224 x 224)" in out
    assert "for at least 0 s" in out and json.loads(report.read_text())["window_s"] == 0
    rows = {row["variant"]: row for row in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"dense", "dense-geometry", "warp"} and json.loads(report.read_text())["frames"] == 6
    assert rows["warp"]["speedup_vs"]["warp"] == 1.0 and all(r["ms_per_frame"]["total"] > 0 for r in rows.values())
    low, high = rows["dense"]["speedup_range"]  # each repeat's ratio, around their median
    assert 0 < low <= rows["dense"]["speedup_vs"]["warp"] <= high and "(range over repeats)" in out


def test_training_free_bench_takes_a_data_folders_first_clip_of_any_kind(tmp_path, capsys):
    """`--data`: the first clip of driving/ (a video here; it took only GIFs and fell back to a synthetic face)
    and the first face of faces/ (a folder holding one image, as MEGC's), found as `generate` finds them."""
    examples = REPO / "examples"
    (tmp_path / "driving").mkdir()
    (tmp_path / "faces" / "normalized_astronaut").mkdir(parents=True)
    (tmp_path / "driving" / "brow_raise.mp4").write_bytes((examples / "brow_raise.mp4").read_bytes())
    (tmp_path / "faces" / "normalized_astronaut" / "face.png").write_bytes((examples / "astronaut.png").read_bytes())
    assert cli(["bench", "--training-free", "--variants", "dense", "--data", str(tmp_path), "--frames", "4",
                "--repeats", "1", "--window", "0"]) == 0
    assert "brow_raise.mp4 (12 frames of 256 x 256) driving face.png (224 x 224)" in capsys.readouterr().out
    (tmp_path / "driving" / "brow_raise.mp4").unlink()  # a folder with no clip: said, not replaced
    assert cli(["bench", "--training-free", "--variants", "dense", "--data", str(tmp_path)]) == 2
    assert "no clips under" in capsys.readouterr().err


def test_training_free_bench_times_each_variant_over_the_same_stretch(monkeypatch):
    """In a repeat every variant animates the clip until `window` seconds have passed (the fast one several
    times, the slow one at least once) and its times are the means of its runs."""
    calls: dict[str, list[float]] = {}
    animate = Engine.animate

    def counted(self, *args, variant="dense", **kwargs):
        result = animate(self, *args, variant=variant, **kwargs)
        calls.setdefault(variant, []).append(result.timings["total_s"])
        return result

    monkeypatch.setattr(Engine, "animate", counted)
    examples = REPO / "examples"
    report = bench.training_free(["dense"], frames=4, repeats=1, window=1.0, source=examples / "astronaut.png",
                                 driving=examples / "brow_raise.mp4")
    runs = {variant: times[1:] for variant, times in calls.items()}  # (the first call of each: its warm-up)
    assert set(runs) == {"dense", "warp"} and len(runs["warp"]) >= 1 and len(runs["dense"]) > 1
    for row in report["rows"]:
        assert row["ms_per_frame"]["total"] == pytest.approx(1000 * np.mean(runs[row["variant"]]) / 4)
    for times in runs.values():  # each stopped once its runs had filled the window
        assert sum(times[:-1]) < 1.0


def test_channels_last_fast_path_equals_contiguous(inputs):
    """The memory format is a speed choice only: NHWC and NCHW engines give the same frames."""
    spec = get_variant("fomm-awp")
    torch.manual_seed(0)
    model = build_model(fixture_config("fomm_awp"))
    frames = {}
    for channels_last in (True, False):
        engine = Engine(device="cpu", channels_last=channels_last)
        assert engine.memory_format == (torch.channels_last if channels_last else torch.contiguous_format)
        served = engine.use_model(spec.id, model)
        frames[channels_last], _ = bench.fast_path(engine, spec, served, inputs, 2, adapt_scale=False)
    torch.testing.assert_close(frames[True], frames[False], atol=1e-5, rtol=0)

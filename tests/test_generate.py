"""Dataset generation: pairs files and the MEGC layout, failures recorded, resume, atomic writes, sharding."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, REPO, require
from mefacial import generate as gen
from mefacial.video import read_clip, write_video

NUM_FRAMES = 8  # frames kept of each shared clip: enough for the landmark smoother, quick on a CPU


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    """Short real clips (GIFs, label-prefixed names, one as a folder of frames) and the shared face."""
    data = require(DATA, "micro-expression clips")
    root = tmp_path_factory.mktemp("material")
    clips = root / "clips"
    clips.mkdir()
    names = []
    for i, gif in enumerate(sorted((data / "driving").glob("*.gif"))[:2]):
        clip = read_clip(gif)
        names.append(f"Positive_{gif.stem}" if i == 0 else gif.stem)
        write_video(clips / f"{names[-1]}.gif", clip.frames[:NUM_FRAMES], clip.fps)
    face = next((data / "faces").glob("*.png"))
    return {"root": root, "clips": clips, "names": names, "face": face}


def write_csv(path: Path, rows: list[list[str]], header=("source", "driving", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_pairs_resolves_relative_paths_labels_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    pairs_csv = write_csv(tmp_path / "pairs.csv", [
        ["faces/normalized_asianFemale.png", "a/Positive_022_3_3.gif", "positive"],
        ["/abs/face2.jpg", "a/Positive_022_3_3.gif", "positive"],
        ["faces/normalized_asianFemale.png", "b/Positive_022_3_3.gif", "positive"],  # same stem, other folder
        ["faces/normalized_asianFemale.png", "a/Positive_022_3_3.gif", "positive"],  # exact repeat: dropped
        ["faces/normalized_asianFemale.png", "", "negative"],  # unusable row: kept as a failure
        ["", "", ""],  # blank line: ignored
    ])
    pairs = gen.read_pairs(pairs_csv)
    assert [p.row for p in pairs] == [1, 2, 3, 5]
    assert pairs[0].source == str(tmp_path / "faces" / "normalized_asianFemale.png")
    assert pairs[0].driving == str(tmp_path / "a" / "Positive_022_3_3.gif")
    assert pairs[0].name == "a_022_3_3-normalized_asianFemale"  # label prefix stripped, folder added on a clash
    assert pairs[1].name == "a_022_3_3-face2"
    assert pairs[2].name == "b_022_3_3-normalized_asianFemale"
    assert pairs[0].output("warp") == "warp/positive/a_022_3_3-normalized_asianFemale.mp4"
    assert pairs[3].error and "no driving" in pairs[3].error and pairs[3].label == "negative"
    assert len({p.key("warp") for p in pairs}) == len(pairs)


def test_read_pairs_needs_the_columns(tmp_path):
    with pytest.raises(gen.InputError, match="source.*driving"):
        gen.read_pairs(write_csv(tmp_path / "bad.csv", [["x", "y"]], header=("face", "clip")))
    with pytest.raises(gen.InputError, match="does not exist"):
        gen.read_pairs(tmp_path / "missing.csv")


def test_megc_layout_pairs_every_face_with_every_clip(tmp_path, material):
    faces, clips = tmp_path / "faces", tmp_path / "clips"
    (faces / "normalized_asianFemale").mkdir(parents=True)  # MEGC 2021: a folder holding one face image
    os.symlink(material["face"], faces / "normalized_asianFemale" / "normalized_asianFemale_gray.png")
    os.symlink(material["face"], faces / "normalized_westernMale.png")
    (clips / "SAMM").mkdir(parents=True)
    os.symlink(material["clips"] / f"{material['names'][0]}.gif", clips / "SAMM" / "Positive_022_3_3.gif")
    frames = clips / "CASME2" / "Surprise_EP01_13"  # a folder of frames
    frames.mkdir(parents=True)
    for i, frame in enumerate(read_clip(material["clips"] / f"{material['names'][1]}.gif").frames[:3]):
        _png(frames / f"img{i + 1}.png", frame)
    (clips / "negative").mkdir()
    os.symlink(material["clips"] / f"{material['names'][1]}.gif", clips / "negative" / "s11_ne_02.gif")

    pairs = gen.megc_pairs(faces, clips)
    outputs = sorted(p.output("fomm-awp", "gif") for p in pairs)
    assert outputs == sorted(f"fomm-awp/{label}/{clip}-{face}.gif"
                             for label, clip in [("positive", "022_3_3"), ("surprise", "EP01_13"),
                                                 ("negative", "s11_ne_02")]
                             for face in ["normalized_asianFemale", "normalized_westernMale"])
    folder_face = next(p for p in pairs if p.name.endswith("normalized_asianFemale"))
    assert folder_face.source.endswith("normalized_asianFemale_gray.png")
    # the CSV recipe: written pairs read back to the same outputs
    again = gen.read_pairs(gen.write_pairs(pairs, tmp_path / "megc.csv"))
    assert sorted(p.output("fomm-awp", "gif") for p in again) == outputs


def test_one_face_and_one_clip_stand_for_their_folders(tmp_path, material):
    """`--megc FACE CLIP` and `evaluate --faces FACE --clips CLIP` take single files (and a folder of one clip's
    frames) as well as folders of them; anything else names what it wanted."""
    clip = material["clips"] / f"{material['names'][0]}.gif"
    pairs = gen.megc_pairs(material["face"], clip)
    assert [(p.source, p.driving) for p in pairs] == [(str(Path(material["face"]).absolute()), str(clip.absolute()))]
    frames = tmp_path / "EP01_13"
    frames.mkdir()
    for i, frame in enumerate(read_clip(clip).frames[:3]):
        _png(frames / f"img{i + 1}.png", frame)
    assert gen.find_clips(frames) == [frames]
    with pytest.raises(gen.InputError, match="is not a clip"):
        gen.find_clips(frames / "img1.png")
    with pytest.raises(gen.InputError, match="is not a face image"):
        gen.find_faces(clip)
    with pytest.raises(gen.InputError, match="does not exist"):
        gen.find_faces(tmp_path / "nowhere")


def _png(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(frame).save(path)


def test_names_stay_short_where_two_files_share_a_stem():
    assert gen.unique_names(["/data/qa/clip.gif", "/data/qa/clip.mp4"]) == {"/data/qa/clip.gif": "clip_gif",
                                                                            "/data/qa/clip.mp4": "clip_mp4"}
    assert gen.unique_names(["/d/sub01/EP02.mp4", "/d/sub02/EP02.mp4", "/d/x.mp4"]) == {
        "/d/sub01/EP02.mp4": "sub01_EP02", "/d/sub02/EP02.mp4": "sub02_EP02", "/d/x.mp4": "x"}


def test_a_run_where_every_pair_fails_exits_with_status_1(tmp_path, capsys):
    from mefacial.__main__ import main

    pairs = write_csv(tmp_path / "pairs.csv", [[str(tmp_path / "no-face.png"), str(tmp_path / "no-clip.gif"), ""]])
    assert main(["generate", "--pairs", str(pairs), "--variants", "warp", "--out", str(tmp_path / "gen"),
                 "--device", "cpu"]) == 1
    assert "nothing was generated" in capsys.readouterr().err


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_item_once(world):
    items = list(range(23))
    shards = [gen.Ranks(rank, world).shard(items) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---- generation on real clips, with the training-free `warp` variant -------------------------------

VARIANT = "warp"


@pytest.fixture(scope="module")
def engine():
    from mefacial import Engine

    return Engine(device="cpu", landmarks="dlib")


@pytest.fixture(scope="module")
def pairs_csv(material) -> Path:
    root, face = material["root"], material["face"]
    a, b = material["names"]
    return write_csv(root / "pairs.csv", [
        [str(face), f"clips/{a}.gif", "positive"],
        [str(face), f"clips/{b}.gif", ""],
        [str(face), "clips/missing.gif", "positive"],  # bad row: the clip does not exist
        [str(face), "", "positive"],  # bad row: no clip given
    ])


def manifest(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in gen.read_jsonl(out / gen.MANIFEST)}


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def run_in_process(pairs_csv: Path, out: Path, engine, **settings) -> gen.Summary:
    pairs = gen.read_pairs(pairs_csv)
    summary = gen.generate(pairs, [VARIANT], out, engine, gen.Settings(landmarks="dlib", **settings))
    gen.merge_manifest(out)
    return summary


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, pairs_csv, engine) -> tuple[Path, gen.Summary]:
    """The pairs generated once in this process (other tests work on copies)."""
    out = tmp_path_factory.mktemp("single") / "out"
    return out, run_in_process(pairs_csv, out, engine)


def copy_of(single_run, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(single_run[0], tmp_path / "out"))


@pytest.mark.slow
def test_bad_rows_are_recorded_and_the_run_goes_on(single_run, material):
    out, summary = single_run
    assert (summary.ok, summary.failed, summary.skipped) == (2, 2, 0)
    records = manifest(out)
    a, b = material["names"]
    face = material["face"].stem
    ok = {k for k, r in records.items() if r["status"] == "ok"}
    assert ok == {f"{VARIANT}/positive/{a.removeprefix('Positive_')}-{face}", f"{VARIANT}/unlabelled/{b}-{face}"}
    for key in ok:
        record = records[key]
        video = read_clip(out / record["output"])
        assert video.num_frames == record["frames"] == NUM_FRAMES
        assert record["settings"]["motion"] == "relative" and record["timings"]["total_s"] > 0
        assert record["weights"] == {"path": None, "source": "none", "sha256": None,
                                     "description": "none (training-free)"}
        assert record["landmarks"] == "dlib" and record["rank"] == 0
    failed = {r["row"]: r for r in records.values() if r["status"] == "error"}
    assert set(failed) == {3, 4}
    assert "missing.gif" in failed[3]["error"] and failed[3]["error_type"] == "UnreadableVideoError"
    assert "no driving" in failed[4]["error"]
    assert files(out) == {gen.MANIFEST} | {records[k]["output"] for k in ok}  # no parts, no partial files left


@pytest.mark.slow
def test_second_run_skips_finished_pairs(single_run, tmp_path, pairs_csv, engine, monkeypatch):
    out = copy_of(single_run, tmp_path)
    first = manifest(out)
    calls = []
    prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: calls.append(a[1]) or prepare(*a, **k))

    summary = run_in_process(pairs_csv, out, engine)
    assert (summary.ok, summary.failed, summary.skipped) == (0, 2, 2)
    assert [Path(c).name for c in calls] == ["missing.gif"]  # only the failed row with a clip is tried again
    again = manifest(out)
    assert {k: r["finished"] for k, r in again.items() if r["status"] == "ok"} == \
           {k: r["finished"] for k, r in first.items() if r["status"] == "ok"}

    # a done pair whose video is gone is made again, and so is everything under other settings
    gone = next(r for r in again.values() if r["status"] == "ok")
    (out / gone["output"]).unlink()
    calls.clear()
    assert run_in_process(pairs_csv, out, engine).ok == 1 and len(calls) == 2
    calls.clear()
    assert run_in_process(pairs_csv, out, engine, magnify=2.0).ok == 2 and len(calls) == 3
    assert {r["settings"]["magnify"] for r in manifest(out).values() if r["status"] == "ok"} == {2.0}


@pytest.mark.slow
def test_variants_of_a_pair_share_its_preparation(material, engine, tmp_path, monkeypatch):
    """A pair is read, cut and tracked once for all its variants (dense and dense-geometry share the meshes),
    and each variant's video is what `Engine.animate` makes of the pair."""
    pairs = gen.read_pairs(write_csv(tmp_path / "pairs.csv", [
        [str(material["face"]), str(material["clips"] / f"{name}.gif"), ""] for name in material["names"]]))
    variants = ["dense", "dense-geometry"]
    calls = []
    prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: calls.append(a[1]) or prepare(*a, **k))
    summary = gen.generate(pairs, variants, tmp_path / "out", engine, gen.Settings(landmarks="dlib"))
    assert (summary.ok, summary.failed) == (4, 0)
    assert sorted(calls) == sorted(pair.driving for pair in pairs)  # once per pair
    monkeypatch.undo()
    for pair in pairs:
        for variant in variants:
            made = read_clip(tmp_path / "out" / pair.output(variant)).frames
            result = engine.animate(pair.source, pair.driving, variant=variant,
                                    options=gen.Settings(landmarks="dlib").animate_options())
            alone = read_clip(write_video(tmp_path / "alone.mp4", result.frames, result.fps)).frames
            assert np.array_equal(made, alone), (pair.name, variant)


@pytest.mark.slow
def test_a_killed_write_is_never_counted_as_done(single_run, tmp_path, pairs_csv, engine, monkeypatch):
    """A write that dies half-way leaves nothing at the output path; a cut manifest line is ignored."""
    out = copy_of(single_run, tmp_path)
    pending = next(r for r in manifest(out).values() if r["status"] == "ok")
    (out / pending["output"]).unlink()

    def dying_write(writer, frames):
        writer.partial.write_bytes(b"half a video")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr("mefacial.video.VideoWriter.write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(gen.read_pairs(pairs_csv), [VARIANT], out, engine, gen.Settings(landmarks="dlib"))
    assert not (out / pending["output"]).exists()  # nothing half-written in the dataset tree
    with open(gen.part_path(out, 0), "a") as f:
        f.write('{"key": "cut sho')  # a line cut by the kill
    monkeypatch.undo()
    summary = run_in_process(pairs_csv, out, engine)
    assert (summary.ok, summary.failed, summary.skipped) == (1, 2, 1)
    assert read_clip(out / pending["output"]).num_frames == NUM_FRAMES
    assert len(manifest(out)) == 4


@pytest.mark.slow
def test_two_ranks_under_torchrun_make_the_single_process_output(single_run, tmp_path, pairs_csv):
    """torchrun with 2 CPU ranks (gloo): the same files and manifest entries, split over both ranks."""
    out = tmp_path / "sharded"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mefacial", "generate", "--pairs", str(pairs_csv), "--variants", VARIANT, "--out", str(out),
               "--device", "cpu", "--landmarks", "dlib"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single, sharded = manifest(single_run[0]), manifest(out)
    assert files(out) == files(single_run[0])
    assert {k: (r["status"], r["output"], r["settings_id"]) for k, r in sharded.items()} == \
           {k: (r["status"], r["output"], r["settings_id"]) for k, r in single.items()}
    assert {r["rank"] for r in sharded.values()} == {0, 1} and {r["world"] for r in sharded.values()} == {2}
    for record in (r for r in sharded.values() if r["status"] == "ok"):
        a, b = read_clip(out / record["output"]).frames, read_clip(single_run[0] / record["output"]).frames
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
    # a run with another number of ranks (here one, without torchrun) finds the finished pairs done
    single_command = [sys.executable, *command[command.index("-m", 3):]]
    again = subprocess.run(single_command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "0 generated, 2 failed, 2 already done" in again.stdout, again.stderr[-3000:]
    assert {k: r["finished"] for k, r in manifest(out).items() if r["status"] == "ok"} == \
           {k: r["finished"] for k, r in sharded.items() if r["status"] == "ok"}

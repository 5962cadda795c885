"""Faults: processes killed at random points and downloads cut midway leave nothing that breaks the next run.

- Training: a tiny run (checkpoint every step) is SIGKILLed several times, some kills
  timed to land inside a checkpoint write; after each kill `last.pth.tar` loads with
  the trainer's own loader as a complete, resumable checkpoint, and resuming through
  every kill ends at the target step with the losses of an uninterrupted run.
- Hub downloads (tests/hub_server.py cutting the connection or stalling): what
  huggingface_hub does on its own (restart, or resume with Range), a download that
  keeps failing (a clear error, nothing cached, the next call completes), and a
  download killed midway (the partial file is never taken for the weights).
- Generation: `python -m mefacial generate` killed after its first finished pair,
  then run again: the remaining pairs are made, the finished ones are not redone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import DATA, REPO, require
from hub_server import FakeHub
from test_checkpoints import PARTS, VARIANT, Tiny, hub_entry, isolated, tiny_checkpoint, use_registry  # noqa: F401 (a fixture)
from test_checkpoints import REPO as HUB_REPO

from mefacial import checkpoints as ck
from mefacial import generate as gen
from mefacial.errors import WeightsNotFoundError
from mefacial.models import build_model
from mefacial.video import read_clip, write_video
import train
from train import checkpointing
from train.config import load_train_config
from train.monitor import read_jsonl

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # processes killed midway, downloads


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this repository importable, one thread (2 cores are shared)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL `proc` (if still running) and reap it; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)


def wait_for(condition, proc: subprocess.Popen | None, timeout: float, interval: float = 0.0002) -> bool:
    """Poll `condition()` until true; False when `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(condition())
        time.sleep(interval)
    return False


# ---- 1. training killed at random points, some inside a checkpoint write -----------------------------

TARGET_STEPS = 16  # more than the kills can reach: each lets a run train a few steps at most
KILL_MODES = ["startup", "step", "step", "save", "save", "save"]  # shuffled with a fixed seed


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A prior-free tiny FOMM config (no landmarks to detect) saving every step, and the shared clips as data."""
    clips = sorted(require(DATA / "driving", "micro-expression clips").glob("*.gif"))
    root = tmp_path_factory.mktemp("faults-train")
    (root / "data" / "train").mkdir(parents=True)
    for clip in clips:
        (root / "data" / "train" / clip.name).symlink_to(clip)
    config = yaml.safe_load((REPO / "mefacial" / "configs" / "train" / "tiny-fomm-awp.yaml").read_text())
    config.update(name="tiny-fomm-none", variant="fomm-none", model="fomm-vox256")
    config["model_overrides"]["name"] = "tiny-fomm-none"
    config["dataset"]["num_repeats"] = 4
    config["runtime"].update(checkpoint_every=1, visualize_every=0, log_every=1)
    path = root / "tiny-fomm-none.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, root / "data"


def train_args(config: Path, data: Path, out: Path) -> list[str]:
    """`python -m train` arguments to train to TARGET_STEPS, resuming from `last` when there is one."""
    args = ["--config", str(config), "--data", str(data), "--out", str(out), "--max-steps", str(TARGET_STEPS)]
    if (out / checkpointing.LAST).is_file():
        args += ["--resume", str(out / checkpointing.LAST)]
    return args


def train_command(config: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "train", *train_args(config, data, out)]


def logged_steps(out: Path) -> int:
    try:
        return (out / "losses.jsonl").read_text(encoding="utf-8").count("\n")
    except FileNotFoundError:
        return 0


def save_activity(out: Path, pid: int, before: tuple | None):
    """A condition: this process is writing a checkpoint (its temporary file exists, or `last` changed)."""
    prefixes = (f".{checkpointing.LAST}.", f".{checkpointing.BEST}.")

    def active() -> bool:
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            return False
        if any(n.startswith(prefixes) and n.endswith(f".{pid}.tmp") for n in names):
            return True
        return file_id(out / checkpointing.LAST) != before

    return active


def file_id(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def check_checkpoint(path: Path, cfg, previous_step: int) -> int:
    """`path` loads with the trainer's loader (weights_only) as a complete, resumable checkpoint; its step."""
    checkpoint = checkpointing.read_checkpoint(path)
    checkpointing.check_resumable(checkpoint, path, cfg.model.to_dict(), cfg.stage)
    model = build_model(cfg.model, for_training=True)
    loaded = checkpointing.load_parts(model, checkpoint, parts=("generator", "kp_detector", "discriminator"))
    assert loaded == ["generator", "kp_detector", "discriminator"]
    assert set(checkpoint["optimizers"]) == {"generator", "kp_detector", "discriminator"}
    assert {"python", "numpy", "torch"} <= set(checkpoint["rng"])
    step = checkpoint["step"]
    assert previous_step <= step <= TARGET_STEPS, f"{path}: step {step} after step {previous_step}"
    return step


@pytest.mark.slow
def test_training_killed_at_random_points_and_mid_save_resumes_to_the_end(train_setup, tmp_path):
    config, data = train_setup
    cfg = load_train_config(config)
    out = tmp_path / "killed"
    rng = random.Random(20240610)
    modes = KILL_MODES[:]
    rng.shuffle(modes)
    step, mid_save, unreadable_tmp, report = 0, 0, 0, []
    log = tmp_path / "stderr.txt"
    for mode in modes:
        before_last, before_config = file_id(out / checkpointing.LAST), file_id(out / "config.json")
        after_step = max(logged_steps(out), step) + rng.randint(0, 1)
        delay = rng.uniform(0.2, 3.0) if mode == "startup" else rng.uniform(0.0, 0.2 if mode == "step" else 0.002)
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(train_command(config, data, out), env=child_env(), cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            if mode == "startup":  # anywhere in imports, data loading, model building (until training starts)
                wait_for(lambda c=before_config: file_id(out / "config.json") != c, proc, delay, 0.01)
            elif mode == "step":  # anywhere in a training step or the save after it
                wait_for(lambda n=after_step: logged_steps(out) > n, proc, 120, 0.01)
                time.sleep(delay)
            else:  # as soon as a checkpoint write starts (fast polling once training starts), plus up to 2 ms
                wait_for(lambda c=before_config: file_id(out / "config.json") != c, proc, 120, 0.01)
                wait_for(save_activity(out, proc.pid, before_last), proc, 120)
                time.sleep(delay)
        finally:
            code = kill(proc)
        assert code == -signal.SIGKILL, f"the run ended before the {mode} kill (exit {code}):\n{log.read_text()[-3000:]}"
        left = sorted(n for n in os.listdir(out) if n.endswith(f".{proc.pid}.tmp")) if out.is_dir() else []
        if left:
            mid_save += 1
            try:  # informative only: a kill after the write and before the rename leaves a complete file
                checkpointing.read_checkpoint(out / left[0])
            except Exception:  # noqa: BLE001
                unreadable_tmp += 1
        if (out / checkpointing.LAST).is_file():
            step = check_checkpoint(out / checkpointing.LAST, cfg, step)
        if (out / checkpointing.BEST).is_file():
            check_checkpoint(out / checkpointing.BEST, cfg, 0)
        report.append(f"{mode}: step {step}{' mid-save' if left else ''}")
    print(f"\n{len(modes)} kills, {mid_save} landed inside a checkpoint write ({unreadable_tmp} left an unreadable "
          f"temporary file): {'; '.join(report)}")
    assert mid_save >= 1, f"no kill landed inside a checkpoint write: {report}"
    assert step < TARGET_STEPS

    # a killed write's temporary file (the last kill's, if it landed mid-save) is removed by the next run
    done = subprocess.run(train_command(config, data, out), check=False, env=child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], "stale temporary files were left in the run folder"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == TARGET_STEPS
    assert check_checkpoint(out / checkpointing.LAST, cfg, step) == TARGET_STEPS

    # Every step logged once, with the losses of a run never killed (exact resume through every kill),
    # here in this process with one thread as the children.
    straight = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(train_args(config, data, straight)) == 0
    finally:
        torch.set_num_threads(threads)
    killed_log, straight_log = read_jsonl(out / "losses.jsonl"), read_jsonl(straight / "losses.jsonl")
    assert [e["step"] for e in killed_log] == list(range(1, TARGET_STEPS + 1))
    assert killed_log == straight_log
    a = torch.load(out / checkpointing.LAST, weights_only=True)
    b = torch.load(straight / checkpointing.LAST, weights_only=True)
    for part in ("generator", "kp_detector", "discriminator"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


# ---- 2. Hub downloads cut midway ----------------------------------------------------------------------

FILENAME = "weights/tiny.pth.tar"
CHUNK = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE  # what the client writes to disk at a time


class HubPlace:
    """An isolated HF cache and registry (test_checkpoints' `isolated`) and a FakeHub started on demand."""

    def __init__(self, folder: Path, monkeypatch):
        self.folder, self.monkeypatch, self.servers = folder, monkeypatch, []

    def start(self, data: bytes, lfs: bool, ranges: bool = True, sha256: bool = False) -> FakeHub:
        """Serve `data` as FILENAME (ranges honoured or not) at HF_ENDPOINT, registered as VARIANT (test_checkpoints)."""
        server = FakeHub(ranges=ranges).start()
        self.servers.append(server)
        self.monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        server.add_file(HUB_REPO, FILENAME, data, lfs=lfs)
        entry = hub_entry(FILENAME, sha256=hashlib.sha256(data).hexdigest() if sha256 else None)
        use_registry(self.folder, self.monkeypatch, {VARIANT: entry})
        return server

    def leftovers(self) -> list[Path]:
        """Partial downloads in the HF cache."""
        return sorted((self.folder / "hf" / "hub").rglob("*.incomplete"))


@pytest.fixture
def place(isolated, monkeypatch):  # noqa: F811 (the fixture imported from test_checkpoints)
    place = HubPlace(isolated, monkeypatch)
    yield place
    for server in place.servers:
        server.stop()


def weights_bytes(tmp_path: Path, big: bool) -> bytes:
    """A loadable checkpoint; `big` pads it past one client chunk (a big tensor in a part not loaded)."""
    checkpoint = tiny_checkpoint(0)
    if big:
        checkpoint["discriminator"] = {"padding": torch.randn(CHUNK // 4 + 300_000, generator=torch.Generator().manual_seed(0))}
    path = tmp_path / f"served-{big}.pth.tar"
    torch.save(checkpoint, path)
    data = path.read_bytes()
    assert not big or len(data) > CHUNK + 1_000_000
    return data


def body_requests(hub: FakeHub) -> list:
    """The GETs that answered with the file's bytes (the resolve URL, or the "CDN" for LFS files)."""
    return [r for r in hub.requests if r.method == "GET" and r.status in (200, 206)]


def assert_served_file(path: Path, data: bytes) -> None:
    """The resolved file is the served one, whole, and loads as the weights."""
    assert not path.name.endswith(".incomplete")
    assert ck.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert ck.load_weights(Tiny(), path, PARTS) == {"epoch": 7}


@pytest.mark.parametrize("lfs", [False, True], ids=["git-file", "lfs-via-cdn"])
def test_cut_download_is_restarted_by_the_client(place, lfs):
    """Under one chunk, a cut loses the partial bytes: the client starts again from byte 0, within the same call."""
    data = weights_bytes(place.folder, big=False)
    hub = place.start(data, lfs, sha256=True)
    hub.cut(FILENAME, after=len(data) // 2, times=2)
    resolved = ck.resolve_checkpoint(VARIANT, progress=False)
    assert resolved.source == "hub"
    assert_served_file(resolved.path, data)
    gets = body_requests(hub)
    assert [(r.sent, r.range) for r in gets] == [(len(data) // 2, None)] * 2 + [(len(data), None)]
    assert any(r.path.startswith("/cdn/") for r in gets) == lfs
    assert place.leftovers() == []


@pytest.mark.parametrize("ranges", [True, False], ids=["range-honoured", "range-ignored"])
@pytest.mark.parametrize("lfs", [False, True], ids=["git-file", "lfs-via-cdn"])
def test_cut_download_past_a_chunk_resumes_with_range(place, lfs, ranges):
    """Past one chunk, the client asks for the rest with Range; a server that ignores it sends the whole
    file again (200) and the client starts over: either way the file is whole."""
    data = weights_bytes(place.folder, big=True)
    hub = place.start(data, lfs, ranges=ranges)
    hub.cut(FILENAME, after=CHUNK + 500_000, times=1)
    resolved = ck.resolve_checkpoint(VARIANT, progress=False)
    assert_served_file(resolved.path, data)
    gets = body_requests(hub)
    assert [(r.status, r.range, r.sent) for r in gets] == [
        (200, None, CHUNK + 500_000),
        (206, f"bytes={CHUNK}-", len(data) - CHUNK) if ranges else (200, f"bytes={CHUNK}-", len(data))]
    assert place.leftovers() == []


@pytest.mark.parametrize("lfs", [False, True], ids=["git-file", "lfs-via-cdn"])
def test_download_that_keeps_failing_is_an_error_and_the_next_call_completes(place, lfs):
    data = weights_bytes(place.folder, big=False)
    hub = place.start(data, lfs)
    hub.cut(FILENAME, after=len(data) // 2, times=100)
    with pytest.raises(WeightsNotFoundError) as info:
        ck.resolve_checkpoint(VARIANT, progress=False)
    message = str(info.value)
    assert "the download failed" in message and FILENAME in message and "RemoteProtocolError" in message, message
    assert "cut during the download" in message and "retry" in message, message
    tries = len(body_requests(hub))
    assert tries > 1  # huggingface_hub retried on its own before giving up
    # nothing of the cut download is in the cache, so nothing partial can be taken for the weights
    assert place.leftovers() == [] and not list((place.folder / "hf" / "hub").rglob("blobs/*"))
    with pytest.raises(WeightsNotFoundError, match="not cached"):
        ck.resolve_checkpoint(VARIANT, offline=True)

    hub.faults.clear()  # the connection is back
    resolved = ck.resolve_checkpoint(VARIANT, progress=False)
    assert resolved.source == "hub" and len(body_requests(hub)) == tries + 1
    assert_served_file(resolved.path, data)
    print(f"\n{'lfs' if lfs else 'git'} file: {tries} cut attempts in the failing call, then one whole download")


RESOLVE_SCRIPT = f"from mefacial.checkpoints import resolve_checkpoint; print(resolve_checkpoint({VARIANT!r}, progress=False).path)"


@pytest.mark.slow
@pytest.mark.parametrize("lfs", [False, True], ids=["git-file", "lfs-via-cdn"])
def test_download_killed_midway_leaves_nothing_taken_for_the_weights(place, lfs):
    """A process killed with one chunk on disk: its partial file stays in the cache but is never used;
    the next call downloads the whole file (the killed process's lock does not block it)."""
    data = weights_bytes(place.folder, big=True)
    hub = place.start(data, lfs, sha256=True)
    hub.cut(FILENAME, after=CHUNK + 500_000, times=1, hold=True)
    proc = subprocess.Popen([sys.executable, "-c", RESOLVE_SCRIPT], env=child_env(), cwd=place.folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(timeout=120), "the download never started"
        assert wait_for(lambda: [p.stat().st_size for p in place.leftovers()] == [CHUNK], proc, 60, 0.01)
    finally:
        code = kill(proc)
    assert code == -signal.SIGKILL
    partial = place.leftovers()
    assert [p.stat().st_size for p in partial] == [CHUNK]  # killed midway: one chunk of the file on disk
    assert ck.cached_hub_file(ck.get_spec(VARIANT).sources[0]) is None
    with pytest.raises(WeightsNotFoundError, match="not cached"):
        ck.resolve_checkpoint(VARIANT, offline=True)

    hub.release()
    resolved = ck.resolve_checkpoint(VARIANT, progress=False)
    assert resolved.source == "hub" and resolved.sha256 == hashlib.sha256(data).hexdigest()
    assert_served_file(resolved.path, data)
    assert resolved.path.resolve() not in {p.resolve() for p in partial}
    assert ck.resolve_checkpoint(VARIANT, offline=True).source == "hf-cache"


# ---- 3. generation killed after its first finished pair, then run again -----------------------------

NUM_FRAMES = 8  # frames kept of each shared clip


@pytest.fixture(scope="module")
def gen_pairs(tmp_path_factory) -> tuple[Path, int]:
    """A pairs file of 2 shared clips (8 frames each) x 2 faces (the shared one, the bundled example)."""
    data = require(DATA, "micro-expression clips")
    root = tmp_path_factory.mktemp("faults-generate")
    (root / "clips").mkdir()
    rows = []
    faces = [next((data / "faces").glob("*.png")), REPO / "examples" / "astronaut.png"]
    for gif in sorted((data / "driving").glob("*.gif"))[:2]:
        clip = read_clip(gif)
        write_video(root / "clips" / gif.name, clip.frames[:NUM_FRAMES], clip.fps)
        rows += [[str(face), f"clips/{gif.name}", "positive"] for face in faces]
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "driving", "label"])
        writer.writerows(rows)
    return root / "pairs.csv", len(rows)


def partial_files(out: Path) -> list[Path]:
    folder = out / gen.PARTIAL_DIR
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


@pytest.mark.slow
def test_generation_killed_then_restarted_completes_the_remaining_pairs(gen_pairs, tmp_path):
    pairs_csv, total = gen_pairs
    out = tmp_path / "gen"
    command = [sys.executable, "-m", "mefacial", "generate", "--pairs", str(pairs_csv), "--variants", "warp",
               "--out", str(out), "--device", "cpu", "--landmarks", "dlib"]
    part = gen.part_path(out, 0)

    def finished() -> int:
        return sum(1 for r in gen.read_jsonl(part) if r.get("status") == "ok")

    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, env=child_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert wait_for(lambda: finished() >= 1, proc, 240, 0.005), "no pair finished"
        # then kill inside the next video write when one is seen, else with two pairs left
        wait_for(lambda: bool(partial_files(out)) or finished() >= total - 2, proc, 120, 0.0005)
    finally:
        code = kill(proc)
    assert code == -signal.SIGKILL, f"the run ended before the kill (exit {code}):\n{log.read_text()[-3000:]}"
    first = {r["key"]: r for r in gen.read_jsonl(part) if r.get("status") == "ok"}
    assert 1 <= len(first) < total
    left_partial = partial_files(out)
    before = {k: file_id(out / r["output"]) for k, r in first.items()}
    for record in first.values():  # what the killed run counted as done is whole
        assert read_clip(out / record["output"]).num_frames == NUM_FRAMES

    again = subprocess.run(command, check=False, env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{total - len(first)} generated, 0 failed, {len(first)} already done" in again.stdout, again.stdout

    lines = gen.read_jsonl(out / gen.MANIFEST)
    records = {r["key"]: r for r in lines}
    assert len(lines) == len(records) == total and all(r["status"] == "ok" for r in lines)
    for key, record in first.items():  # skipped, not redone: same record, same file untouched
        assert records[key]["finished"] == record["finished"]
        assert file_id(out / record["output"]) == before[key]
    for record in lines:
        assert read_clip(out / record["output"]).num_frames == NUM_FRAMES
    tree = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert tree == {gen.MANIFEST} | {r["output"] for r in lines}  # no partial video or manifest part left
    print(f"\nkilled after {len(first)} of {total} pairs"
          f"{f', inside a video write ({len(left_partial)} partial file left)' if left_partial else ''}; "
          f"the restart made the other {total - len(first)}")

"""Run `python app.py` in a subprocess on a free loopback port, for the app tests (gradio_client, browser).

The app runs on the CPU with dlib landmarks, offline, with an empty weights folder,
so every learned variant is "missing weights" whatever the machine has.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 180
MAX_FRAMES = 40  # the app's clip limit in the tests (the examples are shorter)
MAX_UPLOAD_MB = 1  # the app's upload limit in the tests (the examples are under 100 KB)
SHARED_FLAGS = ("--max-frames", str(MAX_FRAMES), "--max-upload-mb", str(MAX_UPLOAD_MB), "--queue-size", "8")
_shared: dict[str, str] = {}
APPS: dict[str, "AppProcess"] = {}  # URL -> the running app, for tests that look at its process and folders


@dataclasses.dataclass
class AppProcess:
    """A running app: its process and its private temporary folders."""

    process: subprocess.Popen
    tmp: Path  # TMPDIR of the app: its per-request output folders live under here
    gradio_tmp: Path  # GRADIO_TEMP_DIR: uploads and the files Gradio serves
    log: Path | None = None  # the app's stdout and stderr
    startup_s: float | None = None  # from starting `python app.py` to its first answer

    def rss_mb(self) -> float:
        """Resident memory of the app process (Linux /proc), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc")

    def open_files(self) -> set[str]:
        """Files the app process holds open (Linux /proc); sockets, pipes and devices left out, since
        client connections come and go."""
        folder = Path(f"/proc/{self.process.pid}/fd")
        targets = set()
        for fd in folder.iterdir():
            try:
                targets.add(os.readlink(fd))
            except FileNotFoundError:  # closed meanwhile
                pass
        return {t for t in targets if t.startswith("/") and not t.startswith(("/dev/", "/proc/"))}


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder` (an app's temporary folders)."""
    return [f for f in folder.rglob("*") if f.is_file()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with status {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"app.py did not answer on {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _wait_for_warm_up(process: subprocess.Popen, log: Path) -> None:
    """Until the app logs that its background warm-up is done (or skipped)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if re.search(r"warmed up in|warm-up skipped", log.read_text()):
            return
        time.sleep(0.2)


@contextlib.contextmanager
def running_app(tmp: Path, *flags: str) -> Iterator[str]:
    """Start app.py with `flags`; yield its URL (ending in /); stop it afterwards."""
    port = free_port()
    weights = tmp / "no-weights"
    weights.mkdir(parents=True, exist_ok=True)
    app_tmp, gradio_tmp = tmp / "tmp", tmp / "gradio"
    app_tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MEFACIAL_CHECKPOINT_DIR": str(weights), "HF_HUB_OFFLINE": "1", "TMPDIR": str(app_tmp),
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(gradio_tmp)}
    log = tmp / "app.log"
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--landmarks", "dlib", *flags], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log)
        startup_s = time.monotonic() - started
        _wait_for_warm_up(process, log)  # the page serves before; the tests start from a warm app
        APPS[url] = AppProcess(process, app_tmp, gradio_tmp, log, startup_s)
        yield url
    finally:
        APPS.pop(url, None)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def shared_app(tmp: Path) -> str:
    """One app for all test modules of the session: started on first use, stopped when the session exits."""
    if "url" not in _shared:
        context = running_app(tmp, *SHARED_FLAGS)
        _shared["url"] = context.__enter__()
        atexit.register(context.__exit__, None, None, None)
    return _shared["url"]

"""Soak test: 4 concurrent `gradio_client` users send 50 requests to `python app.py` (loopback only).

The app runs with a queue of 2 waiting requests and one worker, so a fourth user at a busy moment
is turned away: every request must come back either as the right video for the user who sent it
or as Gradio's "queue full" rejection, nothing else. Afterwards the app's resident memory stays
within RSS_BOUND_MB of its value after the first request and stops growing (PLATEAU_MB over the
second half of the run), and once the outputs' maximum age has
passed its per-request folders and Gradio's cached copies are gone; SIGTERM removes the rest.
The figures are printed (run with -s to see them). A request unanswered after STALL_S fails the test with
what the app's threads were doing then (the app writes their stacks on SIGUSR1) and whether it still served
another client, instead of waiting for pytest's timeout.
"""

from __future__ import annotations

import concurrent.futures
import signal
import statistics
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

from app import examples as app_examples
from app_server import APPS, REPO, files_under, running_app
from mefacial.video import read_clip, write_video

pytestmark = pytest.mark.slow

USERS = 4
REQUESTS = 50
QUEUE_SIZE = 2
MAX_AGE_S = 20  # --output-max-age of the app under test
RSS_BOUND_MB = 250  # growth allowed after the first request: allocator caches and concurrent peaks
STALL_S = 180  # a request waits behind 2 others of 4-7 frames (a few seconds): this long is a hang
PLATEAU_MB = 80  # growth allowed over the second half of the run: a per-request leak would keep climbing
FACE = REPO / "examples" / "astronaut.png"
CLIP = REPO / "examples" / "brow_raise.mp4"


def stalled_app(app, url: str, clip: Path) -> str:
    """What a stalled request's app was doing: whether a new client is still served, and its threads' stacks."""
    try:
        Client(url, verbose=False).submit(source=handle_file(FACE), driving=handle_file(clip),
                                          api_name="/generate").result(timeout=60)
        served = "the app still served a new client"
    except Exception as exc:  # noqa: BLE001 - described, not raised: the stall is the failure
        served = f"a new client was not served either ({type(exc).__name__})"
    app.process.send_signal(signal.SIGUSR1)  # the app writes every thread's stack to its log
    time.sleep(2)
    log = app.log.read_text(errors="replace")
    return f"{served}; the end of the app's log, with its threads' stacks:\n{log[-12000:]}"


def test_four_users_fifty_requests(tmp_path):
    clip = read_clip(CLIP)
    clips = {user: write_video(tmp_path / f"user{user}.mp4", clip.frames[: 4 + user], clip.fps)
             for user in range(USERS)}  # user u's clip has 4 + u frames: a mixed-up answer shows
    shares = [REQUESTS // USERS + (user < REQUESTS % USERS) for user in range(USERS)]
    with running_app(tmp_path / "app", "--max-frames", "40", "--max-upload-mb", "1", "--queue-size",
                     str(QUEUE_SIZE), "--output-max-age", str(MAX_AGE_S)) as url:
        app = APPS[url]
        Client(url, verbose=False).predict(source=handle_file(FACE), driving=handle_file(clips[0]),
                                           api_name="/generate")
        rss_first, files_first = app.rss_mb(), app.open_files()
        outcomes: dict[str, int] = {"served": 1, "rejected": 0}
        wrong: list[str] = []
        rss: list[float] = []  # after each answer
        lock = threading.Lock()

        def user(number: int) -> None:
            client = Client(url, verbose=False)
            for _ in range(shares[number] - (number == 0)):  # user 0 already sent the first request
                job = client.submit(source=handle_file(FACE), driving=handle_file(clips[number]), api_name="/generate")
                try:
                    video, _, _, status = job.result(timeout=STALL_S)
                    frames = iio.imread(video).shape[0]
                    outcome = "served" if frames == 4 + number and f"{frames} frames" in status else "wrong"
                    if outcome == "wrong":
                        wrong.append(f"user {number}: {frames} frames, {status}")
                except QueueError:  # Gradio's "Queue is full! Please try again."
                    outcome = "rejected"
                    time.sleep(1.5)  # back off before trying again
                except AppError as exc:
                    outcome = "wrong"
                    wrong.append(f"user {number}: {exc}")
                except concurrent.futures.TimeoutError:
                    wrong.append(f"user {number}: no answer after {STALL_S} s ({job.status().code}); "
                                 + stalled_app(app, url, clips[0]))
                    job.cancel()
                    return  # (this client's later requests would only repeat it)
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    rss.append(app.rss_mb())

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(USERS) as pool:
            for job in [pool.submit(user, n) for n in range(USERS)]:
                job.result(timeout=600)
        elapsed = time.monotonic() - started
        assert not wrong, "\n".join(wrong)
        rss_after, files_after = app.rss_mb(), app.open_files()
        half = statistics.median(rss[len(rss) // 2 - 3:len(rss) // 2 + 3])
        print(f"\nsoak: {REQUESTS} requests from {USERS} users in {elapsed:.0f} s: {outcomes['served']} served, "
              f"{outcomes['rejected']} rejected (queue full); RSS {rss_first:.0f} MiB after the first request, "
              f"{rss_after:.0f} MiB after all (bound +{RSS_BOUND_MB}), {half:.0f} MiB at half-time; "
              f"open files {len(files_first)} -> {len(files_after)}")
        assert outcomes["served"] + outcomes["rejected"] == REQUESTS
        assert outcomes["rejected"] > 0, "no request met a full queue: the test did not load the app"
        assert outcomes["served"] >= REQUESTS // 4
        assert rss_after <= rss_first + RSS_BOUND_MB, f"memory grew by {rss_after - rss_first:.0f} MiB"
        assert rss_after <= half + PLATEAU_MB, f"memory still grew by {rss_after - half:.0f} MiB in the second half"
        assert files_after <= files_first, f"files left open: {files_after - files_first}"

        outputs = list(app.tmp.glob("mefacial-app-*/req-*"))
        cached = files_under(app.gradio_tmp)
        time.sleep(MAX_AGE_S + MAX_AGE_S // 2 + 2)  # past the maximum age and one of Gradio's cleaning rounds
        Client(url, verbose=False).predict(source=handle_file(FACE), driving=handle_file(clips[0]),
                                           api_name="/generate")
        kept_outputs = list(app.tmp.glob("mefacial-app-*/req-*"))
        kept_cache = files_under(app.gradio_tmp)
        print(f"temp: {len(outputs)} request folders and {len(cached)} cached files after the soak; "
              f"{len(kept_outputs)} and {len(kept_cache)} after {MAX_AGE_S} s and one more request")
        assert len(kept_outputs) == 1, "request folders older than the maximum age were kept"
        assert len(kept_cache) < 10, kept_cache  # one request's uploads and outputs
    # the app got SIGTERM: the rest is removed, but for Gradio's copies of the example files
    assert not files_under(app.tmp), files_under(app.tmp)
    examples = {Path(path).name for pair in app_examples() for path in pair}
    left = [f for f in files_under(app.gradio_tmp) if f.name not in examples]
    assert not left, left

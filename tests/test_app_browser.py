"""The demo in a real browser, as a first-time visitor meets it: Playwright drives Debian's headless Chromium
against `python app.py` (CPU, offline, no weights: only the training-free generators can run).

The page opens with the example loaded and Generate works with one click; Compare ticks only what can run;
errors are a short title and at most three plain sentences without flags, shown when a file arrives (upload,
webcam) and leaving no pane in an error state; the Prior slider follows the clip and its gallery shows every
panel. A screenshot of each tab goes to tests/artifacts/ for review. Chromium's fake camera stands in for a
webcam. Skips when /usr/bin/chromium is absent, unless MEFACIAL_REQUIRE_SHARED=1 (then fails).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect, sync_playwright

from app import suggested_slowdown
from app_server import APPS, REPO, shared_app
from mefacial import get_variant, list_variants
from mefacial.errors import is_cli_free
from mefacial.grid import HEADER, TILE
from mefacial.video import read_clip, write_video

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 "--use-fake-ui-for-media-stream",
                 # a test-pattern webcam at 5 fps: a recording of a few seconds stays under the test server's
                 # MAX_FRAMES (at the fake camera's own rate, up to 30 fps, a 2 s recording was "Too large", not
                 # checked for a face, whenever the machine kept up with it)
                 "--use-fake-device-for-media-stream=fps=5"]
ARTIFACTS = REPO / "tests" / "artifacts"
FACE = REPO / "examples" / "astronaut.png"
CLIP = REPO / "examples" / "brow_raise.mp4"
WAIT_MS = 300_000  # a CPU generation under load
TOAST_TEXT = "[data-testid='toast-text']"
# Counts the chunks of video the page's MediaRecorder hands over (every 200 ms in Gradio's recorder).
COUNT_RECORDED_CHUNKS = """() => {
    const Recorder = window.MediaRecorder;
    window.recordedChunks = 0;
    window.MediaRecorder = class extends Recorder {
        constructor(...args) {
            super(...args);
            this.addEventListener('dataavailable', (event) => { if (event.data.size > 0) window.recordedChunks++; });
        }
    };
}"""
# A MediaRecorder whose chunks never reach the page's listeners (stopped before its first chunk).
DROP_RECORDED_CHUNKS = """() => {
    window.MediaRecorder = class extends window.MediaRecorder {
        addEventListener(type, listener, options) {
            if (type !== 'dataavailable') super.addEventListener(type, listener, options);
        }
    };
}"""


def chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    message = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium, or bash scripts/setup-tests.sh)"
    if os.environ.get("MEFACIAL_REQUIRE_SHARED") == "1":
        pytest.fail(message + "; MEFACIAL_REQUIRE_SHARED=1 forbids skipping")
    pytest.skip(message)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> tuple[str, Path]:
    executable = chromium()  # skip before starting anything
    return shared_app(tmp_path_factory.getbasetemp() / "app"), executable


@pytest.fixture(scope="module")
def browser(app_url):
    _, executable = app_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                  permissions=["camera", "clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(app_url[0])
    page.wait_for_selector("#g-button")
    yield page
    context.close()


@pytest.fixture(scope="module")
def clip():
    return read_clip(CLIP)


def upload(page, prefix: str, face: Path, clip: Path | None = None) -> None:
    """Put files into the tab's face and clip inputs and wait until both uploads are shown."""
    page.locator(f"#{prefix}-source input[type=file]").set_input_files(str(face))
    page.locator(f"#{prefix}-source img").first.wait_for(timeout=30_000)
    if clip is not None:
        put_clip(page, prefix, clip)
        expect(page.locator(f"#{prefix}-driving")).to_contain_text(clip.stem, timeout=30_000)


def put_clip(page, prefix: str, clip: Path) -> None:
    """Upload a driving clip, replacing the example the page opened with."""
    driving = page.locator(f"#{prefix}-driving")
    if driving.locator("input[type=file]").count() == 0:
        driving.get_by_role("button", name="Clear").click()
    driving.locator("input[type=file]").set_input_files(str(clip))


def wait_for_video(page, elem_id: str, other_than: str | None = None) -> dict:
    """Wait until the video in #elem_id (one whose src is not `other_than`) has loaded its metadata; return its
    src and duration, read in the same check (Gradio may replace the element in between two calls)."""
    handle = page.wait_for_function(
        f"""(previous) => {{ const v = document.querySelector('#{elem_id} video');
            return v && v.readyState >= 1 && v.duration > 0 && v.currentSrc !== previous
                && {{src: v.currentSrc, duration: v.duration}}; }}""",
        arg=other_than, timeout=WAIT_MS)
    return handle.json_value()


def video_src(page, elem_id: str) -> str | None:
    """The src of the video now in #elem_id, if any."""
    return page.evaluate(f"() => document.querySelector('#{elem_id} video')?.currentSrc ?? null")


def fetch_frames(page, src: str, tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(page.request.get(src).body())
    return iio.imread(path)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1000)  # let the videos show their first frame
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def read_toast(page, title: str) -> str:
    """The HTML of the error message with this short title (waits for it). If it never comes, the failure
    names the toasts the page did show and the end of the app's log."""
    message = page.locator(TOAST_TEXT).filter(has_text=title).first  # one toast groups the messages of a kind
    try:
        message.wait_for(timeout=WAIT_MS)
    except PlaywrightTimeoutError:
        shown = page.locator(TOAST_TEXT).all_inner_texts()
        app = next((app for url, app in APPS.items() if page.url.startswith(url)), None)
        log = app.log.read_text()[-3000:] if app and app.log else "(no log)"
        pytest.fail(f"no {title!r} message within {WAIT_MS / 1000:.0f} s; the page showed {shown}; the app's log "
                    f"ends:\n{log}")
    return message.inner_html()


def assert_page_wording(html: str, title: str) -> str:
    """The toast holds the short title in bold, then at most three plain sentences: no flags, no environment
    variables, no code, no dangling punctuation. Returns the sentences."""
    head, _, text = html.partition("<br>")
    assert re.sub(r"\s+", " ", head).strip() == f"<strong>{title}</strong>", html
    text = re.sub(r"<[^>]+>", "", text).strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text) if s]
    assert 1 <= len(sentences) <= 3, sentences
    assert text.endswith(".") and not re.search(r"[,;:-]\.$|\.\.$|\s\.$", text), text
    assert is_cli_free(text) and "`" not in text and " - " not in text, text
    return text


def wait_for_camera(page, elem_id: str) -> None:
    """Until the webcam's stream shows in #elem_id (Gradio captures nothing before it has a picture)."""
    page.wait_for_function(f"document.querySelector('#{elem_id} video')?.videoWidth > 0", timeout=60_000)


def assert_no_error_state(page, *elem_ids: str) -> None:
    """The panes show no red "Error" badge after a handled error."""
    page.wait_for_timeout(500)
    for elem_id in elem_ids:
        assert "Error" not in page.locator(f"#{elem_id}").inner_text(), elem_id


def test_it_serves_without_waiting_for_the_warm_up(app_url):
    app = APPS[app_url[0]]
    for _ in range(100):  # the line follows the server's first answer closely
        served = re.search(r"serving \S+, ([\d.]+) s after start", app.log.read_text())
        if served:
            break
        time.sleep(0.2)
    assert served, app.log.read_text()[-2000:]
    log = app.log.read_text()
    warmed = re.search(r"warmed up in|warm-up skipped", log)
    assert warmed and warmed.start() > served.start(), "the page waited for the warm-up"
    print(f"\npython app.py answered after {app.startup_s:.1f} s (the app logged {served[1]} s; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")


def test_the_page_opens_with_the_example_ready_and_generates_with_one_click(page, clip, tmp_path):
    expect(page.locator("#g-driving")).to_contain_text(CLIP.stem)
    page.locator("#g-source img").first.wait_for(timeout=30_000)
    expect(page.locator("#g-clip-info")).to_contain_text(f"{clip.num_frames} frames")
    expect(page.locator("#g-variant")).to_contain_text(get_variant("dense").label)  # the default generator
    slowdown = suggested_slowdown(clip)  # the 0.48 s example plays about 2 s (x5), its preview as well
    assert wait_for_video(page, "g-preview")["duration"] == pytest.approx(clip.duration * slowdown, abs=0.15)
    expect(page.locator("#g-clip-info")).to_contain_text(f"the preview plays x{slowdown} slower")
    page.click("#g-button")  # nothing uploaded: the example runs
    video = wait_for_video(page, "g-result")
    assert video["duration"] == pytest.approx(clip.duration * slowdown, abs=0.15)
    expect(page.locator("#g-status")).to_contain_text(f"slowed down x{slowdown}")
    assert fetch_frames(page, video["src"], tmp_path, "result.mp4").shape[0] == clip.num_frames
    grid = wait_for_video(page, "g-grid")
    assert fetch_frames(page, grid["src"], tmp_path, "grid.mp4").shape[1:3] == (HEADER + TILE, 3 * TILE)
    page.locator("#g-status").get_by_text("landmarks: mesh").wait_for()
    screenshot(page, "app-generate.png")


def test_generate_with_uploaded_files(page, clip, tmp_path, app_url):
    example_preview = video_src(page, "g-preview")  # the page opens with the example clip's preview
    upload(page, "g", FACE, CLIP)
    wait_for_video(page, "g-preview", other_than=example_preview)  # the uploaded clip's preview
    page.click("#g-button")
    assert fetch_frames(page, wait_for_video(page, "g-result")["src"], tmp_path, "r.mp4").shape[0] == clip.num_frames
    # each event's handler gives what its outputs take (Gradio warns in the server's terminal otherwise: the
    # face check on upload returned a note no component showed)
    assert "output values" not in APPS[app_url[0]].log.read_text()


def test_compare_ticks_what_runs_here_and_lists_the_rest_with_a_reason(page, clip, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    variants = list_variants()
    boxes = page.locator("#c-variants input[type=checkbox]")
    expect(boxes).to_have_count(len(variants))
    ticked = [v["label"] for v, box in zip(variants, boxes.all()) if box.is_checked()]
    ready = [v for v in variants if not v["needs_weights"]]
    assert ticked == [v["label"] for v in ready]  # no weights on this server: only the training-free ones run
    labels = page.locator("#c-variants label").all_inner_texts()
    assert [label.strip() for label in labels] == [v["label"] for v in variants]  # the registry's labels
    not_ready = page.locator("#c-not-ready").inner_text()
    for v in variants:
        if v["needs_weights"]:
            assert v["label"] in not_ready
    assert "downloads on first use" not in not_ready and "downloads are off" in not_ready  # FOMM, offline
    slowdown = suggested_slowdown(clip)  # the example's preview plays here as on the Generate tab
    assert wait_for_video(page, "c-preview")["duration"] == pytest.approx(clip.duration * slowdown, abs=0.15)
    page.click("#c-button")  # the example is loaded: one click
    frames = fetch_frames(page, wait_for_video(page, "c-grid")["src"], tmp_path, "compare.mp4")
    assert frames.shape[0] == clip.num_frames
    assert frames.shape[2] == (1 + len(ready)) * TILE  # driving | dense | dense-geometry | warp: no placeholders
    screenshot(page, "app-compare.png")


def test_action_units_preset_synthesises_the_specified_event(page, tmp_path):
    from mefacial import au

    page.get_by_role("tab", name="Action units").click()
    page.get_by_role("button", name="surprise", exact=True).click()  # a preset of the literature, one click
    spec = au.PRESETS["surprise"][0]
    expect(page.locator("#a-spec textarea, #a-spec input").first).to_have_value(spec, timeout=30_000)
    expect(page.locator("#a-preset-note")).to_contain_text("surprise")  # its source is named
    timing = au.Timing(onset_ms=60, apex_ms=40, offset_ms=50)  # 31 frames at 200 fps: within the test app's limit
    for name in ("onset", "apex", "offset"):
        field = page.locator(f"#a-{name} input[type=number]")
        field.fill(str(int(getattr(timing, f"{name}_ms"))))
        field.press("Enter")
    page.click("#a-button")  # the example face is loaded
    frames = fetch_frames(page, wait_for_video(page, "a-result")["src"], tmp_path, "au.mp4")
    assert frames.shape[0] == au.plan(spec, timing).num_frames == 31  # exactly the event, first frame neutral
    expect(page.locator("#a-readout img")).to_be_visible(timeout=30_000)  # what moved and when
    screenshot(page, "app-action-units.png")


def test_a_typo_in_the_au_specification_turns_synthesise_off_until_it_parses(page):
    from mefacial import au

    page.get_by_role("tab", name="Action units").click()
    field = page.locator("#a-spec textarea, #a-spec input").first
    expect(field).to_have_value(au.PRESETS["positive"][0], timeout=30_000)  # the page opens on a preset
    expect(page.locator("#a-preset-note")).to_contain_text("positive", timeout=30_000)  # named, with its source
    field.fill("")
    field.press_sequentially("99:C")  # typed
    expect(page.locator("#a-preset-note")).to_contain_text("AU99 is not in the library", timeout=30_000)
    expect(page.locator("#a-button")).to_be_disabled()  # the preset's choices are not synthesised instead
    field.fill("")
    field.press_sequentially("4:C")
    expect(page.locator("#a-button")).to_be_enabled(timeout=30_000)
    expect(page.locator("#a-preset-note")).not_to_contain_text("positive")  # the preset's note went with it


def test_a_pasted_au_specification_is_read_as_a_typed_one(page):
    """Gradio's input event follows keys: a specification pasted whole was left unread, and Synthesise ran the
    choices before it (the preset's). Pasted (Ctrl+V) or filled in at once, it is read as if typed."""
    page.get_by_role("tab", name="Action units").click()
    field = page.locator("#a-spec textarea, #a-spec input").first
    expect(page.locator("#a-preset-note")).to_contain_text("positive", timeout=30_000)
    page.evaluate("navigator.clipboard.writeText('4:C,99:C')")
    field.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Control+V")
    expect(field).to_have_value("4:C,99:C")
    expect(page.locator("#a-preset-note")).to_contain_text("AU99 is not in the library", timeout=30_000)
    expect(page.locator("#a-button")).to_be_disabled()
    field.fill("1:C, 2:C, 5:B")  # the surprise preset's, set at once as a paste sets it
    expect(page.locator("#a-preset-note")).to_contain_text("surprise", timeout=30_000)  # named as that preset
    expect(page.locator("#a-button")).to_be_enabled()
    for number, letter in ((1, "C"), (2, "C"), (5, "B"), (6, "-"), (12, "-")):  # what Synthesise reads
        expect(page.get_by_label(re.compile(rf"^AU{number} "))).to_have_value(letter, timeout=30_000)


def test_prior_slider_follows_the_clip_and_the_gallery_shows_every_panel(page, clip, tmp_path):
    page.get_by_role("tab", name="Prior").click()
    example_preview = wait_for_video(page, "p-preview")["src"]
    short = tmp_path / "seven_frames.mp4"
    write_video(short, clip.frames[:7], clip.fps)
    put_clip(page, "p", short)
    expect(page.locator("#p-clip-info")).to_contain_text("7 frames", timeout=60_000)
    preview = wait_for_video(page, "p-preview", other_than=example_preview)  # the clip plays where its frame is picked
    assert fetch_frames(page, preview["src"], tmp_path, "preview.mp4").shape[0] == 7
    expect(page.locator("#p-frame input[type=range]")).to_have_attribute("max", "6", timeout=30_000)
    page.locator("#p-frame input[type=number]").fill("6")
    page.locator("#p-frame input[type=number]").press("Enter")
    page.click("#p-button")
    page.locator("#p-gallery img").nth(7).wait_for(timeout=WAIT_MS)
    captions = page.locator("#p-gallery").inner_text()
    assert "driving frame 6" in captions and "source: 68 landmarks" in captions
    wrap = page.locator("#p-gallery .grid-wrap")
    assert wrap.evaluate("e => e.scrollHeight <= e.clientHeight + 1"), "the gallery scrolls inside itself"
    last = page.locator("#p-gallery .gallery-item").last.bounding_box()
    box = page.locator("#p-gallery").bounding_box()
    assert last["y"] + last["height"] <= box["y"] + box["height"] + 1, "the last panel is cut off"
    page.locator("#p-status").get_by_text("landmarks: dlib").wait_for()
    screenshot(page, "app-prior.png")


def test_missing_weights_are_a_short_plain_error_and_the_panes_stay_normal(page):
    page.locator("#g-backbone").get_by_label("FOMM", exact=True).check()
    page.locator("#g-prior").get_by_label("AWP", exact=True).check()
    expect(page.locator("#g-variant")).to_contain_text("FOMM + AWP", timeout=30_000)
    expect(page.locator("#g-variant")).to_contain_text("not ready")
    page.click("#g-button")
    text = assert_page_wording(read_toast(page, "Weights missing"), "Weights missing")
    assert text.startswith("FOMM + AWP has no weights on this server.") and 'see "Weights" in the README' in text
    assert_no_error_state(page, "g-result", "g-grid", "g-download", "g-status")
    screenshot(page, "app-error.png")


def test_a_backbone_keeps_the_prior_it_offers_too(page):
    """Switching the backbone keeps the chosen prior where the new backbone offers it too (FOMM + AWP -> MRAA +
    AWP) and goes back to none where it has no such choice (the dense generator's priors)."""
    variant, prior = page.locator("#g-variant"), page.locator("#g-prior")
    page.locator("#g-backbone").get_by_label("FOMM", exact=True).check()
    prior.get_by_label("AWP", exact=True).check()
    expect(variant).to_contain_text("FOMM + AWP", timeout=30_000)
    page.locator("#g-backbone").get_by_label("MRAA", exact=True).check()
    expect(variant).to_contain_text("MRAA + AWP", timeout=30_000)
    expect(prior.get_by_label("AWP", exact=True)).to_be_checked()
    expect(page.locator("#g-motion")).to_be_visible()  # MRAA's motion modes and scale adaptation: choices
    expect(page.locator("#g-adapt")).to_be_visible()
    page.locator("#g-backbone").get_by_label("Training-free dense mesh", exact=True).check()
    expect(variant).to_contain_text("Runs Training-free dense mesh ·", timeout=30_000)
    from mefacial.variants import get_variant

    expect(prior.get_by_label(get_variant("dense").prior_label, exact=True)).to_be_checked()  # its own words
    expect(prior).to_contain_text("Variant")  # (no facial prior to choose there: with or without appearance)
    expect(page.locator("#g-motion")).to_be_hidden()  # one motion mode, no scale adaptation: nothing to choose
    expect(page.locator("#g-adapt")).to_be_hidden()
    expect(prior.get_by_label("AWP", exact=True)).to_have_count(0)


@pytest.mark.parametrize("tab", ["g", "a"])  # Generate; Action units (Prior and Compare share Generate's check)
@pytest.mark.parametrize("name, content, title", [
    ("not_a_face.png", b"this is text, not a picture", "Not an image"),
    ("noise.png", None, "No face found"),
])
def test_a_bad_face_is_reported_when_it_is_uploaded(page, tmp_path, name, content, title, tab):
    path = tmp_path / name
    if content is None:
        iio.imwrite(path, np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    else:
        path.write_bytes(content)
    if tab == "a":
        page.get_by_role("tab", name="Action units").click()
    page.locator(f"#{tab}-source input[type=file]").set_input_files(str(path))  # Generate / Synthesise not pressed
    text = assert_page_wording(read_toast(page, title), title)
    assert content is None or name in text  # an unreadable file is named; "no face" is about the picture shown
    expect(page.locator(f"#{tab}-source img")).to_have_count(0, timeout=30_000)  # no broken image left behind
    assert_no_error_state(page, "g-source")
    if content is not None:
        screenshot(page, "app-upload-error.png")


def test_a_corrupt_clip_is_reported_when_it_is_uploaded(page, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(CLIP.read_bytes()[:2000])
    put_clip(page, "g", broken)
    text = assert_page_wording(read_toast(page, "Unreadable clip"), "Unreadable clip")
    assert "broken.mp4" in text
    assert_no_error_state(page, "g-preview", "g-clip-info")
    expect(page.locator("#g-driving")).not_to_contain_text("broken.mp4", timeout=30_000)  # refused: not kept
    page.click("#g-button")  # so Generate names the missing clip, not the broken one again
    assert_page_wording(read_toast(page, "Missing input"), "Missing input")


def test_a_webcam_photo_is_checked_like_an_upload(page):
    """Chromium's fake camera shows a test pattern, not a face: the capture is refused at once."""
    source = page.locator("#g-source")
    source.get_by_role("button", name="Capture from camera").click()
    source.get_by_text("Click to Access Webcam").click()
    capture = source.get_by_role("button", name="capture photo")
    capture.wait_for(timeout=30_000)
    wait_for_camera(page, "g-source")
    capture.click()
    assert_page_wording(read_toast(page, "No face found"), "No face found")


def start_recording(page):
    """Start recording a driving clip with the webcam in the Generate tab; returns Gradio's stop control."""
    page.get_by_text("Record a clip with the webcam").first.click()
    record = page.locator("#g-record")
    record.get_by_text("Click to Access Webcam").click()
    start = record.get_by_role("button", name="start recording")
    start.wait_for(timeout=30_000)
    wait_for_camera(page, "g-record")
    start.click()
    stop = record.locator("[title='stop recording']")  # Gradio's icon while it records
    stop.wait_for(timeout=30_000)
    return stop


def test_a_webcam_recording_stopped_before_any_video_says_to_record_again(page):
    """A recorder that hands over no video before stop (a busy machine) uploads an empty file: the page says to
    record again for longer, and the driving clip stays as it was."""
    page.evaluate(DROP_RECORDED_CHUNKS)
    start_recording(page).click()
    text = assert_page_wording(read_toast(page, "Empty recording"), "Empty recording")
    assert "Record again" in text
    expect(page.locator("#g-driving")).to_contain_text(CLIP.stem)  # the example clip is still the driving clip
    assert_no_error_state(page, "g-record", "g-preview")


def test_a_clip_recorded_with_the_webcam_is_checked_like_an_upload(page):
    """Recorded in the page (Chromium's fake camera: a test pattern), then checked as the driving clip."""
    page.evaluate(COUNT_RECORDED_CHUNKS)
    stop = start_recording(page)
    # Gradio's recorder makes the file from the chunks it has when stop is clicked: under load, a fixed wait
    # could stop it before the first chunk came (an empty file, "Empty recording"), so wait for a second of video.
    page.wait_for_function("window.recordedChunks >= 5", timeout=60_000)
    stop.click()
    text = assert_page_wording(read_toast(page, "No face found"), "No face found")
    assert "first frame of the driving clip" in text and "starts with a frontal" in text
    assert_no_error_state(page, "g-record", "g-preview")

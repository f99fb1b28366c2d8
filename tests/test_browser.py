"""End to end in a real browser: the evaluation notebook's latent explorer, served by Voilà, driven by Playwright.

A tiny run is trained here (synthetic 32 px images, a few steps), notebooks/05_evaluation.ipynb is parameterised
for it with papermill (interactive=True, smoke=True) and served by Voilà on 127.0.0.1 with a token. Voilà runs
every cell in a live kernel and renders the outputs with the ipywidgets front end, so the sliders in the page
talk to the Python objects in the kernel exactly as they do in Jupyter. Debian's chromium (never a downloaded
browser) moves the image-picker slider and a latent-channel slider with the mouse, and the test reads the bytes
of the explorer's <img> after each move: the picture must change, and in the right half only (the decoded
edit) when a latent channel moves.

Skipped where /usr/bin/chromium, playwright or voila is missing, unless VAEHELPERS_REQUIRE_BROWSER=1 (.ci/run
sets it), where that is a failure. VAEHELPERS_SCREENSHOT=PATH saves a PNG of the explorer after the moves.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_evaluation.ipynb"
CHROMIUM = Path(os.environ.get("VAEHELPERS_CHROMIUM", "/usr/bin/chromium"))
REQUIRED = os.environ.get("VAEHELPERS_REQUIRE_BROWSER", "") not in ("", "0")
# No downloads, no background traffic: the machine's network is closed except to loopback.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGE_SIZE, PANEL_HEIGHT, PANEL_GAP = 32, 192, 4  # the explorer draws original | edit at 192 px, 4 px apart
# A few steps test the wiring; a longer run (VAEHELPERS_BROWSER_STEPS=300) gives the README picture a real reconstruction.
TRAIN_STEPS = int(os.environ.get("VAEHELPERS_BROWSER_STEPS", "10"))
SERVER_START_S, NOTEBOOK_RUN_S, REDRAW_S = 60, 150, 45


_STARTED: list[float] = []


def phase(message: str) -> None:
    """Print how far the test has got (pytest shows it when the test fails)."""
    _STARTED[:] = _STARTED or [time.monotonic()]
    print(f"[{time.monotonic() - _STARTED[0]:6.1f} s] {message}", flush=True)


def require(condition: bool, message: str) -> None:
    """Skip with `message` where a browser part is missing; fail instead where CI requires this test."""
    if condition:
        return
    if REQUIRED:
        pytest.fail(f"{message} (VAEHELPERS_REQUIRE_BROWSER=1: .ci/run installs it and requires this test)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def playwright_api():
    require(
        CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK),
        f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does it); a Playwright browser "
        "download does not work here",
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None, "playwright is not installed: pip install -e '.[dev]'")
    try:
        import voila  # noqa: F401
    except ImportError:
        voila = None
    require(voila is not None, "voila is not installed: pip install -e '.[dev]'")
    return sync_playwright


@pytest.fixture(scope="module")
def served_notebook(tmp_path_factory, playwright_api):
    """A tiny trained run and a copy of 05_evaluation.ipynb parameterised for it (not executed: Voilà runs it)."""
    import papermill

    from vaehelpers import sources
    from vaehelpers.config import build_config
    from vaehelpers.demo import notebook_kernel
    from vaehelpers.train import train

    phase("training a tiny run")
    root = tmp_path_factory.mktemp("browser")
    sources.make_synthetic(root / "data", count=32, size=IMAGE_SIZE, seed=0)  # 3 of them fall in the test split
    cfg = build_config(
        "tiny",
        "pixel",
        run_dir=str(root / "run"),
        device="cpu",
        epochs=100,
        max_steps=TRAIN_STEPS,
        batch_size=8,
        lr=1e-3,
        **{"data.data_dir": str(root / "data"), "data.image_size": IMAGE_SIZE, "loss.perceptual_weight": 0.0},
    )
    train(cfg, progress=False)
    phase("trained; parameterising the notebook")
    serve = root / "serve"
    serve.mkdir()
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(serve / NOTEBOOK.name),
        prepare_only=True,
        kernel_name=notebook_kernel(),
        progress_bar=False,
        parameters={
            "smoke": True,
            "interactive": True,
            "data_dir": str(root / "data"),
            "run_dir": str(root / "run"),
            "figures_dir": str(root / "figures"),
            "image_size": IMAGE_SIZE,
        },
    )
    return serve / NOTEBOOK.name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(port: int, path: str) -> int | None:
    """The status of GET path on 127.0.0.1:port (redirects not followed), None when nothing answers yet."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (Voilà then shuts its kernels down), then SIGKILL after 20 s; leftover kernels of it are killed by pid."""
    try:
        import psutil

        children = psutil.Process(process.pid).children(recursive=True)
    except Exception:  # psutil missing, or the server already gone
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for child in children:
        try:
            if child.is_running():
                child.kill()
        except Exception:
            pass


@pytest.fixture
def voila_server(served_notebook, tmp_path):
    """Voilà serving the notebook on 127.0.0.1:<free port> with a token; yields (base URL, token, log path)."""
    port, token = free_port(), secrets.token_hex(16)
    log_path = tmp_path / "voila.log"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {
        **os.environ,
        "IPYTHONDIR": str(scratch / "ipython"),
        "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "TMPDIR": str(scratch),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "voila",
        str(served_notebook),
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
        f"--token={token}",
        "--show_tracebacks=True",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=served_notebook.parent)
    try:
        deadline = time.monotonic() + SERVER_START_S
        status = None
        while status is None:
            if process.poll() is not None:
                pytest.fail(f"voila exited with {process.returncode} at startup:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"voila did not answer on 127.0.0.1:{port} within {SERVER_START_S} s:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
            status = http_status(port, "/")
        phase(f"voila answers on port {port}")
        assert status in (302, 403), f"without the token the server answered {status}, not a redirect to the login"
        yield f"http://127.0.0.1:{port}", token, log_path
    finally:
        stop(process)


def slider(explorer, label: str):
    return explorer.locator(f'.widget-slider:has(label.widget-label:text-is("{label}"))')


def drag(page, slider_box, fraction: float) -> None:
    """Drag the slider's handle with the mouse to `fraction` (0 left end, 1 right end) of its track."""
    handle = slider_box.locator(".noUi-handle").bounding_box()
    track = slider_box.locator(".noUi-base").bounding_box()
    y = handle["y"] + handle["height"] / 2
    page.mouse.move(handle["x"] + handle["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], y, steps=8)
    page.mouse.up()


def shown_png(image, default: bytes = b"") -> bytes:
    """The bytes behind the <img> (ipywidgets 8 shows a blob: URL; a data: URL would do as well); `default` when
    the blob was revoked by a newer redraw between reading src and fetching it."""
    try:
        encoded = image.evaluate("""async (img) => {
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let text = ''; for (const b of bytes) text += String.fromCharCode(b);
        return btoa(text); }""")
    except Exception:
        if default:
            return default
        raise
    return base64.b64decode(encoded)


def panels(png: bytes) -> tuple[np.ndarray, np.ndarray]:
    """original | decoded edit, as arrays, from the explorer's PNG (two square panels 4 px apart)."""
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert array.shape == (PANEL_HEIGHT, 2 * PANEL_HEIGHT + PANEL_GAP, 3), f"unexpected explorer image {array.shape}"
    return array[:, :PANEL_HEIGHT], array[:, PANEL_HEIGHT + PANEL_GAP :]


def wait_for_new_image(image, before: bytes, what: str, readout) -> bytes:
    """The image's bytes once they differ from `before` and have stopped changing (a drag sends several values, each
    redrawn); fails after REDRAW_S seconds naming the move."""
    deadline = time.monotonic() + REDRAW_S
    now = before
    while now == before:
        if time.monotonic() > deadline:
            pytest.fail(
                f"the explorer's image did not change within {REDRAW_S} s after {what} "
                f"(the slider's readout shows {readout.inner_text()!r}): the slider callback did not redraw"
            )
        time.sleep(0.25)
        now = shown_png(image, before)
    while time.monotonic() < deadline:  # settled: the same bytes for a second
        time.sleep(1.0)
        latest = shown_png(image, now)
        if latest == now:
            return now
        now = latest
    return now


@pytest.mark.timeout(300 + 3 * TRAIN_STEPS)  # about 75 s on 2 busy cores at 10 steps
def test_explorer_sliders_redraw_the_image_in_chromium(voila_server, playwright_api):
    url, token, log_path = voila_server
    with playwright_api() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(log_path.parent / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 900},
        )
        try:
            # Only the server under test: Voilà's page links a web font on a CDN, which would wait on the closed network.
            context.route(
                "**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort()
            )
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(f"{url}/?token={token}", wait_until="commit")  # the page streams while the cells run

            phase("chromium opened the page; waiting for the notebook to run")
            explorer = page.locator('.widget-vbox:has(button:text-is("reset sliders"))').first
            image = explorer.locator("img.widget-image")
            try:
                image.wait_for(state="visible", timeout=NOTEBOOK_RUN_S * 1000)
            except Exception:
                pytest.fail(
                    f"the latent explorer did not appear within {NOTEBOOK_RUN_S} s; page text:\n"
                    f"{page.inner_text('body')[-3000:]}\nvoila log:\n{log_path.read_text()[-3000:]}"
                )
            phase("the explorer is shown")
            caption = explorer.locator(".widget-label:not(label)").last
            start = shown_png(image)
            start_original, start_edit = panels(start)
            assert caption.inner_text().startswith("image 0:")

            # 1. the image picker, dragged to the last held-out image: a different original and reconstruction
            picker = slider(explorer, "image")
            picker.scroll_into_view_if_needed()
            drag(page, picker, 1.0)
            picked = wait_for_new_image(
                image, start, "dragging the image picker to the right end", picker.locator(".widget-readout")
            )
            picked_original, picked_edit = panels(picked)
            index = int(picker.locator(".widget-readout").inner_text())
            assert index >= 1, f"the picker's readout shows {index} after dragging it right"
            assert not np.array_equal(picked_original, start_original), "the picker changed only the decoded panel"
            page.wait_for_function(
                "([el, n]) => el.textContent.startsWith(`image ${n}:`)",
                arg=[caption.element_handle(), index],
                timeout=REDRAW_S * 1000,
            )

            phase(f"picker moved to image {index}")

            # 2. latent channel 0's offset, dragged to about +2 sigma: the decoded edit changes, the original stays
            offset = slider(explorer, "offset 0")
            drag(page, offset, 0.85)
            moved = wait_for_new_image(
                image, picked, "dragging 'offset 0' to the right", offset.locator(".widget-readout")
            )
            moved_original, moved_edit = panels(moved)
            assert float(offset.locator(".widget-readout").inner_text()) > 0.5
            assert np.array_equal(moved_original, picked_original), "moving a latent channel changed the original"
            assert not np.array_equal(moved_edit, picked_edit), (
                "moving a latent channel left the decoded edit as it was"
            )

            phase("offset 0 moved")
            shot = os.environ.get("VAEHELPERS_SCREENSHOT")
            if shot:
                Path(shot).parent.mkdir(parents=True, exist_ok=True)
                explorer.screenshot(path=shot)

            # 3. the reset button puts every channel back: the picked image's plain reconstruction again
            explorer.locator('button:text-is("reset sliders")').click()
            deadline = time.monotonic() + REDRAW_S
            while shown_png(image, moved) != picked and time.monotonic() < deadline:
                time.sleep(0.25)
            assert shown_png(image) == picked, "reset sliders did not restore the unedited reconstruction"
            assert offset.locator(".widget-readout").inner_text() == "0.00"
            phase("reset restored the image")
        finally:
            context.close()
    assert re.search(r"Voil.\s+is running", log_path.read_text())

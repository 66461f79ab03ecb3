"""The drawing page in a real browser: headless Chromium, driven by Selenium, draws real MNIST
test digits with pointer events (mouse, pen, finger) on ``python -m lenet_xp.serve``'s page and
reads the answer the page shows; a photo goes in through the file picker and drag and drop; a
phone-sized screen fits. Skips (saying why) where Chromium, its driver or Selenium is missing.

Screenshots are kept in pytest's temporary folder (the path is printed: ``pytest -s``)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA
from serve_helpers import running_server

from lenet_xp.data.images import digit_from_bytes
from lenet_xp.data.mnist import load_mnist

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

#: Browsers and drivers looked for, in order (``$LENET_XP_CHROMIUM`` / ``$LENET_XP_CHROMEDRIVER``
#: first when set).
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)
#: The drawing canvas's own pixels and pen width (``SIZE``, ``LINE`` in static/app.js).
CANVAS, PEN = 560, 560 / 14


def _find(env: str, names: tuple[str, ...]) -> str | None:
    """The program ``$env`` names, else the first of ``names`` on the PATH; ``None`` if none."""
    if os.environ.get(env):
        return shutil.which(os.environ[env])
    return next((path for name in names if (path := shutil.which(name))), None)


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, or ``None``."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'no browser test: Selenium is not installed (pip install -e ".[test]")'
    if _find("LENET_XP_CHROMIUM", BROWSERS) is None:
        return (
            "no browser test: Chromium is not installed (apt-get install chromium, "
            "or set LENET_XP_CHROMIUM)"
        )
    if _find("LENET_XP_CHROMEDRIVER", DRIVERS) is None:
        return (
            "no browser test: chromedriver is not installed (apt-get install chromium-driver, "
            "or set LENET_XP_CHROMEDRIVER)"
        )
    return None


pytestmark = pytest.mark.skipif(_browser_missing() is not None, reason=f"{_browser_missing()}")


# -- strokes traced from real digits ------------------------------------------------------------
def strokes(digit: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Pen strokes tracing a 28x28 digit: one horizontal stroke per run of inked pixels (above
    half intensity) in each row, as ``((x0, y0), (x1, y1))`` in digit pixels (centres)."""
    out = []
    for y, row in enumerate(digit > 127):
        x = 0
        while x < 28:
            if row[x]:
                start = x
                while x < 28 and row[x]:
                    x += 1
                out.append(((start + 0.5, y + 0.5), (x - 0.5, y + 0.5)))
            x += 1
    return out


def rendered(digit: np.ndarray) -> bytes:
    """The PNG the page makes of :func:`strokes`: black round-capped pen on white."""
    picture = Image.new("L", (CANVAS, CANVAS), 255)
    draw = ImageDraw.Draw(picture)
    scale, r = CANVAS / 28, PEN / 2
    for (x0, y0), (x1, y1) in strokes(digit):
        a, b = (x0 * scale, y0 * scale), (x1 * scale, y1 * scale)
        draw.line([a, b], fill=0, width=int(PEN))
        for x, y in (a, b):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(trained_checkpoint):
    with running_server(trained_checkpoint) as srv:
        yield srv


@pytest.fixture(scope="module")
def chosen(server):
    """Four test digits of different classes (2, 3, 5, 8: not the easy 1 and 7) whose traced
    strokes the model reads right with some margin, so the test is about the page, not the
    model: ``[(digit image, label)]``."""
    mnist = load_mnist(DATA, download=False)
    picked = {}
    for image, label in zip(mnist.test_images[:500], mnist.test_labels[:500], strict=True):
        label = int(label)
        if label in (2, 3, 5, 8) and label not in picked:
            answer = server.classifier.classify(digit_from_bytes(rendered(image)), maps=False)
            if answer["digit"] == label and answer["probability"] > 0.9:
                picked[label] = image
    assert len(picked) == 4, sorted(picked)
    return [(picked[label], label) for label in (2, 3, 5, 8)]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _find("LENET_XP_CHROMIUM", BROWSERS)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1000,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_find("LENET_XP_CHROMEDRIVER", DRIVERS))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go (pytest's temporary folder; the path is printed)."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def page(browser, server):
    """The page, freshly loaded, its model line shown; afterwards, no console errors."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # drop what earlier tests left
    browser.get(server.url)
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.body.dataset.ready")
    )
    yield browser
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


# -- helpers ------------------------------------------------------------------------------------
def draw(driver, digit: np.ndarray, kind: str) -> None:
    """Trace ``digit`` on the canvas with pointer events of ``kind`` (mouse, pen or touch)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    inner = driver.execute_script("return arguments[0].clientWidth", canvas)  # inside the border
    actions = ActionBuilder(driver, mouse=PointerInput(kind, kind), duration=0)

    def at(x: float, y: float) -> tuple[int, int]:  # Selenium's offsets are from the centre
        return round((x / 28 - 0.5) * inner), round((y / 28 - 0.5) * inner)

    for (x0, y0), (x1, y1) in strokes(digit):
        actions.pointer_action.move_to(canvas, *at(x0, y0)).pointer_down()
        actions.pointer_action.move_to(canvas, *at((x0 + x1) / 2, y0))
        actions.pointer_action.move_to(canvas, *at(x1, y1)).pointer_up()
    actions.perform()


def shown(driver) -> dict:
    """What the page shows once it has answered the latest drawing (nothing pending)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.body.dataset.busy === '0'")
    )
    return driver.execute_script(
        """
        const q = (s) => document.querySelector(s);
        const seen = q('#seen');
        const pixels = seen.getContext('2d').getImageData(0, 0, seen.width, seen.height).data;
        let ink = 0;
        for (let i = 0; i < pixels.length; i += 4) ink += pixels[i];
        return {
          digit: q('#digit').textContent,
          top: q('#bars li.top .label')?.textContent,
          topBar: q('#bars li.top .fill')?.getBoundingClientRect().width
            / q('#bars li.top .track')?.getBoundingClientRect().width,
          probability: q('#confidence').textContent,
          status: q('#status').textContent,
          seenInk: ink / 255,
          canvasPaper: (() => {  // pixels of the photo's paper (grey 250) on the canvas
            const c = q('#canvas');
            const rgba = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let paper = 0;
            for (let i = 0; i < rgba.length; i += 4) paper += rgba[i] === 250;
            return paper;
          })(),
          maps: document.querySelectorAll('#maps canvas').length,
          layers: [...document.querySelectorAll('#maps h3')].map((h) => h.textContent),
        };"""
    )


def clear(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "clear").click()
    assert driver.find_element(By.ID, "digit").text == "–"


def photo_png(digit: np.ndarray) -> bytes:
    """A test digit as a photo of it would be: dark ink on light paper, larger, off-centre."""
    big = Image.fromarray(255 - digit).resize((150, 150), Image.Resampling.BILINEAR)
    picture = Image.new("L", (320, 240), 250)  # paper: grey 250
    picture.paste(big, (120, 40))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


# -- tests --------------------------------------------------------------------------------------
def test_drawn_digits_are_read_right(page, chosen, shots):
    """Four real test digits traced with a mouse, a pen and a finger: the page shows the right
    digit, the top bar, the 28x28 picture and the maps of both convolutions (6 + 16)."""
    kinds = ["mouse", "pen", "touch", "mouse"]
    for (digit, label), kind in zip(chosen, kinds, strict=True):
        clear(page)
        draw(page, digit, kind)
        now = shown(page)
        assert now["digit"] == str(label), (kind, now)
        assert now["top"] == str(label) and now["status"] == ""
        percent = float(now["probability"].split()[1])  # "probability 98.3 %"
        assert now["topBar"] == pytest.approx(percent / 100, abs=0.02)  # the bar is that long
        assert now["seenInk"] > 20  # the network's picture is drawn, not black
        assert now["maps"] == 6 + 16 and [h.split()[0] for h in now["layers"]] == ["conv1", "conv2"]
    path = shots / "serve-desktop.png"
    assert page.save_screenshot(str(path))
    print(f"screenshot: {path}")
    with Image.open(path) as shot:
        assert shot.size[0] >= 900


def test_a_tap_leaves_a_dot(page):
    """A tap without moving (pen down, pen up) leaves a round dot of the pen's width, and the
    page answers it (a zero-length stroke would leave the canvas blank and the server would say
    "no digit found")."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    canvas = page.find_element(By.ID, "canvas")
    actions = ActionBuilder(page, mouse=PointerInput("mouse", "mouse"), duration=0)
    actions.pointer_action.move_to(canvas, 0, 0).pointer_down().pointer_up()
    actions.perform()
    now = shown(page)
    inked = page.execute_script(
        """
        const rgba = document.getElementById('canvas').getContext('2d')
          .getImageData(0, 0, 560, 560).data;
        let dark = 0;
        for (let i = 0; i < rgba.length; i += 4) dark += rgba[i] < 128;
        return dark;"""
    )
    assert inked == pytest.approx(np.pi * (PEN / 2) ** 2, rel=0.1)  # one dot of the pen's width
    assert now["status"] == "" and now["digit"] != "–", now


def test_every_layer_toggle_and_clear(page, chosen):
    from selenium.webdriver.common.by import By

    draw(page, chosen[0][0], "mouse")
    assert shown(page)["maps"] == 22
    page.find_element(By.ID, "all-layers").click()
    layers = [h.split()[0] for h in shown(page)["layers"]]
    assert layers == ["conv1", "pool1", "relu1", "conv2", "pool2", "relu2"]
    clear(page)
    now = shown(page)
    assert now["maps"] == 0 and now["seenInk"] == 0 and now["top"] is None


def test_a_photo_through_the_file_picker_and_drag_and_drop(page, chosen, tmp_path):
    from selenium.webdriver.common.by import By

    (digit, label), (other, other_label) = chosen[1], chosen[2]
    path = tmp_path / "my digit.png"
    path.write_bytes(photo_png(digit))
    page.find_element(By.ID, "file").send_keys(str(path))
    now = shown(page)
    assert now["digit"] == str(label) and now["status"] == "", now
    assert now["canvasPaper"] > 100_000  # the photo is shown where one draws
    drop = """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        for (const type of ['dragenter', 'dragover', 'drop']) {
          document.getElementById('canvas').dispatchEvent(
            new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
        }"""
    page.execute_script(drop, base64.b64encode(photo_png(other)).decode())
    now = shown(page)
    assert now["digit"] == str(other_label) and now["canvasPaper"] > 100_000, now
    draw(page, chosen[0][0], "pen")  # drawing after a photo starts on a clean canvas
    drawn = shown(page)
    assert drawn["digit"] == str(chosen[0][1]) and drawn["canvasPaper"] < 1000


def test_a_bad_picture_is_one_line_on_the_page(browser, server, tmp_path):
    """Not an image: the server's one-line reason is shown (the browser logs the 400 itself,
    so this test does not use the no-console-errors check)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.body.dataset.ready")
    )
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    browser.find_element(By.ID, "file").send_keys(str(path))
    now = shown(browser)
    assert (
        now["digit"] == "–" and now["status"] == "the upload: not an image (no format Pillow reads)"
    )
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("status of 400" in e for e in errors), errors


def test_phone_sized_screen(page, chosen, shots):
    """A 390x844 touch screen: nothing wider than the screen, the canvas whole on the first
    screen, buttons big enough for a finger, and a digit drawn with a finger is read."""
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
    )
    page.execute_cdp_cmd(
        "Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5}
    )
    try:
        page.refresh()
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(page, 20).until(
            lambda d: d.execute_script("return document.body.dataset.ready")
        )
        layout = page.execute_script(
            """
            const r = (id) => document.getElementById(id).getBoundingClientRect();
            return {
              page: document.documentElement.scrollWidth, screen: innerWidth, high: innerHeight,
              canvas: r('canvas'), clear: r('clear'), digit: r('digit'),
            };"""
        )
        assert layout["screen"] == 390 and layout["page"] <= layout["screen"]
        canvas = layout["canvas"]
        assert canvas["left"] >= 0 and canvas["right"] <= 390 and canvas["width"] >= 300
        assert canvas["bottom"] <= layout["high"] and layout["clear"]["height"] >= 44
        digit, label = chosen[3]
        draw(page, digit, "touch")
        assert shown(page)["digit"] == str(label)
        path = shots / "serve-phone.png"
        assert page.save_screenshot(str(path))
        print(f"screenshot: {path}")
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        page.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})

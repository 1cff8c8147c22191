"""The draw-a-digit page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium. It traces a real test digit onto the canvas with pointer
strokes and waits for the page to show the digit's class; uploads a photo-like file of another;
and opens the page of a server without a model. Skipped where no browser is installed
(apt-get install chromium chromium-driver). With $MNIST_SCREENSHOT set, the page with the drawn
digit is saved there (the README's picture: docs/serve.png)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

import dataset
import images
import predict
import serve
import train

pytestmark = [
    pytest.mark.numerics,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="no browser: apt-get install chromium chromium-driver",
    ),
]

SCALE = 10  # canvas pixels per MNIST pixel: the canvas is 280 x 280
TEST = dataset.SAMPLE_DIR / "mnist_test.csv.gz"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("model")
    flags = ["--train", str(dataset.SAMPLE_DIR / "mnist_train.csv.gz"), "--arch", "strong"]
    flags += ["--epochs", "3", "--no-plots", "--quiet", "--device", "cpu"]
    train.main([*flags, "--model-dir", str(folder), "--out-dir", str(folder)])
    return str(folder / "best.pt")


def serving(checkpoint: str):
    """A uvicorn server of serve.create_app(checkpoint) on a free port, in a thread."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(serve.create_app(checkpoint), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1000,760")
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(checkpoint, browser):
    server, thread, url = serving(checkpoint)
    browser.get(url)
    yield browser
    server.should_exit = True
    thread.join()


def strokes(digit: np.ndarray) -> list[tuple[int, int, int]]:
    """The digit as horizontal strokes: (row, first column, last column) of each run of ink."""
    runs = []
    for row in range(28):
        ink = np.flatnonzero(digit[row] > 100)
        for run in np.split(ink, np.flatnonzero(np.diff(ink) > 1) + 1):
            if len(run):
                runs.append((row, int(run[0]), int(run[-1])))
    return runs


def rendered(digit: np.ndarray) -> bytes:
    """The strokes as the page's canvas draws them (black, 20 pixels wide, round ends), as PNG."""
    canvas = Image.new("RGBA", (28 * SCALE, 28 * SCALE), (0, 0, 0, 0))
    pen = ImageDraw.Draw(canvas)
    for row, first, last in strokes(digit):
        y, x0, x1 = (row + 0.5) * SCALE, (first + 0.5) * SCALE, (last + 0.5) * SCALE
        pen.line([(x0, y), (x1, y)], fill=(0, 0, 0, 255), width=20)
        for x in (x0, x1):
            pen.ellipse([x - 10, y - 10, x + 10, y + 10], fill=(0, 0, 0, 255))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def photo(digit: np.ndarray) -> bytes:
    """The digit as a photo-like JPEG: dark ink on white paper, five times the size."""
    big = Image.fromarray(digit).resize((140, 140), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    Image.fromarray(255 - np.asarray(big)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sure_digit(checkpoint: str, render, after: int = -1) -> int:
    """The first row of the sample's test digits after `after` whose rendering the model reads
    right with 90% or more: far from a tie that the browser's antialiasing could tip."""
    models = predict.load_models(predict.Options(checkpoint=[checkpoint], device="cpu"))
    test = dataset.load_csv(TEST)
    for row in range(after + 1, 100):
        image = images.preprocess_image(io.BytesIO(render(test.images[row])), name="drawing")
        probs = models.predict_proba(image[None])[0]
        if probs.argmax() == test.labels[row] and probs.max() > 0.9:
            return row
    pytest.fail("no sure digit among the first 100: the model did not learn")


def shown_class(driver, timeout: float = 20) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answer = driver.find_element(By.ID, "answer")
    WebDriverWait(driver, timeout).until(lambda _: answer.text != "?")
    time.sleep(0.5)  # the last stroke's answer
    return answer.text


def draw(driver, digit: np.ndarray) -> None:
    """Trace the digit's strokes onto the canvas with pointer events (a mouse)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pad = driver.find_element(By.ID, "pad")
    half = 28 * SCALE // 2
    for row, first, last in strokes(digit):
        y = round((row + 0.5) * SCALE) - half
        actions = ActionChains(driver)
        actions.move_to_element_with_offset(pad, round((first + 0.5) * SCALE) - half, y)
        actions.click_and_hold().move_by_offset((last - first) * SCALE, 0).release().perform()


def test_a_traced_real_digit_shows_its_class(page, checkpoint):
    from selenium.webdriver.common.by import By

    row = sure_digit(checkpoint, rendered)
    test = dataset.load_csv(TEST)
    page.find_element(By.ID, "clear").click()
    draw(page, test.images[row])
    assert shown_class(page) == str(test.labels[row])
    bars = page.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 10
    assert page.find_element(By.CSS_SELECTOR, "#bars .bar.top").get_attribute("data-cls") == str(
        test.labels[row]
    )
    if os.environ.get("MNIST_SCREENSHOT"):
        page.save_screenshot(os.environ["MNIST_SCREENSHOT"])


def test_an_uploaded_photo_of_a_digit_shows_its_class(page, checkpoint, tmp_path):
    from selenium.webdriver.common.by import By

    row = sure_digit(checkpoint, photo, after=sure_digit(checkpoint, rendered))
    test = dataset.load_csv(TEST)
    path = tmp_path / "digit.jpg"
    path.write_bytes(photo(test.images[row]))
    page.find_element(By.ID, "clear").click()
    page.find_element(By.ID, "upload").send_keys(str(path))
    assert shown_class(page) == str(test.labels[row])


def test_the_page_without_a_model_says_how_to_train_one(browser, tmp_path):
    from selenium.webdriver.common.by import By

    server, thread, url = serving(str(tmp_path / "best.pt"))
    try:
        browser.get(url)
        missing = browser.find_element(By.ID, "missing")
        assert missing.is_displayed()
        assert "python train.py" in missing.text
    finally:
        server.should_exit = True
        thread.join()

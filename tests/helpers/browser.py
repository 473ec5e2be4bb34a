"""Headless Chromium for the page tests: the system browser (Debian's `chromium` and
`chromium-driver` packages) driven by Selenium; tests skip with the reason when it is missing."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> tuple[str, str]:
    """(browser, driver) paths, or skip the test naming what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium found (apt-get install -y chromium chromium-driver)")
    return browser, driver


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator:
    """A headless Chromium WebDriver that records the page's console (driver.get_log('browser'))."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[str]:
    """The page's console errors (and uncaught exceptions) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def assert_not_blank(png: bytes, min_colors: int = 16) -> None:
    """A screenshot is not blank: many distinct colours and visible contrast."""
    from PIL import Image, ImageStat

    im = Image.open(io.BytesIO(png)).convert("RGB")
    colors = im.getcolors(maxcolors=1 << 20) or []
    assert len(colors) >= min_colors, f"screenshot has only {len(colors)} colours"
    assert max(ImageStat.Stat(im).stddev) > 10, "screenshot has almost no contrast"


def wait_for(driver, script: str, timeout: float = 5.0) -> None:
    """Poll a JavaScript expression (`return ...`) until it is truthy (images load asynchronously)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if driver.execute_script(script):
            return
        time.sleep(0.05)
    raise AssertionError(f"still false after {timeout} s: {script}")

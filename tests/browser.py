"""A real browser for the console's tests: Debian's headless Chromium through chromedriver.

`chromium()` is a context manager yielding a Selenium `WebDriver` (headless, a fresh
profile in a temporary directory, a phone-and-desk friendly window size), quit on exit.
`browser` is the same as a pytest fixture (one browser per test: no cookies or storage
leak from one test into the next). `make test` installs `chromium` and `chromium-driver`
(the Makefile's `chromium` target); the paths can be overridden with CHROMIUM_BINARY and
CHROMEDRIVER.

Helpers: `wait_for(driver, predicate)` waits (bounded) until `predicate(driver)` is truthy;
`screenshot(driver, path)` saves a PNG of the whole page (or, `full=False`, of the window).
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOW = (1280, 900)
WAIT_SECONDS = 20.0

T = TypeVar("T")


@contextmanager
def chromium(*, width: int = WINDOW[0], height: int = WINDOW[1]) -> Iterator[WebDriver]:
    """A headless Chromium driven by chromedriver, quit on exit."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            raise AssertionError(
                f"{path} is missing: install Debian's {what} (make chromium does it)"
            )
    with tempfile.TemporaryDirectory(prefix="mcp-policy-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # tests run as root in a container
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--password-store=basic",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(WAIT_SECONDS)
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def wait_for(
    driver: WebDriver, predicate: Callable[[WebDriver], T], timeout: float = WAIT_SECONDS
) -> T:
    """What `predicate(driver)` returns once it is truthy; TimeoutException otherwise."""
    result: T = WebDriverWait(driver, timeout, poll_frequency=0.1).until(predicate)
    return result


def screenshot(driver: WebDriver, path: Path, *, full: bool = True) -> Path:
    """A PNG of the page at `path`: all of it (`full`, beyond the window's height, through
    Chromium's DevTools), or what the window shows."""
    options: dict[str, Any] = {"format": "png"}
    if full:
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics["cssContentSize"]
        options["captureBeyondViewport"] = True
        options["clip"] = {
            "x": 0,
            "y": 0,
            "width": size["width"],
            "height": size["height"],
            "scale": 1,
        }
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path

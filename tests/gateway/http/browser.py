"""Headless Chromium for the search page's tests: Debian's chromium driven by Debian's chromedriver
through Selenium, started so that nothing is downloaded or contacted (no Selenium Manager, no
background services of the browser), and a small driver of the page itself."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
T = TypeVar("T")


def missing() -> str:
    """Why the browser tests cannot run here ("" when they can)."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if absent:
        return f"{' and '.join(absent)} missing: apt-get install chromium chromium-driver (make browser)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return ""


def required() -> bool:
    """CI sets MPS_REQUIRE_BROWSER=1: then a missing browser fails the tests instead of skipping them."""
    return os.environ.get("MPS_REQUIRE_BROWSER", "") == "1"


# Installed before the page's own script: records the request part of every search the page sends.
RECORD_SEARCHES = """
(() => {
  window.__searches = [];
  const pageFetch = window.fetch;
  window.fetch = function (input, init) {
    try {
      if (String(input).includes("/v1/search") && init && init.body instanceof FormData) {
        window.__searches.push(JSON.parse(init.body.get("request")));
      }
    } catch (error) {
      window.__searches.push({ unreadable: String(error) });
    }
    return pageFetch.apply(this, arguments);
  };
})();
"""


def chromium(profile: Path, window: tuple[int, int] = WINDOW) -> Any:
    """A headless Chromium (selenium.webdriver.Chrome) with a fresh profile in `profile`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-extensions",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        f"--user-data-dir={profile}",
        f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(flag)
    profile.mkdir(parents=True, exist_ok=True)
    # The path given: Selenium Manager (which would download a driver) never runs.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_window_size(*window)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    before_page_scripts(driver, RECORD_SEARCHES)
    return driver


def before_page_scripts(driver: Any, source: str) -> str:
    """Runs `source` in every page this driver opens from now on, before the page's own scripts ->
    an identifier for remove_page_script."""
    return str(driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": source})["identifier"])


def remove_page_script(driver: Any, identifier: str) -> None:
    driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": identifier})


def remove_profile(profile: Path) -> None:
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The search page in a browser: its controls by their data-testid, and waits on its status."""

    def __init__(self, driver: Any, url: str, timeout_s: float = 30.0):
        self.driver, self.url, self.timeout_s = driver, url, timeout_s

    def open(self) -> Page:
        self.driver.get(self.url)
        self.js("sessionStorage.clear();")  # no token left by an earlier test
        self.wait(lambda: "Reading" not in self.one("catalogue").text, "the catalogue line")
        return self

    # --- finding ------------------------------------------------------------------------------

    def all(self, testid: str, within: Any = None) -> list[Any]:
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def one(self, testid: str, within: Any = None) -> Any:
        found = self.all(testid, within)
        assert len(found) == 1, f"{len(found)} elements with data-testid={testid!r}"
        return found[0]

    def wait(self, condition: Callable[[], T], what: str, timeout_s: float | None = None) -> T:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        def check(_driver: Any) -> T | bool:
            try:
                return condition()
            except (StaleElementReferenceException, AssertionError, IndexError):
                return False

        try:
            return cast(T, WebDriverWait(self.driver, timeout_s or self.timeout_s, poll_frequency=0.05).until(check))
        except Exception as error:
            status = self.driver.execute_script(
                "const s = document.querySelector('[data-testid=status]'); return s && s.textContent"
            )
            raise AssertionError(
                f"waited {timeout_s or self.timeout_s} s for {what}; the status says {status!r}"
            ) from error

    def rect(self, element: Any) -> tuple[float, float, float, float]:
        """The element's box on screen: left, top, right, bottom in CSS px."""
        left, top, right, bottom = self.driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom];", element
        )
        return float(left), float(top), float(right), float(bottom)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    # --- acting -------------------------------------------------------------------------------

    def searches(self) -> int:
        return int(self.one("status").get_attribute("data-searches") or 0)

    def sent(self) -> list[dict[str, Any]]:
        """The request part of each search the page sent, oldest first."""
        return list(self.js("return window.__searches || [];"))

    def until_searched(self, action: Callable[[], object], timeout_s: float | None = None) -> str:
        """Runs `action`, waits for the search it starts to finish -> the status text."""
        before = self.searches()
        action()
        self.wait(
            lambda: self.searches() > before and self.one("status").get_attribute("data-state") in ("done", "error"),
            "the search to finish",
            timeout_s,
        )
        return str(self.one("status").text)

    def upload(self, photo: Path) -> str:
        return self.until_searched(lambda: self.one("file-input").send_keys(str(photo)))

    def photo_shown(self) -> Any:
        photo = self.one("photo")
        self.wait(lambda: self.js("return arguments[0].complete && arguments[0].naturalWidth > 0;", photo), "the photo")
        return photo

    def boxes(self) -> list[Any]:
        return self.all("item-box")

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 6) -> None:
        """A mouse drag between two points of the viewport (CSS px), in a few moves."""
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        builder = ActionBuilder(self.driver, duration=20)
        pointer = builder.pointer_action
        pointer.move_to_location(round(start[0]), round(start[1]))
        pointer.pointer_down()
        for step in range(1, steps + 1):
            pointer.move_to_location(
                round(start[0] + (end[0] - start[0]) * step / steps),
                round(start[1] + (end[1] - start[1]) * step / steps),
            )
        pointer.pointer_up()
        builder.perform()

"""The search page in a real browser: headless Chromium (Debian's) driven through Debian's
chromedriver by Selenium, against the HTTP front over the real suite and the shop catalogue.

Skipped, saying why, without /usr/bin/chromium and /usr/bin/chromedriver, unless MPS_REQUIRE_BROWSER=1
(CI): then they fail. With MPS_PAGE_SCREENSHOT=<path> the matches test writes its screenshot there
(docs/search_page.png is one).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.images import encode_jpeg
from common.photos import load_photo
from gateway.client import Attributes, VisualSearchClient
from tests.gateway.http import browser
from tests.helpers import CUP_BOX, MOTO_BOX

WHY_NOT = browser.missing()
if WHY_NOT and not browser.required():
    pytest.skip(WHY_NOT, allow_module_level=True)

CUP_ATTRIBUTES = Attributes(path="kitchen/cups", tags=("porcelain",), labels={"colour": "white"})

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def on_screen(page: browser.Page, box: Box, image_size: tuple[int, int]) -> Box:
    """A box in the photo's pixels -> where it is on screen, by the photo's displayed size."""
    left, top, right, bottom = page.rect(page.photo_shown())
    sx, sy = (right - left) / image_size[0], (bottom - top) / image_size[1]
    return left + box[0] * sx, top + box[1] * sy, left + box[2] * sx, top + box[3] * sy


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in ("coffee", "motorcycle_left", "retina"):
        paths[name] = folder / f"{name}.jpg"
        paths[name].write_bytes(encode_jpeg(load_photo(name)))
    paths["broken"] = folder / "broken.jpg"
    paths["broken"].write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return paths


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if WHY_NOT:
        pytest.fail(f"MPS_REQUIRE_BROWSER=1 but {WHY_NOT}")
    profile = tmp_path_factory.mktemp("chromium-profile")
    chrome = browser.chromium(profile)
    try:
        yield chrome
    finally:
        chrome.quit()
        browser.remove_profile(profile)


@pytest.fixture(scope="module")
def cup_attributes(front: Any) -> Iterator[Attributes]:
    """coffee-cup with a path, a tag and a label for this module (restored to none after)."""
    with VisualSearchClient(front.suite.addresses["gateway"], timeout_s=60) as client:
        client.update_product("coffee-cup", CUP_ATTRIBUTES, category="tableware")
        try:
            yield CUP_ATTRIBUTES
        finally:
            client.update_product("coffee-cup", Attributes(), category="tableware")


@pytest.fixture
def page(driver: Any, front: Any, cup_attributes: Attributes) -> browser.Page:
    driver.set_window_size(*browser.WINDOW)
    return browser.Page(driver, front.url).open()


def tableware_box(page: browser.Page) -> Any:
    boxes = [b for b in page.boxes() if b.get_attribute("data-category") == "tableware"]
    assert boxes, [(b.get_attribute("data-category"), b.get_attribute("data-product")) for b in page.boxes()]
    return boxes[0]


def first_match(page: browser.Page) -> Any:
    return page.wait(lambda: page.all("match")[0], "the matches")


def test_upload_boxes_the_cup_with_a_readable_label_at_any_size(page, photos, front):
    status = page.upload(photos["coffee"])
    assert page.one("status").get_attribute("data-state") == "done", status
    assert re.search(r"\d+ items? found in this photo, \d+ with matches", status), status
    box = tableware_box(page)
    assert box.get_attribute("data-product") == "coffee-cup" and box.get_attribute("data-class-name") == "cup"
    label = page.one("item-label", within=box)
    assert label.is_displayed() and "tableware" in label.text and re.search(r"coffee-cup 0\.\d{3}", label.text)
    # The list beside the photo names it too.
    entries = page.all("item-entry")
    assert len(entries) == len(page.boxes()) and any("coffee-cup" in e.text for e in entries)

    sizes = []
    for window in (browser.WINDOW, (520, 900)):  # side by side, then the photo shrunk to a phone's width
        page.driver.set_window_size(*window)
        shown = page.rect(page.photo_shown())
        page.wait(
            lambda: abs(page.rect(page.one("overlay"))[2] - page.rect(page.one("photo"))[2]) < 1,
            "the overlay to follow",
        )
        expected = on_screen(page, CUP_BOX, (600, 400))
        assert iou(page.rect(box), expected) > 0.8, (window, page.rect(box), expected)
        style = page.js(
            "const s = getComputedStyle(arguments[0]); return [s.fontSize, s.backgroundColor, s.color];", label
        )
        assert style[0] == "13px" and style[1] not in ("rgba(0, 0, 0, 0)", "transparent") and style[1] != style[2]
        assert label.is_displayed()
        sizes.append(shown[2] - shown[0])
    assert sizes[1] < sizes[0] * 0.85, sizes  # the photo did shrink; the boxes followed, the label did not


def test_clicking_the_box_shows_its_matches_with_thumbnails(page, photos, cup_attributes):
    page.upload(photos["coffee"])
    panel = page.one("matches-panel")
    assert "Select an item" in panel.text
    box = tableware_box(page)
    box.click()
    assert box.get_attribute("aria-pressed") == "true"
    row = first_match(page)
    assert row.get_attribute("data-product-id") == "coffee-cup"
    assert page.one("match-id", within=row).text == "coffee-cup"
    score = page.one("match-score", within=row).text
    assert re.fullmatch(r"0\.\d{3}|1\.000", score) and float(score) > 0.6, score
    assert page.one("match-title", within=row).text == "cup"
    assert page.one("match-path", within=row).text == cup_attributes.path
    chips = page.one("match-labels", within=row).text
    assert "porcelain" in chips and "colour: white" in chips
    assert re.fullmatch(r"image [0-9a-f]+", page.one("match-image", within=row).text)
    thumb = page.one("match-thumb", within=row)
    page.wait(lambda: page.js("return arguments[0].complete && arguments[0].naturalWidth > 0;", thumb), "the thumbnail")
    assert thumb.get_attribute("alt") == "Catalogue image of coffee-cup"
    # Scores best first, three decimals each.
    scores = [float(page.one("match-score", within=r).text) for r in page.all("match")]
    assert scores == sorted(scores, reverse=True)
    # The list entry is selected too; the heading says which item.
    pressed = [e for e in page.all("item-entry") if e.get_attribute("aria-pressed") == "true"]
    assert len(pressed) == 1 and pressed[0].get_attribute("data-category") == "tableware"
    assert "tableware" in panel.find_element("tag name", "h2").text

    target = os.environ.get("MPS_PAGE_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        assert page.driver.save_screenshot(str(target))


def test_a_drawn_region_is_searched_alone(page, photos):
    page.upload(photos["motorcycle_left"])
    assert page.sent()[-1].get("regions") is None
    page.one("draw").click()
    assert page.one("draw").get_attribute("aria-pressed") == "true"
    page.js("arguments[0].scrollIntoView({block: 'center'});", page.one("photo"))
    x0, y0, x1, y1 = on_screen(page, MOTO_BOX, (741, 500))
    status = page.until_searched(lambda: page.drag((x0, y0), (x1, y1)))
    assert "found in the region" in status, status
    region = page.sent()[-1]["regions"]
    assert len(region) == 1 and region[0]["category"] == ""
    sent = tuple(region[0]["box"][k] for k in ("xMin", "yMin", "xMax", "yMax"))
    assert iou(sent, MOTO_BOX) > 0.95, sent  # in the photo's own pixels, not the screen's
    boxes = page.boxes()
    assert len(boxes) == 1 and boxes[0].get_attribute("data-source") == "ITEM_SOURCE_USER_REGION"
    assert boxes[0].get_attribute("data-product") == "moto-left"
    assert iou(page.rect(boxes[0]), on_screen(page, MOTO_BOX, (741, 500))) > 0.9
    # The region's item is shown at once, its matches too.
    assert boxes[0].get_attribute("aria-pressed") == "true"
    assert first_match(page).get_attribute("data-product-id") == "moto-left"
    assert page.one("draw").get_attribute("aria-pressed") == "false"
    # Back to the whole photo.
    page.until_searched(page.one("whole").click)
    assert page.sent()[-1].get("regions") is None and page.one("whole").get_attribute("disabled") is not None


def test_the_signature_kind_goes_with_the_search(page, photos):
    from selenium.webdriver.support.ui import Select

    page.upload(photos["coffee"])
    assert page.sent()[-1]["signatureKind"] == "SIGNATURE_KIND_UNSPECIFIED"
    tableware_box(page).click()
    default_score = float(page.one("match-score", within=first_match(page)).text)

    status = page.until_searched(lambda: Select(page.one("kind")).select_by_value("SIGNATURE_KIND_BOW"))
    assert page.sent()[-1]["signatureKind"] == "SIGNATURE_KIND_BOW"
    assert page.one("status").get_attribute("data-kind") == "SIGNATURE_KIND_BOW" and "colour-texture" in status, status
    box = tableware_box(page)
    assert box.get_attribute("data-product") == "coffee-cup"  # the cup is still first
    box.click()
    row = first_match(page)
    bow_score = float(page.one("match-score", within=row).text)
    assert row.get_attribute("data-product-id") == "coffee-cup" and bow_score != default_score

    # Top-k re-searches too, with the kind kept.
    topk = page.one("top-k")
    topk.clear()
    page.until_searched(lambda: topk.send_keys("2\t"))
    assert page.sent()[-1]["topK"] == 2 and page.sent()[-1]["signatureKind"] == "SIGNATURE_KIND_BOW"


def test_nothing_found_and_no_catalogue_say_so(page, photos):
    status = page.upload(photos["retina"])  # nothing of the shop catalogue
    assert status.startswith("No products found in this photo"), status
    assert not page.all("match")
    notice = page.one("notice")
    assert notice.is_displayed() and "no catalogue product scores" in notice.text, notice.text

    # A region in a category that has no catalogue: its item says so, prominently.
    page.upload(photos["coffee"])
    page.one("region-category").send_keys("hats")
    page.one("draw").click()
    x0, y0, x1, y1 = on_screen(page, CUP_BOX, (600, 400))
    status = page.until_searched(lambda: page.drag((x0, y0), (x1, y1)))
    assert status.startswith("No products found in the region"), status
    assert page.sent()[-1]["regions"][0]["category"] == "hats"
    box = page.one("item-box")
    assert box.get_attribute("data-category") == "hats" and "⚠" in page.one("item-label", within=box).text
    warning = page.one("item-warning")
    assert warning.is_displayed() and "no catalogue for category 'hats' yet" in warning.text
    assert page.one("no-matches").is_displayed()


def test_a_refused_image_shows_the_servers_message(page, photos):
    status = page.upload(photos["broken"])
    assert page.one("status").get_attribute("data-state") == "error", status
    error = page.one("error")
    assert error.is_displayed() and "image cannot be decoded" in error.text, error.text
    assert not page.boxes()


def test_a_dropped_photo_is_searched(page, photos):
    dropped = base64.b64encode(photos["motorcycle_left"].read_bytes()).decode()
    drop = """
      const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
      const transfer = new DataTransfer();
      transfer.items.add(new File([bytes], "bike.jpg", { type: "image/jpeg" }));
      const zone = document.querySelector("[data-testid=dropzone]");
      for (const type of ["dragenter", "dragover", "drop"]) {
        zone.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: transfer }));
      }
    """
    status = page.until_searched(lambda: page.js(drop, dropped))
    assert "found in this photo" in status, status
    bikes = [b for b in page.boxes() if b.get_attribute("data-category") == "vehicles"]
    assert bikes and bikes[0].get_attribute("data-product") == "moto-left"
    assert "over" not in (page.one("dropzone").get_attribute("class") or "")
    assert page.js("return arguments[0].naturalWidth;", page.photo_shown()) == 741


# A gateway that wants a token, as the page sees it: 401 unless the call carries "Bearer let-me-in".
NEEDS_TOKEN = """
(() => {
  window.__tokens = [];
  const inner = window.fetch;
  window.fetch = function (input, init) {
    const given = new Headers((init && init.headers) || {}).get("Authorization");
    window.__tokens.push(given);
    if (given !== "Bearer let-me-in") {
      const body = { error: { code: 401, status: "UNAUTHENTICATED", message: "this call needs a bearer token" } };
      const headers = { "content-type": "application/json" };
      return Promise.resolve(new Response(JSON.stringify(body), { status: 401, headers }));
    }
    return inner.apply(this, arguments);
  };
})();
"""


def test_a_refused_call_asks_for_a_token_and_retries_with_it(driver, page, photos):
    script = browser.before_page_scripts(driver, NEEDS_TOKEN)
    try:
        page.open()
        assert page.one("auth-form").is_displayed()  # the catalogue's stats were refused
        status = page.upload(photos["coffee"])
        assert page.one("status").get_attribute("data-state") == "error" and "access token" in status, status
        form = page.one("auth-form")
        assert form.is_displayed() and "this call needs a bearer token" in form.text
        page.one("token").send_keys("let-me-in")
        status = page.until_searched(lambda: page.one("token").submit())
        assert page.one("status").get_attribute("data-state") == "done", status
        assert tableware_box(page).get_attribute("data-product") == "coffee-cup"
        assert not page.one("auth-form").is_displayed()
        assert page.js("return sessionStorage.getItem('mps.token');") == "let-me-in"
        tableware_box(page).click()
        thumb = page.one("match-thumb", within=first_match(page))
        page.wait(lambda: page.js("return arguments[0].naturalWidth > 0;", thumb), "the thumbnail, with the token")
        assert page.js("return window.__tokens[window.__tokens.length - 1];") == "Bearer let-me-in"
        assert "tableware" in page.one("catalogue").text  # read again with the token
    finally:
        browser.remove_page_script(driver, script)
        page.js("sessionStorage.clear();")

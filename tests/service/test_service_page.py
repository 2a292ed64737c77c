"""The try-it page at / in a real browser (headless Chromium through Selenium), against a
real server on the shipped weights: upload a sample, move the budget slider, sweep, a bad
file, and an API key. Skips, saying why, where Chromium or its driver is not installed
(`.ci/run` installs them as root)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import ThreadedServer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "cifar10-jpeg-test" / "cat_0000.jpg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1100,1150"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition)


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def api_answer(url: str, data: bytes, budget: float, **headers) -> dict:
    response = httpx.post(f"{url}/v1/models/acs_ranked_fastnet_wide/predict",
                          params={"budget": budget, "policy": "threshold"},
                          files={"file": ("image.jpg", data, "image/jpeg")}, headers=headers, timeout=30)
    return response.json()


def set_budget(driver, value: float) -> None:
    """Move the slider as a user does: the value changes, then `input` and `change` fire."""
    driver.execute_script(
        "const s = document.getElementById('budget'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));", value)


def test_page_predicts_follows_the_slider_sweeps_and_shows_errors(browser, tmp_path):
    with ThreadedServer(str(ROOT / "weights")) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: d.find_elements("css selector", "#model option"))
        assert "acs_ranked_fastnet_wide" in browser.find_element("id", "model").get_attribute("value")
        browser.find_element("id", "file").send_keys(str(SAMPLE))
        wait(browser, lambda d: text(d, "ratio") != "–")
        full = api_answer(server.url, SAMPLE.read_bytes(), 1.0)["predictions"][0]
        assert text(browser, "ratio") == f"{full['cost']['executed_ratio']:.3f}"
        assert browser.find_element("css selector", "#topk li .label").text == full["top_k"][0]["label"]
        assert text(browser, "expected").startswith(f"{100 * full['budget']['expected_top1']:.1f}%")
        assert "fraction of the dense MACs" in browser.page_source and "floor" in text(browser, "budget-help")

        set_budget(browser, 0.25)
        wait(browser, lambda d: text(d, "effective") == "0.250")
        low = api_answer(server.url, SAMPLE.read_bytes(), 0.25)["predictions"][0]
        wait(browser, lambda d: text(d, "ratio") == f"{low['cost']['executed_ratio']:.3f}")
        assert text(browser, "ratio") != f"{full['cost']['executed_ratio']:.3f}"
        assert browser.find_element("css selector", "#topk li .label").text == low["top_k"][0]["label"]
        assert len(browser.find_elements("css selector", "#layers .bar")) == 6

        browser.find_element("id", "sweep").click()
        points = wait(browser, lambda d: d.execute_script("return window.sweepPoints"))
        assert len(points) == 10 and all(p["ms"] > 0 for p in points)
        assert points[0]["ratio"] < points[-1]["ratio"]
        if os.environ.get("ACS_PAGE_SCREENSHOT"):  # the README's screenshot
            browser.save_screenshot(os.environ["ACS_PAGE_SCREENSHOT"])

        from selenium.webdriver.support.ui import Select

        Select(browser.find_element("id", "model")).select_by_value("fastnet")  # a dense model
        wait(browser, lambda d: not d.find_element("id", "budget").is_enabled())
        assert "budget is fixed" in text(browser, "budget-help")
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        browser.find_element("id", "file").send_keys(str(bad))
        wait(browser, lambda d: d.find_element("id", "error").is_displayed())
        expected = httpx.post(f"{server.url}/v1/models/acs_ranked_fastnet_wide/predict",
                              files={"file": ("notes.txt", b"not an image", "text/plain")}).json()["error"]
        assert text(browser, "error") == expected
        assert expected.startswith("could not decode image: not an image")


def test_page_asks_for_the_api_key_and_sends_it(browser):
    with ThreadedServer(str(ROOT / "weights"), api_key="s3cret") as server:
        browser.get(server.url + "/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait(browser, lambda d: d.find_element("id", "key-row").is_displayed())
        key = browser.find_element("id", "api-key")
        key.send_keys("s3cret")
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait(browser, lambda d: d.find_elements("css selector", "#model option"))
        browser.find_element("id", "file").send_keys(str(SAMPLE))
        wait(browser, lambda d: text(d, "ratio") != "–")
        assert not browser.find_element("id", "error").is_displayed()

"""The page in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, Selenium):
upload a photo and see its top 3 rendered as bars; upload a text file and see the error.
The screenshot goes to ``tests/artifacts/serving_page.png``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serving_support import CLASSES, ROOT, export_fixture, photos, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them: "
    "apt-get install -y chromium chromium-driver)",
)


def chromium_driver(profile: Path):
    """Selenium on the system's chromium and chromedriver; selenium-manager never runs (both
    paths are given and SE_OFFLINE is set), so nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    export = export_fixture(folder)
    with running_server(export, folder / "server.log") as server:
        driver = chromium_driver(folder / "profile")
        try:
            driver.get(server.url + "/")
            yield driver, folder
        finally:
            driver.quit()


def _wait(driver, css: str, count: int = 1, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d):
        elements = d.find_elements(By.CSS_SELECTOR, css)
        return elements if len(elements) >= count else False

    return WebDriverWait(driver, timeout).until(found)


def test_upload_a_photo_then_a_text_file(page):
    from selenium.webdriver.common.by import By

    driver, folder = page
    assert driver.title.startswith("carclassifier")
    assert driver.find_element(By.ID, "model-name").text == "serving-test / tiny / stage_1"
    assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#classes li")] == CLASSES

    photo = photos(folder, 1)[0]
    driver.find_element(By.ID, "files").send_keys(str(photo))
    (card,) = _wait(driver, ".card.ok")
    assert card.find_element(By.TAG_NAME, "figcaption").text == photo.name
    rows = card.find_elements(By.CSS_SELECTOR, ".row")
    assert len(rows) == 3
    names = [r.find_element(By.CSS_SELECTOR, ".name").text for r in rows]
    assert set(names) <= set(CLASSES) and len(set(names)) == 3
    percents = [float(r.find_element(By.CSS_SELECTOR, ".pct").text.rstrip("%")) for r in rows]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.1
    widths = [r.find_element(By.CSS_SELECTOR, ".fill").size["width"] for r in rows]
    assert widths[0] > 0 and widths == sorted(widths, reverse=True)  # bars drawn to scale
    image = card.find_element(By.TAG_NAME, "img")
    assert driver.execute_script("return arguments[0].naturalWidth", image) > 0  # preview shown

    text_file = folder / "notes.txt"
    text_file.write_text("these are notes, not a car\n")
    driver.find_element(By.ID, "files").send_keys(str(text_file))
    (error,) = _wait(driver, ".card.error")
    message = error.find_element(By.CSS_SELECTOR, ".error-message").text
    assert "not an image" in message and "notes.txt" in message
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card.ok")) == 1  # the photo's result stays

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "serving_page.png"))
    # Nothing was blocked by the Content-Security-Policy and nothing failed to load.
    problems = [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "/v1/predict" not in entry["message"]
    ]
    assert not problems, problems

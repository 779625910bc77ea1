"""The page at `GET /` in a real browser (headless Chromium from Debian, driven by Selenium)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import PdfPage, make_pdf, sample_image
from test_server import Server, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromium-driver (make debian-packages)",
)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def keyed_server(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Server]:
    running = start_server(tiny_checkpoint, tmp_path / "jobs", "--api-key", "page-key")
    yield running
    assert running.stopped_cleanly()


def test_a_dropped_pdf_shows_each_page_beside_its_text_with_the_line_boxes(
    keyed_server: Server, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pdf = make_pdf(
        tmp_path / "two pages.pdf", pages=[PdfPage(text="First page"), PdfPage(text="Second page")]
    )
    driver = browser
    driver.get(keyed_server.url + "/")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 120)
    key = wait.until(seen.visibility_of_element_located((By.ID, "key")))  # the server asks for a key
    key.send_keys("page-key")
    Select(driver.find_element(By.ID, "task")).select_by_value("ocr")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "file").send_keys(str(pdf))  # type: ignore[attr-defined]
    wait.until(lambda d: "done, 2 of 2 pages" in d.find_element(By.ID, "status").text)
    sections = driver.find_elements(By.CSS_SELECTOR, "section.page")  # type: ignore[attr-defined]
    assert [section.get_attribute("data-page") for section in sections] == ["1", "2"]
    for section, text in zip(sections, ("First page", "Second page"), strict=True):
        assert section.find_element(By.TAG_NAME, "pre").text == text  # the PDF's own text layer
        wait.until(lambda _, s=section: s.find_elements(By.TAG_NAME, "img"))
        image = section.find_element(By.TAG_NAME, "img")
        wait.until(
            lambda d, i=image: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", i
            )
        )
        polygons = section.find_elements(By.CSS_SELECTOR, "svg polygon.line")
        assert len(polygons) == 1 and image.size["width"] > 100
        box = polygons[0].rect
        assert box["width"] > 10 and box["height"] > 5  # drawn over the page, where its line is


def test_a_wrong_key_says_why_on_the_page(keyed_server: Server, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sample_image().save(tmp_path / "page.png")
    driver = browser
    driver.get(keyed_server.url + "/")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "key").send_keys("wrong")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "file").send_keys(str(tmp_path / "page.png"))  # type: ignore[attr-defined]
    status = WebDriverWait(driver, 60).until(
        lambda d: (
            d.find_element(By.ID, "status").text.startswith("a valid API key")
            and d.find_element(By.ID, "status")
        )
    )
    assert status.get_attribute("class") == "error"

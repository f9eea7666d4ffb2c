"""The review page and the report in a real browser: headless Chromium driven by selenium.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and `selenium` (dev
extras); skipped with the reason otherwise. Run:

    pytest tests/test_review_browser.py -q
    TBR_SCREENSHOT_DIR=docs pytest tests/test_review_browser.py -q   # also refresh docs/*.png

The run is tests/review_run.py (synthetic completions: this tests the pages, not the models).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from analysis.report import write_report
from tbr_ray.results import read_results
from tbr_ray.review import ReviewConfig, make_server
from tests.review_run import build_review_run

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver on PATH "
    "(apt-get install -y chromium chromium-driver; .ci/run does this)",
)
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium: pip install -e '.[dev]'"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 15


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)  # no sandbox: CI runs as root in a container
    options.add_argument("--window-size=1200,1000")
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return build_review_run(tmp_path / "run")


def screenshot(driver, name: str, tmp_path: Path) -> None:
    """Into tmp_path always; into $TBR_SCREENSHOT_DIR too when set (to refresh docs/)."""
    for folder in filter(None, (tmp_path, os.environ.get("TBR_SCREENSHOT_DIR"))):
        driver.save_screenshot(str(Path(folder) / name))


def wait_for(driver, condition) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: condition(d))


def done_count(driver) -> int:
    return int(driver.find_element(By.ID, "progress").get_attribute("data-done") or -1)


def test_review_page_labels_with_the_keyboard_and_keeps_them(browser, run_dir, tmp_path):
    server = make_server(run_dir, ReviewConfig(reviewer="ada", sample_per_cell=2))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert browser.find_element(By.ID, "reason").text == "judges disagree"
        given = {}
        for key, label in (
            ("1", "full_compliance"),
            ("2", "full_refusal"),
            ("p", "partial_refusal"),
        ):
            item = browser.find_element(By.ID, "item").get_attribute("data-key")
            browser.find_element(By.TAG_NAME, "body").send_keys(key)
            wait_for(browser, lambda d, n=len(given) + 1: done_count(d) == n)
            given[item] = label
        assert browser.find_element(By.ID, "progress").text == "3 of 13 labelled · 10 to do"
        screenshot(browser, "review-page.png", tmp_path)
        browser.refresh()  # closing or reloading the page loses nothing
        wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert done_count(browser) == 3
        assert browser.find_element(By.ID, "position").text == "4 / 13"  # first unlabelled
        browser.find_element(By.TAG_NAME, "body").send_keys("k")  # back to the third item
        chosen = browser.find_element(By.CSS_SELECTOR, ".labels button.chosen")
        assert chosen.get_attribute("data-label") == "partial_refusal"
    finally:
        server.shutdown()
        server.server_close()
    reviews = read_results(run_dir).reviews
    stored = {f"{r.cell_id}|{r.benchmark}|{r.prompt_id}": r.label for r in reviews.itertuples()}
    assert stored == given and set(reviews["reviewer"]) == {"ada"}


def test_report_number_opens_onto_its_generations(browser, run_dir, tmp_path):
    paths = write_report(run_dir, tmp_path / "report", n_boot=100)
    page = paths["report_html"].read_text()
    assert "<script src" not in page and "<link" not in page  # one file, opens offline
    browser.get(paths["report_html"].as_uri())
    screenshot(browser, "report-table3.png", tmp_path)
    link = browser.find_element(
        By.CSS_SELECTOR, "table.t3 a[href='#gen-tiny-llama-xstest-s-none-g0.00']"
    )
    assert link.text == "0.667"  # XSTest-S, none: 4 of 6 complied under paper-keywords
    link.click()
    details = browser.find_element(By.ID, "gen-tiny-llama-xstest-s-none-g0.00")
    wait_for(browser, lambda d: details.get_property("open"))
    rows = details.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 6 and all(r.is_displayed() for r in rows)
    assert "I don't think light matters most" in details.text
    screenshot(browser, "report-generations.png", tmp_path)
    browser.find_element(By.ID, "only-disagree").click()
    shown = [r for r in rows if r.is_displayed()]
    assert len(shown) == 2  # s-1 and s-3: the rule judges disagree
    assert all("disagree" in r.get_attribute("class") for r in shown)
    browser.get(
        paths["report_html"].as_uri() + "#gen-tiny-llama-xstest-h-compliance-external-g1.00"
    )
    target = browser.find_element(By.ID, "gen-tiny-llama-xstest-h-compliance-external-g1.00")
    wait_for(browser, lambda d: target.get_property("open"))  # a link from elsewhere opens too

"""The console in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

An administrator logs in, adds an AE title, echoes it (a real DCMTK storescp), and finds a study that
DCMTK storescu sent to `cxrnode serve`. Screenshots of each step are kept in test-artifacts/console/.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support.console import ADMIN, PASSWORD, ConsoleSite, console_site
from tests.support.dcmtk import StoreSCP
from tests.support.paths import REPO_ROOT, dicom_dir, dicom_manifest

pytest.importorskip("selenium")
from selenium import webdriver
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.timeout(300)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleSite]:
    with console_site(tmp_path_factory.mktemp("browser")) as s:
        assert s.statuses[dicom_manifest()[0]["file"]] == 0x0000
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Debian packages chromium and chromium-driver are not installed")
    profile = tempfile.mkdtemp(prefix="cxrnode-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _shot(driver: WebDriver, name: str) -> None:
    # The full page: make the window as tall as the document first.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height), 6000)))
    assert driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _wait_text(driver: WebDriver, css: str, text: str) -> None:
    WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))


def test_log_in_add_and_echo_an_ae_then_find_a_study(site: ConsoleSite, browser: WebDriver, tmp_path: Path) -> None:
    web, store = site.web, site.store
    d = browser

    # Log in (the dashboard sends us to the login page first).
    d.get(web.url + "/")
    WebDriverWait(d, 30).until(ec.presence_of_element_located((By.ID, "login")))
    assert "/login" in d.current_url
    d.find_element(By.ID, "username").send_keys(ADMIN)
    d.find_element(By.ID, "password").send_keys(PASSWORD)
    _shot(d, "01-login")
    d.find_element(By.ID, "login-submit").click()
    WebDriverWait(d, 30).until(ec.presence_of_element_located((By.ID, "today")))
    received = int(d.find_element(By.ID, "n-received").text)
    assert received == len([i for i in store.list_instances() if i.state not in ("rejected", "duplicate")])
    _shot(d, "02-dashboard")

    with StoreSCP(tmp_path / "scp", ae_title="ECHOSCP") as scp:
        # Add an AE title.
        d.find_element(By.LINK_TEXT, "AE titles").click()
        WebDriverWait(d, 30).until(ec.presence_of_element_located((By.ID, "ae-add")))
        form = d.find_element(By.ID, "ae-add")
        form.find_element(By.NAME, "name").send_keys("ECHOSCP")
        Select(form.find_element(By.NAME, "role")).select_by_visible_text("destination")
        form.find_element(By.NAME, "host").send_keys("127.0.0.1")
        form.find_element(By.NAME, "port").send_keys(str(scp.port))
        form.find_element(By.NAME, "description").send_keys("DCMTK storescp (test)")
        form.find_element(By.ID, "ae-add-submit").click()
        _wait_text(d, ".flash.ok", "AE title ECHOSCP added")
        row = d.find_element(By.ID, "ae-ECHOSCP")
        assert "destination" in row.text and str(scp.port) in row.text
        _shot(d, "03-ae-added")

        # C-ECHO it: a real association to storescp.
        row.find_element(By.CSS_SELECTOR, "button.echo").click()
        _wait_text(d, ".flash.ok", "C-ECHO ECHOSCP: success")
        assert "success in" in d.find_element(By.ID, "ae-ECHOSCP").text
        _shot(d, "04-ae-echo")

    events = [(e.kind, e.actor) for e in store.list_events(kinds=["ae.added", "ae.echo"])]
    assert events[-2:] == [("ae.added", f"web:{ADMIN}"), ("ae.echo", f"web:{ADMIN}")]

    # Find the study storescu sent, by its accession number, and open it.
    first = pydicom.dcmread(dicom_dir() / dicom_manifest()[0]["file"], stop_before_pixels=True)
    d.find_element(By.LINK_TEXT, "Studies").click()
    WebDriverWait(d, 30).until(ec.presence_of_element_located((By.ID, "study-search")))
    d.find_element(By.ID, "search-accession").send_keys(str(first.AccessionNumber))
    Select(d.find_element(By.ID, "search-ae")).select_by_visible_text("STORESCU")
    before = d.find_element(By.ID, "study-search")
    d.find_element(By.ID, "search-submit").click()
    # The unfiltered list has the same links: wait for the result page itself, or its links go stale.
    WebDriverWait(d, 30).until(ec.staleness_of(before))
    found = (By.XPATH, f"//*[@id='studies']//a[contains(@class, 'uid') and text()='{first.StudyInstanceUID}']")
    link = WebDriverWait(d, 30).until(ec.element_to_be_clickable(found))
    _shot(d, "05-study-search")
    link.click()
    _wait_text(d, "h1", str(first.StudyInstanceUID))
    assert str(first.SOPInstanceUID) in d.page_source
    # The thumbnail rendered from the spooled file loaded in the browser.
    img = d.find_element(By.CSS_SELECTOR, "figure.thumb img")
    WebDriverWait(d, 30).until(
        lambda drv: drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
    )
    assert d.execute_script("return arguments[0].naturalWidth", img) > 0
    _shot(d, "06-study")
    assert sorted(p.name for p in ARTIFACTS.glob("0*.png"))[:6] == [
        "01-login.png",
        "02-dashboard.png",
        "03-ae-added.png",
        "04-ae-echo.png",
        "05-study-search.png",
        "06-study.png",
    ]

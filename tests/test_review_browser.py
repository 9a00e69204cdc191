"""The review loop in a real browser: Debian's chromium, driven by selenium, clicks report.html's
own controls (identify -> confirm, reject, rename -> export decisions.csv -> jaguar-kit review ->
identify again), and the page stays escape-safe with hostile names.

Skipped only when chromium, chromedriver or selenium is missing; CI installs them (.ci/run).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from photo_layouts import make_layout, shared_model

from jaguar_kit.photos.catalogue import Catalogue, build_catalogue
from jaguar_kit.photos.cluster import cluster
from jaguar_kit.photos.identify import identify
from jaguar_kit.photos.inputs import read_photos
from jaguar_kit.photos.report import write_cluster_report, write_identify_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _skip_without_browser():
    if not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()):
        pytest.skip(f"chromium and chromedriver are not installed ({CHROMIUM}, {DRIVER}); "
                    "apt-get install chromium chromium-driver (CI does)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e .[dev])")


@pytest.fixture
def browser(tmp_path):
    """Headless chromium with a fresh profile; downloads land in ``browser.downloads``."""
    _skip_without_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # an explicit driver: no Selenium Manager
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def entry(driver, photo: str):
    from selenium.webdriver.common.by import By

    found = [e for e in driver.find_elements(By.CSS_SELECTOR, "[data-review]") if e.get_attribute("data-photo") == photo]
    assert len(found) == 1, photo
    return found[0]


def click(element, cls: str) -> None:
    from selenium.webdriver.common.by import By

    element.find_element(By.CSS_SELECTOR, f"button.{cls}").click()


def wait_for_file(path: Path, seconds: float = 20) -> Path:
    end = time.time() + seconds
    while time.time() < end:
        if path.is_file() and not list(path.parent.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path} was not downloaded; folder holds {[p.name for p in path.parent.iterdir()]}")


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


@pytest.mark.slow
def test_review_round_trip_in_the_browser(competition, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    layout = make_layout(competition, tmp_path / "eco")
    cat = tmp_path / "cat"
    build_catalogue(read_photos(layout.photos), shared_model(), cat, progress=False)
    proc = run_cli("identify", "--catalogue", cat, "--photos", layout.unlabelled, "--out", tmp_path / "first")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "first" / "identify.csv")
    known = table[table["decision"] != "new"]
    renamed = table[(table["decision"] == "new") & table["photo"].map(lambda p: layout.truth[p] in layout.new)]
    assert len(known) >= 2 and len(renamed) >= 1, table[["photo", "decision"]]
    confirmed, rejected, renamed = known.iloc[0], known.iloc[1], renamed.iloc[0]

    browser.get((tmp_path / "first" / "report.html").as_uri())
    browser.find_element(By.ID, "reviewer").send_keys("Ana Jaguara")
    click(entry(browser, confirmed["photo"]), "confirm")
    click(entry(browser, rejected["photo"]), "reject")
    box = entry(browser, renamed["photo"])
    box.find_element(By.CSS_SELECTOR, ".rename-name").send_keys("Zé Novo")
    click(box, "rename")

    browser.refresh()  # the decisions survive a reload (localStorage)
    assert browser.find_element(By.ID, "reviewer").get_attribute("value") == "Ana Jaguara"
    assert entry(browser, renamed["photo"]).find_element(By.CSS_SELECTOR, ".status").text == "renamed: Zé Novo"
    Select(browser.find_element(By.ID, "filter-decision")).select_by_value("new")  # filtering hides the others
    shown = [e for e in browser.find_elements(By.CSS_SELECTOR, "[data-review]") if e.is_displayed()]
    assert shown and all(e.get_attribute("data-decision") == "new" for e in shown)
    Select(browser.find_element(By.ID, "filter-decision")).select_by_value("")
    Select(browser.find_element(By.ID, "sort")).select_by_value("uncertain")  # closest to the threshold first
    order = [float(e.get_attribute("data-uncertainty")) for e in browser.find_elements(By.CSS_SELECTOR, "[data-review]")]
    assert order == sorted(order, reverse=True) and len(order) == len(table)

    browser.find_element(By.ID, "export").click()
    decisions = wait_for_file(browser.downloads / "decisions.csv")
    rows = {r["photo"]: r for r in csv.DictReader(decisions.open(encoding="utf-8"))}
    assert {r["action"] for r in rows.values()} == {"confirm", "reject", "rename"} and len(rows) == 3
    assert all(r["reviewer"] == "Ana Jaguara" and r["decided_at"] for r in rows.values())

    proc = run_cli("review", "--catalogue", cat, "--decisions", decisions)
    assert proc.returncode == 0, proc.stderr
    assert "3 decisions applied (1 confirmed, 1 renamed, 1 rejected): 2 photos added" in proc.stdout
    after = Catalogue.load(cat)
    ids = dict(zip(after.keys, after.identities))
    assert ids[rows[renamed["photo"]]["key"]] == "Zé Novo"
    assert ids[rows[confirmed["photo"]]["key"]] == confirmed["decision"]
    assert rows[rejected["photo"]]["key"] not in ids
    history = [json.loads(line) for line in (cat / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(h["action"] for h in history) == ["confirm", "reject", "rename"]
    assert {h["reviewer"] for h in history} == {"Ana Jaguara"}

    again = run_cli("review", "--catalogue", cat, "--decisions", decisions)  # applying it twice changes nothing
    assert again.returncode == 0 and "3 applied before" in again.stdout, again.stdout + again.stderr
    assert len(Catalogue.load(cat)) == len(after) and len((cat / "history.jsonl").read_text().splitlines()) == 3

    proc = run_cli("identify", "--catalogue", cat, "--photos", layout.unlabelled, "--out", tmp_path / "second")
    assert proc.returncode == 0, proc.stderr
    second = pd.read_csv(tmp_path / "second" / "identify.csv").set_index("photo")
    assert second.loc[renamed["photo"], "decision"] == "Zé Novo"  # the new animal is now known by its name
    assert second.loc[confirmed["photo"], "decision"] == confirmed["decision"]


HOSTILE = ["<img src=x onerror=alert(1)>", "\"><script>window.pwned=1</script>"]


@pytest.mark.slow
def test_hostile_names_stay_text_in_the_browser(competition, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    layout = make_layout(competition, tmp_path / "eco")
    rows = list(csv.reader(layout.csv.open()))
    renames = dict(zip(layout.known, HOSTILE))  # two individuals get hostile names (CSV identities)
    with layout.csv.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[r[0], renames.get(r[1], r[1]), *r[2:]] for r in rows[1:]])
    cat = build_catalogue(read_photos(layout.csv), shared_model(), tmp_path / "cat", progress=False)
    photos = read_photos(layout.unlabelled, folder_labels=False)
    ident = identify(cat, photos, model=shared_model(), top_k=3, cache_dir=tmp_path / "q", progress=False)
    clusters = cluster(photos, model=shared_model(), catalogue=cat, cache_dir=tmp_path / "q", progress=False)
    pages = [write_identify_report(ident, tmp_path / "identify.html"),
             write_cluster_report(clusters, tmp_path / "cluster.html")]
    for page in pages:
        browser.get(page.as_uri())
        assert no_alert(browser)
        text = browser.find_element(By.TAG_NAME, "body").text
        assert all(name in text for name in HOSTILE), page  # shown as text
        first = browser.find_elements(By.CSS_SELECTOR, "[data-review]")[0]
        first.find_element(By.CSS_SELECTOR, ".rename-name").send_keys(HOSTILE[0])
        click(first, "rename")  # the status line shows the typed name
        chooser = Select(browser.find_element(By.ID, "filter-individual"))
        chooser.select_by_index(len(chooser.options) - 1)
        browser.find_element(By.ID, "filter-text").send_keys(HOSTILE[1])
        assert no_alert(browser)
        assert browser.execute_script("return window.pwned === undefined && "
                                      "document.querySelectorAll('img[src=\"x\"], script:not([src])').length === 1")
    # a group's decision is exported for each of its members, the typed name intact
    browser.find_element(By.ID, "reviewer").send_keys(HOSTILE[1])
    browser.find_element(By.ID, "export").click()
    rows = list(csv.DictReader(wait_for_file(browser.downloads / "decisions.csv").open(encoding="utf-8")))
    group = first.get_attribute("data-group")
    assert [r["photo"] for r in rows] == [p.name for p, g in zip(clusters.photos, clusters.groups)
                                          if clusters.group_names[g] == group]
    assert {(r["kind"], r["action"], r["name"], r["reviewer"]) for r in rows} == {("group", "rename", *HOSTILE)}
    assert no_alert(browser)

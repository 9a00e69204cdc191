"""The review page at 1,000 photos: its size and how soon it is usable in a browser.

Synthetic jaguar photos (50 individuals x 25 views, 384 px, prepared as `identify` prepares
them): 5 views of each of 30 individuals form a 150-photo catalogue, and 1,000 of the others
are identified with their top-5 candidates (clustered random embeddings: the page does not
depend on the model). The
page is written by today's report.py (above report.INLINE_PHOTOS: thumbnails as files in
thumbs/, lazy) and, for the same input, by main's report.py before the review page (every
thumbnail inline); and the largest page that stays one file (report.INLINE_PHOTOS photos).
Each page is opened in headless Chromium (selenium): navigationStart to
DOMContentLoaded and to load (median of 5), and the time the page's script takes to re-sort
every entry (most uncertain first).

    .venv/bin/python benchmarks/bench_report_page.py   # -> benchmarks/results/report_page.json

Needs chromium and chromedriver (apt-get install chromium chromium-driver) and selenium.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.data.synth import generate_competition
from jaguar_kit.photos import report
from jaguar_kit.photos.calibration import calibrate, hold_out_scores
from jaguar_kit.photos.catalogue import Catalogue
from jaguar_kit.photos.identify import _identification
from jaguar_kit.photos.inputs import prepare_photos, read_photos, thumbnail_bytes

PHOTOS, IDS, KNOWN, PER_KNOWN, TOP_K = 1000, 50, 30, 5, 5


def old_report_module(tmp: Path):
    """main's report.py (the page before the review loop), or None outside a git checkout."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", "main:jaguar_kit/photos/report.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp / "report_main.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("jaguar_kit.photos._report_main", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_input(tmp: Path):
    comp = generate_competition(tmp / "comp", identities=IDS, images_per_identity=PHOTOS // IDS + PER_KNOWN,
                                test_per_identity=1, size=384, seed=7, workers=2, progress=False)
    photos = read_photos(comp)
    keys, files = prepare_photos(photos, tmp / "cache", size=384, workers=2, progress=False)
    ids = sorted({p.identity for p in photos})
    known = set(ids[:KNOWN])
    rng = np.random.default_rng(0)
    centre = {i: rng.normal(size=64) for i in ids}
    emb = np.stack([centre[p.identity] + 1.2 * rng.normal(size=64) for p in photos]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    taken: dict[str, int] = {}
    cat_rows, queries = [], []
    for i, p in enumerate(photos):
        if p.identity in known and taken.get(p.identity, 0) < PER_KNOWN:
            taken[p.identity] = taken.get(p.identity, 0) + 1
            cat_rows.append(i)
        else:
            queries.append(i)
    cat = Catalogue([keys[i] for i in cat_rows], [photos[i].identity for i in cat_rows],
                    [photos[i].name for i in cat_rows], [str(photos[i].path) for i in cat_rows],
                    np.full((len(cat_rows), 4), -1), emb[cat_rows], [thumbnail_bytes(files[i]) for i in cat_rows],
                    {"source": "synthetic embeddings"})
    codes, uniques = cat.codes()
    cat.calibration = calibrate(cat.embeddings, cat.identities, 0.05, hold_out_scores(cat.embeddings, codes, len(uniques)))

    def identification(n: int):
        q = queries[:n]
        return _identification(cat, [photos[i] for i in q], [keys[i] for i in q], [files[i] for i in q], emb[q], TOP_K)

    return identification


def browser(tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def timings(driver, page: Path, runs: int = 5) -> dict:
    dcl, load, sort, paint = [], [], [], []
    for _ in range(runs):
        driver.get(page.as_uri())
        t = driver.execute_script("var t = performance.timing; return [t.navigationStart, "
                                  "t.domContentLoadedEventEnd, t.loadEventEnd];")
        dcl.append(t[1] - t[0])
        load.append(t[2] - t[0])
        paint.append(driver.execute_script("var p = performance.getEntriesByName('first-contentful-paint');"
                                           "return p.length ? p[0].startTime : null;"))
        ms = driver.execute_script(
            "var s = document.getElementById('sort'); if (!s) { return null; }"
            "var t0 = performance.now(); s.value = 'uncertain'; s.dispatchEvent(new Event('change'));"
            "return performance.now() - t0;")
        if ms is not None:
            sort.append(ms)
    out = {"first_contentful_paint_ms": round(statistics.median(paint), 1),
           "dom_content_loaded_ms": statistics.median(dcl), "load_ms": statistics.median(load)}
    if sort:
        out["sort_all_entries_ms"] = round(statistics.median(sort), 1)
    return out


def size(page: Path) -> dict:
    thumbs = page.parent / report.THUMBS
    files = list(thumbs.glob("*.jpg")) if thumbs.is_dir() else []
    return {"page_bytes": page.stat().st_size, "thumb_files": len(files),
            "thumb_bytes": sum(f.stat().st_size for f in files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="also copy the pages to this folder (to look at them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        identification = make_input(tmp)
        ident = identification(PHOTOS)
        pages = {"review_page": report.write_identify_report(ident, tmp / "new" / "report.html"),
                 # the largest page that stays one file (to mail): where the line is
                 f"review_page_{report.INLINE_PHOTOS}_photos_one_file": report.write_identify_report(
                     identification(report.INLINE_PHOTOS), tmp / "inline" / "report.html")}
        old = old_report_module(tmp)
        if old is not None:
            pages["before_inline"] = old.write_identify_report(ident, tmp / "old" / "report.html")
        result = {
            "what": f"identify report.html for {len(ident.photos)} synthetic photos with top-{TOP_K} candidates; "
                    f"time from navigationStart in headless Chromium (median of 5, file://)",
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} threads, load average "
                       f"{os.getloadavg()[0]:.1f} before the timings (a shared machine: they are noisy)",
            "inline_photos_limit": report.INLINE_PHOTOS,
            "photos": len(ident.photos),
            "top_k": TOP_K,
        }
        driver = browser(tmp)
        try:
            result["chromium"] = driver.capabilities.get("browserVersion")
            for name, page in pages.items():
                result[name] = {**size(page), **timings(driver, page)}
        finally:
            driver.quit()
        if args.keep:
            for name, page in pages.items():
                shutil.copytree(page.parent, Path(args.keep) / name, dirs_exist_ok=True)
        if "before_inline" in result:
            result["before_bytes_per_40_photos"] = round(result["before_inline"]["page_bytes"] / len(ident.photos) * 40)
    out = REPO / "benchmarks" / "results" / "report_page.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

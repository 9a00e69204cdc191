"""The review page (templates, controls, escaping, thumbnails beside a large page) and
`jaguar-kit review`, which applies decisions.csv to a catalogue (without a browser; the browser
round trip is tests/test_review_browser.py)."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli
from photo_layouts import make_layout, shared_model

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.photos import report
from jaguar_kit.photos.catalogue import Catalogue, build_catalogue
from jaguar_kit.photos.identify import identify
from jaguar_kit.photos.inputs import read_photos
from jaguar_kit.photos.review import COLUMNS, apply_decisions, read_decisions, read_history

HOSTILE = "<img src=x onerror=alert(1)>"


class Page(HTMLParser):
    """Elements and text of a page, as a browser's parser sees them."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def setup(competition, tmp_path_factory):
    """A catalogue whose first individual has a hostile name, and the unlabelled photos identified."""
    tmp = tmp_path_factory.mktemp("review")
    layout = make_layout(competition, tmp / "eco")
    rows = list(csv.reader(layout.csv.open()))
    with layout.csv.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[r[0], HOSTILE if r[1] == layout.known[0] else r[1], *r[2:]]
                                             for r in rows[1:]])
    build_catalogue(read_photos(layout.csv), shared_model(), tmp / "cat", progress=False)
    ident = identify(tmp / "cat", read_photos(layout.unlabelled, folder_labels=False), model=shared_model(), top_k=3,
                     cache_dir=tmp / "q", progress=False)
    return layout, ident, tmp


@pytest.fixture
def catalogue(setup, tmp_path) -> Path:
    """A fresh copy of the module's catalogue (review changes it)."""
    return Path(shutil.copytree(setup[2] / "cat", tmp_path / "cat"))


def row(ident, i: int, action: str, name: str = "", **extra) -> dict:
    """One decisions.csv row for photo ``i``, as the page exports it."""
    p = ident.photos[i]
    return {"photo": p.name, "path": str(p.path.resolve()), "key": ident.keys[i], "box": "", "kind": "identify",
            "group": "", "proposed": ident.decisions[i], "action": action,
            "name": name or (ident.decisions[i] if action == "confirm" else ""), "reviewer": "Ana",
            "decided_at": "2026-12-07T04:00:00.000Z", **extra}


def write_decisions(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def pick(ident, new: bool) -> list[int]:
    return [i for i, d in enumerate(ident.decisions) if (d == "new") == new]


# --- the page -------------------------------------------------------------------------------


def test_page_has_controls_review_data_and_a_viewport_for_every_photo(setup, tmp_path):
    layout, ident, _ = setup
    page = parse(report.write_identify_report(ident, tmp_path / "report.html"))
    entries = page.all("section")
    assert [(e["data-photo"], e["data-key"], e["data-proposed"]) for e in entries] == [
        (p.label, k, d) for p, k, d in zip(ident.photos, ident.keys, ident.decisions)]
    assert all(Path(e["data-path"]).is_file() for e in entries)  # what decisions.csv needs to find the photo
    for cls in ("confirm", "reject", "rename", "undo"):
        assert len(page.all("button", **{"class": cls})) == len(entries)
    assert page.all("button", id="export") and page.all("input", id="reviewer")
    assert page.all("meta", name="viewport")
    assert {o["value"] for o in page.all("option")} >= set(ident.catalogue.individuals)  # rename suggestions
    sorts = {a["value"] for t, a in page.tags if t == "option" and "value" in a}
    assert {"uncertain", "probability", "individual"} <= sorts


def test_hostile_names_are_text_and_attributes_never_markup(setup, tmp_path):
    layout, ident, _ = setup
    assert HOSTILE in ident.catalogue.individuals
    path = report.write_identify_report(ident, tmp_path / "report.html")
    page = parse(path)
    assert not page.all("img", src="x")  # no element made from the name
    assert len(page.all("script")) == 1 and all("src" not in a for a in page.all("script"))
    assert HOSTILE in " ".join(page.text)  # shown, as text
    assert HOSTILE in {o.get("value") for o in page.all("option")}  # and as an attribute value, intact
    assert HOSTILE not in path.read_text(encoding="utf-8")  # escaped everywhere in the source


def test_a_large_page_keeps_its_thumbnails_beside_it_lazily(setup, tmp_path, monkeypatch):
    layout, ident, _ = setup
    small = report.write_identify_report(ident, tmp_path / "small" / "report.html")
    monkeypatch.setattr(report, "INLINE_PHOTOS", 5)
    big = report.write_identify_report(ident, tmp_path / "big" / "report.html")
    images = parse(big).all("img")
    assert len(images) == len(ident.photos) * 4
    assert all(a["src"].startswith("thumbs/") and a.get("loading") == "lazy" for a in images)
    for a in images:
        pixels = cv2.imread(str(big.parent / a["src"]))
        assert pixels is not None and pixels.shape[2] == 3
    assert not (small.parent / "thumbs").exists()
    assert all(a["src"].startswith("data:image/") for a in parse(small).all("img"))
    assert big.stat().st_size < small.stat().st_size / 3

    (big.parent / "thumbs" / "notes.txt").write_text("mine")  # a file the kit did not write
    monkeypatch.setattr(report, "INLINE_PHOTOS", 200)
    report.write_identify_report(ident, big)  # rewritten as one file: its old thumbnails go, nothing else
    assert sorted(p.name for p in (big.parent / "thumbs").iterdir()) == ["notes.txt"]


# --- decisions.csv --------------------------------------------------------------------------


@pytest.mark.parametrize("change, problem", [
    ({"action": "maybe"}, "action 'maybe'; expected one of confirm, reject, rename, skip"),
    ({"action": "rename", "name": "  "}, "rename without a name"),
    ({"action": "rename", "name": "new"}, "'new' cannot name an individual"),
    ({"action": "rename", "name": "Bo\x07b"}, "'Bo\\x07b' cannot name an individual"),
    ({"box": "1,2,3"}, "box '1,2,3': expected x,y,w,h in pixels"),
    ({"path": "/nowhere/x.jpg"}, "/nowhere/x.jpg: file not found"),
    ({"key": "0" * 32}, "its content changed since the page was made"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_row(setup, tmp_path, change, problem):
    layout, ident, _ = setup
    i = pick(ident, new=False)[0]
    path = write_decisions(tmp_path / "decisions.csv", [row(ident, 0, "reject"), row(ident, i, "confirm") | change])
    with pytest.raises(JaguarKitError) as e:
        read_decisions(path, set(ident.catalogue.individuals))
    assert str(e.value).startswith(f"{path} line 3: ") and problem in str(e.value) and "\n" not in str(e.value)


def test_a_file_without_the_columns_is_refused_in_one_line(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text("photo,decision\na.jpg,Bob\n")
    with pytest.raises(JaguarKitError, match=r"line 1: no path, key, action column"):
        read_decisions(path, set())
    path.write_text("photo;path;key;action\na.jpg;/a.jpg;k;confirm\n")  # re-saved by a spreadsheet
    with pytest.raises(JaguarKitError, match="wrong delimiter"):
        read_decisions(path, set())


def test_one_photo_decided_two_ways_is_refused(setup, tmp_path):
    layout, ident, _ = setup
    i = pick(ident, new=False)[0]
    path = write_decisions(tmp_path / "d.csv", [row(ident, i, "confirm"), row(ident, i, "rename", "Rosa")])
    with pytest.raises(JaguarKitError, match="line 3: .* decided differently on line 2"):
        read_decisions(path, set(ident.catalogue.individuals))


# --- applying it ----------------------------------------------------------------------------


def test_confirmed_and_renamed_photos_join_the_catalogue_rejected_ones_do_not(setup, catalogue, tmp_path):
    layout, ident, _ = setup
    known, new = pick(ident, new=False), pick(ident, new=True)
    nfd = unicodedata.normalize("NFD", " José ")  # typed with a combining accent, and spaces
    rows = [row(ident, known[0], "confirm"), row(ident, known[1], "reject"), row(ident, new[0], "rename", nfd),
            row(ident, new[1], "confirm"), row(ident, new[2], "skip")]
    decisions = write_decisions(tmp_path / "decisions.csv", rows)
    before = Catalogue.load(catalogue)
    result = apply_decisions(catalogue, decisions, model=shared_model(), progress=False)
    assert [d.action for d in result.applied] == ["confirm", "reject", "rename", "confirm"]
    assert result.new_individuals == ["José"]
    assert "1 confirmed without an individual of this catalogue to join: recorded, not added" in result.summary()
    after = Catalogue.load(catalogue)
    ids = dict(zip(after.keys, after.identities))
    assert ids[ident.keys[known[0]]] == ident.decisions[known[0]]
    assert ids[ident.keys[new[0]]] == "José" == unicodedata.normalize("NFC", "José")
    assert ident.keys[known[1]] not in ids and ident.keys[new[1]] not in ids  # rejected; `new` without a name
    assert len(after) == len(before) + 2 and after.calibration is not None
    history = read_history(catalogue)
    assert [(h["action"], h["name"], h["outcome"], h["reviewer"]) for h in history] == [
        ("confirm", ident.decisions[known[0]], "added", "Ana"), ("reject", "", "recorded", "Ana"),
        ("rename", "José", "added", "Ana"), ("confirm", "", "recorded", "Ana")]

    again = apply_decisions(catalogue, decisions, model=shared_model(), progress=False)
    assert again.applied == [] and again.already == 4
    assert len(read_history(catalogue)) == 4 and len(Catalogue.load(catalogue)) == len(after)

    # a later change of mind is a new decision: the photo moves to the name now given
    fixed = write_decisions(tmp_path / "fixed.csv", [row(ident, new[0], "rename", "Josefa")])
    apply_decisions(catalogue, fixed, model=shared_model(), progress=False)
    ids = dict(zip(*(lambda c: (c.keys, c.identities))(Catalogue.load(catalogue))))
    assert ids[ident.keys[new[0]]] == "Josefa"


def test_a_cut_history_line_is_closed_and_its_decision_applied_again(setup, catalogue, tmp_path):
    layout, ident, _ = setup
    (catalogue / "history.jsonl").write_text('{"key": "abc", "action": "rej')  # a writer killed mid-line
    decisions = write_decisions(tmp_path / "d.csv", [row(ident, 0, "reject")])
    result = apply_decisions(catalogue, decisions, progress=False)
    assert len(result.applied) == 1
    lines = (catalogue / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["action"] == "reject"


@pytest.mark.slow  # two command-line runs, each loading torch
def test_review_command_applies_and_refuses_bad_files_in_one_line(setup, catalogue, tmp_path):
    layout, ident, _ = setup
    bad = write_decisions(tmp_path / "bad.csv", [row(ident, 0, "rename")])
    proc = run_cli("review", "--catalogue", catalogue, "--decisions", bad)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {bad} line 2: rename without a name"
    assert not (catalogue / "history.jsonl").exists()

    i = pick(ident, new=True)[0]
    good = write_decisions(tmp_path / "good.csv", [row(ident, i, "rename", "Yara")])
    killed = run_cli("review", "--catalogue", catalogue, "--decisions", good, fault="review-history:1")
    assert killed.returncode < 0  # killed after saving the catalogue, before writing the history
    assert "Yara" in Catalogue.load(catalogue).individuals and not (catalogue / "history.jsonl").exists()
    proc = run_cli("review", "--catalogue", catalogue, "--decisions", good)  # the rerun completes it
    assert proc.returncode == 0, proc.stderr
    assert "1 decisions applied (0 confirmed, 1 renamed, 0 rejected): 1 photos added" in proc.stdout
    after = Catalogue.load(catalogue)
    assert after.identities.count("Yara") == 1 and len(read_history(catalogue)) == 1

"""report.html: self-contained (every image a data URI that decodes), one entry per photo, escaped text."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from photo_layouts import make_layout, shared_model

from jaguar_kit.photos.catalogue import build_catalogue
from jaguar_kit.photos.cluster import cluster
from jaguar_kit.photos.identify import identify
from jaguar_kit.photos.inputs import Photo, read_photos
from jaguar_kit.photos.report import write_cluster_report, write_identify_report


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.entries, self.members, self.groups, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "section" and "data-photo" in a:
            self.entries.append(a["data-photo"])
        if tag == "div" and a.get("class") == "member":
            self.members.append(a["data-photo"])
        if "data-group" in a:
            self.groups.append(a["data-group"])
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            raise AssertionError(f"external resource {a}")

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def assert_images_resolve(page: Page) -> None:
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/"), src[:40]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@pytest.fixture(scope="module")
def setup(competition, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    layout = make_layout(competition, tmp / "eco")
    # a photo whose name would break the page unless escaped
    odd = layout.unlabelled / "cam1" / "<b>odd & \"name\".jpg"
    odd.write_bytes(next((layout.unlabelled / "cam1").glob("train_*.jpg")).read_bytes())
    cat = build_catalogue(read_photos(layout.photos), shared_model(), tmp / "cat", progress=False)
    return layout, cat, tmp


def test_identify_report_is_self_contained_with_one_entry_per_photo(setup):
    layout, cat, tmp = setup
    photos = read_photos(layout.unlabelled, folder_labels=False)
    res = identify(cat, photos, model=shared_model(), top_k=3, cache_dir=tmp / "q", progress=False)
    page = parse(write_identify_report(res, tmp / "identify.html"))
    assert sorted(page.entries) == sorted(p.label for p in photos)
    matched = sum(m is not None and len(m) > 0 for m in (res.match_points or []))
    # the photo + 3 candidates each, and the matched keypoints where the top candidate's coat matched
    assert len(page.images) == len(photos) * 4 + matched
    assert_images_resolve(page)
    text = " ".join(page.text)
    assert "<b>odd & \"name\".jpg" in text  # shown as text, not markup
    assert "target false-merge rate 5%" in text and text.count("Check:") == len(photos)


def test_cluster_report_lists_every_photo_once(setup):
    layout, cat, tmp = setup
    res = cluster(layout.unlabelled, model=shared_model(), catalogue=cat, cache_dir=tmp / "q", progress=False)
    page = parse(write_cluster_report(res, tmp / "cluster.html"))
    assert sorted(page.members) == sorted(p.label for p in res.photos)
    assert set(page.groups) == set(res.group_names)
    assert_images_resolve(page)


def test_missing_catalogue_thumbnail_does_not_break_the_page(setup, tmp_path):
    layout, cat, tmp = setup
    photo = read_photos(layout.unlabelled, folder_labels=False)[0]
    res = identify(cat, [photo], model=shared_model(), cache_dir=tmp / "q", progress=False)
    res.prepared = [tmp_path / "gone.jpg"]  # the query's prepared file was deleted
    page = parse(write_identify_report(res, tmp_path / "r.html"))
    assert len(page.entries) == 1
    assert_images_resolve(page)
    assert isinstance(photo, Photo)

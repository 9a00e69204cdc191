"""Own photos: writes stay inside the output, the kit's own folders are never read as photos,
links and every OpenCV photo format are read once and never silently, names are one thing."""

from __future__ import annotations

import csv
import json
import logging
import os
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli
from photo_layouts import MODEL, PREPARED_SIZE, make_layout

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.photos.cluster import Clustering
from jaguar_kit.photos.folders import write_group_folders
from jaguar_kit.photos.inputs import Photo, mark_kit_folder, photo_key, read_photos
from jaguar_kit.photos.names import normalise_name, safe_component

NFD_JOSE = unicodedata.normalize("NFD", "José")
NFC_JOSE = unicodedata.normalize("NFC", "José")
MODEL_ARGS = ("--model", MODEL, "--prepared-size", PREPARED_SIZE)


def _image(path: Path, seed: int, size: int = 48) -> Path:
    """A small photo of random content (distinct per seed), in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    assert cv2.imwrite(str(path), rgb)
    return path


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[bool, bytes]]:
    """Every entry under ``root`` (outside ``skip``): is it a link, and its bytes or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath).resolve().is_relative_to(skip.resolve()):
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = (True, os.readlink(p).encode())
            elif p.is_file():
                out[str(p)] = (False, p.read_bytes())
    return out


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# ------------------------------------------------------------------------ names and paths


@pytest.mark.parametrize("name", ["../../victim", "..", ".", "/etc/passwd", "a\\..\\b", "<b>Bob</b>", ".hidden",
                                  "CON", "com1.txt", "tab\there\x00nul", " Bob ", "x" * 400, "é" * 300, "",
                                  NFD_JOSE, "a/x.png"])
def test_a_name_becomes_one_safe_component(tmp_path, name):
    comp = safe_component(name, keep_suffix=True)
    assert comp and comp not in (".", "..") and not comp.startswith(".")
    assert not any(c in comp for c in '/\\<>:"|?*') and all(ord(c) >= 32 for c in comp)
    assert len(comp.encode()) <= 120 and comp == unicodedata.normalize("NFC", comp)
    assert comp.split(".")[0].upper() not in ("CON", "COM1")
    assert (tmp_path / comp).resolve().parent == tmp_path.resolve()
    assert safe_component("a/x.png", keep_suffix=True).endswith(".png")


def test_names_are_normalised_trimmed_and_merges_warned_once(tmp_path, caplog):
    assert normalise_name(f"  {NFD_JOSE} \t da  Silva ") == f"{NFC_JOSE} da Silva"
    _image(tmp_path / "photos" / NFD_JOSE / "a.jpg", 1)
    _image(tmp_path / "photos" / NFC_JOSE / "b.jpg", 2)
    _image(tmp_path / "photos" / "Bob" / "c.jpg", 3)
    with caplog.at_level(logging.WARNING):
        photos = read_photos(tmp_path / "photos")
    assert sorted(p.identity for p in photos) == ["Bob", NFC_JOSE, NFC_JOSE]
    merged = [r.getMessage() for r in caplog.records if "more than one way" in r.getMessage()]
    assert len(merged) == 1 and ascii(NFD_JOSE) in merged[0] and ascii(NFC_JOSE) in merged[0]
    # a CSV: cells are normalised the same way, and Bob's two spellings are named once
    (tmp_path / "list.csv").write_text(f"path,identity\nphotos/Bob/c.jpg,Bob\nphotos/{NFC_JOSE}/b.jpg, Bob \n"
                                       f"photos/{NFD_JOSE}/a.jpg,{NFD_JOSE}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        photos = read_photos(tmp_path / "list.csv")
    assert [p.identity for p in photos] == ["Bob", "Bob", NFC_JOSE]
    assert len([r for r in caplog.records if "'Bob', ' Bob '" in r.getMessage()
                or "' Bob ' and 'Bob'" in r.getMessage()]) == 1


# ------------------------------------------------------------------------ group folders


def _clustering(photos: list[Photo], groups: list[int], names: list[str]) -> Clustering:
    return Clustering(table=None, photos=photos, keys=[photo_key(p) for p in photos], prepared=[],
                      groups=np.array(groups), group_names=names, group_checks=[""] * len(names), threshold=0.5)


def test_group_folders_stay_inside_never_collide_and_rerun_replaces_only_their_own(tmp_path, caplog):
    src = tmp_path / "photos"
    paths = [_image(src / "a" / "x.png", 1), _image(src / "a__x.png", 2), _image(src / "IMG.png", 3),
             _image(src / "img.png", 4), _image(src / "b.png", 5)]
    photos = read_photos(src, folder_labels=False)
    by_path = {p.path: p for p in photos}
    photos = [by_path[p] for p in paths]
    # a group name that climbs, one with markup, two that differ in case, one that is the manifest's name
    res = _clustering(photos, [0, 0, 0, 0, 1], ["../../victim", "<b>Bob</b>"])
    before = _snapshot(tmp_path, skip=tmp_path / "out")
    out = tmp_path / "out" / "groups"
    for mode in ("link", "link", "copy"):
        write_group_folders(res, out, mode)
        assert _snapshot(tmp_path, skip=tmp_path / "out") == before  # nothing outside out changed or appeared
        folders = sorted(p for p in out.iterdir() if p.is_dir())
        assert len(folders) == 2  # <b>Bob</b> is one folder, not nested ones
        files = sorted(f for d in folders for f in d.rglob("*"))
        assert len(files) == len(photos) and all(f.parent.parent == out for f in files)
        assert all(f.is_symlink() == (mode == "link") for f in files)
        # each photo once, with its own content: a/x.png, a__x.png, IMG.png and img.png do not overwrite each other
        assert sorted(f.read_bytes() for f in files) == sorted(p.read_bytes() for p in paths)
        assert not any(f.name.casefold() == g.name.casefold() for f in files for g in files if f != g)
    assert (out / "_b_Bob__b_").is_dir() and not (tmp_path / "victim").exists()
    # a file the kit did not write, where it would write: left, and named in one line
    manifest = json.loads((out / "manifest.json").read_text())
    mine = out / manifest["files"][0]["path"]
    mine.unlink()
    mine.write_bytes(b"the user's own notes")
    notes = out / mine.parent.name / "notes.txt"
    notes.write_text("kept")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        write_group_folders(res, out, "link")
    assert mine.read_bytes() == b"the user's own notes" and notes.read_text() == "kept"
    warned = [r.getMessage() for r in caplog.records if "not written by jaguar-kit" in r.getMessage()]
    assert len(warned) == 1 and manifest["files"][0]["path"] in warned[0]
    assert sum(f.is_symlink() for f in out.rglob("*")) == len(photos) - 1


def test_group_folders_never_replace_a_photo_with_a_link_to_itself(tmp_path):
    src = tmp_path / "photos"
    photo = _image(src / "Bob" / "x.png", 1)
    res = _clustering([Photo(photo, None, None, "x.png")], [0], ["Bob"])
    with pytest.raises(JaguarKitError, match="holds photos being grouped"):
        write_group_folders(res, src, "link")  # the group folder would be the photo's own folder
    assert not photo.is_symlink() and photo.stat().st_size > 0


@pytest.fixture(scope="module")
def layout(competition, tmp_path_factory):
    return make_layout(competition, tmp_path_factory.mktemp("eco"))


@pytest.fixture(scope="module")
def odd_catalogue(layout, tmp_path_factory):
    """A catalogue whose individuals are called ``../../victim`` and ``<b>Bob</b>`` (from a CSV)."""
    root = tmp_path_factory.mktemp("odd")
    rename = {layout.known[0]: "../../victim", layout.known[1]: "<b>Bob</b>"}
    rows = [(p, rename.get(p.parent.name, p.parent.name)) for p in sorted(layout.photos.glob("*/*.png"))]
    with open(root / "odd.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "identity"), *rows])
    r = run_cli("index", "--photos", root / "odd.csv", "--out", root / "cat", *MODEL_ARGS)
    assert r.returncode == 0, r.stderr
    return root / "cat", rename


@pytest.mark.slow
def test_cli_cluster_folders_stay_inside_out_and_a_rerun_keeps_one_link_per_photo(layout, odd_catalogue, tmp_path):
    cat, rename = odd_catalogue
    photos = tmp_path / "photos"
    for i, ident in enumerate(rename):  # photos of both oddly named individuals, and others
        for p in sorted((layout.photos / ident).glob("*.png")):
            (photos / "cam1").mkdir(parents=True, exist_ok=True)
            (photos / "cam1" / f"{i}_{p.name}").write_bytes(p.read_bytes())
    for p in sorted(layout.unlabelled.rglob("*.jpg"))[:6]:
        (photos / "cam2").mkdir(parents=True, exist_ok=True)
        (photos / "cam2" / p.name).write_bytes(p.read_bytes())
    n = sum(1 for _ in photos.rglob("*.*"))
    out = photos / "results"  # the output inside the photo folder
    before = _snapshot(tmp_path, skip=out)
    for _ in range(2):
        r = run_cli("cluster", "--photos", photos, "--out", out, "--catalogue", cat, "--folders", "link")
        assert r.returncode == 0, r.stderr
        assert _snapshot(tmp_path, skip=out) == before  # no photo replaced, nothing written outside --out
        rows = list(csv.DictReader(open(out / "clusters.csv")))
        assert len(rows) == n  # the output's own files are not read back as photos
        assert {"../../victim", "<b>Bob</b>"} <= {row["group"] for row in rows}
        links = [f for f in (out / "groups").rglob("*") if f.is_symlink()]
        assert len(links) == n and all(f.parent.parent == out / "groups" for f in links)
        assert sorted(f.resolve() for f in links) == sorted(Path(row["path"]).resolve() for row in rows)
    assert not (tmp_path / "victim").exists() and not (photos / "victim").exists()


def test_cli_cluster_photo_names_that_sanitise_alike_are_both_kept(tmp_path):
    photos = tmp_path / "photos"
    a, b = _image(photos / "a" / "x.png", 1, 64), _image(photos / "a__x.png", 2, 64)
    out = tmp_path / "out"
    r = run_cli("cluster", "--photos", photos, "--out", out, *MODEL_ARGS, "--threshold", "-1", "--folders", "copy")
    assert r.returncode == 0, r.stderr
    copies = list((out / "groups").glob("*/*"))
    assert len(copies) == 2 and sorted(f.read_bytes() for f in copies) == sorted([a.read_bytes(), b.read_bytes()])


# ------------------------------------------------------------------------ the kit's own folders


def test_marked_folders_are_skipped_and_said(tmp_path, caplog):
    _image(tmp_path / "Bob" / "a.jpg", 1)
    _image(mark_kit_folder(tmp_path / "catalogue") / "cache" / "prepared" / "x.jpg", 2)
    _image(tmp_path / "results" / "y.jpg", 3)
    with caplog.at_level(logging.WARNING):
        photos = read_photos(tmp_path, exclude=[tmp_path / "results"])
    assert [(p.name, p.identity) for p in photos] == [("Bob/a.jpg", "Bob")]
    assert any("2 folder(s) written by jaguar-kit" in r.getMessage() for r in caplog.records)
    with pytest.raises(JaguarKitError, match="a folder jaguar-kit wrote"):
        read_photos(tmp_path / "catalogue")


@pytest.mark.slow
def test_cli_identify_output_inside_photos_is_not_read_back(layout, odd_catalogue, tmp_path):
    cat, _ = odd_catalogue
    photos = tmp_path / "photos"
    for p in sorted(layout.unlabelled.rglob("*.jpg"))[:6]:
        photos.mkdir(exist_ok=True)
        (photos / p.name).write_bytes(p.read_bytes())
    counts = []
    for _ in range(2):
        r = run_cli("identify", "--catalogue", cat, "--photos", photos, "--out", photos / "out")
        assert r.returncode == 0, r.stderr
        counts.append(len(list(csv.DictReader(open(photos / "out" / "identify.csv")))))
    assert counts == [6, 6]
    # a catalogue given as the photos: one line, nothing embedded; to index: no individual named `cache`
    r = run_cli("identify", "--catalogue", cat, "--photos", cat, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "a folder jaguar-kit wrote" in _one_line(r.stderr)
    assert not (tmp_path / "o2" / "identify.csv").exists()
    before = (cat / "catalogue.json").read_text()
    r = run_cli("index", "--photos", cat, "--out", cat, *MODEL_ARGS)
    assert r.returncode == 2 and "a folder jaguar-kit wrote" in _one_line(r.stderr)
    assert (cat / "catalogue.json").read_text() == before
    # an output folder equal to the photo folder is refused before anything is written
    r = run_cli("identify", "--catalogue", cat, "--photos", photos, "--out", photos)
    assert r.returncode == 2 and "output folder" in _one_line(r.stderr)


# ------------------------------------------------------------------------ links and formats


def test_a_link_loop_gives_each_photo_once_under_its_individual(tmp_path):
    _image(tmp_path / "A" / "a.png", 1)
    _image(tmp_path / "B" / "sub" / "b.png", 2)
    os.symlink("..", tmp_path / "A" / "loop")  # A/loop/A/loop/... and A/loop/B/...
    outside = _image(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "c.png", 3)
    os.symlink(outside, tmp_path / "B" / "c.png")  # a linked photo is read like a photo
    got = sorted((p.name, p.identity) for p in read_photos(tmp_path))
    assert got == [("A/a.png", "A"), ("B/c.png", "B"), ("B/sub/b.png", "B")]


def test_every_photo_format_opencv_decodes_is_read_and_others_are_listed(tmp_path, caplog):
    for i, ext in enumerate(("jpg", "jpeg", "png", "tif", "tiff", "bmp", "webp", "jp2")):
        _image(tmp_path / "A" / f"p.{ext}", i)
    (tmp_path / "A" / "IMG_1.CR2").write_bytes(b"raw")
    (tmp_path / "A" / "IMG_2.heic").write_bytes(b"heic")
    with caplog.at_level(logging.WARNING):
        photos = read_photos(tmp_path)
    assert len(photos) == 8
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(said) == 1 and "2 file(s)" in said[0] and "A/IMG_1.CR2" in said[0] and "A/IMG_2.heic" in said[0]
    from jaguar_kit.data.images import decode_image

    assert all(decode_image(p.path)[0].shape == (48, 48, 3) for p in photos)


def test_a_broken_link_among_photos_is_said(tmp_path, caplog):
    _image(tmp_path / "A" / "p.jpg", 0)
    os.symlink(tmp_path / "gone.jpg", tmp_path / "A" / "moved.jpg")
    with caplog.at_level(logging.WARNING):
        photos = read_photos(tmp_path)
    assert [p.name for p in photos] == ["A/p.jpg"]
    said = [r.getMessage() for r in caplog.records if "link to nothing" in r.getMessage()]
    assert len(said) == 1 and "A/moved.jpg" in said[0]


@pytest.fixture(scope="module")
def small_catalogue(tmp_path_factory):
    """``index`` as a user runs it: a folder (an NFD-named TIFF individual, a link loop, a raw
    file), then a CSV adding a photo of the same individual typed in NFC. Returns the
    catalogue and the first run's stderr."""
    root = tmp_path_factory.mktemp("small")
    photos = root / "photos"
    for i in range(2):
        _image(photos / NFD_JOSE / f"{i}.tif", i, 64)
        _image(photos / "Bob" / f"{i}.png", 10 + i, 64)
    os.symlink("..", photos / "Bob" / "loop")
    (photos / "Bob" / "IMG.CR2").write_bytes(b"raw")
    _image(root / "more" / "new.jpg", 20, 64)
    (root / "more" / "list.csv").write_text(f"path,identity\nnew.jpg,{NFC_JOSE}\n")
    stderr = []
    for source in (photos, root / "more" / "list.csv"):
        r = run_cli("index", "--photos", source, "--out", root / "cat", *MODEL_ARGS)
        assert r.returncode == 0, r.stderr
        stderr.append(r.stderr)
    return root / "cat", stderr[0]


def test_cli_index_reads_tiff_links_once_and_one_spelling_per_name(small_catalogue):
    """A TIFF individual is read; a link loop adds nothing; an NFD folder name and the same name
    typed in a CSV (NFC) are one individual; the skipped raw file is named."""
    cat, stderr = small_catalogue
    counts = json.loads((cat / "catalogue.json").read_text())["photos_per_individual"]
    assert counts == {"Bob": 2, NFC_JOSE: 3}
    assert "Bob/IMG.CR2" in stderr


# ------------------------------------------------------------------------ one photo as --photos


def test_a_single_photo_is_that_photo(tmp_path):
    photo = _image(tmp_path / "IMG_0001.JPG", 1)
    assert [(p.path, p.identity, p.name) for p in read_photos(photo)] == [(photo, None, "IMG_0001.JPG")]
    (tmp_path / "notes.txt").write_text("path,identity\n")
    with pytest.raises(JaguarKitError, match=r"notes\.txt: neither a photo"):
        read_photos(tmp_path / "notes.txt")


def test_cli_identify_on_one_photo(small_catalogue, tmp_path):
    cat, _ = small_catalogue
    photo = _image(tmp_path / "IMG_0001.JPG", 30, 64)
    r = run_cli("identify", "--catalogue", cat, "--photos", photo, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "identify.csv")))
    assert len(rows) == 1 and rows[0]["photo"] == photo.name

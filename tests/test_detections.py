"""Whole camera-trap frames with MegaDetector's output: one catalogue photo per animal box."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from jaguar_kit.data.images import decode_image
from jaguar_kit.data.synth_image import render_image
from jaguar_kit.photos.catalogue import load_catalogue
from jaguar_kit.photos.detections import read_detections
from jaguar_kit.data.images import cut_box
from photo_layouts import MODEL, PREPARED_SIZE

W, H = 320, 240  # frame size
INDIVIDUALS = ["Dajun", "Marcela", "Tico"]


def _background(seed: int, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 140, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _jaguar(identity: int, index: int) -> np.ndarray:
    """A synthetic jaguar view (96 x 64 px, RGB)."""
    return cv2.cvtColor(render_image(7, identity, 0, index, 96)[..., :3], cv2.COLOR_BGR2RGB)


def _frame(path: Path, seed: int, animals: list[tuple[np.ndarray, int, int]]) -> list[tuple[int, int, int, int]]:
    """A frame with each animal pasted at (x, y); their pixel boxes."""
    img = _background(seed)
    boxes = []
    for patch, x, y in animals:
        h, w = patch.shape[:2]
        img[y:y + h, x:x + w] = patch
        boxes.append((x, y, w, h))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return boxes


def _det(box, conf=0.9, category="1", size=(W, H)):
    """A detection as MegaDetector writes it: relative [x_min, y_min, width, height], 4 decimals."""
    x, y, w, h = box
    return {"category": category, "conf": conf,
            "bbox": [round(x / size[0], 4), round(y / size[1], 4), round(w / size[0], 4), round(h / size[1], 4)]}


def _md_json(path: Path, images: list[dict], version: str = "1.4") -> Path:
    path.write_text(json.dumps({
        "info": {"format_version": version, "detector": "md_v5a.0.0.pt"},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": images,
    }))
    return path


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return make_frames(tmp_path_factory.mktemp("frames"))


def make_frames(root: Path):
    """Labelled frames (a folder per individual) and their MegaDetector output.

    Every frame has one jaguar, a person box and a weak animal box (below 0.2); one frame of
    Tico holds two jaguars; one frame is empty; one frame MegaDetector failed on."""
    photos = root / "photos"
    images, expected = [], {}
    for i, name in enumerate(INDIVIDUALS):
        for k in range(3):
            rel = f"{name}/cam{k}/IMG_{k:04d}.JPG"
            animals = [(_jaguar(i, k), 40 + 60 * k, 30 + 50 * k)]
            if name == "Tico" and k == 0:
                animals.append((_jaguar(i, 5), 200, 150))
            boxes = _frame(photos / rel, 10 * i + k, animals)
            dets = [_det(b) for b in boxes]
            dets += [_det((5, 5, 30, 80), 0.95, "2"), _det((250, 10, 40, 40), 0.1)]
            images.append({"file": rel, "detections": dets})
            for n, b in enumerate(boxes, 1):
                expected[f"{rel}#{n}"] = (name, b)
    _frame(photos / "Dajun/empty.jpg", 99, [])
    images.append({"file": "Dajun/empty.jpg", "detections": [_det((1, 1, 50, 50), 0.05)]})
    (photos / "Marcela/broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    images.append({"file": "Marcela/broken.jpg", "failure": "Failure image access", "detections": None})
    md = _md_json(root / "md.json", images)
    return root, photos, md, expected


def test_index_and_identify_whole_frames(frames, tmp_path):
    root, photos, md, expected = frames
    cat_dir = tmp_path / "catalogue"
    proc = run_cli("index", "--photos", photos, "--detections", md, "--out", cat_dir, "--model", MODEL,
                   "--device", "cpu", "--prepared-size", PREPARED_SIZE)
    assert proc.returncode == 0, proc.stderr
    cat = load_catalogue(cat_dir)
    # one entry per animal box at 0.2 or more: not the person, not the weak box, not the empty frame
    got = {n: (i, tuple(int(v) for v in b)) for n, i, b in zip(cat.names, cat.identities, cat.boxes)}
    assert got == expected
    assert "1 frame(s) without an animal box" in proc.stderr and "Dajun/empty.jpg" in proc.stderr
    assert "1 frame(s) MegaDetector failed on" in proc.stderr
    assert "Tico/cam0/IMG_0000.JPG" in proc.stderr  # two animals under one individual's folder: check them

    # identify two jaguars in one new frame: the crops are the boxes, so each finds its individual
    new = tmp_path / "new"
    boxes = _frame(new / "site B" / "frame.jpg", 123, [(_jaguar(0, 0), 10, 20), (_jaguar(1, 1), 180, 140)])
    md_new = _md_json(tmp_path / "md_new.json",
                      [{"file": "site B/frame.jpg", "detections": [_det(b) for b in boxes]}])
    out = tmp_path / "identified"
    proc = run_cli("identify", "--catalogue", cat_dir, "--photos", new, "--detections", md_new, "--out", out,
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "identify.csv")
    assert list(table["photo"]) == [f"site B/frame.jpg#{n} [{','.join(map(str, b))}]" for n, b in enumerate(boxes, 1)]
    assert list(table["id_1"]) == ["Dajun", "Marcela"]

    # cluster reads the same arguments
    out = tmp_path / "groups"
    proc = run_cli("cluster", "--catalogue", cat_dir, "--photos", new, "--detections", md_new, "--out", out,
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(out / "clusters.csv")) == 2


def test_threshold_and_photos_not_in_the_file(frames):
    root, photos, md, expected = frames
    from jaguar_kit.photos.inputs import read_photos

    listed = read_photos(photos, need_identity=True)
    assert len(read_detections(md, photos, photos=listed)) == len(expected)
    # the weak animal boxes (0.1) come in at a lower threshold; the 0.05 box of the empty frame does not
    assert len(read_detections(md, photos, threshold=0.1, photos=listed)) == len(expected) + 9
    # without the labelled photos, the JSON alone: the same boxes, unlabelled
    alone = read_detections(md, photos)
    assert {p.name: p.box for p in alone} == {n: b for n, (_, b) in expected.items()}
    assert {p.identity for p in alone} == {None}


def test_box_follows_exif_orientation(tmp_path):
    """MegaDetector's boxes are relative to the frame as displayed (EXIF orientation applied)."""
    shown = _background(5, h=W, w=H)  # portrait as displayed: 240 wide, 320 tall
    box = (30, 200, 120, 80)
    x, y, w, h = box
    shown[y:y + h, x:x + w] = (250, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer rotates it 90 degrees clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    md = _md_json(tmp_path / "md.json", [{"file": "turned.jpg", "detections": [_det(box, size=(H, W))]}])
    (photo,) = read_detections(md, tmp_path)
    assert photo.box == box
    rgb, mask = decode_image(tmp_path / "turned.jpg")
    crop, _ = cut_box(rgb, mask, photo.box, "turned.jpg")
    assert np.abs(crop.reshape(-1, 3).mean(0) - (250, 20, 20)).max() < 8


def _bad(images=None, version="1.4", text=None):
    def write(path: Path) -> Path:
        if text is not None:
            path.write_text(text)
            return path
        return _md_json(path, images, version)
    return write


GOOD = {"file": "Dajun/cam0/IMG_0000.JPG", "detections": [_det((40, 30, 96, 64))]}


@pytest.mark.parametrize("write, message", [
    (_bad(text='{"images": [ {"file": '), r"md\.json: not a MegaDetector output file \(not valid JSON"),
    (_bad([GOOD], version="2.0"), r"md\.json: MegaDetector output format version 2\.0 is not read here"),
    (_bad([GOOD, {"file": "../outside.jpg", "detections": []}]),
     r"md\.json: images\[1\] \(\.\./outside\.jpg\): lies outside the image folder"),
    (_bad([GOOD, {"file": "Tico/cam1/IMG_0001.JPG", "detections": [{"category": "1", "conf": 0.9,
                                                                   "bbox": [0.8, 0.1, 0.5, 0.2]}]}]),
     r"md\.json: images\[1\] \(Tico/cam1/IMG_0001\.JPG\) detection 0: bbox \[0\.8, 0\.1, 0\.5, 0\.2\] lies outside"),
])
def test_bad_detections_file_is_one_line(frames, tmp_path, write, message):
    _, photos, _, _ = frames
    md = write(tmp_path / "md.json")
    before, frames_before = sorted(tmp_path.rglob("*")), sorted(photos.parent.rglob("*"))
    out = tmp_path / "catalogue"
    proc = run_cli("index", "--photos", photos, "--detections", md, "--out", out, "--model", MODEL, "--device", "cpu")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p for p in tmp_path.rglob("*") if out not in (p, *p.parents)) == before
    assert sorted(photos.parent.rglob("*")) == frames_before

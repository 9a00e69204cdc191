"""Reading an ecologist's photos: folders, CSVs with boxes, competition folders; the content-keyed cache."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from jaguar_kit.data.prepare import load_prepared
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.photos.inputs import Photo, duplicate_files, prepare_photos, read_photos


def _jpg(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
    return path


def _solid(h=40, w=60, colour=(200, 30, 30)):
    return np.full((h, w, 3), colour, np.uint8)


def test_folder_per_individual(tmp_path):
    _jpg(tmp_path / "Dajun" / "a.jpg", _solid())
    _jpg(tmp_path / "Dajun" / "2023" / "deep" / "b.JPG", _solid())
    _jpg(tmp_path / "Marcela" / "c.jpeg", _solid())
    _jpg(tmp_path / "loose.jpg", _solid())
    (tmp_path / "Marcela" / "notes.txt").write_text("not a photo")
    _jpg(tmp_path / ".cache" / "x.jpg", _solid())  # hidden folders (caches) are skipped
    photos = read_photos(tmp_path)
    got = {p.name: p.identity for p in photos}
    assert got == {"Dajun/a.jpg": "Dajun", "Dajun/2023/deep/b.JPG": "Dajun", "Marcela/c.jpeg": "Marcela",
                   "loose.jpg": None}
    # unlabelled reading (identify, cluster): sub-folders are camera stations, not individuals
    assert {p.identity for p in read_photos(tmp_path, folder_labels=False)} == {None}
    with pytest.raises(JaguarKitError, match=r"loose\.jpg: no individual"):
        read_photos(tmp_path, need_identity=True)


def test_empty_folder_and_missing_source(tmp_path):
    (tmp_path / "Dajun").mkdir()
    with pytest.raises(JaguarKitError, match="no photos found"):
        read_photos(tmp_path)
    with pytest.raises(JaguarKitError, match="nope: not found"):
        read_photos(tmp_path / "nope")


def test_csv_paths_relative_to_csv_with_boxes(tmp_path):
    _jpg(tmp_path / "site A" / "2023" / "IMG_1.jpg", _solid())
    _jpg(tmp_path / "IMG_2.jpg", _solid())
    csv = tmp_path / "list.csv"
    csv.write_text("path,identity,x,y,w,h\nsite A/2023/IMG_1.jpg,Dajun,1,2,30,20\nIMG_2.jpg,,,,,\n"
                   "site A/2023/IMG_1.jpg,Marcela,31,2,29,20\n")
    photos = read_photos(csv)
    assert [(p.name, p.identity, p.box) for p in photos] == [
        ("site A/2023/IMG_1.jpg", "Dajun", (1, 2, 30, 20)), ("IMG_2.jpg", None, None),
        ("site A/2023/IMG_1.jpg", "Marcela", (31, 2, 29, 20))]
    assert photos[0].path == tmp_path / "site A" / "2023" / "IMG_1.jpg"
    with pytest.raises(JaguarKitError, match="line 3: an empty identity"):
        read_photos(csv, need_identity=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,identity\nmissing.jpg,Dajun\n", r"list\.csv line 2: missing\.jpg: file not found"),
        ("path,identity,x,y,w,h\nIMG.jpg,Dajun,1,2,zero,4\n", r"line 2: box x,y,w,h = 1,2,zero,4: expected four numbers"),
        ("path,identity,x,y,w,h\nIMG.jpg,Dajun,1,2,0,4\n", r"line 2: .* needs x,y >= 0 and w,h > 0"),
        ("file;identity\nIMG.jpg;Dajun\n", r"line 1: no path column .* wrong delimiter"),
        ("path,identity,x,y\nIMG.jpg,Dajun,1,2\n", r"box columns need all of x,y,w,h; missing w,h"),
        ("path,identity\nIMG.jpg,Dajun,extra\n", r"line 2: 3 fields, but the header has 2"),
        ("path,identity\nnotes.txt,Dajun\n", r"notes\.txt: not a \.jpg"),
    ],
)
def test_csv_problems_are_one_line_naming_the_row(tmp_path, text, message):
    _jpg(tmp_path / "IMG.jpg", _solid())
    (tmp_path / "notes.txt").write_text("x")
    csv = tmp_path / "list.csv"
    csv.write_text(text)
    with pytest.raises(JaguarKitError, match=message) as e:
        read_photos(csv)
    assert "\n" not in str(e.value)


def test_competition_folder_keeps_working(competition):
    photos = read_photos(competition, need_identity=True)
    assert len(photos) == 36 and len({p.identity for p in photos}) == 6
    assert all(p.path.is_file() for p in photos)


def test_box_crops_before_preparing_and_keys_follow_content(tmp_path):
    frame = _solid(100, 150, (20, 20, 200))
    frame[30:70, 50:110] = (250, 200, 0)  # the animal
    src = _jpg(tmp_path / "a" / "frame.jpg", frame)
    copy = tmp_path / "b" / "renamed.jpg"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    photos = [Photo(src, "A", (50, 30, 60, 40)), Photo(copy, "A", (50, 30, 60, 40)), Photo(src, "A")]
    keys, files = prepare_photos(photos, tmp_path / "cache", "crop", 0.05, 64, progress=False)
    assert keys[0] == keys[1] != keys[2]  # same bytes and box: same key, wherever the file lies
    crop = load_prepared(files[0])
    assert crop.shape[:2] == (40, 60)  # exactly the 60 x 40 box (smaller than 64 px: not enlarged)
    assert np.abs(crop.astype(int).mean((0, 1)) - (250, 200, 0)).max() < 12
    assert np.abs(load_prepared(files[2]).astype(int).mean((0, 1)) - (250, 200, 0)).max() > 50  # whole frame
    # a rerun prepares nothing; a changed photo gets a new key
    mtime = files[0].stat().st_mtime_ns
    keys2, files2 = prepare_photos(photos[:1], tmp_path / "cache", "crop", 0.05, 64, progress=False)
    assert files2[0].stat().st_mtime_ns == mtime
    frame[5:9, 5:9] = 255  # the photo changes
    _jpg(src, frame)
    assert prepare_photos(photos[:1], tmp_path / "cache", "crop", 0.05, 64, progress=False)[0] != keys2


def test_mask_is_used_inside_the_box(tmp_path):
    rgba = np.zeros((80, 120, 4), np.uint8)
    rgba[..., :3] = (10, 10, 10)
    rgba[20:40, 30:60] = (0, 255, 0, 255)  # the animal's mask, green
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    _, files = prepare_photos([Photo(src, "A", (10, 10, 80, 60))], tmp_path / "c", "crop", 0.0, 256, progress=False)
    out = load_prepared(files[0])
    assert out.shape[:2] == (20, 30)  # cropped to the mask inside the box
    assert out[..., 1].mean() > 240


def test_box_outside_the_photo_names_the_csv_row(tmp_path):
    _jpg(tmp_path / "IMG.jpg", _solid(40, 60))
    csv = tmp_path / "list.csv"
    csv.write_text("path,identity,x,y,w,h\nIMG.jpg,Dajun,1,1,10,10\nIMG.jpg,Dajun,500,1,10,10\n")
    with pytest.raises(JaguarKitError, match=r"list\.csv line 3: box x,y,w,h = 500,1,10,10 lies outside the 60x40"):
        prepare_photos(read_photos(csv), tmp_path / "cache", progress=False)


def test_broken_photo_names_the_file(tmp_path):
    bad = tmp_path / "Dajun" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    with pytest.raises(JaguarKitError, match="broken.jpg"):
        prepare_photos(read_photos(tmp_path), tmp_path / "cache", progress=False)


def test_duplicate_files_across_individuals(tmp_path):
    a = _jpg(tmp_path / "A" / "x.jpg", _solid())
    b = tmp_path / "B" / "y.jpg"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    photos = read_photos(tmp_path)
    keys, _ = prepare_photos(photos, tmp_path / ".cache", progress=False)
    assert duplicate_files(photos, keys) == [(keys[0], ["A", "B"], ["A/x.jpg", "B/y.jpg"])]

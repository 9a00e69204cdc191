"""Encounters from camera-trap EXIF: one camera's photos of an animal within a minute are one pass.

Photos are JPEGs written here with Pillow, their EXIF as a camera writes it (DateTimeOriginal in the
Exif sub-IFD, Make/Model in IFD0); their pixels are unrelated noise, so only the clock can group them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image

from jaguar_kit.data.encounters import EXIF_GAP_S, infer_encounters, photo_clock, train_encounters
from jaguar_kit.data.folds import make_folds

T0 = datetime(2024, 3, 1, 21, 15, 0)


def write_photo(path: Path, seed: int, taken: datetime | None = None, make: str | None = "Browning",
                model: str | None = "BTC-8E", serial: str | None = None, pixels: np.ndarray | None = None) -> Path:
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    if taken is not None:
        if make is not None:
            exif[ExifTags.Base.Make] = make
        if model is not None:
            exif[ExifTags.Base.Model] = model
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        sub[ExifTags.Base.DateTimeOriginal] = taken.strftime("%Y:%m:%d %H:%M:%S")
        if serial is not None:
            sub[ExifTags.Base.BodySerialNumber] = serial
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_one_cameras_photos_within_the_gap_are_one_encounter_and_folds_keep_them_together(tmp_path: Path):
    s = lambda sec: T0 + timedelta(seconds=sec)  # noqa: E731
    rows = [  # (identity, file, taken, camera model)
        ("Dajun", "burst_a.jpg", s(0), "BTC-8E"),
        ("Dajun", "burst_b.jpg", s(20), "BTC-8E"),
        ("Dajun", "burst_c.jpg", s(75), "BTC-8E"),  # 55 s after the one before: the chain goes on
        ("Dajun", "next_pass.jpg", s(75 + EXIF_GAP_S + 1), "BTC-8E"),  # just past the gap: a new encounter
        ("Dajun", "other_cam.jpg", s(5), "Reconyx HP2X"),  # same moment, the other flank's camera: its own
        ("Dajun", "next_day.jpg", s(86400), "BTC-8E"),
        ("Mariua", "mariua_a.jpg", s(1), "BTC-8E"),  # same camera, same minute, another animal
        ("Mariua", "mariua_b.jpg", s(30), "BTC-8E"),
    ]
    paths = [write_photo(tmp_path / f, i, taken, model=model) for i, (_, f, taken, model) in enumerate(rows)]
    assert photo_clock(paths[1])[0] - photo_clock(paths[0])[0] == 20
    train = pd.DataFrame({"identity": [r[0] for r in rows], "path": paths, "encounter": ""})
    enc = train_encounters(train, cache=tmp_path / "hashes.json")
    by_file = dict(zip((r[1] for r in rows), enc))
    assert by_file["burst_a.jpg"] == by_file["burst_b.jpg"] == by_file["burst_c.jpg"]
    others = ["next_pass.jpg", "other_cam.jpg", "next_day.jpg", "mariua_a.jpg"]
    assert len({by_file["burst_a.jpg"], *(by_file[f] for f in others)}) == 5
    assert by_file["mariua_a.jpg"] == by_file["mariua_b.jpg"]
    assert not (tmp_path / "hashes.json").exists()  # every photo had a clock: nothing was hashed

    # the gap is a setting: at 10 s the burst falls apart
    narrow = infer_encounters(train["identity"], train["path"], gap_s=10)
    assert len(set(narrow[:3])) == 3

    # folds never split the burst
    fold = make_folds(train["identity"].tolist(), num_folds=2, seed=0, groups=list(enc)).fold
    assert len(set(fold[:3])) == 1


def test_the_serial_number_tells_two_cameras_of_one_model_apart(tmp_path: Path):
    a = write_photo(tmp_path / "a.jpg", 0, T0, serial="SN-001")
    b = write_photo(tmp_path / "b.jpg", 1, T0 + timedelta(seconds=3), serial="SN-002")
    c = write_photo(tmp_path / "c.jpg", 2, T0 + timedelta(seconds=6), serial="SN-001")
    enc = infer_encounters(["Dajun"] * 3, [a, b, c])
    assert enc[0] == enc[2] != enc[1]


def test_photos_without_a_clock_fall_back_to_near_duplicates_and_never_join_a_timed_encounter(tmp_path: Path):
    scene = np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    near = np.clip(scene.astype(int) + np.random.default_rng(8).integers(-3, 4, scene.shape), 0, 255).astype(np.uint8)
    timed = write_photo(tmp_path / "timed.jpg", 0, T0, pixels=scene)  # the same scene, with a clock
    copy_a = write_photo(tmp_path / "copy_a.jpg", 1, None, pixels=scene)  # no EXIF at all
    copy_b = write_photo(tmp_path / "copy_b.jpg", 2, None, pixels=near)
    other = write_photo(tmp_path / "other.jpg", 3, None)
    bad = tmp_path / "placeholder.jpg"  # a camera that never set its clock
    write_photo(bad, 4, None)
    img = Image.open(bad)
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "0000:00:00 00:00:00"
    img.save(tmp_path / "placeholder2.jpg", exif=exif.tobytes())
    assert photo_clock(tmp_path / "placeholder2.jpg") == (None, "")
    paths = [timed, copy_a, copy_b, other, tmp_path / "placeholder2.jpg"]
    enc = infer_encounters(["Dajun"] * 5, paths, cache=tmp_path / "hashes.json")
    assert enc[1] == enc[2]  # near-duplicates without a clock: one encounter
    assert enc[0] not in set(enc[1:])  # the clock decides for the timed photo
    assert len(set(enc)) == 4
    assert (tmp_path / "hashes.json").exists()
    # the old positional call still works
    assert list(infer_encounters(["Dajun"] * 5, paths, 64, tmp_path / "hashes.json")) == list(enc)

"""The prepared-image cache: sizes, resumability, atomicity, keys, parallel == serial."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from jaguar_kit.data.prepare import load_prepared, prepare_images, prepared_dir, prepared_file
from jaguar_kit.errors import JaguarKitError


def _rgba(path: Path, seed: int, box: tuple[int, int, int, int] | None = (60, 40, 260, 140)) -> None:
    """A 300 x 200 RGBA PNG: a reddish animal inside ``box`` (x0, y0, x1, y1), noisy background."""
    rng = np.random.default_rng(seed)
    bgr = rng.integers(0, 120, (200, 300, 3), dtype=np.uint8)
    alpha = np.zeros((200, 300), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        bgr[y0:y1, x0:x1] = (20, 30, 230)  # BGR: red animal
        alpha[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.dstack([bgr, alpha]))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "src" / "train" / f"img_{i}.png" for i in range(5)]
    for i, p in enumerate(paths):
        _rgba(p, i)
    clash = tmp_path / "src" / "test" / "img_0.png"  # same file name as a train image
    _rgba(clash, 99, box=(0, 0, 100, 200))
    return paths + [clash]


def _mtimes(d: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in d.rglob("*.jpg")}


def test_sizes_content_and_rgb_order(tmp_path: Path, images: list[Path]) -> None:
    res = prepare_images(images, tmp_path / "cache", "crop", margin=0.0, size=64, workers=1, progress=False)
    # keyed by file name; the two img_0.png (train and test) by folder/name
    assert set(res) == {"train/img_0.png", "test/img_0.png"} | {f"img_{i}.png" for i in range(1, 5)}
    assert res["img_1.png"] == res[images[1]] == res[str(images[1])]
    with pytest.raises(KeyError, match="several prepared sources"):
        res["img_0.png"]
    for src in images[:5]:
        out = load_prepared(res[src])
        # crop box 200 x 100 -> longest side 64, aspect kept
        assert out.shape == (32, 64, 3) and out.dtype == np.uint8
        r, g, b = out[16, 32]
        assert r > 200 and b < 60  # the red animal, in RGB order
    assert load_prepared(res[images[5]]).shape == (64, 32, 3)  # 100 x 200 box
    assert res.made == 6 and res.skipped == 0 and res.empty_masks == []


def test_small_images_not_enlarged_and_ignore_mode(tmp_path: Path, images: list[Path]) -> None:
    res = prepare_images(images[:1], tmp_path / "cache", "ignore", size=1000, workers=1, progress=False)
    assert load_prepared(res[images[0]]).shape == (200, 300, 3)


def test_blank_mode_zeroes_background(tmp_path: Path, images: list[Path]) -> None:
    res = prepare_images(images[:1], tmp_path / "cache", "blank", size=300, workers=1, progress=False)
    out = load_prepared(res[images[0]]).astype(int)
    assert out[5:30, 5:50].max() <= 12  # background (JPEG noise aside)
    assert out[60:120, 80:240, 0].mean() > 200


def test_train_and_test_name_clash_kept_apart(tmp_path: Path, images: list[Path]) -> None:
    res = prepare_images(images, tmp_path / "cache", size=64, workers=1, progress=False)
    a, b = res[images[0]], res[images[5]]
    assert a != b and a.parent.name == "train" and b.parent.name == "test"
    assert load_prepared(a).shape != load_prepared(b).shape


def test_second_run_does_no_work(tmp_path: Path, images: list[Path]) -> None:
    cache = tmp_path / "cache"
    first = prepare_images(images, cache, size=64, workers=1, progress=False)
    before = _mtimes(cache)
    second = prepare_images(images, cache, size=64, workers=1, progress=False)
    assert second.made == 0 and second.skipped == len(images)
    assert _mtimes(cache) == before and dict(second) == dict(first)


def test_resume_after_partial_run_and_stale_temp_ignored(tmp_path: Path, images: list[Path]) -> None:
    cache = tmp_path / "cache"
    out_dir = prepared_dir(cache, "crop", 0.05, 64)
    partial = prepare_images(images[:2], cache, size=64, workers=1, progress=False)
    # A run killed mid-write leaves a hidden half-written temp file next to the target.
    target = prepared_file(out_dir, images[2])
    stale = target.parent / f".{target.name}.tmp-abc123"
    stale.write_bytes(b"\xff\xd8\xff half a jpeg")
    full = prepare_images(images, cache, size=64, workers=1, progress=False)
    assert full.made == len(images) - 2 and full.skipped == 2
    assert full[images[0]] == partial[images[0]]
    for p in full.values():
        assert max(load_prepared(p).shape[:2]) == 64
    assert full[images[2]] == target


def test_changed_setting_uses_new_folder(tmp_path: Path, images: list[Path]) -> None:
    cache = tmp_path / "cache"
    dirs = {
        prepared_dir(cache, "crop", 0.05, 64),
        prepared_dir(cache, "crop", 0.1, 64),
        prepared_dir(cache, "crop", 0.05, 128),
        prepared_dir(cache, "blank", 0.05, 64),
        prepared_dir(cache, "ignore", 0.05, 64),
    }
    assert len(dirs) == 5
    a = prepare_images(images[:1], cache, "crop", 0.05, 64, workers=1, progress=False)
    b = prepare_images(images[:1], cache, "crop", 0.05, 96, workers=1, progress=False)
    assert b.made == 1
    assert load_prepared(a[images[0]]).shape[1] == 64
    assert load_prepared(b[images[0]]).shape[1] == 96


def test_changed_source_file_is_prepared_again(tmp_path: Path, images: list[Path]) -> None:
    cache = tmp_path / "cache"
    a = prepare_images(images[:1], cache, size=64, workers=1, progress=False)
    _rgba(images[0], 7, box=(0, 0, 300, 200))  # same name, different image
    b = prepare_images(images[:1], cache, size=64, workers=1, progress=False)
    assert b.made == 1 and a[images[0]] != b[images[0]]


def test_parallel_equals_serial(tmp_path: Path, images: list[Path]) -> None:
    serial = prepare_images(images, tmp_path / "s", size=64, workers=1, progress=False)
    parallel = prepare_images(images, tmp_path / "p", size=64, workers=2, progress=False)
    assert parallel.made == len(images)
    assert set(serial) == set(parallel)
    for key in serial:
        assert serial[key].read_bytes() == parallel[key].read_bytes()


def test_decode_error_names_file_and_keeps_the_rest(tmp_path: Path, images: list[Path]) -> None:
    data = images[3].read_bytes()
    images[3].write_bytes(data[: len(data) // 2])
    with pytest.raises(JaguarKitError) as e:
        prepare_images(images, tmp_path / "cache", size=64, workers=1, progress=False)
    assert "img_3.png" in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)
    out_dir = prepared_dir(tmp_path / "cache", "crop", 0.05, 64)
    assert len(list(out_dir.rglob("*.jpg"))) == len(images) - 1


def test_empty_masks_reported_also_after_resume(tmp_path: Path, images: list[Path]) -> None:
    _rgba(images[1], 1, box=None)  # fully transparent
    first = prepare_images(images, tmp_path / "cache", size=64, workers=1, progress=False)
    assert first.empty_masks == ["img_1.png"]
    assert load_prepared(first[images[1]]).shape == (43, 64, 3)  # kept whole (300 x 200)
    again = prepare_images(images, tmp_path / "cache", size=64, workers=1, progress=False)
    assert again.made == 0 and again.empty_masks == ["img_1.png"]
    assert "1 with an empty mask" in again.summary()

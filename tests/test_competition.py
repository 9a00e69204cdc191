"""Competition folder loading: layouts, and every validation error with a real bad file."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from jaguar_kit.data.competition import find_competition_dir, load_competition
from jaguar_kit.errors import JaguarKitError


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (12, 16, 4), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def make_comp(
    root: Path, layout: str = "nested", ids: int = 3, per_id: int = 3, n_test: int = 4, test_csv: bool = True
) -> Path:
    """A tiny competition folder: RGBA PNGs, train.csv, and test.csv with all ordered pairs."""
    tr = root / "train" / "train" if layout == "nested" else root / "train"
    te = root / "test" / "test" if layout == "nested" else root / "test"
    rows = ["filename,ground_truth"]
    for i in range(ids * per_id):
        name = f"train_{i:04d}.png"
        _png(tr / name, i)
        rows.append(f"{name},jaguar_{i % ids}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    names = [f"test_{i:04d}.png" for i in range(n_test)]
    for i, name in enumerate(names):
        _png(te / name, 100 + i)
    if test_csv:
        pairs = ["row_id,query_image,gallery_image"]
        for r, (q, g) in enumerate(itertools.permutations(names, 2)):
            pairs.append(f"{q}_{g},{q},{g}")
        (root / "test.csv").write_text("\n".join(pairs) + "\n")
    return root


def _error(root: Path, **kw) -> str:
    with pytest.raises(JaguarKitError) as e:
        load_competition(root, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_load_both_layouts(tmp_path: Path, layout: str) -> None:
    root = make_comp(tmp_path, layout, ids=3, per_id=3, n_test=4)
    comp = load_competition(root)
    expected_dir = root / "train" / "train" if layout == "nested" else root / "train"
    assert comp.train_dir == expected_dir
    assert list(comp.train.columns) == ["filename", "identity", "path", "encounter"]
    assert set(comp.train["encounter"]) == {""}  # no encounter column: none given
    assert len(comp.train) == 9
    assert comp.train["identity"].tolist()[:3] == ["jaguar_0", "jaguar_1", "jaguar_2"]
    assert all(Path(p).is_file() for p in comp.train["path"])
    assert comp.test_images["filename"].tolist() == [f"test_{i:04d}.png" for i in range(4)]
    assert all(Path(p).is_file() for p in comp.test_images["path"])
    assert len(comp.pairs) == 4 * 3
    assert list(comp.pairs.columns) == ["row_id", "query_image", "gallery_image"]


def test_without_test_csv(tmp_path: Path) -> None:
    comp = load_competition(make_comp(tmp_path, test_csv=False))
    assert comp.pairs is None
    assert len(comp.test_images) == 0
    assert len(comp.train) == 9


def test_missing_train_csv(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").unlink()
    msg = _error(root)
    assert "train.csv" in msg and "not found" in msg


def test_missing_image_folder(tmp_path: Path) -> None:
    root = make_comp(tmp_path, layout="flat")
    for f in (root / "train").iterdir():
        f.unlink()
    (root / "train").rmdir()
    assert "train image folder not found" in _error(root)


@pytest.mark.parametrize("content", ["", "filename,ground_truth\n", "\n\n"])
def test_empty_csv(tmp_path: Path, content: str) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").write_text(content)
    msg = _error(root)
    assert "train.csv" in msg and "empty CSV" in msg


def test_missing_column_names_found_columns(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").write_text("filename,label\ntrain_0000.png,a\n")
    msg = _error(root)
    assert "ground_truth" in msg and "'label'" in msg and "line 1" in msg
    assert "delimiter" not in msg


@pytest.mark.parametrize("delim, name", [(";", "';'"), ("\t", "tab")])
def test_wrong_delimiter(tmp_path: Path, delim: str, name: str) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").write_text(f"filename{delim}ground_truth\ntrain_0000.png{delim}a\n")
    msg = _error(root)
    assert "wrong delimiter" in msg and name in msg


def test_extra_field_names_line(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").write_text("filename,ground_truth\ntrain_0000.png,a\ntrain_0001.png,b,oops\n")
    assert "line 3: 3 fields" in _error(root)


def test_duplicate_filename_names_both_lines(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").write_text(
        "filename,ground_truth\ntrain_0000.png,a\ntrain_0001.png,b\ntrain_0000.png,a\n"
    )
    msg = _error(root)
    assert "'train_0000.png' appears twice" in msg and "lines 2 and 4" in msg


def test_empty_identity(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train.csv").write_text("filename,ground_truth\ntrain_0000.png,a\ntrain_0001.png,\n")
    msg = _error(root)
    assert "line 3" in msg and "empty ground_truth" in msg


def test_missing_images_counted(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train" / "train" / "train_0004.png").unlink()
    (root / "train" / "train" / "train_0007.png").unlink()
    msg = _error(root)
    assert "line 6" in msg and "'train_0004.png' not found" in msg and "(and 1 more)" in msg


def test_pair_with_unknown_image(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    with open(root / "test.csv", "a") as f:
        f.write("x,test_0000.png,train_0000.png\n")
    msg = _error(root)
    assert "test.csv" in msg and "line 14" in msg and "'train_0000.png' is not in the test folder" in msg


def test_duplicate_row_id_and_self_pair_both_reported(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    with open(root / "test.csv", "a") as f:
        f.write("test_0000.png_test_0001.png,test_0001.png,test_0000.png\n")  # line 14
        f.write("self,test_0002.png,test_0002.png\n")  # line 15
    msg = _error(root)
    assert "row_id 'test_0000.png_test_0001.png' appears twice, on lines 2 and 14" in msg
    assert "line 15: self-pair" in msg


def test_zero_byte_png(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train" / "train" / "train_0002.png").write_bytes(b"")
    msg = _error(root)
    assert "train_0002.png" in msg and "zero-byte" in msg
    load_competition(root, check_images=False)  # content checks are optional


def test_truncated_pngs_counted(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    for name in ("train_0001.png", "train_0005.png", "train_0006.png"):
        p = root / "train" / "train" / name
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    msg = _error(root)
    assert "train_0001.png: truncated PNG" in msg and "(and 2 more)" in msg


def test_jpeg_named_png_is_refused_with_rename_hint(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    p = root / "test" / "test" / "test_0003.png"
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    p.write_bytes(buf.tobytes())
    msg = _error(root)
    assert "test_0003.png: is a JPEG file named .png: rename it to test_0003.jpg" in msg


def test_unknown_format(tmp_path: Path) -> None:
    root = make_comp(tmp_path)
    (root / "train" / "train" / "train_0000.png").write_text("not an image at all")
    assert "unknown image format" in _error(root)


def test_jpeg_images_accepted(tmp_path: Path) -> None:
    root = tmp_path / "comp"
    (root / "train").mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(root / "train" / f"cam_{i}.jpg"), np.full((8, 8, 3), 40 * i, np.uint8))
    (root / "train.csv").write_text("filename,ground_truth\ncam_0.jpg,a\ncam_1.jpg,b\n")
    comp = load_competition(root)
    assert comp.test_dir is None and comp.pairs is None and len(comp.train) == 2


# --- find_competition_dir -------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        "competitions/jaguar-re-id",
        "jaguar-re-id",
        "datasets/someone/jaguar-copy/data/jaguar-re-id",
    ],
)
def test_find_in_kaggle_layouts(tmp_path: Path, rel: str) -> None:
    inp = tmp_path / "input"
    (inp / "datasets" / "someone" / "weights").mkdir(parents=True)
    (inp / "datasets" / "someone" / "weights" / "train.csv").write_text("not a competition\n")
    comp = make_comp(inp / rel)
    assert find_competition_dir(inp) == comp
    assert find_competition_dir(comp) == comp  # the folder itself


def test_find_nothing_lists_what_was_searched(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(JaguarKitError) as e:
        find_competition_dir(tmp_path)
    msg = str(e.value)
    assert "searched" in msg and str(tmp_path) in msg and "train.csv" in msg


def test_find_respects_depth_bound(tmp_path: Path) -> None:
    make_comp(tmp_path / "a" / "b" / "c")
    with pytest.raises(JaguarKitError):
        find_competition_dir(tmp_path, max_depth=2)
    assert find_competition_dir(tmp_path, max_depth=3) == tmp_path / "a" / "b" / "c"


def test_find_identical_copies_is_not_ambiguous(tmp_path: Path) -> None:
    make_comp(tmp_path / "competitions" / "jaguar-re-id")
    make_comp(tmp_path / "datasets" / "me" / "copy" / "jaguar-re-id")
    assert find_competition_dir(tmp_path) == tmp_path / "competitions" / "jaguar-re-id"


def test_find_different_folders_is_ambiguous(tmp_path: Path) -> None:
    a = make_comp(tmp_path / "competitions" / "jaguar-re-id")
    b = make_comp(tmp_path / "other", ids=2)
    with pytest.raises(JaguarKitError) as e:
        find_competition_dir(tmp_path)
    assert str(a) in str(e.value) and str(b) in str(e.value)


# --- encounters ------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["encounter", "sequence", "sequence_id", "encounter_id"])
def test_encounter_column_is_read_under_each_name(tmp_path: Path, column: str) -> None:
    from jaguar_kit.data.encounters import train_encounters

    root = make_comp(tmp_path, ids=2, per_id=3)
    lines = (root / "train.csv").read_text().splitlines()
    given = ["burst1", "burst1", "", "burst2", "burst2", ""]  # two photos without an encounter
    (root / "train.csv").write_text("\n".join([f"{lines[0]},{column}"] + [f"{ln},{g}" for ln, g in
                                                                          zip(lines[1:], given)]) + "\n")
    train = load_competition(root).train
    assert train["encounter"].tolist() == given
    enc = train_encounters(train)
    assert enc[:2].tolist() == ["burst1", "burst1"] and enc[3] == "burst2"
    assert enc[2].startswith("~") and enc[5].startswith("~") and enc[2] != enc[5]  # inferred, never a given one


def test_encounters_inferred_as_near_duplicates_of_one_identity(tmp_path: Path) -> None:
    """Without the column: the same shot (or a near copy) of one identity is one encounter; others are not."""
    from jaguar_kit.data.encounters import train_encounters

    root = make_comp(tmp_path, ids=2, per_id=3)
    tr = root / "train" / "train"
    # train_0000 and train_0002 are jaguar_0 and jaguar_0; make them one burst (a copy with a little noise)
    img = cv2.imread(str(tr / "train_0000.png"), cv2.IMREAD_UNCHANGED)
    noisy = np.clip(img.astype(int) + np.random.default_rng(1).integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tr / "train_0002.png"), noisy)
    cv2.imwrite(str(tr / "train_0001.png"), img)  # the same picture under another identity: not its encounter
    train = load_competition(root).train
    assert set(train["encounter"]) == {""}
    enc = train_encounters(train)
    ids = train["identity"].tolist()
    assert ids[0] == ids[2] != ids[1]
    assert enc[0] == enc[2]
    assert len(set(enc)) == len(enc) - 1  # every other photo is its own encounter


def test_photo_hashes_are_cached_by_file_and_redone_when_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    """Training and inference hash each photo once: a second pass reads the cache, a changed file is rehashed."""
    import os

    from jaguar_kit.data import encounters

    root = make_comp(tmp_path, ids=2, per_id=2)
    paths = sorted((root / "train" / "train").iterdir())
    cache = tmp_path / "cache" / encounters.HASH_CACHE
    first = encounters.image_hashes(paths, cache)
    assert cache.is_file() and first.shape == (4, 256)
    calls = []
    real = encounters.image_hash
    monkeypatch.setattr(encounters, "image_hash", lambda p: calls.append(p) or real(p))
    assert np.array_equal(encounters.image_hashes(paths, cache), first) and calls == []
    _png(paths[0], seed=99)
    os.utime(paths[0], ns=(1, 1))  # another file: another size or time
    again = encounters.image_hashes(paths, cache)
    assert calls == [paths[0]] and np.array_equal(again[1:], first[1:])
    cache.write_text("{not json")  # a damaged cache is rebuilt, not an error
    assert np.array_equal(encounters.image_hashes(paths, cache), again)

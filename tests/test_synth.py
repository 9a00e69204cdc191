"""The synthetic competition: Kaggle's folder format, RGBA masks, determinism, and a coat
whose identity signal is real (same flank overlaps, other flanks and jaguars do not)."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from jaguar_kit.data.synth import generate_competition, identity_names
from jaguar_kit.data.synth_coats import _X0, _Y0, render_coat
from jaguar_kit.data.synth_image import _SHIFT_U, render_image
from jaguar_kit.errors import JaguarKitError

SMALL = dict(identities=3, images_per_identity=2, test_per_identity=2, size=64, progress=False)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return generate_competition(tmp_path_factory.mktemp("synth") / "comp", **SMALL)


def test_folder_layout_and_csv_formats(comp):
    train = _rows(comp / "train.csv")
    assert train[0] == ["filename", "ground_truth"]
    assert len(train) - 1 == 3 * 2
    names = [g for _, g in train[1:]]
    assert sorted(set(names)) == sorted(identity_names(3, 0)) and all(names.count(n) == 2 for n in set(names))
    for f, _ in train[1:]:
        assert f.startswith("train_") and (comp / "train" / "train" / f).is_file()

    solution = _rows(comp / "solution.csv")
    assert solution[0] == ["filename", "ground_truth"]
    test_images = [f for f, _ in solution[1:]]
    assert len(test_images) == 3 * 2 and {g for _, g in solution[1:]} == set(names)  # closed set
    n = len(test_images)

    pairs = _rows(comp / "test.csv")
    assert pairs[0] == ["row_id", "query_image", "gallery_image"]
    body = pairs[1:]
    assert len(body) == n * (n - 1)
    assert [int(r) for r, _, _ in body] == list(range(n * (n - 1)))
    assert all(q != g for _, q, g in body)
    assert len({(q, g) for _, q, g in body}) == n * (n - 1)  # every ordered pair once
    named = {q for _, q, _ in body} | {g for _, _, g in body}
    assert named == set(test_images)
    assert all((comp / "test" / "test" / f).is_file() for f in named)

    sub = _rows(comp / "sample_submission.csv")
    assert sub[0] == ["row_id", "similarity"]
    assert [r for r, _ in sub[1:]] == [r for r, _, _ in body] and {s for _, s in sub[1:]} == {"0.5"}


def test_images_are_rgba_with_a_partial_mask(comp):
    for path in sorted((comp / "train" / "train").glob("*.png")) + sorted((comp / "test" / "test").glob("*.png")):
        im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert im.shape == (43, 64, 4), path  # landscape 3:2, longest side = size
        alpha = im[..., 3]
        assert 0 < (alpha > 0).mean() < 0.9, path
        assert im[..., :3][alpha == 0].std() > 1, path  # the background is still there


def test_same_arguments_give_identical_bytes_also_with_workers(tmp_path, comp):
    again = generate_competition(tmp_path / "again", **{**SMALL, "workers": 2})
    files = sorted(p.relative_to(comp) for p in comp.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (comp / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = generate_competition(tmp_path / "other", **{**SMALL, "seed": 1})
    first = sorted((comp / "train" / "train").glob("*.png"))[0].name
    assert (comp / "train" / "train" / first).read_bytes() != (other / "train" / "train" / first).read_bytes()


def test_finished_folder_is_kept_and_foreign_folder_refused(tmp_path, comp):
    manifest = json.loads((comp / "synth.json").read_text())
    assert manifest["complete"] is True and manifest["size"] == 64
    stamp = (comp / "train.csv").stat().st_mtime_ns
    generate_competition(comp, **SMALL)  # same arguments: nothing rewritten
    assert (comp / "train.csv").stat().st_mtime_ns == stamp

    foreign = tmp_path / "kaggle"
    foreign.mkdir()
    (foreign / "train.csv").write_text("filename,ground_truth\n")
    with pytest.raises(JaguarKitError, match="not written by generate_competition"):
        generate_competition(foreign, **SMALL)
    assert (foreign / "train.csv").read_text() == "filename,ground_truth\n"


@pytest.mark.parametrize(
    "bad", [dict(identities=1), dict(images_per_identity=1), dict(test_per_identity=0), dict(size=32), dict(seed=-1), dict(workers=0), dict(size=256.0)]
)
def test_bad_arguments_are_one_line_errors(tmp_path, bad):
    with pytest.raises(JaguarKitError) as err:
        generate_competition(tmp_path / "x", **{**SMALL, **bad})
    assert "\n" not in str(err.value) and next(iter(bad)) in str(err.value)
    assert not (tmp_path / "x").exists()


def test_names_are_distinct_and_stable():
    names = identity_names(200, seed=3)
    assert len(set(names)) == 200 and all(n.isalpha() and n[0].isupper() for n in names)
    assert identity_names(20, seed=3) == names[:20]


PPU = 40.0  # coat pixels per body unit for the coat tests


def _window(seed, identity, flank, du, mirror=False):
    """The flank's coat over the central torso, seen through a window moved by du body units."""
    spots = render_coat(seed, identity, flank, PPU)[..., 0].astype(np.float32)
    x0 = int((-0.8 + du - _X0) * PPU)
    y0 = int((-0.3 - _Y0) * PPU)
    win = spots[y0 : y0 + int(0.6 * PPU), x0 : x0 + int(1.6 * PPU)]
    return win[:, ::-1] if mirror else win


def _match(a, b):
    """Best normalised correlation of ``a``'s centre anywhere along ``b`` (a view's offset is unknown)."""
    m = int(_SHIFT_U * PPU)
    return float(cv2.matchTemplate(b, a[:, m:-m], cv2.TM_CCOEFF_NORMED).max())


def test_coat_identity_signal_same_flank_beats_other_flank_and_other_jaguars():
    seed, rng = 0, np.random.default_rng(0)
    same, other_flank, other_jaguar = [], [], []
    for i in range(6):
        du1, du2 = rng.uniform(-_SHIFT_U / 2, _SHIFT_U / 2, 2)
        ref = _window(seed, i, 0, du1)
        same.append(_match(ref, _window(seed, i, 0, du2)))
        other_flank.append(max(_match(ref, _window(seed, i, 1, du2)), _match(ref, _window(seed, i, 1, du2, mirror=True))))
        other_jaguar.append(_match(ref, _window(seed, (i + 1) % 6, 0, du2)))
    # Same flank: views overlap, the layout lines up (high). Left vs (mirrored) right
    # flank of one jaguar is no closer than two different jaguars: flanks differ.
    assert min(same) > 0.8
    assert max(other_flank) < 0.5 and max(other_jaguar) < 0.5
    assert abs(np.mean(other_flank) - np.mean(other_jaguar)) < 0.15


def test_rendered_views_keep_the_coat_and_vary_the_rest():
    a = render_image(0, 0, 0, 0, 96)
    b = render_image(0, 0, 0, 1, 96)
    assert a.shape == b.shape == (64, 96, 4) and a.dtype == np.uint8
    assert not np.array_equal(a, b)  # another view: pose, light and background differ
    assert np.array_equal(a, render_image(0, 0, 0, 0, 96))


# --- encounters ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comp_encounters(tmp_path_factory):
    return generate_competition(tmp_path_factory.mktemp("synth") / "enc", identities=4, images_per_identity=9,
                                test_per_identity=3, size=128, seed=1, progress=False, images_per_encounter=3)


def test_encounters_are_written_and_kept_out_of_the_test(comp_encounters):
    from jaguar_kit.data.competition import load_competition

    train = load_competition(comp_encounters).train
    assert _rows(comp_encounters / "train.csv")[0] == ["filename", "ground_truth", "encounter"]
    sizes = train.groupby("encounter").agg(n=("identity", "size"), ids=("identity", "nunique"))
    assert len(sizes) == 4 * 3 and (sizes["n"] == 3).all() and (sizes["ids"] == 1).all()
    params = json.loads((comp_encounters / "synth.json").read_text())
    assert params["images_per_encounter"] == 3 and params["complete"]


def test_photos_of_one_encounter_share_their_scene_and_are_found_again(comp_encounters):
    """The scene is shared (the near-duplicate rule recovers every encounter exactly), the coat view is not."""
    from jaguar_kit.data.competition import load_competition
    from jaguar_kit.data.encounters import infer_encounters

    train = load_competition(comp_encounters).train
    inferred = infer_encounters(train["identity"], train["path"])
    given = train["encounter"].to_numpy()
    assert all(len(set(inferred[given == g])) == 1 for g in set(given))  # no encounter is split
    assert all(len(set(given[inferred == g])) == 1 for g in set(inferred))  # no two are merged
    imgs = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in train["path"][given == given[0]]]
    assert not np.array_equal(imgs[0], imgs[1])  # each photo is its own view


def test_without_encounters_the_bytes_are_those_of_before(comp):
    """Opting out (the default) keeps every existing folder's images: the same bytes as without the option."""
    assert np.array_equal(render_image(0, 1, 0, 3, 64), render_image(0, 1, 0, 3, 64, encounter=None))
    assert not np.array_equal(render_image(0, 1, 0, 3, 64, encounter=0), render_image(0, 1, 0, 3, 64))

"""Submission writing: every pair answered, order within each query kept, bad input refused."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.submission import validate_submission, write_submission


def all_pairs(names: list[str]) -> pd.DataFrame:
    rows = [(f"r{k}", q, g) for k, (q, g) in enumerate(itertools.permutations(names, 2))]
    return pd.DataFrame(rows, columns=["row_id", "query_image", "gallery_image"])


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    names = [f"test_{i:04d}.png" for i in range(12)]
    sim = rng.uniform(-1, 1, (12, 12)).astype(np.float32)
    sim[0, 5] = sim[0, 6]  # a tie that must stay a tie
    pairs = all_pairs(names).sample(frac=1.0, random_state=1).reset_index(drop=True)  # any row order
    return names, sim, pairs


def test_writes_every_pair_in_unit_range_preserving_each_querys_order(tmp_path, case):
    names, sim, pairs = case
    out = write_submission(pairs, names, sim, tmp_path / "sub.csv")
    validate_submission(out, pairs)
    sub = pd.read_csv(out, dtype={"row_id": str})
    assert list(sub.columns) == ["row_id", "similarity"]
    assert list(sub["row_id"]) == list(pairs["row_id"])
    assert sub["similarity"].between(0, 1).all()
    got = pairs.assign(similarity=sub["similarity"].to_numpy())
    pos = {n: i for i, n in enumerate(names)}
    for q, grp in got.groupby("query_image"):
        raw = np.array([sim[pos[q], pos[g]] for g in grp["gallery_image"]])
        written = grp["similarity"].to_numpy()
        # Same strict order and same ties: the sign of every pairwise difference agrees.
        np.testing.assert_array_equal(np.sign(raw[:, None] - raw[None, :]), np.sign(written[:, None] - written[None, :]))


def test_constant_similarity_is_written_as_half(tmp_path, case):
    names, _, pairs = case
    out = write_submission(pairs, names, np.ones((12, 12)), tmp_path / "s.csv")
    assert (pd.read_csv(out)["similarity"] == 0.5).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda n, s, p: (n, s[:11, :11], p), "shape \\(11, 11\\) but there are 12 image names"),
        (lambda n, s, p: (n, s, p.assign(query_image=p["query_image"].where(p.index != 7, "ghost.png"))),
         "row_id 'r\\d+': query_image 'ghost.png' is not among"),
        (lambda n, s, p: (n, s, p.assign(gallery_image=p["gallery_image"].where(p.index != 3, "x.png"))),
         "gallery_image 'x.png'"),
        (lambda n, s, p: (n, np.where(np.eye(12, k=1) > 0, np.nan, s), p), "similarity is nan"),
        (lambda n, s, p: (n, np.where(np.eye(12, k=2) > 0, np.inf, s), p), "similarity is inf"),
        (lambda n, s, p: (n, s, pd.concat([p, p.iloc[[4]]])), "appears more than once"),
        (lambda n, s, p: (n, s, p.drop(columns="gallery_image")), "lacks column\\(s\\) gallery_image"),
        (lambda n, s, p: (n[:11] + [n[0]], s, p), "listed twice"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case, mutate, match):
    names, sim, pairs = case
    names, sim, pairs = mutate(names, sim, pairs)
    out = tmp_path / "sub.csv"
    out.write_text("previous\n")
    with pytest.raises(JaguarKitError, match=match) as e:
        write_submission(pairs, names, sim, out)
    assert "\n" not in str(e.value)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temporary left behind


def test_nan_error_names_the_row(tmp_path, case):
    names, sim, pairs = case
    sim = sim.copy()
    sim[2, 9] = np.nan
    want = pairs.loc[(pairs.query_image == names[2]) & (pairs.gallery_image == names[9]), "row_id"].item()
    with pytest.raises(JaguarKitError, match=f"row_id '{want}'"):
        write_submission(pairs, names, sim, tmp_path / "s.csv")


def _write(tmp_path, df: pd.DataFrame):
    p = tmp_path / "sub.csv"
    df.to_csv(p, index=False)
    return p


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.rename(columns={"similarity": "score"}), "columns must be row_id,similarity"),
        (lambda d: d.iloc[:-1], "has 131 rows but there are 132 pairs"),
        (lambda d: d.assign(row_id=d["row_id"].where(d.index != 5, d["row_id"][4])), "line 7: row_id 'r4' appears more than once"),
        (lambda d: d.assign(row_id=d["row_id"].where(d.index != 5, "zzz")), "row_id 'r5' of the pairs is missing"),
        (lambda d: d.assign(similarity=d["similarity"].where(d.index != 9, np.nan)), "line 11: row_id 'r9': similarity"),
        (lambda d: d.assign(similarity=d["similarity"].astype(object).where(d.index != 9, "abc")), "'abc' is not a finite"),
        (lambda d: d.assign(similarity=d["similarity"].where(d.index != 2, 1.5)), "line 4: row_id 'r2': similarity 1.5 is outside"),
        (lambda d: d.assign(similarity=d["similarity"].where(d.index != 2, -0.1)), "outside \\[0, 1\\]"),
    ],
)
def test_validate_submission_reports_each_problem_in_one_line(tmp_path, case, edit, match):
    names, _, pairs = case
    good = pd.DataFrame({"row_id": [f"r{k}" for k in range(len(pairs))], "similarity": np.linspace(0, 1, len(pairs))})
    validate_submission(_write(tmp_path, good), pairs)
    with pytest.raises(JaguarKitError, match=match) as e:
        validate_submission(_write(tmp_path, edit(good)), pairs)
    assert "\n" not in str(e.value) and "sub.csv" in str(e.value)

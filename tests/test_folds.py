"""Folds: closed-set stratified (every identity trains in every fold) and open-set identity folds."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_kit.data.folds import make_folds, split_indices
from jaguar_kit.errors import JaguarKitError

# Sizes like the competition's (13 to 183 per identity), plus the awkward small cases.
SIZES = {"one": 1, "two": 2, "four": 4, "five": 5, "a": 13, "b": 45, "c": 61, "d": 183, "e": 7}


def _labels(seed: int = 0) -> list[str]:
    labels = [name for name, n in SIZES.items() for _ in range(n)]
    return list(np.random.default_rng(seed).permutation(labels))


def test_stratified_every_identity_trains_in_every_fold() -> None:
    labels = np.array(_labels())
    fa = make_folds(labels, num_folds=5, seed=3)
    for f in range(5):
        tr, va = split_indices(fa, f)
        assert set(labels[tr]) == set(SIZES)  # closed-set: all identities train
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
        val_ids = set(labels[va])
        for name, n in SIZES.items():
            if n >= 5:
                assert name in val_ids  # large identities validate in every fold
                per = (labels[va] == name).sum()
                assert n // 5 <= per <= n // 5 + 1
    assert (fa.fold[labels == "one"] == -1).all()  # a single image never leaves training


def test_stratified_small_identities_reported_and_spread() -> None:
    labels = np.array(_labels())
    fa = make_folds(labels, num_folds=5, seed=3)
    assert fa.small_identities == ["four", "one", "two"]
    for name in ("two", "four"):
        folds = fa.fold[labels == name]
        assert len(set(folds.tolist())) == len(folds)  # at most one val image per fold


def test_stratified_folds_balanced() -> None:
    fa = make_folds(_labels(), num_folds=5, seed=0)
    counts = np.bincount(fa.fold[fa.fold >= 0], minlength=5)
    assert counts.max() - counts.min() <= 2


def test_identity_folds_disjoint_and_balanced() -> None:
    labels = np.array([f"x{i}" for i in range(14) for _ in range(5 + 3 * i)] + ["one"])
    fa = make_folds(labels, num_folds=3, seed=1, mode="identity")
    seen: set[str] = set()
    for f in range(3):
        tr, va = split_indices(fa, f)
        assert not set(labels[tr]) & set(labels[va])  # open-set
        assert not set(labels[va]) & seen  # each identity validates in one fold only
        seen |= set(labels[va])
    assert seen == set(labels)
    counts = np.bincount(fa.fold, minlength=3)
    assert counts.max() <= 1.1 * counts.min()
    assert fa.small_identities == ["one"]


def test_identity_mode_needs_enough_identities() -> None:
    with pytest.raises(JaguarKitError, match="at least 5 identities"):
        make_folds(["a", "b", "c"], num_folds=5, mode="identity")


@pytest.mark.parametrize("mode", ["stratified", "identity"])
def test_deterministic_from_seed(mode: str) -> None:
    labels = _labels()
    a = make_folds(labels, 4, seed=7, mode=mode).fold
    b = make_folds(labels, 4, seed=7, mode=mode).fold
    c = make_folds(labels, 4, seed=8, mode=mode).fold
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_arguments() -> None:
    with pytest.raises(JaguarKitError):
        make_folds(["a", "b"], num_folds=1)
    with pytest.raises(JaguarKitError):
        make_folds(["a", "b"], mode="random")
    fa = make_folds(_labels(), num_folds=5)
    with pytest.raises(JaguarKitError, match="fold 5 out of range"):
        split_indices(fa, 5)

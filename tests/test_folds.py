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


# --- encounters ------------------------------------------------------------------------------


def _encounter_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Identities of SIZES, their photos taken in encounters of 1 to 6 photos."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for name, n in SIZES.items():
        k = 0
        while k < n:
            size = min(n - k, int(rng.integers(1, 7)))
            labels += [name] * size
            groups += [f"{name}-{len(set(groups))}"] * size
            k += size
    order = rng.permutation(len(labels))
    return np.array(labels)[order], np.array(groups)[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_folds_never_split_an_encounter(seed: int) -> None:
    labels, groups = _encounter_labels(seed)
    fa = make_folds(labels, num_folds=5, seed=seed, groups=groups)
    for g in np.unique(groups):
        assert len(set(fa.fold[groups == g])) == 1, g  # an encounter lies on one side of every split
    for f in range(5):
        tr, va = split_indices(fa, f)
        assert set(labels[tr]) == set(SIZES)  # still closed-set: every identity trains in every fold
    for name in SIZES:
        n_enc = len(set(groups[labels == name]))
        if n_enc == 1:
            assert (fa.fold[labels == name] == -1).all()  # its only encounter never leaves training
        assert (name in fa.small_identities) == (n_enc < 5)
    assert fa.fold.tolist() == make_folds(labels, 5, seed, groups=groups).fold.tolist()  # deterministic


def test_fold_split_uses_the_encounters_and_checks_their_count() -> None:
    from jaguar_kit.config import DataConfig
    from jaguar_kit.data.folds import fold_split

    labels, groups = _encounter_labels(4)
    split = fold_split(labels, DataConfig(fold=1), groups=groups)
    assert not set(groups[split.train_idx]) & set(groups[split.val_idx])
    with pytest.raises(JaguarKitError, match="3 encounters for"):
        make_folds(labels, groups=groups[:3])


def _ridge_embed(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A tiny trained model: a ridge classifier's class scores as the embedding (it can learn scenes)."""
    classes, y = np.unique(y_train, return_inverse=True)
    w = np.linalg.solve(x_train.T @ x_train + np.eye(x_train.shape[1]), x_train.T @ np.eye(len(classes))[y])
    return x @ w


def _map(x: np.ndarray, labels: np.ndarray) -> float:
    from jaguar_kit.metrics import identity_balanced_map

    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return identity_balanced_map(x @ x.T, labels).map


def test_random_folds_inflate_validation_grouped_folds_do_not() -> None:
    """Photos of one encounter share a context: a model trained on some of them learns the scene.

    With random folds a validation photo's encounter-mates are in training, so the trained
    model's validation mAP overstates its test mAP (test photos come from other encounters);
    folds grouped by encounter validate on new encounters, like the test.
    """
    from jaguar_kit.data.synth import encounter_embeddings

    gaps: dict[str, list[float]] = {"random": [], "grouped": []}
    for seed in range(5):
        x, ids, enc = encounter_embeddings(identities=20, encounters=12, per_encounter=2, context=1.3, seed=seed)
        test = np.array([int(e.split("-")[1]) >= 10 for e in enc])  # 2 encounters per identity held out
        xt, it, et = x[~test], ids[~test], enc[~test]
        for mode, groups in (("random", None), ("grouped", et)):
            tr, va = split_indices(make_folds(it, 5, seed, groups=groups), 0)
            val = _map(_ridge_embed(xt[tr], it[tr], xt[va]), it[va])
            tst = _map(_ridge_embed(xt[tr], it[tr], x[test]), ids[test])
            gaps[mode].append(val - tst)
    assert np.mean(gaps["random"]) > 0.12, gaps  # measured: +0.21 (every seed +0.11 or more)
    assert abs(np.mean(gaps["grouped"])) < 0.06, gaps  # measured: +0.02 (seeds -0.06 to +0.08)

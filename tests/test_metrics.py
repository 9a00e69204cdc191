"""identity_balanced_map equals the competition's metric, computed the slow obvious way."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.metrics import identity_balanced_map


def brute_force(sim: np.ndarray, labels: list) -> tuple[float, float, dict]:
    """The metric as facts.md words it, one query at a time (ties: lower index first)."""
    n = len(labels)
    per_id: dict = {}
    for q in range(n):
        others = sorted((j for j in range(n) if j != q), key=lambda j: (-float(sim[q, j]), j))
        precisions, hits = [], 0
        for k, j in enumerate(others, start=1):
            if labels[j] == labels[q]:
                hits += 1
                precisions.append(hits / k)
        if not precisions:
            continue
        ap = sum(precisions) / len(precisions)
        r1 = 1.0 if labels[others[0]] == labels[q] else 0.0
        per_id.setdefault(labels[q], []).append((ap, r1))
    maps = [np.mean([a for a, _ in v]) for v in per_id.values()]
    r1s = [np.mean([r for _, r in v]) for v in per_id.values()]
    return float(np.mean(maps)), float(np.mean(r1s)), per_id


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_random_cases_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    n_ids = int(rng.integers(1, max(2, n // 2) + 1))
    labels = [f"id{int(x)}" for x in rng.integers(0, n_ids, n)]
    if seed % 2:  # integer-valued: many ties
        sim = rng.integers(-2, 3, (n, n)).astype(np.float32)
    else:
        sim = rng.normal(size=(n, n))
    if len(set(labels)) == n:  # every image alone: nothing to score
        labels[1] = labels[0]
    want_map, want_r1, per_id = brute_force(sim, labels)
    got = identity_balanced_map(sim, labels)
    assert got.map == pytest.approx(want_map, abs=1e-12)
    assert got.rank1 == pytest.approx(want_r1, abs=1e-12)
    assert got.n_queries == sum(len(v) for v in per_id.values())
    table = got.per_identity.set_index("identity")
    for ident, rows in per_id.items():
        assert table.loc[ident, "map"] == pytest.approx(np.mean([a for a, _ in rows]), abs=1e-12)
        assert table.loc[ident, "n_queries"] == len(rows)


def test_hand_computed_case_with_singleton_and_all_tied_row():
    labels = ["a", "a", "a", "b", "b", "c"]
    sim = np.zeros((6, 6))
    rankings = {0: [1, 3, 2, 4, 5], 1: [3, 4, 0, 5, 2], 2: [0, 1, 3, 4, 5], 4: [0, 1, 2, 5, 3], 5: [0, 1, 2, 3, 4]}
    for q, order in rankings.items():
        sim[q, q] = 100.0  # self must be ignored
        for score, j in zip([5, 4, 3, 2, 1], order):
            sim[q, j] = score
    sim[3, :] = 7.0  # all tied, self included: others in index order 0,1,2,4,5
    # AP: q0 (1 + 2/3)/2, q1 (1/3 + 2/5)/2, q2 1, q3 1/4 (b at rank 4), q4 1/5, q5 skipped.
    a_map = (5 / 6 + 11 / 30 + 1) / 3
    b_map = (1 / 4 + 1 / 5) / 2
    got = identity_balanced_map(sim, labels)
    assert got.map == pytest.approx((a_map + b_map) / 2)
    assert got.rank1 == pytest.approx((2 / 3 + 0) / 2)
    assert got.n_queries == 5
    c = got.per_identity.set_index("identity").loc["c"]
    assert c["n_images"] == 1 and c["n_queries"] == 0 and np.isnan(c["map"])


def test_identity_whose_images_all_tie_uses_index_order():
    # Everything ties: ranking is by index; identity x = {0, 3}, y = {1, 2}.
    labels = ["x", "y", "y", "x"]
    got = identity_balanced_map(np.ones((4, 4)), labels)
    # q0: 1,2,3 -> x at 3: 1/3; q3: 0,1,2 -> 1; q1: 0,2,3 -> 1/2; q2: 0,1,3 -> 1/2
    assert got.map == pytest.approx(((1 / 3 + 1) / 2 + 0.5) / 2)
    assert got.map == pytest.approx(brute_force(np.ones((4, 4)), labels)[0])


def test_perfect_similarity_scores_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 80)
    sim = (labels[:, None] == labels[None, :]).astype(float) + 0.01 * rng.random((80, 80))
    got = identity_balanced_map(sim, labels)
    assert got.map == 1.0 and got.rank1 == 1.0


def test_each_identity_weighs_the_same():
    # Identity "big" perfectly retrieved, "small" worst possible: score is the plain mean.
    labels = ["big"] * 10 + ["small"] * 2
    sim = np.zeros((12, 12))
    sim[:10, :10] = 1.0
    sim[10, 11] = sim[11, 10] = -1.0  # the pair of "small" sees each other last
    got = identity_balanced_map(sim, labels)
    small_ap = 1 / 11
    assert got.map == pytest.approx((1.0 + small_ap) / 2)


def test_large_n_runs_blockwise_and_matches_small_blocks(monkeypatch):
    import jaguar_kit.metrics as m

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 30, 700)
    sim = rng.integers(0, 5, (700, 700)).astype(np.float32)
    full = identity_balanced_map(sim, labels)
    monkeypatch.setattr(m, "_BLOCK_ELEMENTS", 700 * 3)
    blocked = identity_balanced_map(sim, labels)
    assert blocked.map == full.map and blocked.rank1 == full.rank1


@pytest.mark.parametrize(
    "sim, labels, match",
    [
        (np.zeros((3, 4)), ["a"] * 3, "square"),
        (np.zeros((3, 3)), ["a"] * 2, "2 labels"),
        (np.array([[0, np.nan], [1, 0]]), ["a", "a"], "NaN at row 0, column 1"),
        (np.zeros((3, 3)), ["a", "b", "c"], "no query has a true match"),
    ],
)
def test_bad_input_is_a_one_line_error(sim, labels, match):
    with pytest.raises(JaguarKitError, match=match) as e:
        identity_balanced_map(sim, labels)
    assert "\n" not in str(e.value)


# --- estimates with their noise --------------------------------------------------------------


def test_bootstrap_interval_covers_the_score_of_other_identities():
    """The interval over identities is about what another draw of jaguars would score: over many draws
    of identities from one population, the 90% interval holds the population's mean about 90% of the time."""
    from jaguar_kit.metrics import bootstrap_interval

    rng = np.random.default_rng(0)
    population = rng.beta(2, 5, 20000)  # per-identity APs of a whole population
    hits = 0
    for seed in range(200):
        sample = rng.choice(population, 40)
        lo, hi = bootstrap_interval(sample, n_boot=500, seed=seed)
        assert lo <= sample.mean() <= hi
        hits += lo <= population.mean() <= hi
    assert 0.82 <= hits / 200 <= 0.96  # measured: 0.87
    assert bootstrap_interval([0.5, np.nan, 0.7]) == bootstrap_interval([0.5, 0.7])  # unscored: left out
    assert bootstrap_interval([0.3, 0.9], seed=1) == bootstrap_interval([0.3, 0.9], seed=1)  # seeded
    assert np.isnan(bootstrap_interval([np.nan])[0])


def test_paired_difference_clears_noise_only_for_a_real_gain():
    from jaguar_kit.metrics import paired_difference

    rng = np.random.default_rng(1)
    frozen = rng.uniform(0.05, 0.6, 60)  # identities differ a lot; the models differ little
    better = frozen + 0.03 + rng.normal(0, 0.03, 60)
    same = frozen + rng.normal(0, 0.03, 60)
    assert paired_difference(better, frozen).clears_noise
    d = paired_difference(same, frozen)
    assert not d.clears_noise and d.low < 0 < d.high and d.n_identities == 60
    # unpaired, the identities' own spread (sd 0.16) would swamp a gain of 0.03: pairing removes it
    assert paired_difference(better, frozen).high - paired_difference(better, frozen).low < 0.03
    with pytest.raises(JaguarKitError, match="3 scores against 2"):
        paired_difference([1, 2, 3], [1, 2])


def test_epoch_selection_on_a_trailing_mean_is_not_fooled_by_one_lucky_epoch():
    """Simulated validation curves (rising, then flat) with noise: picking the best single epoch overstates
    the chosen model by the luck of the draw; the best 3-epoch trailing mean overstates it less than half
    as much and picks models at least as good."""
    from jaguar_kit.metrics import trailing_mean

    rng = np.random.default_rng(0)
    epochs = np.arange(1, 13)
    true = 0.10 + 0.02 * (1 - np.exp(-epochs / 3))
    raw, smooth = [], []
    for _ in range(1000):
        observed = true + rng.normal(0, 0.01, len(epochs))
        r, s = int(np.argmax(observed)), int(np.argmax(trailing_mean(observed, 3)))
        raw.append((true[r], observed[r] - true[r]))
        smooth.append((true[s], trailing_mean(observed, 3)[s] - true[s]))
    (raw_true, raw_over), (smooth_true, smooth_over) = np.mean(raw, axis=0), np.mean(smooth, axis=0)
    assert smooth_over < raw_over / 2  # measured: +0.0069 vs +0.0156 (the noise sd is 0.01)
    assert smooth_true >= raw_true - 0.0005  # measured: 0.1181 vs 0.1180
    assert trailing_mean([1, 2, 3, 4], 3).tolist() == [1, 1.5, 2, 3]

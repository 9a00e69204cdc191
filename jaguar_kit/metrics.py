"""Identity-balanced mAP: the jaguar-re-id competition metric, for validation.

For each query image every *other* image is ranked by similarity (the query itself is
excluded). The query's AP is the mean of precision@k over the ranks k of its true
matches; a query with no true match (a singleton identity) is skipped. APs are averaged
within each identity, and the score is the mean over identities, so an identity with 183
photos weighs as much as one with 13.

Ties: the competition does not say how equal similarities are ordered. Here a query's
row is sorted by descending similarity with a *stable* sort, so equal similarities keep
ascending image-index order. The same rule is used by every reference in the tests.

Rank-1 is balanced the same way: for each scored query, 1 if its top-ranked other image
is a true match, else 0; averaged within each identity, then over identities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import JaguarKitError

# Rows of the similarity matrix sorted per block: keeps the (rows x N) int64 sort
# buffers near 32 MB whatever N is.
_BLOCK_ELEMENTS = 4_000_000


@dataclass
class RetrievalScore:
    """Result of :func:`identity_balanced_map`.

    ``per_identity`` has columns identity, n_images, n_queries, map, rank1; identities
    with no scored query (singletons) have n_queries 0 and NaN map/rank1 and do not
    count towards ``map`` or ``rank1``.
    """

    map: float
    rank1: float
    per_identity: pd.DataFrame
    n_queries: int


def ranked_others(similarity: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each query in ``rows``, the other images' indices, best first.

    Sorted by descending similarity, ties by ascending index (stable sort); the query
    itself is removed. Returns an int64 array of shape (len(rows), N - 1).
    """
    n = similarity.shape[1]
    # Negating float64 keeps order exactly (and avoids unsigned-integer wrap-around).
    key = -np.asarray(similarity[rows], dtype=np.float64)
    order = np.argsort(key, axis=1, kind="stable")
    keep = order != np.asarray(rows)[:, None]
    return order[keep].reshape(len(rows), n - 1)


def _check_inputs(similarity: np.ndarray, labels: Sequence) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise JaguarKitError(f"metric: similarity must be a square (N, N) matrix, got shape {sim.shape}")
    n = sim.shape[0]
    if len(labels) != n:
        raise JaguarKitError(f"metric: similarity is {n}x{n} but there are {len(labels)} labels")
    if n < 2:
        raise JaguarKitError(f"metric: need at least 2 images, got {n}")
    if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
        raise JaguarKitError(f"metric: similarity must be real numbers, got dtype {sim.dtype}")
    if np.issubdtype(sim.dtype, np.floating):
        bad = np.argwhere(np.isnan(sim))
        if len(bad):
            i, j = bad[0]
            raise JaguarKitError(f"metric: similarity has NaN at row {i}, column {j}")
    codes, identities = pd.factorize(pd.Series(list(labels), dtype=object), sort=True)
    if (codes < 0).any():
        raise JaguarKitError(f"metric: label of image {int(np.argmax(codes < 0))} is missing (None/NaN)")
    return sim, codes, pd.Index(identities)


def identity_balanced_map(similarity: np.ndarray, labels: Sequence) -> RetrievalScore:
    """Identity-balanced mAP and rank-1 of an all-vs-all (N, N) similarity matrix.

    ``labels[i]`` is the identity of image i. Higher similarity means more alike. The
    diagonal is ignored. Raises :class:`JaguarKitError` if no query has a true match.
    """
    sim, codes, identities = _check_inputs(similarity, labels)
    n = sim.shape[0]
    ap = np.zeros(n)
    top1 = np.zeros(n)
    n_true = np.zeros(n, dtype=np.int64)
    inv_rank = 1.0 / np.arange(1, n)  # 1/k for k = 1..N-1
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n, block):  # blocks of queries, vectorised inside
        rows = np.arange(start, min(n, start + block))
        order = ranked_others(sim, rows)
        match = codes[order] == codes[rows, None]
        hits = np.cumsum(match, axis=1)  # true matches within the top k
        n_true[rows] = hits[:, -1]
        precision_sum = np.where(match, hits * inv_rank, 0.0).sum(axis=1)
        ap[rows] = precision_sum / np.maximum(hits[:, -1], 1)
        top1[rows] = match[:, 0]
    scored = n_true > 0
    if not scored.any():
        raise JaguarKitError("metric: no query has a true match (every identity has a single image)")
    n_ids = len(identities)
    n_images = np.bincount(codes, minlength=n_ids)
    n_queries = np.bincount(codes, weights=scored, minlength=n_ids).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        id_map = np.bincount(codes, weights=ap * scored, minlength=n_ids) / n_queries
        id_rank1 = np.bincount(codes, weights=top1 * scored, minlength=n_ids) / n_queries
    per_identity = pd.DataFrame(
        {
            "identity": identities,
            "n_images": n_images,
            "n_queries": n_queries,
            "map": np.where(n_queries > 0, id_map, np.nan),
            "rank1": np.where(n_queries > 0, id_rank1, np.nan),
        }
    )
    has = n_queries > 0
    return RetrievalScore(
        map=float(id_map[has].mean()),
        rank1=float(id_rank1[has].mean()),
        per_identity=per_identity,
        n_queries=int(scored.sum()),
    )


def pooled_score(scores: Sequence[RetrievalScore]) -> RetrievalScore:
    """The identity-balanced score of the queries of several sets, each scored within itself.

    For cross-validation folds: each fold's images are ranked among themselves (in its own
    model's embeddings), then every identity's AP (and rank-1) is the mean over all its queries
    in every fold, and the score is the mean over identities, as if the queries were one set.
    One set: its own score, unchanged.
    """
    if len(scores) == 1:
        return scores[0]
    t = pd.concat([s.per_identity for s in scores], ignore_index=True)
    t["map"], t["rank1"] = t["map"].fillna(0) * t["n_queries"], t["rank1"].fillna(0) * t["n_queries"]
    t = t.groupby("identity", sort=True, as_index=False)[["n_images", "n_queries", "map", "rank1"]].sum()
    has = t["n_queries"] > 0
    for c in ("map", "rank1"):
        t[c] = (t[c] / t["n_queries"]).where(has)
    if not has.any():
        raise JaguarKitError("metric: no query has a true match in any set")
    return RetrievalScore(float(t.loc[has, "map"].mean()), float(t.loc[has, "rank1"].mean()), t,
                          int(t["n_queries"].sum()))


__all__ = ["RetrievalScore", "identity_balanced_map", "pooled_score", "ranked_others"]


# --- Estimates with their noise --------------------------------------------------------------
#
# A validation mAP is a mean over identities, and the identities are a sample: another
# draw of jaguars would give another score. The intervals below resample identities with
# replacement (percentile bootstrap, seeded, so the same scores give the same interval).

LEVEL = 0.9  # the intervals' coverage
N_BOOT = 2000


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)


def bootstrap_interval(per_identity: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the identity-balanced mean of ``per_identity`` (NaN: unscored, left out).

    (NaN, NaN) when no identity is scored.
    """
    x = np.asarray(per_identity, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not len(x):
        return float("nan"), float("nan")
    lo, hi = np.quantile(_resampled_means(x, n_boot, seed), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class Difference:
    """A paired difference of two identity-balanced scores: its mean and percentile interval."""

    mean: float
    low: float
    high: float
    n_identities: int
    level: float = LEVEL

    @property
    def clears_noise(self) -> bool:
        """The whole interval lies above 0: the first score beats the second beyond the noise."""
        return self.low > 0

    def __str__(self) -> str:
        return (f"{self.mean:+.4f} ({self.level:.0%} interval {self.low:+.4f} to {self.high:+.4f} over "
                f"{self.n_identities} identities)")


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                      seed: int = 0) -> Difference:
    """``a - b`` scored on the same identities (``a[i]``, ``b[i]``: identity i), with a paired bootstrap.

    Resampling identities keeps each identity's two scores together, so what the identities
    share (an easy jaguar is easy for both) cancels and only the difference's own noise is left.
    Identities unscored in either (NaN) are left out.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise JaguarKitError(f"paired difference: {len(a)} scores against {len(b)}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    if not len(d):
        return Difference(float("nan"), float("nan"), float("nan"), 0, level)
    lo, hi = np.quantile(_resampled_means(d, n_boot, seed), [(1 - level) / 2, (1 + level) / 2])
    return Difference(float(d.mean()), float(lo), float(hi), len(d), level)


def trailing_mean(scores: Sequence[float], window: int = 3) -> np.ndarray:
    """Each score averaged with the ones before it, ``window`` in all (fewer at the start).

    Epoch selection on this rather than on single scores: one lucky validation cannot win
    alone, and the chosen score overstates the model's less (measured in tests/test_metrics.py).
    """
    x = np.asarray(scores, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(idx - window, 0)
    return (c[idx] - c[start]) / (idx - start)


__all__ += ["LEVEL", "Difference", "bootstrap_interval", "paired_difference", "trailing_mean"]


# --- Open-set identification: known individuals vs. new ones ---------------------------------


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half).

    Mann-Whitney U from average ranks; NaN when either side is empty.
    """
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = pd.Series(np.concatenate([pos, neg])).rank(method="average").to_numpy()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def open_set_scores(
    top_ids: np.ndarray, top_scores: np.ndarray, truth: Sequence[str], known: set[str] | Sequence[str], threshold: float
) -> dict[str, float]:
    """Open-set figures from each query's ranked candidate individuals.

    ``top_ids`` / ``top_scores`` (Q, k): candidate individuals best first and their scores;
    ``truth``: each query's individual; ``known``: the catalogue's individuals. A query is
    attached to its top candidate when that score is >= ``threshold``, else called new.

    - ``top1_known`` / ``top5_known``: share of known-individual queries whose individual is the
      first / among the first five candidates (threshold ignored);
    - ``auroc_known_vs_new``: how well the top score separates known from new queries;
    - ``false_merge``: share of new-individual queries attached to a known individual;
    - ``false_split``: share of known-individual queries called new;
    - ``wrong_individual``: share of known-individual queries attached to another individual;
    - ``correct_known``: share of known-individual queries attached to the right one.
    """
    known = set(known)
    truth = np.asarray(list(truth), dtype=object)
    if len(truth) != len(top_ids):
        raise JaguarKitError(f"open-set metric: {len(top_ids)} queries but {len(truth)} identities")
    is_known = np.array([t in known for t in truth], bool)
    top1 = top_scores[:, 0]
    attached = top1 >= threshold
    hit1 = top_ids[:, 0] == truth
    hit5 = (top_ids[:, :5] == truth[:, None]).any(axis=1)
    mean = lambda m: float(m.mean()) if m.size else float("nan")  # noqa: E731
    return {
        "known_queries": int(is_known.sum()),
        "new_queries": int((~is_known).sum()),
        "top1_known": mean(hit1[is_known]),
        "top5_known": mean(hit5[is_known]),
        "auroc_known_vs_new": auroc(top1[is_known], top1[~is_known]),
        "false_merge": mean(attached[~is_known]),
        "false_split": mean(~attached[is_known]),
        "wrong_individual": mean((attached & ~hit1)[is_known]),
        "correct_known": mean((attached & hit1)[is_known]),
    }


__all__ += ["auroc", "open_set_scores"]

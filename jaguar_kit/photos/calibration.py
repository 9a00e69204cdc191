"""Scores of photos against individuals, and the calibrated `new`-individual decision.

**Scores.** A photo's score against an individual is its best cosine similarity to any of
that individual's catalogue photos (one good view of the same flank is what identifies a
jaguar; a mean over all photos would punish individuals photographed from both sides).

**Calibration** (:func:`calibrate`), on the catalogue alone, by holding identities out:
every identity in turn is removed from the catalogue (leave-one-identity-out: the limit of
leave-some-identities-out folds, and exact here because removing an identity only removes
columns of the photo x individual score matrix) and its photos are scored against the
others as "new individuals"; every photo is also scored against its own individual without
itself, as a "known" photo. The threshold is the best-match score that new-individual photos
exceed at the target false-merge rate (default 5%: the share of photos of an unseen animal
that would be attached to a known one). A logistic fit of score -> "this candidate is the
right individual" over each photo's top candidates (known and new cases weighted equally)
turns scores into probabilities; the threshold is stored as both a score and a probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import JaguarKitError

DEFAULT_TARGET_FMR = 0.05
FIT_TOP_K = 5  # candidates per photo used to fit the probabilities (what a person is shown)
MIN_IDENTITIES = 3  # to calibrate: at least this many individuals, some with 2+ photos


def individual_scores(sim: np.ndarray, codes: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Best similarity of each row to each individual, and the column (photo) that gave it.

    ``sim`` (Q, N) similarities to catalogue photos whose individuals are ``codes`` (N,);
    returns ``(scores (Q, I), best photo index (Q, I))``; ``-inf`` where an individual has no
    usable photo (e.g. masked out with -inf).
    """
    q = sim.shape[0]
    scores = np.full((q, n_ids), -np.inf, dtype=np.float64)
    best = np.full((q, n_ids), -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_ids + 1))
    for i in range(n_ids):
        cols = order[bounds[i]:bounds[i + 1]]
        if len(cols):
            block = sim[:, cols]
            j = block.argmax(axis=1)
            scores[:, i] = block[np.arange(q), j]
            best[:, i] = cols[j]
    return scores, best


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, ridge: float = 1e-3,
                 iterations: int = 50) -> tuple[float, float]:
    """``(a, b)`` of P(y=1 | x) = sigmoid(a x + b), weighted, by Newton's method.

    Two parameters on one feature: a dozen lines of numpy do it exactly, so scikit-learn (not a
    dependency of the wheel, which installs with --no-deps on Kaggle) is not needed. A small
    ridge keeps separable data (a very good model) finite.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    mu, sd = x.mean(), x.std() or 1.0
    X = np.stack([(x - mu) / sd, np.ones_like(x)], 1)
    beta = np.zeros(2)
    for _ in range(iterations):
        p = _sigmoid(X @ beta)
        grad = X.T @ (w * (p - y)) + ridge * w.sum() * np.array([beta[0], 0.0])
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + ridge * w.sum() * np.diag([1.0, 0.0]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0] / sd), float(beta[1] - beta[0] * mu / sd)


def threshold_for_rate(new_scores: np.ndarray, target: float) -> float:
    """The lowest score threshold at which at most ``target`` of ``new_scores`` reach it (>=)."""
    v = np.sort(np.asarray(new_scores, np.float64))[::-1]
    v = v[np.isfinite(v)]
    if not len(v):
        return float("-inf")
    allowed = int(np.floor(target * len(v) + 1e-9))
    if allowed >= len(v):
        return float(v[-1])
    if allowed == 0:
        return float(np.nextafter(v[0], np.inf))
    return float((v[allowed] + v[allowed - 1]) / 2) if v[allowed] < v[allowed - 1] else float(np.nextafter(v[allowed], np.inf))


@dataclass
class Calibration:
    """The `new`-individual decision and the score -> probability map of a catalogue."""

    threshold: float  # best-match score at or above which a photo is attached to a known individual
    probability_threshold: float  # the same threshold as a probability
    a: float  # P = sigmoid(a * score + b)
    b: float
    target_false_merge: float
    estimated: dict = field(default_factory=dict)  # rates on the catalogue itself (leave-one-identity-out)
    method: str = "leave-one-identity-out"

    def probability(self, scores) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(scores, np.float64) + self.b)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("threshold", "probability_threshold", "a", "b", "target_false_merge",
                                              "estimated", "method")}

    @classmethod
    def from_dict(cls, d: dict | None) -> Calibration | None:
        return None if not d else cls(**d)


@dataclass
class HoldOut:
    """Leave-one-identity-out scores of catalogue photos (what calibration learns from)."""

    scores: np.ndarray  # (N, I) best match per individual, the photo itself excluded
    own: np.ndarray  # (N,) score against its own individual (-inf: its only photo)
    new_top: np.ndarray  # (N,) best score when its individual is absent
    new_arg: np.ndarray  # (N,) which individual that best score belongs to


def hold_out_scores(embeddings: np.ndarray, codes: np.ndarray, n_ids: int) -> HoldOut:
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -np.inf)
    scores, _ = individual_scores(sim, codes, n_ids)
    rows = np.arange(len(codes))
    own = scores[rows, codes].copy()
    others = scores.copy()
    others[rows, codes] = -np.inf
    new_arg = others.argmax(axis=1)
    return HoldOut(scores, own, others[rows, new_arg], new_arg)


def calibrate(embeddings: np.ndarray, identities: Sequence[str], target_false_merge: float = DEFAULT_TARGET_FMR,
              hold: HoldOut | None = None) -> Calibration:
    """Fit the threshold and the probabilities on a catalogue (see the module docstring)."""
    if not 0 < target_false_merge < 1:
        raise JaguarKitError(f"target false-merge rate must be between 0 and 1, got {target_false_merge}")
    codes, uniques = pd.factorize(pd.Series(list(identities), dtype=object))
    n_ids = len(uniques)
    h = hold or hold_out_scores(embeddings, codes, n_ids)
    known = np.isfinite(h.own)
    if n_ids < MIN_IDENTITIES or known.sum() < 2:
        raise JaguarKitError(
            f"catalogue: {n_ids} individuals, {int(known.sum())} photos with another photo of the same individual; "
            f"calibrating the `new` decision needs at least {MIN_IDENTITIES} individuals and some with 2+ photos"
        )
    t = threshold_for_rate(h.new_top, target_false_merge)
    # Probability fit: each photo once as a known individual (its top candidates, the right one
    # labelled 1) and once as a new one (its top candidates among the others, all 0).
    k = min(FIT_TOP_K, n_ids)
    xs, ys, ws = [], [], []
    kn = np.flatnonzero(known)
    top_known = np.argsort(-h.scores[kn], axis=1)[:, :k]
    s_known = np.take_along_axis(h.scores[kn], top_known, 1)
    y_known = top_known == codes[kn, None]
    others = h.scores.copy()
    others[np.arange(len(codes)), codes] = -np.inf
    s_new = -np.sort(-others, axis=1)[:, :k]
    for s, y, weight in ((s_known, y_known, 1.0 / max(len(kn), 1)), (s_new, np.zeros_like(s_new, bool), 1.0 / len(codes))):
        ok = np.isfinite(s)
        xs.append(s[ok])
        ys.append(y[ok])
        ws.append(np.full(ok.sum(), weight))
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    a, b = fit_logistic(x, y, w)
    if a <= 0:  # scores carry no signal here (a model that cannot tell these animals apart): flat probabilities
        a, b = 0.0, float(np.log(max((w * y).sum(), 1e-9) / max((w * (1 - y)).sum(), 1e-9)))
    top_known_score = np.maximum(h.own, h.new_top)[known]
    right = (h.own >= h.new_top)[known]
    estimated = {
        "false_merge": float(np.mean(h.new_top >= t)),
        "false_split": float(np.mean(top_known_score < t)),
        "wrong_individual": float(np.mean((top_known_score >= t) & ~right)),
        "top1_known": float(np.mean(right)),
        "photos": len(codes),
        "known_photos": int(known.sum()),
        "individuals": int(n_ids),
    }
    cal = Calibration(float(t), float(_sigmoid(a * t + b)), a, b, float(target_false_merge), estimated)
    return cal


def duplicate_identity_pairs(identities: Sequence[str], hold: HoldOut, threshold: float,
                             min_share: float = 0.5) -> list[tuple[str, str, int, int]]:
    """Pairs ``(A, B, photos of A attached to B, photos of A)`` where, with A held out, at least
    ``min_share`` of A's photos would be attached to B: possibly one animal under two names."""
    codes, uniques = pd.factorize(pd.Series(list(identities), dtype=object))
    merged = hold.new_top >= threshold
    out = []
    for a in range(len(uniques)):
        mine = codes == a
        n = int(mine.sum())
        hits = np.bincount(hold.new_arg[mine & merged], minlength=len(uniques))
        if not hits.any():
            continue
        b = int(hits.argmax())
        if hits[b] >= max(1, int(np.ceil(min_share * n))) and (n >= 2 or hits[b] >= 1):
            out.append((str(uniques[a]), str(uniques[b]), int(hits[b]), n))
    return out


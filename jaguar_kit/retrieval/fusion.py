"""Calibrated fusion of the global similarity and local-feature evidence.

One logistic model turns a pair's global similarity ``g``, its RANSAC inlier count and its
inlier ratio into the probability that both images show the same individual::

    p(same) = sigmoid(bias + w_global * g + local_weight * (w_inliers * log(1 + inliers) + w_ratio * ratio))

fitted on validation pairs (each query's shortlist, where the local evidence exists), as
WildFusion calibrates its scores. ``local_weight`` is 1 for the fitted, calibrated model;
``jaguar-kit tune`` may pick another value when it ranks better (0 gives the global
order back). :func:`fuse_shortlist` re-ranks each query's shortlist by the fused score and
leaves the rest in the global order below it (:class:`~jaguar_kit.retrieval.verify.LocalVerification`
is the step that does it); :func:`same_individual_probability` gives the probability for
any pair. (The own-photos `new`-individual decision calibrates best-match scores instead,
in :mod:`jaguar_kit.photos.calibration`.)

The coefficients live in :class:`~jaguar_kit.config.RetrievalConfig` (``fusion_*``, read and
written by the step), so they travel in the same JSON as the rest of the retrieval settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import JaguarKitError
from ..logistic import fit_logistic, sigmoid


@dataclass
class ShortlistScores:
    """Local evidence for each query's shortlist: ``index[i, r]`` is the r-th candidate of query i."""

    index: np.ndarray  # (N, k) int
    inliers: np.ndarray  # (N, k) int
    ratio: np.ndarray  # (N, k) float


@dataclass(frozen=True)
class Calibration:
    """Logistic calibration of (global similarity, log(1 + inliers), inlier ratio)."""

    bias: float = 0.0
    w_global: float = 0.0
    w_inliers: float = 0.0
    w_ratio: float = 0.0
    local_weight: float = 1.0

    @property
    def fitted(self) -> bool:
        return any(v != 0.0 for v in (self.bias, self.w_global, self.w_inliers, self.w_ratio))

    def logit(self, global_sim, inliers=None, ratio=None) -> np.ndarray:
        g = np.asarray(global_sim, dtype=np.float64)
        local = np.zeros_like(g)
        if inliers is not None:
            local = local + self.w_inliers * np.log1p(np.maximum(np.asarray(inliers, dtype=np.float64), 0))
        if ratio is not None:
            local = local + self.w_ratio * np.asarray(ratio, dtype=np.float64)
        return self.bias + self.w_global * g + self.local_weight * local

    def probability(self, global_sim, inliers=None, ratio=None) -> np.ndarray:
        return sigmoid(self.logit(global_sim, inliers, ratio))


def fit_calibration(global_sim, same, inliers=None, ratio=None, l2: float = 1.0) -> Calibration:
    """Fit :class:`Calibration` on pairs: ``same[i]`` says whether pair i shows one individual.

    Without ``inliers``/``ratio`` it is a global-only calibration (their weights stay 0),
    for an identify step that has no local features.
    """
    cols = [np.asarray(global_sim, dtype=np.float64).ravel()]
    if inliers is not None:
        cols.append(np.log1p(np.maximum(np.asarray(inliers, dtype=np.float64).ravel(), 0)))
    if ratio is not None:
        cols.append(np.asarray(ratio, dtype=np.float64).ravel())
    same = np.asarray(same).ravel()
    # fit_logistic's penalty is per unit of weight: l2 / pairs keeps this one a total of l2.
    coef, bias = fit_logistic(np.stack(cols, axis=1), same, l2=l2 / max(len(same), 1))
    coef = list(coef)
    w_global = coef.pop(0)
    w_inliers = coef.pop(0) if inliers is not None else 0.0
    w_ratio = coef.pop(0) if ratio is not None else 0.0
    return Calibration(float(bias), float(w_global), float(w_inliers), float(w_ratio), 1.0)


def same_individual_probability(global_sim, calibration: Calibration, inliers=None, ratio=None) -> np.ndarray:
    """Calibrated probability that two images show the same individual (any array shape).

    For the identify decision: ``global_sim`` the pairs' similarity under the same retrieval
    settings the calibration was fitted with; ``inliers``/``ratio`` their local evidence
    (omit both for a global-only calibration).
    """
    if not calibration.fitted:
        raise JaguarKitError("calibration: not fitted (all coefficients are 0): run `jaguar-kit tune` first")
    return calibration.probability(global_sim, inliers, ratio)


def calibration_quality(p: np.ndarray, same: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Log-loss, Brier score and expected calibration error of probabilities against outcomes."""
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 1e-12, 1 - 1e-12)
    y = np.asarray(same, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean()
              for b in range(bins) if (which == b).any())
    return {"log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
            "brier": float(((p - y) ** 2).mean()), "ece": float(ece), "pairs": int(len(y)),
            "same_share": float(y.mean())}


def fuse_shortlist(sim: np.ndarray, scores: ShortlistScores, calibration: Calibration) -> np.ndarray:
    """Re-rank each query's shortlist by the fused score; the rest keeps the global order below.

    Returns a new (N, N) float64 matrix: shortlisted pairs get ``max(sim) + 1 +`` their fused
    logit (shifted to be >= 0), so they rank above every other pair of the row, in the order
    of the calibrated probability (the logit, which never saturates into ties).
    """
    out = np.array(sim, dtype=np.float64, copy=True)
    if out.ndim != 2 or out.shape[0] != out.shape[1] or scores.index.shape[0] != out.shape[0]:
        raise JaguarKitError(f"fusion: similarity {out.shape} does not fit a shortlist of {scores.index.shape}")
    rows = np.arange(out.shape[0])[:, None]
    logit = calibration.logit(out[rows, scores.index], scores.inliers, scores.ratio)
    top = float(np.max(out))
    out[rows, scores.index] = top + 1.0 + (logit - logit.min())
    return out


__all__ = [
    "Calibration",
    "ShortlistScores",
    "fit_calibration",
    "same_individual_probability",
    "calibration_quality",
    "fuse_shortlist",
]

"""Calibrated fusion of the global similarity and local-feature evidence.

One logistic model turns a pair's global similarity ``g``, its RANSAC inlier count and its
inlier ratio into the probability that both images show the same individual::

    p(same) = sigmoid(bias + w_global * g + local_weight * (w_inliers * log(1 + inliers) + w_ratio * ratio))

fitted on validation pairs (each query's shortlist, where the local evidence exists), as
WildFusion calibrates its scores. ``local_weight`` is 1 for the fitted, calibrated model;
``jaguar-kit tune`` may pick another value when it ranks better (0 gives the global
order back). The same :class:`Calibration` serves two users:

- retrieval: :func:`fuse_shortlist` re-ranks each query's shortlist by the fused score and
  leaves the rest in the global order below it;
- the ecologists' identify decision: :func:`same_individual_probability` gives the
  probability for any (query, candidate) pair, so "known individual or new" is a threshold
  on a calibrated number.

The coefficients live in :class:`~jaguar_kit.config.RetrievalConfig` (``fusion_*``), so
they travel in the same JSON as the rest of the retrieval settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .config import RetrievalConfig
from .errors import JaguarKitError

if TYPE_CHECKING:
    from .local import ShortlistScores


def _sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z) without overflow


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Weights and intercept of an L2-regularised logistic regression, by Newton's method.

    scikit-learn is not a dependency of the wheel (it installs with --no-deps on Kaggle and
    must stay small), and a model with three inputs needs nothing more than this: features
    are standardised, the penalty ``l2`` (on the standardised weights, not the intercept)
    keeps the fit finite when the classes separate perfectly, and Newton's method converges
    in a handful of steps.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise JaguarKitError(f"calibration: features {x.shape} and {len(y)} labels do not match")
    if len(y) < 2 or y.min() == y.max():
        raise JaguarKitError(f"calibration: needs pairs of both kinds (same and different individuals), got "
                             f"{int(y.sum())} same of {len(y)}")
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], float(l2))
    penalty[0] = 0.0
    for _ in range(max_iter):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    coef = w[1:] / sd
    return coef, float(w[0] - coef @ mu)


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
        return _sigmoid(self.logit(global_sim, inliers, ratio))

    @classmethod
    def from_config(cls, cfg: RetrievalConfig) -> "Calibration":
        return cls(cfg.fusion_bias, cfg.fusion_global, cfg.fusion_inliers, cfg.fusion_ratio, cfg.local_weight)

    def to_config(self, cfg: RetrievalConfig) -> RetrievalConfig:
        """A copy of ``cfg`` carrying this calibration."""
        return replace(cfg, fusion_bias=self.bias, fusion_global=self.w_global, fusion_inliers=self.w_inliers,
                       fusion_ratio=self.w_ratio, local_weight=self.local_weight)


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
    coef, bias = fit_logistic(np.stack(cols, axis=1), np.asarray(same).ravel(), l2=l2)
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


def fuse_shortlist(sim: np.ndarray, scores: "ShortlistScores", calibration: Calibration) -> np.ndarray:
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
    "fit_logistic",
    "fit_calibration",
    "same_individual_probability",
    "calibration_quality",
    "fuse_shortlist",
]

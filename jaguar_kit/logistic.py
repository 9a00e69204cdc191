"""The one logistic fit of the kit: weighted, L2-penalised, by Newton's method.

It serves the local-feature fusion (three features, refusing labels of one kind: there is
nothing to calibrate) and the photo catalogue's score -> probability map (one feature,
sample weights, and a finite answer even when one kind is missing). scikit-learn is not a
dependency of the wheel (it installs with --no-deps on Kaggle and must stay small), and a
model with a few inputs needs nothing more than this. It imports nothing of the kit but
its error type, so any layer may use it (the photos package as much as retrieval).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import JaguarKitError


def sigmoid(z) -> np.ndarray:
    """1 / (1 + e^-z) without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray | None = None,
    l2: float = 1e-3,
    single_class: Literal["refuse", "fit"] = "refuse",
    max_iter: int = 100,
) -> tuple[np.ndarray, float]:
    """``(coef, intercept)`` of P(y = 1 | x) = sigmoid(x @ coef + intercept).

    ``x``: (n, d) features, or (n,) for one feature (``coef`` then has one entry).
    ``sample_weight``: weight of each row (default 1; without a penalty, a weight of 2 is
    the row twice). Features are standardised and the penalty ``l2 * sum(sample_weight)``
    acts on the standardised weights, not the intercept: it keeps the fit finite when the
    classes separate perfectly, and means the same at any number of rows. ``single_class``: labels of one kind only are refused with a one-line
    error (``"refuse"``), or fitted anyway (``"fit"``: the slope stays ~0 and the intercept
    grows with the iterations, a large finite value the caller can test for).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise JaguarKitError(f"calibration: features {x.shape} and {len(y)} labels do not match")
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    if len(w) != len(y) or (w < 0).any() or not np.isfinite(w).all():
        raise JaguarKitError(f"calibration: {len(w)} sample weights for {len(y)} labels (must be finite, >= 0)")
    if single_class == "refuse" and (len(y) < 2 or y.min() == y.max()):
        raise JaguarKitError(f"calibration: needs pairs of both kinds (same and different individuals), got "
                             f"{int(y.sum())} same of {len(y)}")
    mu, sd = x.mean(0), x.std(0)  # over the rows, unweighted (as the catalogue's fit always was)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
    beta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], float(l2) * w.sum())
    penalty[0] = 0.0
    for _ in range(max_iter):
        p = sigmoid(z @ beta)
        grad = z.T @ (w * (p - y)) + penalty * beta
        hess = (z * (w * p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-12 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    coef = beta[1:] / sd
    return coef, float(beta[0] - coef @ mu)


__all__ = ["sigmoid", "fit_logistic"]

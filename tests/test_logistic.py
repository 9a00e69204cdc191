"""The one logistic fit: several features or one, sample weights, and both single-class behaviours."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.logistic import fit_logistic, sigmoid


def catalogue_fit_before(x, y, w=None, ridge=1e-3, iterations=50):
    """The own-photos catalogue's fit as it was (photos/calibration.py), the reference for its calls."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    mu, sd = x.mean(), x.std() or 1.0
    X = np.stack([(x - mu) / sd, np.ones_like(x)], 1)
    beta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ beta, -60, 60)))
        grad = X.T @ (w * (p - y)) + ridge * w.sum() * np.array([beta[0], 0.0])
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + ridge * w.sum() * np.diag([1.0, 0.0]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0] / sd), float(beta[1] - beta[0] * mu / sd)


def weighted_scores(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.7, 0.1, n // 3), rng.normal(0.4, 0.12, n - n // 3)])
    y = np.arange(n) < n // 3
    w = np.where(y, 1.0 / (n // 3), 1.0 / (n - n // 3))  # known and new cases weighted equally
    return x, y, w


def test_the_catalogues_weighted_one_feature_fit_is_unchanged():
    x, y, w = weighted_scores()
    coef, b = fit_logistic(x, y, sample_weight=w, l2=1e-3, single_class="fit", max_iter=50)
    a_ref, b_ref = catalogue_fit_before(x, y, w)
    assert coef.shape == (1,)
    np.testing.assert_allclose([coef[0], b], [a_ref, b_ref], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_is_fitted_for_the_catalogue_and_refused_for_the_fusion(label):
    x, _, w = weighted_scores(1, 300)
    y = np.full(len(x), label)
    coef, b = fit_logistic(x, y, sample_weight=w, single_class="fit", max_iter=50)
    a_ref, b_ref = catalogue_fit_before(x, y, w)
    assert np.isfinite(b) and abs(coef[0]) < 1e-3  # no slope to learn, a finite answer
    p = sigmoid(coef[0] * x + b)
    assert (p > 1 - 1e-6).all() if label else (p < 1e-6).all()  # every photo gets its only class
    np.testing.assert_allclose([coef[0], b], [a_ref, b_ref], rtol=1e-4, atol=1e-6)  # what the catalogue relied on
    with pytest.raises(JaguarKitError, match="both kinds"):
        fit_logistic(x, y)  # the fusion's default: nothing to calibrate


def test_integer_weights_count_as_repeated_rows_and_the_penalty_follows_the_total_weight():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 2))
    y = rng.random(400) < sigmoid(x @ np.array([1.5, -0.5]) + 0.2)
    w = rng.integers(1, 4, 400)
    coef_w, b_w = fit_logistic(x, y, sample_weight=w, l2=0.0)
    coef_r, b_r = fit_logistic(np.repeat(x, w, axis=0), np.repeat(y, w), l2=0.0)
    np.testing.assert_allclose(np.r_[coef_w, b_w], np.r_[coef_r, b_r], atol=1e-8)
    coef_w, b_w = fit_logistic(x, y, sample_weight=w, l2=0.01)
    coef_s, b_s = fit_logistic(x, y, sample_weight=7.0 * w, l2=0.01)  # only relative weights matter
    np.testing.assert_allclose(np.r_[coef_s, b_s], np.r_[coef_w, b_w], atol=1e-9)


def test_bad_weights_are_one_line_errors():
    x, y, w = weighted_scores(2, 30)
    with pytest.raises(JaguarKitError, match="sample weights"):
        fit_logistic(x, y, sample_weight=w[:5])
    with pytest.raises(JaguarKitError, match="sample weights"):
        fit_logistic(x, y, sample_weight=-w)

"""Local verification of the shortlists and its calibrated fusion: what a user of the re-ranking relies on."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_kit.config import RetrievalConfig
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.local import MatchScore
from jaguar_kit.metrics import ranked_others
from jaguar_kit.retrieval import Context, Pipeline
from jaguar_kit.retrieval.fusion import (Calibration, ShortlistScores, calibration_quality, fit_calibration,
                                         fuse_shortlist, same_individual_probability)
from jaguar_kit.logistic import fit_logistic
from jaguar_kit.retrieval.verify import LocalVerification, shortlist, verify_shortlist


class CountingMatcher:
    def __init__(self):
        self.calls = []

    def match(self, a, b):
        self.calls.append((a, b))
        return MatchScore(int(a) + int(b), 10)


def test_shortlist_excludes_self_and_each_pair_is_matched_once():
    rng = np.random.default_rng(1)
    sim = rng.random((12, 12))
    sim = (sim + sim.T) / 2
    idx = shortlist(sim, 4)
    assert idx.shape == (12, 4) and not (idx == np.arange(12)[:, None]).any()
    np.testing.assert_array_equal(idx, ranked_others(sim, np.arange(12))[:, :4])
    m = CountingMatcher()
    feats = list(range(12))
    scores = verify_shortlist(sim, feats, 4, m, progress=False)
    pairs = {(min(i, j), max(i, j)) for i in range(12) for j in idx[i]}
    assert len(m.calls) == len(pairs)  # symmetric pairs matched once
    np.testing.assert_array_equal(scores.inliers, np.arange(12)[:, None] + idx)
    # A memo carries matches across calls: nothing is matched twice.
    memo: dict = {}
    verify_shortlist(sim, feats, 4, m, progress=False, memo=memo)
    before = len(m.calls)
    verify_shortlist(sim, feats, 4, m, progress=False, memo=memo)
    assert len(m.calls) == before


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 3))
    true_w, true_b = np.array([2.0, -1.0, 0.5]), -0.7
    y = rng.random(20000) < 1 / (1 + np.exp(-(x @ true_w + true_b)))
    w, b = fit_logistic(x, y, l2=1e-6)
    np.testing.assert_allclose(w, true_w, atol=0.08)
    assert abs(b - true_b) < 0.08
    with pytest.raises(JaguarKitError, match="both kinds"):
        fit_logistic(x, np.ones(len(x)))


def test_calibration_is_calibrated_on_fresh_pairs():
    rng = np.random.default_rng(3)

    def pairs(n):
        same = rng.random(n) < 0.25
        g = np.where(same, rng.normal(0.6, 0.15, n), rng.normal(0.3, 0.15, n))
        inl = np.where(same, rng.poisson(25, n), rng.poisson(2, n))
        ratio = np.where(same, rng.uniform(0.3, 0.9, n), rng.uniform(0, 0.4, n))
        return g, inl, ratio, same

    g, inl, ratio, same = pairs(5000)
    cal = fit_calibration(g, same, inl, ratio)
    g2, inl2, ratio2, same2 = pairs(5000)
    q = calibration_quality(same_individual_probability(g2, cal, inl2, ratio2), same2)
    assert q["ece"] < 0.03
    global_only = fit_calibration(g, same)
    q_global = calibration_quality(same_individual_probability(g2, global_only), same2)
    assert global_only.w_inliers == 0 and q["log_loss"] < q_global["log_loss"]  # local evidence helps here
    # The calibration travels in the retrieval config (JSON) unchanged.
    step = LocalVerification().with_calibration(cal)
    assert LocalVerification.from_config(step.to_config(RetrievalConfig())).calibration == cal
    with pytest.raises(JaguarKitError, match="not fitted"):
        same_individual_probability(g2, Calibration())


def test_fusion_reranks_only_the_shortlist_and_keeps_the_rest_in_global_order():
    rng = np.random.default_rng(2)
    n, k = 10, 3
    sim = rng.random((n, n))
    idx = shortlist(sim, k)
    inl = rng.integers(0, 40, (n, k))
    scores = ShortlistScores(idx, inl, np.zeros((n, k)))
    cal = Calibration(bias=-3.0, w_global=1.0, w_inliers=1.0)
    fused = fuse_shortlist(sim, scores, cal)
    order = ranked_others(fused, np.arange(n))
    for i in range(n):
        top = order[i, :k]
        assert set(top) == set(idx[i])  # the shortlist stays on top
        logit = cal.logit(sim[i, top], inl[i, [list(idx[i]).index(j) for j in top]], 0)
        assert (np.diff(logit) <= 1e-12).all()  # in the order of the fused probability
        rest = order[i, k:]
        assert (np.diff(sim[i, rest]) <= 0).all()  # the rest in the global order
    # Weight 0 on the local terms: the global order comes back.
    plain = fuse_shortlist(sim, scores, Calibration(-3.0, 1.0, 1.0, 0.0, local_weight=0.0))
    np.testing.assert_array_equal(ranked_others(plain, np.arange(n)), ranked_others(sim, np.arange(n)))


def test_local_rerank_refuses_an_uncalibrated_config(tmp_path):
    cfg = RetrievalConfig(local_verify=True, rerank=False)
    ctx = Context(["a", "b", "c"], dict(zip("abc", "abc")), tmp_path)
    with pytest.raises(JaguarKitError, match="tune"):
        Pipeline.from_config(cfg).run([np.eye(3, dtype=np.float32)], ctx)

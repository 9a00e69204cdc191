"""Local-feature verification and its calibrated fusion: what a user of the re-ranking relies on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from jaguar_kit.config import RetrievalConfig
from jaguar_kit.data.synth import render_image
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.fusion import (Calibration, calibration_quality, fit_calibration, fit_logistic, fuse_shortlist,
                               same_individual_probability)
from jaguar_kit.local import (LocalSettings, MatchScore, ShortlistScores, SiftMatcher, compute_local_features,
                              local_rerank, rootsift, shortlist, verify_shortlist)
from jaguar_kit.metrics import ranked_others

SETTINGS = LocalSettings(size=384, max_keypoints=600)


def rgba(identity: int, flank: int, index: int, size: int = 384):
    bgra = render_image(0, identity, flank, index, size)
    return cv2.cvtColor(bgra[..., :3], cv2.COLOR_BGR2RGB), bgra[..., 3].copy()


def test_rootsift_rows_are_unit_and_nonnegative():
    d = rootsift(np.random.default_rng(0).integers(0, 255, (50, 128)).astype(np.float32))
    assert (d >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_keypoints_lie_inside_the_mask():
    rgb, mask = rgba(0, 0, 0)
    m = SiftMatcher(SETTINGS)
    f = m.extract(rgb, mask)
    assert len(f) > 20
    from jaguar_kit.local import _crop

    _, crop_mask = _crop(rgb, mask, SETTINGS)
    x = np.clip(np.round(f.points[:, 0]).astype(int), 0, crop_mask.shape[1] - 1)
    y = np.clip(np.round(f.points[:, 1]).astype(int), 0, crop_mask.shape[0] - 1)
    assert (crop_mask[y, x] > 0).mean() > 0.97  # keypoint centres (sub-pixel) sit on the animal


def test_same_flank_matches_and_mirror_or_other_animal_does_not():
    m = SiftMatcher(SETTINGS)
    a = m.extract(*rgba(1, 0, 0))
    b = m.extract(*rgba(1, 0, 1))  # another view of the same flank
    other = m.extract(*rgba(2, 0, 0))
    rgb, mask = rgba(1, 0, 1)
    mirrored = m.extract(np.ascontiguousarray(rgb[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    same, diff, mirror = m.match(a, b), m.match(a, other), m.match(a, mirrored)
    assert same.inliers >= 15, same
    assert diff.inliers <= 6 and mirror.inliers <= 6, (diff, mirror)
    assert 0.0 <= same.ratio <= 1.0


def test_features_cache_resumes_and_is_content_keyed(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / "img" / f"x{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), render_image(0, i % 3, 0, i, 192))
        paths.append(p)
    names = [p.name for p in paths]
    s = LocalSettings(size=192, max_keypoints=200)
    first = compute_local_features(names, paths, tmp_path / "cache", s, chunk_size=2, progress=False)
    assert (first.computed_chunks, first.reused_chunks) == (3, 0)
    # A killed run leaves chunks missing; a rerun computes only those.
    victim = sorted((tmp_path / "cache").glob("local_*.npz"))[0]
    victim.unlink()
    again = compute_local_features(names, paths, tmp_path / "cache", s, chunk_size=2, progress=False)
    assert (again.computed_chunks, again.reused_chunks) == (1, 2)
    for f, g in zip(first.features, again.features):
        np.testing.assert_array_equal(f.points, g.points)
        np.testing.assert_allclose(f.descriptors, g.descriptors, atol=1e-3)  # float16 storage
    # A changed image (same name) and a corrupt chunk are recomputed, never reused.
    cv2.imwrite(str(paths[4]), render_image(0, 2, 0, 99, 192))
    next(iter(sorted((tmp_path / "cache").glob("local_*.npz")))).write_bytes(b"not a zip")
    third = compute_local_features(names, paths, tmp_path / "cache", s, chunk_size=2, progress=False)
    assert third.computed_chunks >= 1 and third.reused_chunks <= 2
    fresh = compute_local_features(names, paths, tmp_path / "fresh", s, chunk_size=2, progress=False)
    np.testing.assert_array_equal(third.features[4].points, fresh.features[4].points)
    # Another setting never reuses these features.
    other = compute_local_features(names, paths, tmp_path / "cache", LocalSettings(size=160, max_keypoints=200),
                                   chunk_size=2, progress=False)
    assert other.reused_chunks == 0


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
    assert Calibration.from_config(cal.to_config(RetrievalConfig())) == cal
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
    cfg = RetrievalConfig(local_verify=True)
    with pytest.raises(JaguarKitError, match="tune"):
        local_rerank(np.eye(3), ["a", "b", "c"], ["a", "b", "c"], cfg, tmp_path)

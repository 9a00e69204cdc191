"""Local verification: each query's shortlist re-ranked by local-feature matches, fused by a calibration.

The features and the matcher are :mod:`jaguar_kit.local`'s (SIFT inside the animal's
mask, RANSAC similarity transform); the fusion is :mod:`jaguar_kit.retrieval.fusion`'s
calibrated logistic model. Only the ``k`` most similar images of each query are matched (a
shortlist: all pairs of the real test set would be 137,270 matches).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import JaguarKitError
from ..local import ImageFeatures, LocalSettings, Matcher, SiftMatcher, compute_local_features
from ..metrics import ranked_others
from .fusion import Calibration, ShortlistScores, calibration_quality, fit_calibration, fuse_shortlist
from .step import Context, State, Step


def shortlist(sim: np.ndarray, k: int = 20) -> np.ndarray:
    """(N, k) indices of each row's k most similar *other* images, best first (ties: lower index)."""
    sim = np.asarray(sim)
    n = sim.shape[0]
    if k < 1:
        raise JaguarKitError(f"local verification: shortlist size must be >= 1, got {k}")
    k = min(int(k), n - 1)
    return np.concatenate([ranked_others(sim, np.arange(s, min(n, s + 256)))[:, :k] for s in range(0, n, 256)])


def verify_shortlist(
    sim: np.ndarray,
    features: Sequence[ImageFeatures],
    k: int = 20,
    matcher: Matcher | None = None,
    progress: bool = True,
    memo: dict | None = None,
    keys: Sequence[str] | None = None,
) -> ShortlistScores:
    """Match every query against its top ``k`` images by ``sim`` (features aligned with its rows).

    A pair that is in both images' shortlists is matched once (the score is taken as
    symmetric). ``memo`` (keyed by ``keys``, e.g. image names) carries matches across calls,
    so trying several global settings matches each pair once.
    """
    n = np.asarray(sim).shape[0]
    if len(features) != n:
        raise JaguarKitError(f"local verification: {len(features)} feature sets for a {n} x {n} similarity")
    matcher = matcher or SiftMatcher()
    keys = list(keys) if keys is not None else list(range(n))
    memo = {} if memo is None else memo
    index = shortlist(sim, k)
    todo = sorted({(min(keys[i], keys[j]), max(keys[i], keys[j])) if keys[i] != keys[j] else (keys[i], keys[j])
                   for i in range(n) for j in index[i]} - set(memo))
    pos = {key: i for i, key in enumerate(keys)}
    for a, b in tqdm(todo, desc="local matching", unit="pair", disable=not progress or not todo):
        memo[(a, b)] = matcher.match(features[pos[a]], features[pos[b]])
    inliers = np.zeros(index.shape, np.int64)
    ratio = np.zeros(index.shape, np.float64)
    for i in range(n):
        for r, j in enumerate(index[i]):
            a, b = keys[i], keys[j]
            m = memo[(min(a, b), max(a, b))]
            inliers[i, r], ratio[i, r] = m.inliers, m.ratio
    return ShortlistScores(index, inliers, ratio)


@dataclass(frozen=True)
class LocalVerification(Step):
    """Each query's top ``local_k`` re-ranked by the calibrated fusion of global and local evidence.

    :meth:`fit` learns the calibration (``fusion_*``) from the shortlist pairs of labelled
    images; ``jaguar-kit tune`` then tries the weight of the local terms (0: off).
    """

    local_verify: bool = False
    local_k: int = 20  # shortlist per query
    local_size: int = 640  # longest side (px) of the animal crop the features are taken from
    local_features: int = 1000  # most SIFT keypoints kept per image
    local_weight: float = 1.0  # multiplies the local terms of the fusion (0: the global order)
    fusion_bias: float = 0.0
    fusion_global: float = 0.0
    fusion_inliers: float = 0.0
    fusion_ratio: float = 0.0

    name = "local_verification"
    space = {"local_weight": (0.0, 0.5, 1.0, 2.0)}
    joint = False  # matching images is the costly part: searched on the best global settings only
    needs_images = True

    @property
    def active(self) -> bool:
        return bool(self.local_verify)

    def off(self) -> "LocalVerification":
        return self.with_settings(local_verify=False)

    @property
    def settings(self) -> LocalSettings:
        return LocalSettings(size=int(self.local_size), max_keypoints=int(self.local_features))

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.fusion_bias, self.fusion_global, self.fusion_inliers, self.fusion_ratio,
                           self.local_weight)

    def with_calibration(self, cal: Calibration) -> "LocalVerification":
        """This step fusing with ``cal``'s coefficients (its own ``local_weight`` kept)."""
        return replace(self, fusion_bias=cal.bias, fusion_global=cal.w_global, fusion_inliers=cal.w_inliers,
                       fusion_ratio=cal.w_ratio)

    def candidates(self, grid, n):
        return [{"local_verify": c["local_weight"] != 0, **c} for c in super().candidates(grid, n)]

    def describe(self) -> dict:
        if not self.local_verify:
            return {"local_verify": False}
        return {"local_verify": True, "local_k": self.local_k, "local_weight": self.local_weight}

    # ------------------------------------------------------------------ evidence

    def _features(self, ctx: Context) -> tuple[list[str], list[ImageFeatures]]:
        """``ctx``'s image names and their features (kept in ``ctx.memo``, cached in ``ctx.local_cache``)."""
        if ctx.images is None or ctx.names is None:
            raise JaguarKitError("local verification needs the images (--data)")
        names = [str(n) for n in ctx.names]
        known = ctx.memo.setdefault(("local-features", self.settings), {})
        todo = [n for n in names if n not in known]
        if todo:
            missing = [n for n in todo if n not in ctx.images]
            if missing:
                raise JaguarKitError(f"local verification: no image for {missing[0]} (and {len(missing) - 1} more)")
            if ctx.local_cache is None:
                raise JaguarKitError("local verification needs a cache folder for its features")
            got = compute_local_features(todo, [ctx.images[n] for n in todo], ctx.local_cache, self.settings,
                                         workers=ctx.workers, progress=ctx.progress)
            known.update(zip(got.names, got.features))
        return names, [known[n] for n in names]

    def _scores(self, state: State) -> ShortlistScores:
        """The shortlist of ``state``'s similarity and its matches (cached on the state)."""
        def make():
            names, feats = self._features(state.ctx)
            memo = state.ctx.memo.setdefault(("local-matches", self.settings), {})
            return verify_shortlist(state.similarity(self.name), feats, self.local_k, SiftMatcher(self.settings),
                                    progress=state.ctx.progress, memo=memo, keys=names)

        return state.cached((self.name, self.local_k, self.settings), make)

    def _pairs(self, state: State, labels: np.ndarray):
        scores = self._scores(state)
        rows = np.arange(len(labels))[:, None]
        return scores, state.sim[rows, scores.index], labels[rows] == labels[scores.index]

    # ------------------------------------------------------------------ the step

    def prepare(self, ctx: Context) -> None:
        if ctx.images is not None:
            self._features(ctx)

    def fit(self, state: State, labels: np.ndarray) -> "LocalVerification":
        if state.ctx.images is None:
            return self
        scores, g, same = self._pairs(state, labels)
        return self.with_calibration(fit_calibration(g, same, scores.inliers, scores.ratio))

    def apply(self, state: State) -> State:
        cal = self.calibration
        if not cal.fitted:
            raise JaguarKitError("retrieval.local_verify is on but the fusion is not calibrated "
                                 "(retrieval.fusion_* are all 0): run `jaguar-kit tune --data ...` on validation "
                                 "embeddings and pass its tuned.json with --config")
        return state.then(sim=fuse_shortlist(state.similarity(self.name), self._scores(state), cal))

    def report(self, state: State, labels: np.ndarray) -> dict | None:
        if state.ctx.images is None or not self.calibration.fitted:
            return None
        scores, g, same = self._pairs(state, labels)
        p = replace(self.calibration, local_weight=1.0).probability(g, scores.inliers, scores.ratio)
        return {**calibration_quality(p, same),
                "note": "in-sample, on the full validation shortlist pairs (local_weight 1)"}


__all__ = ["shortlist", "verify_shortlist", "LocalVerification"]

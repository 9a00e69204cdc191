"""Coat-pattern evidence: a photo's keypoints matched against every catalogue photo at once.

A jaguar's rosettes are its identity, and matching them needs no training: SIFT keypoints
on the animal (:mod:`jaguar_kit.local`: RootSIFT, CLAHE, the mask where there is one) and a
geometric check. Matching a photo pair by pair against a whole catalogue costs 5-12 ms a
pair, and a shortlist taken from the global embedding misses the right animal whenever
the embedding is weak (a frozen backbone ranks it first for 1 photo in 10 on real
photos). So the evidence is gathered the way HotSpotter (Crall et al., WACV 2013) did for
zebras and jaguars, one-vs-many:

1. every descriptor of the catalogue in one approximate nearest-neighbour index (OpenCV's
   FLANN, randomised kd-trees: deterministic, 16x faster than exact search here, with the
   same decisions on the demo's jaguars);
2. each query descriptor's nearest catalogue descriptor is a tentative match when it is
   clearly closer than the nearest descriptor of *any other individual* (Lowe's ratio test
   across individuals, 0.8: several photos of the same animal do not cancel each other, as
   they would in a pairwise ratio test);
3. the tentative matches are grouped by catalogue photo, those on the static scene of an
   unmasked photo are dropped (two keypoints at the same place of two frames of one size:
   :func:`~jaguar_kit.local.static_scene`), and a RANSAC similarity transform
   (:func:`~jaguar_kit.local.similarity_inliers`) keeps the geometrically consistent ones.

An individual's evidence is its best photo's inlier count. A mirrored flank never matches:
SIFT is not mirror-invariant, a similarity transform cannot mirror, and no flipped copy is
ever made, so a left flank only ever matches left flanks (on the demo's jaguars photos of
different animals, and of the other flank, reach at most 5 inliers; photos of the same
flank a median of 40). How much an inlier count means is not assumed: the catalogue's
calibration (:mod:`.calibration`) learns it together with the global score, holding
individuals out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..local import (ImageFeatures, LocalSettings, compute_local_features, crop_for_features, same_scene,
                     similarity_inliers, static_scene)
from .inputs import Photo, key_digest

# The photos' local features: 512 px across the animal keeps rosettes several pixels wide on a
# camera-trap crop; 500 keypoints per photo keeps the catalogue index small (a 1,000-photo
# catalogue: 500,000 descriptors, 256 MB as float32).
COAT_SETTINGS = LocalSettings(size=512, max_keypoints=500)
NEIGHBOURS = 10  # nearest catalogue descriptors looked at per query descriptor
FLANN_TREES, FLANN_CHECKS = 4, 64  # OpenCV's FLANN kd-tree settings (its recommended range)
CALIBRATION_FOLDS = 10  # individuals held out a tenth at a time to score photos as new ones
FEATURE_DIR = "local"


@dataclass
class CoatEvidence:
    """Coat-pattern evidence of query photos against a catalogue's individuals."""

    inliers: np.ndarray  # (Q, I) int: the best inlier count among each individual's photos
    photo: np.ndarray  # (Q, I) int: the catalogue row that gave it, -1 where none matched
    pairs: list[dict[int, np.ndarray]]  # per query, catalogue row -> (n, 4) inlier points (query x, y, catalogue x, y)


def photo_features(photos: Sequence[Photo], keys: Sequence[str], cache: str | Path, workers: int = 0,
                   progress: bool = True, settings: LocalSettings = COAT_SETTINGS) -> list[ImageFeatures]:
    """Local features of photos (their boxes cut out), through the content-keyed chunk cache in ``cache/local``.

    ``keys`` are the photos' content keys (:func:`~.inputs.photo_key`: the file's digest, then the
    box): cached features are found by them without reading a photo again, and a photo whose
    features must be computed is checked to still be that content.
    """
    return compute_local_features(list(keys), [p.path for p in photos], Path(cache) / FEATURE_DIR, settings,
                                  workers=workers, progress=progress, boxes=[p.box for p in photos],
                                  digests=[key_digest(k) for k in keys]).features


class CoatIndex:
    """Every descriptor of some catalogue photos, in one FLANN index (see the module docstring)."""

    def __init__(self, features: Sequence[ImageFeatures], codes: np.ndarray, n_ids: int,
                 settings: LocalSettings = COAT_SETTINGS, rows: Sequence[int] | None = None,
                 keys: Sequence[str] | None = None):
        rows = np.arange(len(features)) if rows is None else np.asarray(rows, np.int64)
        self.keys = None if keys is None else np.asarray(keys, dtype=object).astype(str)
        if keys is not None:  # FLANN's search is approximate and depends on the order it was given the
            # descriptors in: by content key, the same photos give the same evidence however listed
            rows = rows[np.argsort(np.asarray(keys, dtype=object)[rows].astype(str), kind="stable")]
        counts = [len(features[r]) for r in rows]
        self.n_ids, self.settings, self.row_codes = n_ids, settings, np.asarray(codes)
        self.photo = np.repeat(rows, counts).astype(np.int64)  # per descriptor: its catalogue row
        self.code = self.row_codes[self.photo]  # per descriptor: its individual
        self.points = np.concatenate([features[r].points for r in rows] + [np.zeros((0, 2), np.float32)])
        self.features = features  # per catalogue row: its frame, for the static-scene rule
        self.frame_points = np.concatenate([features[r].points if features[r].frame_points is None
                                            else features[r].frame_points for r in rows]
                                           + [np.zeros((0, 2), np.float32)])
        descriptors = np.concatenate([features[r].descriptors for r in rows] + [np.zeros((0, 128), np.float32)])
        self._index = None
        if len(descriptors) >= 2:
            # the kd-trees are randomised with OpenCV's process-wide RNG: seeded here, the same photos give
            # the same index in any process, whatever ran before (measured: three builds in one process
            # gave three different neighbour lists without it)
            cv2.setRNGSeed(0)
            self._index = cv2.flann_Index(np.ascontiguousarray(descriptors, np.float32),
                                          {"algorithm": 1, "trees": FLANN_TREES})  # 1: FLANN_INDEX_KDTREE

    def evidence(self, queries: Sequence[ImageFeatures], exclude: Sequence[np.ndarray | None] | None = None,
                 keys: Sequence[str] | None = None) -> CoatEvidence:
        """Inliers of each query against each individual; ``exclude[q]``: catalogue rows query ``q``
        must not match (itself and its encounter, when the catalogue is scored against itself);
        ``keys``: the queries' content keys (with the index's own keys: a query that *is* a catalogue
        photo matches it whole, static scene included)."""
        n = len(queries)
        inliers = np.zeros((n, self.n_ids), np.int64)
        photo = np.full((n, self.n_ids), -1, np.int64)
        pairs: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
        for q, f in enumerate(queries):
            best = {}
            same = (np.flatnonzero(self.keys == str(keys[q])) if keys is not None and self.keys is not None
                    else np.zeros(0, np.int64))
            for row, both in self._matches(f, None if exclude is None else exclude[q], same):
                i = self.row_codes[row]
                if len(both) > inliers[q, i]:
                    inliers[q, i], photo[q, i], best[i] = len(both), row, both
            pairs[q] = {int(photo[q, i]): both for i, both in best.items()}
        return CoatEvidence(inliers, photo, pairs)

    def _matches(self, f: ImageFeatures, exclude: np.ndarray | None, same_photo: np.ndarray):
        """(catalogue row, inlier points) for every catalogue photo with consistent matches."""
        if self._index is None or len(f) == 0:
            return []
        k = min(NEIGHBOURS, len(self.photo))
        nn, dist = self._index.knnSearch(np.ascontiguousarray(f.descriptors, np.float32), k,
                                         params={"checks": FLANN_CHECKS})
        nn = nn.astype(np.int64)
        dist = np.sqrt(np.maximum(dist.astype(np.float64), 0))  # FLANN's L2 gives squared distances
        if exclude is not None and len(exclude):
            dist = np.where(np.isin(self.photo[nn], exclude), np.inf, dist)
            order = np.argsort(dist, axis=1, kind="stable")
            nn, dist = np.take_along_axis(nn, order, 1), np.take_along_axis(dist, order, 1)
        codes = self.code[nn]
        other = (codes != codes[:, :1]) & np.isfinite(dist)
        # the nearest descriptor of another individual; where none is among the k, the farthest
        # one looked at bounds its distance from below (a stricter test, never a looser one)
        farthest = np.where(np.isfinite(dist), dist, -np.inf).max(axis=1)
        d2 = np.where(other.any(axis=1), dist[np.arange(len(nn)), other.argmax(axis=1)], farthest)
        good = np.isfinite(dist[:, 0]) & (dist[:, 0] < self.settings.ratio * d2)
        cols = nn[good, 0]
        rows, src, dst = self.photo[cols], f.points[good], self.points[cols]
        out = []
        for row in np.unique(rows):
            sel = rows == row
            if same_scene(f, self.features[row]) and row not in same_photo:
                sel &= ~static_scene(f.frame_points[good], self.frame_points[cols], f.frame_shape)
            keep = similarity_inliers(src[sel], dst[sel], self.settings)
            if keep.any():
                out.append((int(row), np.hstack([src[sel][keep], dst[sel][keep]])))
        return out


@dataclass
class CoatHoldOut:
    """The catalogue scored against itself (what the calibration learns the inlier counts from)."""

    known: np.ndarray  # (N, I) inliers of each photo against each individual, itself and its encounter excluded
    new: np.ndarray  # (N, I) inliers with its own individual (and its fold) absent from the catalogue


def coat_hold_out(features: Sequence[ImageFeatures], codes: np.ndarray, n_ids: int,
                  encounters: Sequence[str] | None = None, keys: Sequence[str] | None = None,
                  settings: LocalSettings = COAT_SETTINGS, seed: int = 0) -> CoatHoldOut:
    """Leave-out inlier counts for every catalogue photo (the local half of the calibration).

    Known: each photo against the whole catalogue but itself, the other photos of its
    encounter (a burst shows the same scene, not a second sighting) and other copies of its
    file. New: the individuals are split into ``CALIBRATION_FOLDS`` groups, and each group's
    photos are matched against an index of the other groups' photos only.
    """
    codes = np.asarray(codes)
    n = len(features)
    enc = np.asarray(["" if e is None else str(e) for e in (encounters or [""] * n)], dtype=object)
    key = np.asarray(list(keys) if keys is not None else [str(i) for i in range(n)], dtype=object)
    exclude = []
    for r in range(n):
        same = (key == key[r]) | ((enc == enc[r]) & (enc[r] != "") & (codes == codes[r]))
        same[r] = True
        exclude.append(np.flatnonzero(same))
    known = CoatIndex(features, codes, n_ids, settings, keys=key).evidence(features, exclude).inliers
    new = np.zeros_like(known)
    # individuals in a fixed order (by their first photo's content key), so the folds do not depend
    # on the order the photos were listed in
    first = [min(key[codes == i].astype(str), default="") for i in range(n_ids)]
    canonical = np.argsort(np.asarray(first, dtype=object).astype(str), kind="stable")
    folds = np.empty(n_ids, np.int64)
    folds[canonical] = np.random.default_rng(seed).permutation(n_ids) % min(CALIBRATION_FOLDS, n_ids)
    for g in range(folds.max() + 1):
        held = np.isin(codes, np.flatnonzero(folds == g))
        if held.any() and (~held).any():
            index = CoatIndex(features, codes, n_ids, settings, rows=np.flatnonzero(~held), keys=key)
            new[held] = index.evidence([features[r] for r in np.flatnonzero(held)]).inliers
    return CoatHoldOut(known, new)


def match_picture(a: Photo, b_path: str | Path, b_box, points: np.ndarray, settings: LocalSettings = COAT_SETTINGS,
                  height: int = 240, lines: int = 40) -> bytes:
    """A JPEG of two photos side by side with lines between matched keypoints (what a person checks)."""
    crops = [crop_for_features(a.path, a.box, settings), crop_for_features(b_path, None if b_box is None else b_box,
                                                                           settings)]
    scales = [height / c.shape[0] for c in crops]
    crops = [cv2.resize(c, (max(1, round(c.shape[1] * s)), height), interpolation=cv2.INTER_AREA)
             for c, s in zip(crops, scales)]
    canvas = np.hstack(crops)
    offset = crops[0].shape[1]
    pick = points[np.linspace(0, len(points) - 1, min(lines, len(points))).astype(int)] if len(points) else points
    for x0, y0, x1, y1 in pick:
        p0 = (round(x0 * scales[0]), round(y0 * scales[0]))
        p1 = (round(x1 * scales[1]) + offset, round(y1 * scales[1]))
        cv2.line(canvas, p0, p1, (255, 220, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, p0, 3, (255, 220, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, p1, 3, (255, 220, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else b""


__all__ = ["COAT_SETTINGS", "CoatEvidence", "CoatHoldOut", "CoatIndex", "coat_hold_out", "match_picture",
           "photo_features"]

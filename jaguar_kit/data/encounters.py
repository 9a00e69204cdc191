"""Encounters: the photos one pass of an animal in front of a camera gave (a burst, both flanks).

Photos of one encounter share background, light and pose, so a validation image whose
encounter-mate is in training is matched by its scene as much as by its coat: random
folds overstate the test (facts.md). Folds therefore never split an encounter
(``folds.make_folds(groups=...)``).

Where train.csv names no encounter (:data:`competition.ENCOUNTER_COLUMNS`), it is inferred
as near-duplicate groups, the scheme the best documented jaguar validation used (facts.md):

    two photos of the same identity whose perceptual hashes (:func:`image_hash`) differ in
    at most ``NEAR_DUPLICATE_BITS`` of their 256 bits are of one encounter, and encounters
    are the connected components of that relation.

The hash is a difference hash of the whole photo (background included: the background is
what an encounter shares) in grey at 17 x 16 pixels: cheap, deterministic and torch-free.
On the synthetic encounters photos of one encounter differ in 34 bits (median; 90%: 55),
photos of other encounters of the same identity in 99 or more, unrelated photos in about
half (128).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from .images import decode_image

HASH_SIZE = 16  # a 16 x 16 grid of horizontal differences: 256 bits
NEAR_DUPLICATE_BITS = 64  # at most this many differing bits (of 256, a quarter): one encounter


def image_hash(path: str | Path) -> np.ndarray:
    """The photo's difference hash: 256 booleans, True where a pixel is brighter than its right neighbour."""
    rgb, _ = decode_image(path)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (HASH_SIZE + 1, HASH_SIZE), interpolation=cv2.INTER_AREA).astype(np.int16)
    return (small[:, 1:] > small[:, :-1]).ravel()


def near_duplicate_groups(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Connected components of "hashes differ in at most ``max_bits`` bits": a component index per row."""
    h = np.asarray(hashes, dtype=bool)
    n = len(h)
    close = (h[:, None, :] != h[None, :, :]).sum(axis=2) <= max_bits
    component = np.full(n, -1, dtype=np.int64)
    for start in range(n):
        if component[start] >= 0:
            continue
        label, frontier = component.max() + 1, [start]
        component[start] = label
        while frontier:
            reach = np.flatnonzero(close[frontier].any(axis=0) & (component < 0))
            component[reach] = label
            frontier = list(reach)
    return component


def infer_encounters(identities: Sequence[str], paths: Sequence[str | Path],
                     max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Each photo's inferred encounter: near-duplicate groups within its identity (module docstring)."""
    ids = np.asarray([str(i) for i in identities])
    hashes = np.stack([image_hash(p) for p in paths]) if len(paths) else np.zeros((0, HASH_SIZE**2), bool)
    out = np.empty(len(ids), dtype=object)
    for identity in np.unique(ids):
        rows = np.flatnonzero(ids == identity)
        out[rows] = [f"~{identity}~{c}" for c in near_duplicate_groups(hashes[rows], max_bits)]
    return out


def train_encounters(train: pd.DataFrame) -> np.ndarray:
    """Each training photo's encounter: train.csv's where given, inferred for the others.

    ``train`` is ``Competition.train`` (identity, path, encounter). Photos with an empty
    encounter cell are grouped among themselves by :func:`infer_encounters`; inferred names
    start with ``~`` so they never meet a given one.
    """
    given = train["encounter"].astype(str).to_numpy() if "encounter" in train else np.full(len(train), "")
    out = given.astype(object)
    missing = np.flatnonzero(given == "")
    if len(missing):
        out[missing] = infer_encounters(train["identity"].to_numpy()[missing], train["path"].to_numpy()[missing])
    return out


__all__ = ["HASH_SIZE", "NEAR_DUPLICATE_BITS", "image_hash", "near_duplicate_groups", "infer_encounters",
           "train_encounters"]

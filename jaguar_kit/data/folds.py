"""Cross-validation folds over the training images.

``stratified`` (default, closed-set like the test): each identity's encounters are spread
over the folds, so every identity is in every training split and, when it has enough
encounters, in every validation split. ``identity`` (open-set): whole identities go to one
fold, so validation identities are never seen in training.

An encounter (a burst, one pass in front of a camera: the same background, light and pose)
is never split between training and validation: photos of one encounter on both sides
reward learning the scene, and validation then overstates the test (facts.md). Without
``groups`` every image is its own encounter.

Identities with fewer encounters than folds (stratified) get at most one encounter per
fold and only in some folds; an identity with a single encounter is never validated (fold
``-1``), so each identity always keeps at least one training image. They are listed in
``small_identities``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..config import FoldMode, check_choice
from ..errors import JaguarKitError

if TYPE_CHECKING:
    from ..config import DataConfig



def group_by_identity(labels: Sequence, what: str) -> tuple[list[str], list[np.ndarray]]:
    """(sorted identity names, indices of each identity's images); ``what`` names the caller in errors."""
    names = np.asarray([str(x) for x in labels])
    if names.size == 0:
        raise JaguarKitError(f"{what}: no labels")
    identities, inverse = np.unique(names, return_inverse=True)
    return [str(i) for i in identities], [np.flatnonzero(inverse == i) for i in range(len(identities))]
_IDENTITY_TRIES = 16


@dataclass
class FoldAssignment:
    """``fold[i]``: the validation fold of image ``i`` (``-1``: training in every fold)."""

    fold: np.ndarray
    small_identities: list[str]
    num_folds: int = 5
    mode: str = "stratified"


def _least_loaded(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fold order from least to most loaded, ties broken at random."""
    return np.lexsort((rng.random(len(counts)), counts))


def make_folds(
    labels: Sequence[str], num_folds: int = 5, seed: int = 42, mode: str = "stratified",
    groups: Sequence[str] | None = None,
) -> FoldAssignment:
    """Assign each image a validation fold; the same labels, groups and seed give the same folds.

    ``groups[i]``: the encounter of image ``i`` (within its identity); None: one per image.
    """
    check_choice("data.split", mode, FoldMode)
    if num_folds < 2:
        raise JaguarKitError(f"num_folds must be >= 2, got {num_folds}")
    identities, members = group_by_identity(labels, "cannot make folds")
    if groups is not None and len(groups) != len(labels):
        raise JaguarKitError(f"cannot make folds: {len(groups)} encounters for {len(labels)} images")
    enc = np.arange(len(labels)) if groups is None else pd.factorize(pd.Series(list(groups), dtype=str))[0]
    sizes = np.array([len(m) for m in members])
    rng = np.random.default_rng(seed)
    fold = np.full(len(labels), -1, dtype=np.int64)

    if mode == "identity":
        if len(identities) < num_folds:
            raise JaguarKitError(
                f"identity folds need at least {num_folds} identities, got {len(identities)}"
            )
        # Greedy "least-loaded fold" over random identity orders; keep the best balanced
        # of a few tries, so the seed matters while fold sizes stay close.
        best: tuple[int, np.ndarray] | None = None
        for _ in range(_IDENTITY_TRIES):
            counts = np.zeros(num_folds, dtype=np.int64)
            choice = np.empty(len(identities), dtype=np.int64)
            for i in rng.permutation(len(identities)):
                f = _least_loaded(counts, rng)[0]
                choice[i] = f
                counts[f] += sizes[i]
            spread = int(counts.max() - counts.min())
            if best is None or spread < best[0]:
                best = (spread, choice)
        assert best is not None
        for i, f in enumerate(best[1]):
            fold[members[i]] = f
        small = sorted(str(identities[i]) for i in range(len(identities)) if sizes[i] < 2)
        return FoldAssignment(fold, small, num_folds, mode)

    counts = np.zeros(num_folds, dtype=np.int64)
    # Largest identities first: the small ones then fill the gaps, balancing fold sizes.
    n_encounters = np.zeros(len(identities), dtype=np.int64)
    for i in np.lexsort((rng.random(len(identities)), -sizes)):
        idx = rng.permutation(members[i])
        # The identity's encounters in random order, then largest first (stable).
        codes, first = np.unique(enc[idx], return_index=True)
        units = [idx[enc[idx] == c] for c in codes[np.argsort(first)]]
        units.sort(key=len, reverse=True)
        n_encounters[i] = len(units)
        if len(units) < 2:
            continue  # never validated: it must stay in every training split
        # Each encounter goes to the fold holding the fewest of this identity's images, ties
        # to the globally least-loaded: with one image per encounter that is a round robin
        # (every fold gets n // F or n // F + 1). Fewer encounters than folds: one each in
        # distinct folds. No fold ever holds all of an identity's encounters.
        folds_for = _least_loaded(counts, rng)
        own = np.zeros(num_folds, dtype=np.int64)
        for unit in units:
            f = folds_for[np.argmin(own[folds_for])]
            fold[unit] = f
            own[f] += len(unit)
            counts[f] += len(unit)
    small = sorted(str(identities[i]) for i in range(len(identities)) if n_encounters[i] < num_folds)
    return FoldAssignment(fold, small, num_folds, mode)


def split_indices(assignment: FoldAssignment, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)`` for one fold: its images validate, all others train."""
    if not 0 <= fold < assignment.num_folds:
        raise JaguarKitError(f"fold {fold} out of range (0 to {assignment.num_folds - 1})")
    is_val = assignment.fold == fold
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@dataclass
class FoldSplit:
    train_idx: np.ndarray
    val_idx: np.ndarray  # empty for fold -1


def fold_split(labels: Sequence[str], data_cfg: "DataConfig", report: bool = False,
               groups: Sequence[str] | None = None) -> FoldSplit:
    """The training/validation split a config names: the one place training and inference decide it.

    ``groups``: each image's encounter (``data.encounters.train_encounters``), never split.
    ``data_cfg.fold = -1`` trains on every image and validates none (the final model).
    """
    if data_cfg.fold < 0:
        return FoldSplit(np.arange(len(labels)), np.array([], dtype=np.int64))
    folds = make_folds(labels, data_cfg.num_folds, data_cfg.seed, data_cfg.split, groups)
    if report and folds.small_identities:
        print(f"note: {len(folds.small_identities)} identities have fewer encounters than folds: "
              f"{', '.join(map(str, folds.small_identities[:8]))}")
    return FoldSplit(*split_indices(folds, data_cfg.fold))


__all__ = ["FoldAssignment", "FoldSplit", "make_folds", "split_indices", "fold_split"]

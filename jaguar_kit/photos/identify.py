"""Identify photos against a catalogue: top-k individuals, probabilities, known or `new`.

``identify.csv`` has a row per photo: the decision (an individual or ``new``), its
``confidence`` band (``almost certainly``, ``probably``, ``possibly``, ``doubtful``, ``new``:
:data:`~.calibration.BANDS`), the top-k candidates with scores and probabilities, ``check``
(the decision in plain words and what to look at) and ``caution``: the catalogue's
:func:`~.calibration.calibration_banner` on every row when its own calibration shows that the
model cannot tell its individuals apart (empty otherwise; a column rather than a first line,
so the file stays a plain table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import JaguarKitError
from ..files import atomic_path
from .calibration import Calibration, calibration_banner, decision_band, decision_words, individual_scores
from .catalogue import Catalogue, catalogue_model
from .coat import CoatEvidence, CoatIndex, photo_features
from .inputs import Photo, read_photos
from .model import Model, embed_photos


@dataclass
class Identification:
    """Result of :func:`identify`: one row per query photo in ``table`` plus what the report needs."""

    table: pd.DataFrame
    photos: list[Photo]
    keys: list[str]
    prepared: list[Path]
    top_ids: np.ndarray  # (Q, k) individual names
    top_scores: np.ndarray  # (Q, k)
    top_probs: np.ndarray  # (Q, k)
    top_photo: np.ndarray  # (Q, k) catalogue row of each candidate's best-matching photo
    decisions: list[str]
    catalogue: Catalogue
    top_inliers: np.ndarray | None = None  # (Q, k) coat-pattern inliers, where the catalogue uses them
    top_statistic: np.ndarray | None = None  # (Q, k) what the threshold is compared with (Calibration.statistic)
    match_points: list | None = None  # per photo: (n, 4) matched keypoints with its top candidate's photo, or None

    @property
    def top_passes(self) -> np.ndarray:
        """(Q, k) whether each candidate reaches the catalogue's threshold (all, uncalibrated)."""
        cal = self.catalogue.calibration
        return self.top_statistic >= (cal.threshold if cal is not None else -np.inf)

    @property
    def banner(self) -> str | None:
        """The catalogue's calibration banner (:func:`~.calibration.calibration_banner`), if any."""
        return calibration_banner(self.catalogue.calibration)

    def save_csv(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)


def what_to_check(decision: str, ids, statistics, probs, cal: Calibration | None, same_file: str | None) -> str:
    """The decision in plain words (:func:`~.calibration.decision_words`) and what the reviewer should do."""
    if same_file:
        return f"Same file as catalogue photo {same_file} ({ids[0] if decision != 'new' else 'listed there'})."
    words = decision_words(decision, ids[0], probs[0], cal)
    words = words[0].upper() + words[1:]
    band = decision_band(decision, probs[0], cal)
    if band == "uncalibrated":
        return f"{words}: compare with {ids[0]} by eye."
    if band == "new":
        return (f"{words}. Compare the coat pattern with {ids[0]}; if it is not, give it a new name and add it "
                f"to the catalogue.")
    if len(ids) > 1 and statistics[1] >= cal.threshold:  # the score, or the fused logit (Calibration.statistic)
        return (f"{words}; {ids[1]} also passes the threshold (p={probs[1]:.2f}): compare both on the same flank; "
                f"if they are one animal, merge their names.")
    if band == "almost certainly":
        return f"{words}: a glance at the same flank is enough."
    if band == "probably":
        return f"{words}: confirm against {ids[0]}'s photos on the same flank."
    if band == "possibly":
        return f"{words} against {ids[0]}'s photos on the same flank."
    return f"{words}: compare with {ids[0]}'s photos on the same flank, and call it new unless the coat matches."


def as_photos(photos: Sequence[Photo | str | Path] | str | Path) -> list[Photo]:
    """Photos from :class:`Photo` objects or image paths (a list may mix them), or from a folder or a CSV."""
    if isinstance(photos, (str, Path)):
        return read_photos(photos, folder_labels=False)
    out = []
    for p in photos:
        if isinstance(p, Photo):
            out.append(p)
        elif isinstance(p, (str, Path)):
            if not Path(p).is_file():
                raise JaguarKitError(f"{p}: photo not found")
            out.append(Photo(Path(p), name=str(p)))
        else:
            raise JaguarKitError(f"photos: expected Photo objects or image paths, got {type(p).__name__} ({p!r})")
    return out


@dataclass
class Candidates:
    """Each query photo's top-k individuals (best first) and the decision on the first."""

    ids: np.ndarray  # (Q, k) individual names
    scores: np.ndarray  # (Q, k) global scores (best cosine similarity to the individual's photos)
    probs: np.ndarray  # (Q, k) calibrated probabilities (NaN: uncalibrated catalogue)
    photo: np.ndarray  # (Q, k) catalogue row of each candidate's best-matching photo
    decisions: list[str]
    inliers: np.ndarray  # (Q, k) coat-pattern inliers (0 where not used)
    statistic: np.ndarray  # (Q, k) what the threshold is compared with (Calibration.statistic)


def identify_embeddings(catalogue: Catalogue, embeddings: np.ndarray, top_k: int = 5,
                        coat: CoatEvidence | None = None) -> Candidates:
    """Top-k individuals, scores, probabilities, best catalogue photos and decisions for embeddings;
    with ``coat`` (the photos' coat-pattern evidence) ranked and decided on both, as the catalogue's
    calibration fused them."""
    check_top_k(top_k)
    codes, uniques = catalogue.codes()
    if embeddings.shape[1] != catalogue.embeddings.shape[1]:
        raise JaguarKitError(f"embedding size {embeddings.shape[1]} differs from the catalogue's "
                             f"{catalogue.embeddings.shape[1]}: another model")
    sim = embeddings.astype(np.float32) @ catalogue.embeddings.T
    scores, best = individual_scores(sim, codes, len(uniques))
    cal = catalogue.calibration
    inliers = coat.inliers if coat is not None else np.zeros(scores.shape, np.int64)
    if coat is not None:  # the photo shown beside a candidate: the one its coat matched, if any
        best = np.where(coat.photo >= 0, coat.photo, best)
    stat = cal.statistic(scores, inliers) if cal is not None else scores
    k = min(top_k, len(uniques))
    order = np.argsort(-stat, axis=1, kind="stable")[:, :k]
    pick = lambda m: np.take_along_axis(m, order, 1)  # noqa: E731
    top_scores, top_inliers, top_stat = pick(scores), pick(inliers), pick(stat)
    top_ids = np.array(uniques, dtype=object)[order]
    if cal is None:
        top_probs = np.full(top_scores.shape, np.nan)
        decisions = [str(t) for t in top_ids[:, 0]]
    else:
        top_probs = cal.probability(top_scores, top_inliers)
        decisions = [str(top_ids[i, 0]) if top_stat[i, 0] >= cal.threshold else "new" for i in range(len(order))]
    return Candidates(top_ids, top_scores, top_probs, pick(best), decisions, top_inliers, top_stat)


def check_top_k(top_k: int) -> int:
    """How many candidates per photo: 1 or more."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise JaguarKitError(f"top-k must be a whole number, 1 or more (candidates shown per photo), got {top_k!r}")
    return int(top_k)


def identify(catalogue: Catalogue | str | Path, photos: Sequence[Photo | str | Path] | str | Path,
             model: Model | None = None,
             top_k: int = 5, cache_dir: str | Path | None = None, progress: bool = True,
             workers: int = 0) -> Identification:
    """Identify each photo against the catalogue: top-k individuals, probabilities, a decision.

    ``photos``: :class:`Photo` objects or image paths (a list may mix them), a folder or a CSV.
    ``model`` defaults to the catalogue's own (found by its digest, :func:`catalogue_model`);
    another one is refused. Query photos are prepared and embedded under ``cache_dir``
    (default: the catalogue's, see :meth:`Catalogue.cache_dir`), and matched by their coat
    pattern where the catalogue's calibration uses it (:mod:`.coat`).
    """
    check_top_k(top_k)
    cat = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    photos = as_photos(photos)
    if model is None:
        model = catalogue_model(cat)
    cat.check_model(model)
    cache = Path(cache_dir) if cache_dir else cat.cache_dir()
    keys, emb, files = embed_photos(model, photos, cache, progress=progress, workers=workers)
    return _identification(cat, photos, keys, files, emb, top_k, cache, progress, workers)


def coat_evidence(cat: Catalogue, photos: Sequence[Photo], keys: Sequence[str], cache: Path, progress: bool = True,
                  workers: int = 0) -> CoatEvidence:
    """The photos' coat-pattern evidence against the catalogue's individuals (features cached and reused)."""
    cat_features = photo_features(cat.photos(), cat.keys, cat.cache_dir(fallback=cache), workers, progress)
    features = photo_features(photos, keys, cache, workers, progress)
    codes, uniques = cat.codes()
    return CoatIndex(cat_features, codes, len(uniques), keys=cat.keys).evidence(features, keys=keys)


def _identification(cat: Catalogue, photos, keys, files, emb, top_k, cache: Path | None = None,
                    progress: bool = True, workers: int = 0) -> Identification:
    cal = cat.calibration
    coat = None
    if cal is not None and cal.uses_coat:
        coat = coat_evidence(cat, photos, keys, cache or cat.cache_dir(), progress, workers)
    c = identify_embeddings(cat, emb, top_k, coat)
    caution = calibration_banner(cal) or ""
    by_key = {}
    for j, k in enumerate(cat.keys):
        by_key.setdefault(k, j)
    rows = []
    for i, p in enumerate(photos):
        same = cat.names[by_key[keys[i]]] if keys[i] in by_key else None
        check = what_to_check(c.decisions[i], list(c.ids[i]), list(c.statistic[i]), list(c.probs[i]), cal, same)
        row = {"photo": p.label, "path": str(p.path), "decision": c.decisions[i],
               "confidence": decision_band(c.decisions[i], c.probs[i, 0], cal),
               "probability": round(float(c.probs[i, 0]), 4), "score": round(float(c.scores[i, 0]), 4)}
        if coat is not None:
            row["inliers"] = int(c.inliers[i, 0])
        if p.identity is not None:
            row["true_identity"] = p.identity
        for r in range(c.ids.shape[1]):
            row[f"id_{r + 1}"] = c.ids[i, r]
            row[f"score_{r + 1}"] = round(float(c.scores[i, r]), 4)
            if coat is not None:
                row[f"inliers_{r + 1}"] = int(c.inliers[i, r])
            row[f"prob_{r + 1}"] = round(float(c.probs[i, r]), 4)
            row[f"match_{r + 1}"] = cat.names[c.photo[i, r]]
        row["check"] = check
        row["caution"] = caution
        rows.append(row)
    points = None if coat is None else [coat.pairs[i].get(int(c.photo[i, 0])) for i in range(len(photos))]
    return Identification(pd.DataFrame(rows), list(photos), keys, files, c.ids, c.scores, c.probs, c.photo,
                          c.decisions, cat, c.inliers if coat is not None else None, c.statistic, points)

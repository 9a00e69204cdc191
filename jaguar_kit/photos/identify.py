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

    @property
    def banner(self) -> str | None:
        """The catalogue's calibration banner (:func:`~.calibration.calibration_banner`), if any."""
        return calibration_banner(self.catalogue.calibration)

    def save_csv(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)


def what_to_check(decision: str, ids, scores, probs, cal: Calibration | None, same_file: str | None) -> str:
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
    if len(ids) > 1 and scores[1] >= cal.threshold:
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


def identify_embeddings(catalogue: Catalogue, embeddings: np.ndarray, top_k: int = 5):
    """Top-k individuals, scores, probabilities, best catalogue photos and decisions for embeddings."""
    check_top_k(top_k)
    codes, uniques = catalogue.codes()
    if embeddings.shape[1] != catalogue.embeddings.shape[1]:
        raise JaguarKitError(f"embedding size {embeddings.shape[1]} differs from the catalogue's "
                             f"{catalogue.embeddings.shape[1]}: another model")
    sim = embeddings.astype(np.float32) @ catalogue.embeddings.T
    scores, best = individual_scores(sim, codes, len(uniques))
    k = min(top_k, len(uniques))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, 1)
    top_photo = np.take_along_axis(best, order, 1)
    top_ids = np.array(uniques, dtype=object)[order]
    cal = catalogue.calibration
    if cal is None:
        top_probs = np.full(top_scores.shape, np.nan)
        decisions = [str(t) for t in top_ids[:, 0]]
    else:
        top_probs = cal.probability(top_scores)
        decisions = [str(top_ids[i, 0]) if top_scores[i, 0] >= cal.threshold else "new" for i in range(len(order))]
    return top_ids, top_scores, top_probs, top_photo, decisions


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
    (default: the catalogue's, see :meth:`Catalogue.cache_dir`).
    """
    check_top_k(top_k)
    cat = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    photos = as_photos(photos)
    if model is None:
        model = catalogue_model(cat)
    cat.check_model(model)
    cache = Path(cache_dir) if cache_dir else cat.cache_dir()
    keys, emb, files = embed_photos(model, photos, cache, progress=progress, workers=workers)
    return _identification(cat, photos, keys, files, emb, top_k)


def _identification(cat: Catalogue, photos, keys, files, emb, top_k) -> Identification:
    top_ids, top_scores, top_probs, top_photo, decisions = identify_embeddings(cat, emb, top_k)
    cal = cat.calibration
    caution = calibration_banner(cal) or ""
    by_key = {}
    for j, k in enumerate(cat.keys):
        by_key.setdefault(k, j)
    rows = []
    for i, p in enumerate(photos):
        same = cat.names[by_key[keys[i]]] if keys[i] in by_key else None
        check = what_to_check(decisions[i], list(top_ids[i]), list(top_scores[i]), list(top_probs[i]), cal, same)
        row = {"photo": p.label, "path": str(p.path), "decision": decisions[i],
               "confidence": decision_band(decisions[i], top_probs[i, 0], cal),
               "probability": round(float(top_probs[i, 0]), 4), "score": round(float(top_scores[i, 0]), 4)}
        if p.identity is not None:
            row["true_identity"] = p.identity
        for r in range(top_ids.shape[1]):
            row[f"id_{r + 1}"] = top_ids[i, r]
            row[f"score_{r + 1}"] = round(float(top_scores[i, r]), 4)
            row[f"prob_{r + 1}"] = round(float(top_probs[i, r]), 4)
            row[f"match_{r + 1}"] = cat.names[top_photo[i, r]]
        row["check"] = check
        row["caution"] = caution
        rows.append(row)
    return Identification(pd.DataFrame(rows), list(photos), keys, files, top_ids, top_scores, top_probs, top_photo,
                          decisions, cat)


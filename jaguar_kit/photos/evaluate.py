"""Open-set figures: how well a catalogue tells known individuals from new ones."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import JaguarKitError
from ..metrics import open_set_scores
from ..pipeline import write_json
from .calibration import DEFAULT_TARGET_FMR, MIN_IDENTITIES, calibrate
from .catalogue import Catalogue, build_catalogue, calibrate_catalogue
from .identify import Identification, identify, identify_embeddings
from .inputs import read_photos
from .model import Model, load_model
from .report import write_identify_report


def open_set_split(identities: Sequence[str], new_share: float = 0.3, query_share: float = 0.5,
                   seed: int = 0, new: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An identity-disjoint split: ``(catalogue rows, known-query rows, new-query rows)``.

    ``new_share`` of the individuals (or those named ``new``) are held out entirely (their
    photos are new-individual queries); of each remaining individual ``query_share`` of the
    photos are queries and the rest (at least one) form the catalogue.
    """
    ids = np.asarray(list(identities), dtype=object)
    uniques = sorted(set(ids))
    if len(uniques) < 4:
        raise JaguarKitError(f"open-set split: {len(uniques)} individuals; needs at least 4")
    if not 0 < new_share < 1:
        raise JaguarKitError(f"open-set split: the share of new individuals must be between 0 and 1, got {new_share}")
    rng = np.random.default_rng(seed)
    n_new = min(len(uniques) - MIN_IDENTITIES, max(1, round(new_share * len(uniques))))
    new = set(rng.choice(uniques, n_new, replace=False)) if new is None else set(map(str, new))
    cat_rows, known_rows, new_rows = [], [], []
    for u in uniques:
        rows = np.flatnonzero(ids == u)
        if u in new:
            new_rows.extend(rows)
            continue
        rows = rng.permutation(rows)
        n_q = min(len(rows) - 1, round(query_share * len(rows)))
        known_rows.extend(rows[:n_q])
        cat_rows.extend(rows[n_q:])
    return np.sort(cat_rows), np.sort(known_rows), np.sort(new_rows)


def evaluate_open_set(embeddings: np.ndarray, identities: Sequence[str], new_share: float = 0.3,
                      query_share: float = 0.5, seed: int = 0, target_false_merge: float = DEFAULT_TARGET_FMR,
                      top_k: int = 5) -> dict:
    """Build a catalogue from part of the known individuals, calibrate it on itself, identify the
    rest and the held-out individuals: top-1/top-5 of known, AUROC known vs. new, and the
    realised false-merge and false-split rates at the calibrated threshold beside the target."""
    ids = [str(i) for i in identities]
    cat_rows, known_rows, new_rows = open_set_split(ids, new_share, query_share, seed)
    cat_ids = [ids[i] for i in cat_rows]
    cal = calibrate(embeddings[cat_rows], cat_ids, target_false_merge)
    n = len(cat_rows)
    cat = Catalogue([str(i) for i in cat_rows], cat_ids, cat_ids, [""] * n, np.full((n, 4), -1),
                    embeddings[cat_rows].astype(np.float32), [b""] * n, {}, cal)
    q = np.concatenate([known_rows, new_rows]).astype(np.int64)
    c = identify_embeddings(cat, embeddings[q], max(5, top_k))
    figures = open_set_scores(c.ids, c.statistic, [ids[i] for i in q], set(cat_ids), cal.threshold)
    figures.update({
        "target_false_merge": target_false_merge,
        "threshold": cal.threshold,
        "probability_threshold": cal.probability_threshold,
        "catalogue_photos": int(n),
        "catalogue_individuals": len(set(cat_ids)),
        "new_individuals": len({ids[i] for i in new_rows}),
        "calibration_estimate": cal.estimated,
    })
    return figures


def catalogue_demo(data_dir: str | Path, model_source: str | Path | Model, out_dir: str | Path,
                   new_share: float = 0.3, seed: int = 0, prepared_size: int | None = None,
                   target_false_merge: float = DEFAULT_TARGET_FMR, progress: bool = True,
                   new_individuals: Sequence[str] | None = None, coat: str = "auto") -> dict:
    """The own-photos journey on a labelled folder (the demo's synthetic train photos).

    Holds ``new_share`` of the individuals out as new, indexes half of each other individual's
    photos into ``out_dir/catalogue``, identifies the rest and the held-out ones, and writes
    ``identify.csv``, ``report.html`` and ``figures.json`` into ``out_dir``. Returns the figures:
    top-1/top-5 of known individuals, AUROC known vs. new, the realised false-merge rate beside its
    target, the false-split rate, and index / identify throughput (photos per second).
    A model fine-tuned on these same individuals has seen the "new" ones: its figures are then
    optimistic: train it on the catalogue individuals only and name the others ``new_individuals``
    (held out as new instead of a random ``new_share``) for an honest open-set figure. ``coat``:
    coat-pattern evidence, as ``jaguar-kit index --coat``.
    """
    out = Path(out_dir)
    photos = read_photos(data_dir, need_identity=True)
    cat_rows, known_rows, new_rows = open_set_split([p.identity for p in photos], new_share, 0.5, seed,
                                                    new_individuals)
    model = model_source if isinstance(model_source, Model) else load_model(model_source, prepared_size=prepared_size)
    t = time.perf_counter()
    cat = build_catalogue([photos[i] for i in cat_rows], model, out / "catalogue", target_false_merge, progress=progress,
                          coat=coat)
    index_s = time.perf_counter() - t
    queries = [photos[i] for i in np.concatenate([known_rows, new_rows])]
    truth = [p.identity for p in queries]
    by_evidence = {}
    cal = cat.calibration
    if cal is not None and cal.uses_coat:  # the global score alone first: what the coat pattern adds is measured
        alone, _ = calibrate_catalogue(cat, target_false_merge)
        t = time.perf_counter()
        res = identify(replace(cat, calibration=alone), queries, model=model, cache_dir=out / "cache",
                       progress=progress)
        by_evidence["global score"] = _figures(res, truth, time.perf_counter() - t)
    t = time.perf_counter()
    res = identify(cat, queries, model=model, cache_dir=out / "cache", progress=progress)
    seconds = time.perf_counter() - t
    if by_evidence:  # the queries were embedded by the first call: add that time back
        seconds += len(queries) / by_evidence["global score"]["identify_photos_per_s"]
    chosen = "global score + coat pattern" if cal is not None and cal.uses_coat else "global score"
    by_evidence[chosen] = _figures(res, truth, seconds)
    res.save_csv(out / "identify.csv")
    page = write_identify_report(res, out / "report.html", title="Identification report (demo: held-out jaguars are new)")
    figures = {
        "model": model.source,
        "evidence": chosen,
        "catalogue_photos": len(cat),
        "known_individuals": len(cat.individuals),
        "new_individuals": len({photos[i].identity for i in new_rows}),
        **by_evidence[chosen],
        "target_false_merge": target_false_merge,
        "threshold": None if cal is None else cal.threshold,
        "index_photos_per_s": len(cat) / max(index_s, 1e-9),
        "by_evidence": by_evidence,
        "warnings": cat.warnings,
        "report": str(page),
    }
    write_json(out / "figures.json", figures)
    return figures


def _figures(res: Identification, truth: Sequence[str], seconds: float) -> dict:
    """Open-set figures of an identification whose photos' individuals are ``truth``."""
    cal = res.catalogue.calibration
    f = open_set_scores(res.top_ids, res.top_statistic, truth, set(res.catalogue.identities),
                        cal.threshold if cal is not None else float("-inf"))
    return {**f, "identify_photos_per_s": len(truth) / max(seconds, 1e-9)}

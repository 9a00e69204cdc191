"""Group unlabelled photos by individual, and attach the groups to known individuals.

Two photos are linked when their similarity reaches the threshold, and groups are the
connected components of these links (single linkage). That is the same rule
:func:`jaguar_kit.photos.identify.identify` applies to one photo against a catalogue individual
(its best match among the individual's photos), so a catalogue's calibrated threshold means
the same thing here. Without a catalogue the threshold must be given.

With a catalogue each photo is also identified; a group is attached to the known individual
most of its identified members point to, and otherwise named ``new-001``, ``new-002``, ...
(largest first). Disagreements inside a group are spelled out in its ``check`` column.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import JaguarKitError
from ..files import atomic_path
from .catalogue import Catalogue
from .identify import Identification, _identification
from .inputs import Photo, read_photos
from .model import Model, embed_photos, load_model


def connected_groups(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Group index per row: connected components of ``cosine >= threshold`` (largest group 0)."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, np.int64)
    adj = (embeddings @ embeddings.T) >= threshold
    label = np.full(n, -1, np.int64)
    g = 0
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = g
        frontier = [start]
        while frontier:
            nxt = np.flatnonzero(adj[frontier].any(axis=0) & (label < 0))
            label[nxt] = g
            frontier = list(nxt)
        g += 1
    sizes = np.bincount(label)
    rank = np.empty_like(sizes)
    rank[np.lexsort((np.arange(len(sizes)), -sizes))] = np.arange(len(sizes))  # big first, then first seen
    return rank[label]


@dataclass
class Clustering:
    """Result of :func:`cluster`: ``table`` has one row per photo (clusters.csv)."""

    table: pd.DataFrame
    photos: list[Photo]
    keys: list[str]
    prepared: list[Path]
    groups: np.ndarray  # group index per photo
    group_names: list[str]  # per group index: individual name, new-NNN or group-NNN
    group_checks: list[str]
    threshold: float
    identification: Identification | None = None

    def save_csv(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)


def name_groups(groups: np.ndarray, decisions: Sequence[str] | None, probs: Sequence[float] | None):
    """Names and review notes per group: the majority known individual, or new-NNN / group-NNN."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    names, checks = [], []
    fresh = 0
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        if decisions is None:
            fresh += 1
            names.append(f"group-{fresh:03d}")
            checks.append("Check that all members show the same animal." if len(members) > 1 else "A single photo.")
            continue
        votes = Counter(decisions[i] for i in members if decisions[i] != "new")
        if not votes:
            fresh += 1
            names.append(f"new-{fresh:03d}")
            checks.append("No member matches a known individual: a new animal? Check the members agree, then name it.")
            continue
        best = max(votes, key=lambda d: (votes[d], max(probs[i] for i in members if decisions[i] == d)))
        names.append(best)
        others = [f"{d} ({c})" for d, c in votes.most_common() if d != best]
        n_new = sum(1 for i in members if decisions[i] == "new")
        if others:
            checks.append(f"Members also point to {', '.join(others)}: check before merging with {best}.")
        elif n_new:
            checks.append(f"{votes[best]} of {len(members)} photos match {best}; confirm the other {n_new} are it too.")
        else:
            checks.append(f"All {len(members)} photos match {best}." if len(members) > 1 else f"The photo matches {best}.")
    # two groups on one known individual: keep both, distinguishable in folders
    seen: Counter = Counter()
    unique_names = []
    for n in names:
        seen[n] += 1
        unique_names.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return unique_names, checks


def cluster(photos: Sequence[Photo] | str | Path, model: Model | str | None = None,
            catalogue: Catalogue | str | Path | None = None, threshold: float | None = None,
            cache_dir: str | Path = "cache", top_k: int = 5, progress: bool = True, workers: int = 0) -> Clustering:
    """Group ``photos`` by individual (see the module docstring).

    ``threshold`` defaults to the catalogue's calibrated one; without a catalogue it is needed.
    ``model`` defaults to the catalogue's.
    """
    cat = catalogue if catalogue is None or isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    if not isinstance(photos, (list, tuple)):
        photos = read_photos(photos, folder_labels=False)
    if threshold is None:
        if cat is None or cat.calibration is None:
            raise JaguarKitError("cluster: give --threshold (a similarity) or a calibrated --catalogue to set it")
        threshold = cat.calibration.threshold
    if model is None:
        if cat is None:
            raise JaguarKitError("cluster: give --model (a checkpoint or frozen:BACKBONE) or a --catalogue")
        model = load_model(cat.model["source"], prepared_size=cat.model["prepared_size"], tta=cat.model["tta"])
    elif not isinstance(model, Model):
        model = load_model(model)
    if cat is not None:
        cat.check_model(model)
    keys, emb, files = embed_photos(model, photos, cache_dir, progress=progress, workers=workers)
    groups = connected_groups(emb, threshold)
    ident = _identification(cat, photos, keys, files, emb, top_k) if cat is not None else None
    decisions = ident.decisions if ident else None
    probs = [float(p) for p in ident.top_probs[:, 0]] if ident else None
    names, checks = name_groups(groups, decisions, probs)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    rows = []
    sizes = np.bincount(groups) if len(groups) else np.zeros(0, int)
    for i, p in enumerate(photos):
        g = groups[i]
        mates = np.flatnonzero(groups == g)
        mates = mates[mates != i]
        row = {"photo": p.label, "path": str(p.path), "group": names[g], "group_size": int(sizes[g]),
               "best_in_group": round(float(sim[i, mates].max()), 4) if len(mates) else float("nan")}
        if ident is not None:
            row.update({"decision": ident.decisions[i], "top_individual": ident.top_ids[i, 0],
                        "probability": round(float(ident.top_probs[i, 0]), 4)})
        if p.identity is not None:
            row["true_identity"] = p.identity
        row["check"] = checks[g]
        rows.append(row)
    table = pd.DataFrame(rows)
    return Clustering(table, list(photos), keys, files, groups, names, checks, float(threshold), ident)


def write_group_folders(result: Clustering, out_dir: str | Path, mode: str = "link") -> Path:
    """A folder per group holding its photos, as symbolic links (``link``) or copies (``copy``)."""
    if mode not in ("link", "copy"):
        raise JaguarKitError(f"folders: expected link or copy, got {mode!r}")
    out_dir = Path(out_dir)
    for i, p in enumerate(result.photos):
        folder = out_dir / result.group_names[result.groups[i]]
        folder.mkdir(parents=True, exist_ok=True)
        stem = p.name.replace("/", "__")
        if p.box is not None:
            stem = f"{Path(stem).stem}_box{'-'.join(map(str, p.box))}{Path(stem).suffix}"
        dst = folder / stem
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if mode == "link":
            os.symlink(p.path.resolve(), dst)
        else:
            with atomic_path(dst) as tmp:
                shutil.copyfile(p.path, tmp)
    return out_dir


def pairwise_agreement(groups: Sequence[int], truth: Sequence[str]) -> dict[str, float]:
    """Pairwise precision / recall of a grouping against the true individuals (for benchmarks)."""
    g, t = np.asarray(groups), np.asarray(list(truth), dtype=object)
    same_g = g[:, None] == g[None, :]
    same_t = t[:, None] == t[None, :]
    off = ~np.eye(len(g), dtype=bool)
    tp = (same_g & same_t & off).sum()
    return {
        "pair_precision": float(tp / max((same_g & off).sum(), 1)),
        "pair_recall": float(tp / max((same_t & off).sum(), 1)),
        "groups": len(set(g.tolist())),
        "individuals": len(set(t.tolist())),
    }


__all__ = ["Clustering", "cluster", "connected_groups", "name_groups", "pairwise_agreement", "write_group_folders"]

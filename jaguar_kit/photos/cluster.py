"""Group unlabelled photos by individual, and attach the groups to known individuals.

**Grouping** is average-linkage agglomerative clustering on cosine distance
(``scipy.cluster.hierarchy``): two groups merge while the *mean* similarity between their
photos reaches the linking threshold. Single linkage (connected components of the pairs above a
threshold) chains: one look-alike pair joins two animals, and every photo added gives chains
more chances. On synthetic embeddings of 20 unseen individuals (``benchmarks/bench_cluster.py``,
three noise levels, five seeds each) single linkage at the catalogue's threshold kept a pairwise
precision of 0.53-0.79, average linkage at its calibrated cut 0.97-1.00; recall was as high or
higher (0.96-0.97 vs 0.81-1.00) except at the hardest noise, where both fail (0.17 vs 0.34).

**The linking threshold** comes from the catalogue when there is one
(:func:`linkage_threshold`): the catalogue's own photos are clustered the same way, and the cut
is the lowest mean similarity at which the pairs it puts together are still the same individual
at least ``1 - target_false_merge`` of the time. Without a catalogue it must be given.

**Names.** With a catalogue each photo is also identified; a group takes a known individual's
name only when a strict majority of its photos are identified as that individual, else it is
``new-001``, ``new-002``, ... (largest first); groups that take the same individual's name are
one group (the same animal seen on different occasions). Disagreements inside a group are spelled
out in its ``check`` column. Each photo is identified exactly as ``identify`` would: where the
catalogue's calibration uses coat-pattern evidence (:mod:`.coat`), with it. The grouping itself
links photos by the global embedding only (matching every pair of unlabelled photos by their
keypoints is left for later).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import JaguarKitError
from ..files import atomic_path
from .calibration import DEFAULT_TARGET_FMR
from .catalogue import Catalogue, catalogue_model
from .identify import Identification, _identification
from .inputs import Photo, read_photos
from .model import Model, embed_photos, load_model

LINKAGES = ("average", "single")


def _scipy_hierarchy():
    """scipy's hierarchical clustering (on Kaggle's image; an optional extra elsewhere)."""
    try:
        from scipy.cluster import hierarchy
        from scipy.spatial.distance import squareform
    except ImportError as e:  # pragma: no cover - scipy is in the dev and photos extras
        raise JaguarKitError("grouping photos needs scipy: pip install scipy (or jaguar_kit[photos])") from e
    return hierarchy, squareform


def _dendrogram(embeddings: np.ndarray, method: str) -> np.ndarray:
    hierarchy, squareform = _scipy_hierarchy()
    x = np.asarray(embeddings, np.float64)
    dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return hierarchy.linkage(squareform((dist + dist.T) / 2, checks=False), method)


def _rank_by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0, 1, ... largest first (ties: the group seen first)."""
    _, first, label = np.unique(labels, return_index=True, return_inverse=True)
    sizes = np.bincount(label)
    order = np.lexsort((first, -sizes))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[label]


def group_photos(embeddings: np.ndarray, threshold: float, linkage: str = "average") -> np.ndarray:
    """Group index per row (largest group 0): ``linkage`` clustering cut at similarity ``threshold``.

    ``average``: groups whose mean pairwise cosine similarity reaches ``threshold`` merge;
    ``single``: any one pair at ``threshold`` or above links two groups (chains; for comparison).
    """
    if linkage not in LINKAGES:
        raise JaguarKitError(f"linkage: expected one of {', '.join(LINKAGES)}, got {linkage!r}")
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise JaguarKitError(f"linking threshold must be a cosine similarity in [-1, 1], got {threshold}")
    n = len(embeddings)
    if n < 2:
        return np.zeros(n, np.int64)
    hierarchy, _ = _scipy_hierarchy()
    z = _dendrogram(embeddings, linkage)
    # merge heights are distances 1 - similarity; a merge at exactly the threshold joins
    labels = hierarchy.fcluster(z, np.nextafter(1.0 - threshold, np.inf), criterion="distance")
    return _rank_by_size(labels)


def pairwise_agreement(groups: Sequence[int], truth: Sequence[str]) -> dict[str, float]:
    """Pairwise precision / recall of a grouping against the true individuals."""
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


def linkage_threshold(embeddings: np.ndarray, identities: Sequence[str],
                      target_false_merge: float = DEFAULT_TARGET_FMR, linkage: str = "average") -> float:
    """The lowest similarity cut at which grouping the catalogue's own photos keeps pairwise
    precision at ``1 - target_false_merge`` or more.

    The merges of the dendrogram are replayed in order, counting the pairs each one joins and
    how many of them are one individual, so every cut is scored in one pass (time linear in
    the photos, not cubic as re-cutting and re-scoring the tree at every height would be).
    """
    if len(embeddings) < 2 or len(set(identities)) < 2:
        raise JaguarKitError("linking threshold: the catalogue needs 2 or more individuals to calibrate it")
    z = _dendrogram(embeddings, linkage)
    codes, _ = pd.factorize(pd.Series(list(identities), dtype=object))
    members: list[Counter | None] = [Counter({int(c): 1}) for c in codes]  # individuals per cluster
    same = joined = 0
    best = None
    for row, (a, b, height, _) in enumerate(z):
        big, small = sorted((members[int(a)], members[int(b)]), key=len, reverse=True)
        same += sum(n * big[k] for k, n in small.items())
        joined += sum(big.values()) * sum(small.values())
        big.update(small)
        members.append(big)
        members[int(a)] = members[int(b)] = None
        if row + 1 < len(z) and z[row + 1, 2] == height:
            continue  # a cut falls between heights: score it once every merge at this height is in
        if same < (1 - target_false_merge) * joined:
            break
        best = height
    if best is None:  # even the first merge joins two individuals: link nothing but identical photos
        return 1.0
    return float(np.clip(1.0 - best, -1.0, 1.0))


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
    threshold: float  # linking similarity (see group_photos)
    identification: Identification | None = None

    def save_csv(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)


def user_cache_dir() -> Path:
    """Where photos are cached when neither a catalogue nor an output folder is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaguar_kit" / "photos"


def name_groups(groups: np.ndarray, decisions: Sequence[str] | None,
                probs: Sequence[float] | None) -> tuple[np.ndarray, list[str], list[str]]:
    """Groups (relabelled), a name and a review note per group (see the module docstring).

    A group is named after a known individual only when a strict majority of its members are
    identified as it; groups named after the same individual become one group.
    """
    groups = np.asarray(groups, np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    owner: list[str | None] = []
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        votes = Counter(decisions[i] for i in members if decisions[i] != "new") if decisions is not None else Counter()
        top, count = votes.most_common(1)[0] if votes else (None, 0)
        owner.append(top if 2 * count > len(members) else None)
    # one group per known individual: its groups join the first (largest) of them
    first: dict[str, int] = {}
    merged = np.array([first.setdefault(o, g) if o is not None else g for g, o in enumerate(owner)], np.int64)
    groups = _rank_by_size(merged[groups]) if len(groups) else groups
    names, checks = [], []
    fresh = 0
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        members = np.flatnonzero(groups == g)
        n = len(members)
        if decisions is None:
            fresh += 1
            names.append(f"group-{fresh:03d}")
            checks.append("Check that all members show the same animal." if n > 1 else "A single photo.")
            continue
        votes = Counter(decisions[i] for i in members if decisions[i] != "new")
        top, count = votes.most_common(1)[0] if votes else (None, 0)
        if top is None or 2 * count <= n:
            fresh += 1
            names.append(f"new-{fresh:03d}")
            if top is None:
                checks.append("No member matches a known individual: a new animal? Check the members agree, then name it.")
            else:
                pointed = ", ".join(f"{d} ({c})" for d, c in votes.most_common())
                checks.append(f"Only {sum(votes.values())} of {n} photos match a known individual ({pointed}): "
                              f"a new animal, or one of these? Compare before naming it.")
            continue
        names.append(top)
        others = [f"{d} ({c})" for d, c in votes.most_common() if d != top]
        n_new = sum(1 for i in members if decisions[i] == "new")
        if others:
            checks.append(f"{count} of {n} photos match {top}; members also point to {', '.join(others)}: "
                          f"check those before adding them to {top}.")
        elif n_new:
            checks.append(f"{count} of {n} photos match {top}; confirm the other {n_new} are it too.")
        else:
            checks.append(f"All {n} photos match {top}." if n > 1 else f"The photo matches {top}.")
    return groups, names, checks


def cluster(photos: Sequence[Photo] | str | Path, model: Model | str | None = None,
            catalogue: Catalogue | str | Path | None = None, threshold: float | None = None,
            cache_dir: str | Path | None = None, top_k: int = 5, progress: bool = True, workers: int = 0,
            linkage: str = "average") -> Clustering:
    """Group ``photos`` by individual (see the module docstring).

    ``threshold`` (a similarity) defaults to the cut calibrated on the catalogue; without a
    catalogue it is needed. ``model`` defaults to the catalogue's. Photos are prepared and
    embedded under ``cache_dir``: by default the catalogue's cache (where ``identify`` keeps
    them too, so neither embeds a photo the other has), else :func:`user_cache_dir`.
    """
    cat = catalogue if catalogue is None or isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    if not isinstance(photos, (list, tuple)):
        photos = read_photos(photos, folder_labels=False)
    if threshold is None and cat is None:
        raise JaguarKitError("cluster: give --threshold (a similarity) or a --catalogue to calibrate it")
    if model is None:
        if cat is None:
            raise JaguarKitError("cluster: give --model (a checkpoint or frozen:BACKBONE) or a --catalogue")
        model = catalogue_model(cat)
    elif not isinstance(model, Model):
        model = load_model(model)
    if cat is not None:
        cat.check_model(model)
    if threshold is None:
        target = cat.calibration.target_false_merge if cat.calibration else DEFAULT_TARGET_FMR
        threshold = linkage_threshold(cat.embeddings, cat.identities, target, linkage)
    if cache_dir is None:
        cache_dir = cat.cache_dir(user_cache_dir()) if cat is not None else user_cache_dir()
    keys, emb, files = embed_photos(model, photos, cache_dir, progress=progress, workers=workers)
    ident = (_identification(cat, photos, keys, files, emb, top_k, Path(cache_dir), progress, workers)
             if cat is not None else None)
    decisions = ident.decisions if ident else None
    probs = [float(p) for p in ident.top_probs[:, 0]] if ident else None
    groups, names, checks = name_groups(group_photos(emb, threshold, linkage), decisions, probs)
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


__all__ = ["Clustering", "cluster", "group_photos", "linkage_threshold", "name_groups", "pairwise_agreement"]

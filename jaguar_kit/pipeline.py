"""The stages wired together: what the command line, the kernels and the demo call.

Each function takes plain inputs (paths, a config) and writes plain outputs (``.npz``
embeddings, ``submission.csv``, PNGs), so a kernel cell is one call.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Config, RetrievalConfig
from .data.folds import fold_split
from .errors import JaguarKitError
from .files import atomic_path, atomic_write_text, load_npz
from .kaggle.env import find_files, find_folders
from .metrics import identity_balanced_map
from .submission import write_submission
from .viz import save_retrieval_grid

# OpenCV (data.competition, data.images, data.prepare, retrieval's local verification) and torch
# (device, embed, models) load inside the functions that use them: photos.evaluate and the CLI's
# light paths import this module.

log = logging.getLogger(__name__)

@dataclass
class Embeddings:
    """Embeddings of a set of images, in the order of ``names``."""

    names: list[str]
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    model: str = ""  # what made them (checkpoint path or backbone name)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, names=np.array(self.names), vectors=self.vectors, model=np.array(self.model))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Embeddings":
        """Read and check an embeddings file: one finite row per unique name."""
        z = load_npz(path, ("names", "vectors", "model"), "jaguar_kit embeddings file")
        names, vectors, model = [str(n) for n in z["names"]], z["vectors"], str(z["model"])
        if vectors.ndim != 2 or vectors.shape[0] != len(names):
            raise JaguarKitError(f"{path}: {len(names)} names but vectors of shape {vectors.shape}")
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            raise JaguarKitError(f"{path}: image {dup!r} has two vectors")
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if vectors.size else []
        if len(bad):
            raise JaguarKitError(f"{path}: the vector of {names[bad[0]]!r} is not finite (and {len(bad) - 1} more)")
        return cls(names, vectors, model)

    def subset(self, names: Sequence[str]) -> "Embeddings":
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise JaguarKitError(f"embeddings ({self.model}): no vector for {missing[0]} (and {len(missing) - 1} more)")
        return Embeddings(list(names), self.vectors[[index[n] for n in names]], self.model)


def split_images(cfg: Config, data_dir: str | Path, split: str) -> tuple[list[str], list[Path], list[str] | None]:
    """(names, source paths, identities or None) of a split: train, val (the config's fold), test."""
    from .data.competition import load_competition  # OpenCV: deferred (see the imports)
    from .data.encounters import train_encounters  # OpenCV: deferred

    comp = load_competition(data_dir)
    if split == "test":
        if not len(comp.test_images):
            raise JaguarKitError(f"{data_dir}: no test images (test.csv missing or empty)")
        return list(comp.test_images["filename"]), list(comp.test_images["path"]), None
    names, paths, ids = list(comp.train["filename"]), list(comp.train["path"]), list(comp.train["identity"])
    if split == "train":
        return names, paths, ids
    if split == "val":
        if cfg.data.fold < 0:
            raise JaguarKitError("split 'val' needs data.fold >= 0 (fold -1 trains on everything)")
        # the split training validated on: the same encounters, never split
        val_idx = fold_split(ids, cfg.data, groups=train_encounters(comp.train)).val_idx
        return [names[i] for i in val_idx], [paths[i] for i in val_idx], [ids[i] for i in val_idx]
    raise JaguarKitError(f"unknown split {split!r} (train, val or test)")


def embed_split(
    model_source: str | Path,
    data_dir: str | Path,
    split: str,
    cache_dir: str | Path,
    prepared_root: str | Path,
    cfg: Config | None = None,
    device: str = "auto",
    progress: bool = True,
    seed_roots: Sequence[Path] = (),
) -> Embeddings:
    """Embed a split with TTA through the resumable chunk cache.

    ``model_source`` is a training checkpoint (its config decides the preprocessing and the
    validation fold), or ``frozen:BACKBONE`` for a frozen pretrained backbone's own pooled
    features (the baseline). ``cfg`` supplies the embedding settings (TTA, chunk size) and,
    for ``frozen:``, the data and model ones (:func:`~jaguar_kit.models.loading.load_model`).
    Chunks live in ``cache_dir/<weights digest and input size>/``; chunks of the same weights found under
    ``seed_roots`` (a previous session's output attached as an input) are copied in first,
    so a new session continues where the last one stopped.
    """
    from .data.prepare import prepare_images  # torch and OpenCV: deferred (see the imports)
    from .device import select_device
    from .embed import cache_key, embed_images, weights_digest
    from .models.loading import load_model

    info = select_device(device)
    source = str(model_source)
    model, run_cfg = load_model(source, cfg, info.device)
    digest = weights_digest(model)
    key = cache_key(model, digest)
    cache_dir = Path(cache_dir) / key
    _seed_cache(cache_dir, key, seed_roots)
    embed_cfg = (cfg or run_cfg).embed
    names, paths, _ = split_images(run_cfg, data_dir, split)
    d = run_cfg.data
    prepared = prepare_images(paths, prepared_root, d.alpha_mode, d.crop_margin, d.prepared_size,
                              workers=d.workers, progress=progress)
    result = embed_images(
        model, names, [prepared[n] for n in names], cache_dir, info.device, tta=embed_cfg.tta,
        chunk_size=embed_cfg.chunk_size, batch_size=embed_cfg.batch_size, amp_dtype=info.amp_dtype,
        preprocessing={"alpha": d.alpha_mode, "margin": d.crop_margin, "size": d.prepared_size},
        tag=f"{split}-{embed_cfg.tta}", progress=progress, weights_id=digest,
    )
    return Embeddings(result.names, result.embeddings, source)


def embed_folds(
    run_dir: str | Path,
    data_dir: str | Path,
    cache_dir: str | Path,
    prepared_root: str | Path,
    cfg: Config,
    ttas: Sequence[str],
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, list[Embeddings]]]:
    """Out-of-fold embeddings of a ``train --all-folds`` run: fold name -> TTA -> [Embeddings].

    Each fold's validation images are embedded by that fold's own ``RUN/fold{k}/best.pt``, once
    per TTA setting, through the chunk cache (a rerun reuses them). Different folds' models
    embed into different spaces: compare a fold's embeddings only among themselves.
    """
    run = Path(run_dir)
    folds = sorted((d for d in run.glob("fold*") if d.is_dir() and d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))
    if not folds:
        raise JaguarKitError(f"{run}: no fold{{k}} folders; make them with jaguar-kit train --all-folds --out {run}")
    unfinished = [d for d in folds if not (d / "best.pt").is_file()]
    if unfinished:
        raise JaguarKitError(f"{unfinished[0] / 'best.pt'}: not found; finish that fold first (the same "
                             "train --all-folds command resumes it)")
    out: dict[str, dict[str, list[Embeddings]]] = {}
    for d in folds:
        for tta in ttas:
            c = copy.deepcopy(cfg)
            c.embed.tta = tta
            out.setdefault(d.name, {})[tta] = [embed_split(d / "best.pt", data_dir, "val", cache_dir, prepared_root, c,
                                                           device=device, progress=progress)]
    return out


def _seed_cache(cache_dir: Path, key: str, roots: Sequence[Path]) -> None:
    """Copy finished chunks of this model (its :func:`~jaguar_kit.embed.cache_key`) from attached outputs
    into the working cache."""
    for src_dir in find_folders(lambda f: f.path.name == key, [Path(r) for r in roots]):
        if src_dir.resolve() == cache_dir.resolve():
            continue
        cache_dir.mkdir(parents=True, exist_ok=True)
        for chunk in src_dir.glob("*.npz"):
            if not (cache_dir / chunk.name).exists():
                with atomic_path(cache_dir / chunk.name) as tmp:
                    shutil.copyfile(chunk, tmp)


def find_outputs(roots: Sequence[Path], pattern: str) -> list[Path]:
    """Files matching ``pattern`` under ``roots`` (e.g. ``best.pt`` of attached training runs).

    The inputs' one bounded walk, shallowest first; a file reached twice (through a link,
    or a root inside another) is listed once.
    """
    return [p.resolve() for p in find_files(lambda name: fnmatch(name, pattern), [Path(r) for r in roots])]


def similarity(sets: Sequence[Embeddings], cfg: RetrievalConfig, device: str | None = None) -> tuple[list[str], np.ndarray]:
    """Final all-vs-all similarity of one or several models' embeddings of the same images."""
    from .retrieval import final_similarity  # OpenCV and torch: deferred (see the imports)

    names = sets[0].names
    aligned = [s.subset(names).vectors for s in sets]
    return names, final_similarity(aligned, cfg, device=device)


def read_labels(path: str | Path) -> dict[str, str]:
    """``filename -> identity`` from a ``filename,ground_truth`` CSV (train.csv, solution.csv).

    Read like ``train.csv`` (:func:`~jaguar_kit.data.competition.read_csv_checked`): names
    stripped, ``NA``/``null`` kept as identities. A file named twice with two identities,
    or an empty name or identity, is refused in one line naming the CSV line.
    """
    from .data.competition import read_csv_checked  # OpenCV: deferred (see the imports)

    df = read_csv_checked(Path(path), ("filename", "ground_truth"))
    labels: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, name, ident in df.itertuples():
        if not name or not ident:
            raise JaguarKitError(f"{path}: line {line}: empty {'filename' if not name else 'ground_truth'}")
        if name in labels and labels[name] != ident:
            raise JaguarKitError(f"{path}: {name!r} is labelled {labels[name]!r} on line {first[name]} "
                                 f"and {ident!r} on line {line}")
        labels[name] = ident
        first.setdefault(name, line)
    return labels


def unlabelled(sets: Sequence[Embeddings], labels: dict[str, str]) -> list[str]:
    """The embedded images (of the first set) that have no label."""
    return [n for n in sets[0].names if n not in labels]


def score(sets: Sequence[Embeddings], labels: dict[str, str], cfg: RetrievalConfig,
          warn: bool = True) -> dict[str, dict]:
    """Identity-balanced mAP and rank-1 with and without re-ranking, per-identity tables.

    Only the embedded images with a label are scored; how many had none is returned
    (``n_images``, ``n_unlabelled`` in each entry) and, with ``warn``, logged as a warning.
    """
    missing = unlabelled(sets, labels)
    names = [n for n in sets[0].names if n in labels]
    if len(names) < 2:
        shown = f" (e.g. {missing[0]!r})" if missing else ""
        raise JaguarKitError(f"score: {len(names)} of the {len(sets[0].names)} embedded images have a label{shown}; "
                             "need at least two: are these the right labels for these embeddings?")
    if missing and warn:
        log.warning("score: %s; scoring the other %d", unlabelled_note(missing, len(sets[0].names)), len(names))
    sets = [s.subset(names) for s in sets]
    y = [labels[n] for n in names]
    out = {}
    for tag, rerank in (("raw", False), ("reranked", True)):
        c = copy.deepcopy(cfg)
        c.rerank = rerank
        _, sim = similarity(sets, c)
        r = identity_balanced_map(sim, y)
        out[tag] = {"map": r.map, "rank1": r.rank1, "per_identity": r.per_identity, "n_images": len(names),
                    "n_unlabelled": len(missing)}
    return out


def unlabelled_note(missing: Sequence[str], total: int) -> str:
    more = ", ...)" if len(missing) > 3 else ")"
    return f"{len(missing)} of the {total} embedded images have no label ({', '.join(missing[:3])}{more}"


def submit(
    sets: Sequence[Embeddings],
    data_dir: str | Path,
    out_csv: str | Path,
    cfg: RetrievalConfig,
    grid_png: str | Path | None = None,
    prepared_root: str | Path | None = None,
) -> Path:
    """``submission.csv`` for the competition's test pairs (and a retrieval grid)."""
    from .data.competition import load_competition  # OpenCV: deferred (see the imports)

    comp = load_competition(data_dir, check_images=False)
    if comp.pairs is None:
        raise JaguarKitError(f"{data_dir}: test.csv not found; nothing to submit")
    test_names = list(comp.test_images["filename"])
    wanted = set(test_names)
    extra = [n for n in sets[0].names if n not in wanted]
    if extra:  # e.g. train and test embedded together: re-rank over the test images only
        log.warning("submit: %d embedded images are not in %s and were ignored (e.g. %s)", len(extra),
                    Path(data_dir) / "test.csv", extra[0])
    missing = [n for n in test_names if n not in set(sets[0].names)]
    if missing:
        raise JaguarKitError(f"{data_dir}: {len(missing)} of the {len(test_names)} test images have no embedding "
                             f"(e.g. {missing[0]!r}); embed the test split with these settings")
    from .retrieval import Context, Pipeline  # OpenCV and torch: deferred (see the imports)

    sets = [s.subset(test_names) for s in sets]
    by_name = dict(zip(comp.test_images["filename"].astype(str), comp.test_images["path"]))
    # Local features (when the config verifies) are cached next to the output: on Kaggle under
    # /kaggle/working, so a rerun reuses them; a process pool outweighs a few images.
    ctx = Context(test_names, by_name, Path(out_csv).parent / "local_cache",
                  workers=min(4, os.cpu_count() or 1) if len(test_names) >= 100 else 0, progress=True)
    sim = Pipeline.from_config(cfg).run([s.vectors for s in sets], ctx)
    path = write_submission(comp.pairs, test_names, sim, out_csv)
    if grid_png is not None:
        from .data.images import decode_image  # OpenCV: deferred (see the imports)

        save_retrieval_grid(sim, test_names, lambda n: decode_image(by_name[str(n)])[0], grid_png)
    return path


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")

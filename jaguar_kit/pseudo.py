"""One pseudo-label round: confident test images join the training set for one fine-tuning.

The fourth-place jaguar-re-id solution gained +0.017 from one round of pseudo-labels taken
where its three models agreed, and lost with a second round. Here:

1. :class:`IdentityModel` -- per model, a closed-set classifier over the known identities:
   cosine similarity to each identity's mean training embedding, turned into
   probabilities by a softmax whose temperature is fitted on validation images
   (temperature scaling: one parameter, maximum likelihood), so "0.95" means right about
   95 % of the time on validation.
2. :func:`select_pseudo_labels` -- a test image is kept when every model of the ensemble
   puts it in the same identity with a probability of at least ``threshold``.
3. :func:`pseudo_label_round` -- writes a derived competition folder (``train.csv`` with
   the kept test images added under their pseudo identity; images linked, not copied) and
   runs the training engine once on it, started from the trained checkpoint
   (``model.init_from``). A checkpoint made by a round is refused: one round, hard stop.

The round trains with ``data.fold = -1`` (no validation split inside the round: its fold
assignment would differ from the original run's), and by default leaves the original
run's validation images out of the derived ``train.csv`` so they stay a fair check.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import JaguarKitError
from .files import atomic_write_text

PSEUDO_MARKER = "pseudo_round.json"  # in a round's run folder: its checkpoints never start another round


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(cos: np.ndarray, true_class: np.ndarray) -> float:
    """The softmax scale s minimising the validation log-loss of softmax(s * cos).

    A 1-D convex problem in s: a log-spaced scan, then golden-section refinement.
    """
    cos = np.asarray(cos, dtype=np.float64)
    rows = np.arange(len(true_class))

    def nll(s: float) -> float:
        return float(-_log_softmax(s * cos)[rows, true_class].mean())

    grid = np.geomspace(0.5, 500.0, 41)
    i = int(np.argmin([nll(s) for s in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


@dataclass
class IdentityModel:
    """One model's calibrated closed-set identity classifier (centroids + softmax scale)."""

    classes: list[str]
    centroids: np.ndarray  # (C, D) unit rows
    scale: float

    @classmethod
    def fit(cls, gallery_vectors: np.ndarray, gallery_labels: Sequence[str], val_vectors: np.ndarray,
            val_labels: Sequence[str]) -> "IdentityModel":
        """Centroids from the training images, softmax scale fitted on the validation images."""
        classes = sorted({str(x) for x in gallery_labels})
        lab = np.array([str(x) for x in gallery_labels])
        g = _unit(gallery_vectors)
        centroids = _unit(np.stack([g[lab == c].mean(0) for c in classes]))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({str(x) for x in val_labels} - set(index))
        if unknown:
            raise JaguarKitError(f"pseudo-labels: validation identity {unknown[0]!r} has no training image")
        truth = np.array([index[str(x)] for x in val_labels])
        scale = fit_temperature(_unit(val_vectors) @ centroids.T, truth)
        return cls(classes, centroids, scale)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """(N, C) calibrated probability of each known identity."""
        return np.exp(_log_softmax(self.scale * (_unit(vectors) @ self.centroids.T)))


def select_pseudo_labels(models: Sequence[IdentityModel], test_vectors: Sequence[np.ndarray],
                         names: Sequence[str], threshold: float = 0.9) -> pd.DataFrame:
    """Test images every model puts in the same identity with probability >= ``threshold``.

    ``test_vectors[m]`` are model m's embeddings of ``names``. Returns a DataFrame with
    columns filename, ground_truth (the pseudo identity), probability (the lowest of the
    models'), sorted by filename.
    """
    if not models or len(models) != len(test_vectors):
        raise JaguarKitError(f"pseudo-labels: {len(models)} identity models for {len(test_vectors)} embedding sets")
    if not 0.0 < threshold <= 1.0:
        raise JaguarKitError(f"pseudo-labels: threshold must be in (0, 1], got {threshold}")
    picks, probs = [], []
    for model, vecs in zip(models, test_vectors):
        if len(vecs) != len(names):
            raise JaguarKitError(f"pseudo-labels: {len(vecs)} embeddings for {len(names)} test images")
        p = model.probabilities(vecs)
        best = p.argmax(1)
        picks.append(np.array(model.classes, dtype=object)[best])
        probs.append(p[np.arange(len(best)), best])
    picks_arr, probs_arr = np.stack(picks), np.stack(probs)
    agree = (picks_arr == picks_arr[0]).all(0)
    low = probs_arr.min(0)
    keep = agree & (low >= threshold)
    df = pd.DataFrame({"filename": np.asarray(names, dtype=object)[keep], "ground_truth": picks_arr[0][keep],
                       "probability": low[keep]})
    return df.sort_values("filename", kind="stable").reset_index(drop=True)


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # a file system without links
        shutil.copyfile(src, dst)


def write_pseudo_competition(data_dir: str | Path, pseudo: pd.DataFrame, out_dir: str | Path,
                             exclude: Sequence[str] = ()) -> Path:
    """A competition folder whose ``train.csv`` is the original's (minus ``exclude``) plus
    the pseudo-labelled test images; images are linked into a flat ``train/`` folder."""
    from .data.competition import load_competition

    comp = load_competition(data_dir, check_images=False)
    test_paths = dict(zip(comp.test_images["filename"].astype(str), comp.test_images["path"]))
    unknown = [f for f in pseudo["filename"] if str(f) not in test_paths]
    if unknown:
        raise JaguarKitError(f"pseudo-labels: {unknown[0]} is not a test image of {data_dir}")
    train_names = set(comp.train["filename"].astype(str))
    clash = [f for f in pseudo["filename"] if str(f) in train_names]
    if clash:
        raise JaguarKitError(f"pseudo-labels: test image {clash[0]} has the name of a training image")
    known = set(comp.train["identity"].astype(str))
    new_ids = sorted(set(pseudo["ground_truth"].astype(str)) - known)
    if new_ids:
        raise JaguarKitError(f"pseudo-labels: identity {new_ids[0]!r} is not in {data_dir}/train.csv")
    out = Path(out_dir)
    img_dir = out / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    skip = {str(x) for x in exclude}
    keep = comp.train[~comp.train["filename"].astype(str).isin(skip)]
    rows = [(str(f), str(i), Path(p)) for f, i, p in zip(keep["filename"], keep["identity"], keep["path"])]
    rows += [(str(f), str(i), Path(test_paths[str(f)])) for f, i in zip(pseudo["filename"], pseudo["ground_truth"])]
    for name, _, src in rows:
        _link(src, img_dir / name)
    table = pd.DataFrame({"filename": [r[0] for r in rows], "ground_truth": [r[1] for r in rows]})
    atomic_write_text(out / "train.csv", table.to_csv(index=False))
    return out


def pseudo_label_round(
    checkpoint: str | Path,
    data_dir: str | Path,
    pseudo: pd.DataFrame,
    out_dir: str | Path,
    epochs: int | None = None,
    exclude_validation: bool = True,
    overrides: Sequence[str] = (),
    prepared_root: str | Path | None = None,
    progress: bool = True,
):
    """Fine-tune once more with the pseudo-labelled test images added; returns the TrainResult.

    Starts from ``checkpoint``'s backbone (``model.init_from``) with its recipe (its saved
    config), ``epochs`` (default: the original's), trains on every image of the derived
    folder (``data.fold=-1``); ``overrides`` (``section.key=value``) adjust the recipe.
    The run goes to ``out_dir/run``; its ``best.pt`` is ``result.best_checkpoint``.
    """
    from .config import apply_overrides, config_from_dict
    from .train.checkpoint import load_checkpoint
    from .train.engine import train

    checkpoint = Path(checkpoint)
    if (checkpoint.parent / PSEUDO_MARKER).is_file():
        raise JaguarKitError(f"{checkpoint}: made by a pseudo-label round; only one round is run "
                             "(a second round hurt in the public solutions)")
    if not checkpoint.is_file():
        raise JaguarKitError(f"{checkpoint}: checkpoint not found")
    if len(pseudo) == 0:
        raise JaguarKitError("pseudo-labels: no test image passed the threshold; nothing to train on")
    cfg = config_from_dict(load_checkpoint(checkpoint)["config"])
    exclude: list[str] = []
    if exclude_validation and cfg.data.fold >= 0:
        from .pipeline import split_images

        exclude = split_images(cfg, data_dir, "val")[0]
    out = Path(out_dir)
    derived = write_pseudo_competition(data_dir, pseudo, out / "data", exclude)
    round_cfg = copy.deepcopy(cfg)
    round_cfg.model.init_from = str(checkpoint.resolve())
    round_cfg.model.weights = "none"  # the backbone comes from init_from: nothing to fetch
    round_cfg.data.fold = -1
    round_cfg.train.epochs = int(epochs or cfg.train.epochs)
    round_cfg.train.resume = "auto"
    apply_overrides(round_cfg, list(overrides))
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / PSEUDO_MARKER, json.dumps({
        "round": 1, "from_checkpoint": str(checkpoint.resolve()), "pseudo_images": int(len(pseudo)),
        "min_probability": float(pseudo["probability"].min()) if "probability" in pseudo else None,
        "validation_images_left_out": len(exclude)}, indent=2) + "\n")
    atomic_write_text(out / "pseudo_labels.csv", pseudo.to_csv(index=False))
    # resume_roots=[]: only this round's own folder resumes it. The attached training output (on Kaggle,
    # under /kaggle/input) is also a folder named ``run``; taken for this round's earlier session, it
    # would be copied in and then refused as a run of another config.
    return train(round_cfg, derived, run_dir, prepared_root=prepared_root, progress=progress, resume_roots=[])


__all__ = ["IdentityModel", "fit_temperature", "select_pseudo_labels", "write_pseudo_competition",
           "pseudo_label_round", "PSEUDO_MARKER"]

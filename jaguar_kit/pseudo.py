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
   The round records its status (:data:`ROUND_STATUS`: started, then finished, with the
   epochs done) in its folder; only a finished round counts as one that ran.
4. :func:`pseudo_label_ensemble` -- the submit notebook's round for every attached model:
   reuses a finished round found among the inputs (republished, never repeated), resumes
   one that was killed from its own ``last.pt``, else selects the pseudo-labels and trains;
   returns each round model's test embeddings.

The round trains with ``data.fold = -1`` (no validation split inside the round: its fold
assignment would differ from the original run's), and by default leaves the original
run's validation images out of the derived ``train.csv`` so they stay a fair check.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .config import Config, apply_overrides
from .data.competition import load_competition
from .errors import JaguarKitError
from .files import atomic_path, atomic_write_text, file_digest
from .kaggle.env import advice, default_cache_dir, input_roots, default_prepared_root
from .pipeline import Embeddings, embed_split, find_outputs, split_images
from .train.checkpoint import BEST, LAST, copy_run, read_checkpoint

# In a round's run folder from its start: its checkpoints never start another round.
PSEUDO_MARKER = "pseudo_round.json"
# In a round's folder (``pseudo/model<i>/``): {"status": "started" | "finished", "epochs_done", ...},
# written atomically; "finished" only once its training finished, so a killed round never passes for one.
ROUND_STATUS = "round_status.json"
# The round's run folder. Not ``run``: the training output attached beside it holds a ``run`` folder,
# and the round resumes only from a run folder of its own name.
ROUND_RUN = "pseudo_run"
PSEUDO_LABELS_FILE = "pseudo_labels.csv"
ROUND_EMBEDDINGS = "embeddings_pseudo_test.npz"


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
    if (keep["encounter"] != "").any():  # given encounters stay; pseudo-labelled photos get theirs inferred
        table["encounter"] = [*map(str, keep["encounter"]), *[""] * len(pseudo)]
    atomic_write_text(out / "train.csv", table.to_csv(index=False))
    return out


def read_round_status(folder: str | Path) -> dict[str, Any] | None:
    """A round folder's recorded status, or None when it has none (or an unreadable one)."""
    try:
        status = json.loads((Path(folder) / ROUND_STATUS).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("status") in ("started", "finished") else None


def round_finished(folder: str | Path) -> bool:
    """Whether a round folder holds a round that finished (its status says so and its model is there)."""
    status = read_round_status(folder)
    return bool(status) and status["status"] == "finished" and (Path(folder) / ROUND_RUN / BEST).is_file()


def _write_status(folder: Path, status: str, **fields: Any) -> None:
    atomic_write_text(folder / ROUND_STATUS, json.dumps({"status": status, **fields}, indent=2) + "\n")


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
    resume_from: str | Path | None = None,
    derived_dir: str | Path | None = None,
):
    """Fine-tune once more with the pseudo-labelled test images added; returns the TrainResult.

    Starts from ``checkpoint``'s backbone (``model.init_from``) with its recipe (its saved
    config), ``epochs`` (default: the original's), trains on every image of the derived
    folder (``data.fold=-1``); ``overrides`` (``section.key=value``) adjust the recipe.
    The run goes to ``out_dir/pseudo_run``; its ``best.pt`` is ``result.best_checkpoint``, the
    round's model only when ``result.status`` is ``finished`` (without validation, ``best.pt``
    is rewritten every epoch). ``out_dir/round_status.json`` records the round's status.

    The run resumes its own ``last.pt`` in ``out_dir``, else, with ``resume_from`` (an earlier
    session's round folder, attached read-only), that round's; never another run folder.
    The derived competition folder goes to ``derived_dir`` (default ``out_dir/data``).
    """
    from .train.engine import train  # the training stack (models, timm): imported only when a round trains

    checkpoint = Path(checkpoint)
    if (checkpoint.parent / PSEUDO_MARKER).is_file():
        raise JaguarKitError(f"{checkpoint}: made by a pseudo-label round; only one round is run "
                             "(a second round hurt in the public solutions)")
    if not checkpoint.is_file():
        raise JaguarKitError(f"{checkpoint}: checkpoint not found")
    if len(pseudo) == 0:
        raise JaguarKitError("pseudo-labels: no test image passed the threshold; nothing to train on")
    cfg = read_checkpoint(checkpoint).run_config
    exclude: list[str] = []
    if exclude_validation and cfg.data.fold >= 0:
        exclude = split_images(cfg, data_dir, "val")[0]
    out = Path(out_dir)
    derived = write_pseudo_competition(data_dir, pseudo, Path(derived_dir) if derived_dir else out / "data", exclude)
    digest = file_digest(checkpoint, 16, "checkpoint")
    round_cfg = copy.deepcopy(cfg)
    round_cfg.model.init_from = str(checkpoint.resolve())
    if resume_from is not None and (Path(resume_from) / ROUND_RUN / LAST).is_file():
        earlier = read_round_status(resume_from) or {}
        if earlier.get("from_digest") != digest:
            raise JaguarKitError(f"{resume_from}: this round started from another checkpoint than {checkpoint}")
        # the same weights by content, attached at another path in this session: the run's config is the earlier one
        round_cfg.model.init_from = earlier["from_checkpoint"]
    round_cfg.model.weights = "none"  # the backbone comes from init_from: nothing to fetch
    round_cfg.data.fold = -1
    round_cfg.train.epochs = int(epochs or cfg.train.epochs)
    round_cfg.train.resume = "auto"
    apply_overrides(round_cfg, list(overrides))
    run_dir = out / ROUND_RUN
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"round": 1, "from_checkpoint": round_cfg.model.init_from, "from_digest": digest,
              "pseudo_images": int(len(pseudo)),
              "min_probability": float(pseudo["probability"].min()) if "probability" in pseudo else None,
              "validation_images_left_out": len(exclude)}
    atomic_write_text(run_dir / PSEUDO_MARKER, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / PSEUDO_LABELS_FILE, pseudo.to_csv(index=False))
    _write_status(out, "started", epochs=round_cfg.train.epochs, epochs_done=None, **record)
    # Only this round's folders resume it: its own, or ``resume_from`` (whose run folder is named ROUND_RUN,
    # unlike the attached training output's ``run``, which would be refused as a run of another config).
    result = train(round_cfg, derived, run_dir, prepared_root=prepared_root, progress=progress,
                   resume_roots=[Path(resume_from)] if resume_from is not None else [])
    _write_status(out, "finished" if result.status == "finished" else "started", epochs=round_cfg.train.epochs,
                  epochs_done=result.epochs_done, **record)
    return result


# ----------------------------------------------------------------------------- the submit notebook's round


@dataclass
class AttachedModel:
    """One model of the ensemble as the inference notebook left it."""

    test: Embeddings  # its test embeddings (what the submission uses without a round)
    val: Path | None = None  # its embeddings_val_model<i>.npz: the softmax temperature is fitted on them
    train: Path | None = None  # its embeddings_train_model<i>.npz: the identity centroids
    digest: str | None = None  # inference.json's content digest of the best.pt that made them


def inference_digest(manifests: dict[Path, dict[str, Any]], folder: Path, model: int) -> str | None:
    """The content digest of the checkpoint that made model ``model``'s embeddings in ``folder``
    (its ``inference.json``, read into ``manifests`` by folder), or None when it is not recorded."""
    entries = manifests.get(folder, {}).get("models", [])
    return next((m["digest"] for m in entries if m["model"] == model), None)


def publish_round(src: Path, dst: Path) -> None:
    """Copy a finished round into this output, file by file (never a lock or temporary); its status last."""
    copy_run(src / ROUND_RUN, dst / ROUND_RUN)
    for rel in (f"{ROUND_RUN}/{PSEUDO_MARKER}", PSEUDO_LABELS_FILE, ROUND_STATUS):
        if (src / rel).is_file():
            with atomic_path(dst / rel) as tmp:
                shutil.copyfile(src / rel, tmp)


def attached_rounds(roots: Sequence[Path]) -> dict[int, Path]:
    """Round folders (``.../pseudo/model<i>/`` with a status) under ``roots``, by model index; the first found wins."""
    found: dict[int, Path] = {}
    for path in find_outputs(roots, ROUND_STATUS):
        m = re.fullmatch(r"model(\d+)", path.parent.name)
        if m and read_round_status(path.parent) is not None:
            found.setdefault(int(m.group(1)), path.parent)
    return found


def _select(models: Sequence[AttachedModel], labels: dict[str, str], threshold: float) -> pd.DataFrame:
    """The ensemble's pseudo-labels, with a line on how many images reached the threshold."""
    missing = [f"model {i}: no {what}" for i, m in enumerate(models)
               for what, path in (("embeddings_val", m.val), ("embeddings_train", m.train)) if path is None]
    if missing:
        raise JaguarKitError(f"PSEUDO_LABELS: {missing[0]}: set VALIDATION = True and SPLITS = [\"test\", \"train\"] "
                             "in the inference notebook and attach its output")
    names = models[0].test.names
    identity_models, tests = [], []
    for m in models:
        val, trained = Embeddings.load(m.val), Embeddings.load(m.train)
        gallery = [n for n in trained.names if n not in set(val.names)]
        identity_models.append(IdentityModel.fit(trained.subset(gallery).vectors, [labels[n] for n in gallery],
                                                 val.vectors, [labels[n] for n in val.names]))
        tests.append(m.test.subset(names).vectors)
    pseudo = select_pseudo_labels(identity_models, tests, names, threshold)
    top = np.min([m.probabilities(t).max(1) for m, t in zip(identity_models, tests)], axis=0)  # to choose a threshold
    print(f"pseudo-labels: {len(pseudo)} of {len(names)} test images reach {threshold} "
          f"with every model agreeing ({pseudo['ground_truth'].nunique()} identities); top probability per "
          f"image: median {np.median(top):.3f}, 90th percentile {np.quantile(top, 0.9):.3f}, max {top.max():.3f}")
    return pseudo


def pseudo_label_ensemble(
    models: Sequence[AttachedModel],
    data_dir: str | Path,
    labels: dict[str, str],
    out_dir: str | Path,
    embed_cfg: Config,
    *,
    threshold: float = 0.9,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    roots: Sequence[Path] | None = None,
    cache_dir: str | Path | None = None,
    prepared_root: str | Path | None = None,
) -> dict[int, Embeddings]:
    """The submit notebook's one pseudo-label round; returns {model index: the round model's test embeddings}.

    Per model ``i`` (its round in ``out_dir/model<i>``): a finished round among the inputs
    (``roots``, default the notebook's; this notebook's earlier output) is republished and
    reused, never repeated; a started one (killed, or stopped by the time budget) resumes
    from its ``last.pt`` with the pseudo-labels it started with; otherwise the pseudo-labels
    are selected (:func:`select_pseudo_labels`) and the round trains from the ``best.pt``
    whose digest ``models[i].digest`` names. A round that did not finish raises (its state is
    kept in the output to resume), so an unfinished model never submits. Empty when no test
    image reaches ``threshold``.
    """
    roots = list(input_roots() if roots is None else roots)
    out = Path(out_dir)
    prepared = Path(prepared_root) if prepared_root else default_prepared_root()
    attached = attached_rounds(roots)
    finished = {i: f for i, f in attached.items() if i < len(models) and round_finished(f)}
    checkpoints: dict[int, Path] = {}
    if finished:
        print(f"PSEUDO_LABELS: a pseudo-label round already ran ({', '.join(str(f) for f in finished.values())}); "
              "only one round is run (a second round hurt in the public solutions): no training, submitting with "
              "its models")
        for i, folder in finished.items():
            publish_round(folder, out / f"model{i}")  # republished: this output is complete by itself
            checkpoints[i] = out / f"model{i}" / ROUND_RUN / BEST
    todo = [i for i in range(len(models)) if i not in finished]
    # a round started (and killed) by an earlier session resumes, if it started from this model's checkpoint
    started = {i: attached[i] for i in todo
               if i in attached and (read_round_status(attached[i]) or {}).get("from_digest") == models[i].digest}
    if started:
        pseudo = pd.read_csv(next(iter(started.values())) / PSEUDO_LABELS_FILE,
                             dtype={"filename": str, "ground_truth": str})
        print(f"PSEUDO_LABELS: resuming the round started in {', '.join(map(str, started.values()))} "
              f"({len(pseudo)} pseudo-labelled test images)")
    elif todo:
        pseudo = _select(models, labels, threshold)
        if len(pseudo) == 0:
            print("no round: submitting with the attached models (lower PSEUDO_THRESHOLD to take more)")
            todo = []
    if todo:
        by_digest = {file_digest(p, 16, "checkpoint"): p for p in find_outputs(roots, BEST)
                     if not (p.parent / PSEUDO_MARKER).is_file()}  # a round's checkpoints start no other round
    for i in todo:
        if models[i].digest not in by_digest:
            raise JaguarKitError(f"PSEUDO_LABELS: model {i}: the best.pt its embeddings came from is not "
                                 "attached (attach the training output the inference notebook used)")
        result = pseudo_label_round(by_digest[models[i].digest], data_dir, pseudo, out / f"model{i}", epochs=epochs,
                                    overrides=overrides, prepared_root=prepared, resume_from=started.get(i),
                                    derived_dir=prepared.parent / "pseudo-data" / f"model{i}")
        print(result.summary())
        if result.status != "finished":
            raise JaguarKitError(
                f"PSEUDO_LABELS: model {i}: the round stopped at epoch {result.epochs_done} "
                f"({result.stop_reason or result.status}), so no submission was made; " + advice(
                    "run again with this output to resume it",
                    "attach this version's output (Add Input -> Your Work, or jaguar-kit kaggle push submit "
                    "--resume) and run the notebook again: the round resumes where it stopped"))
        checkpoints[i] = result.best_checkpoint
    sets: dict[int, Embeddings] = {}
    for i, checkpoint in sorted(checkpoints.items()):
        emb = embed_split(checkpoint, data_dir, "test", cache_dir or default_cache_dir(), prepared, embed_cfg,
                          seed_roots=roots)
        path = emb.save(checkpoint.parent.parent / ROUND_EMBEDDINGS)
        sets[i] = emb
        print(f"model {i}: the round's model embedded {len(emb.names)} test images -> {path}")
    return sets


__all__ = ["IdentityModel", "AttachedModel", "fit_temperature", "select_pseudo_labels", "write_pseudo_competition",
           "pseudo_label_round", "pseudo_label_ensemble", "inference_digest", "read_round_status", "round_finished",
           "publish_round", "attached_rounds", "PSEUDO_MARKER", "ROUND_STATUS", "ROUND_RUN"]

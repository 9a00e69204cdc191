"""A run folder: what it trains on, the guards before any work, where it resumes, its metrics.

Checked before an image is prepared: settings that cannot train (:func:`check_trainable`), and
a resume (:func:`plan_resume`) against the checkpoint's config (raising ``train.epochs`` or
``train.patience`` extends a run, any other change is refused by name) and its training table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import Config, diff_configs
from ..data.competition import load_competition
from ..data.folds import fold_split
from ..data.prepare import prepare_images
from ..errors import JaguarKitError
from ..files import atomic_write_text
from ..kaggle.env import advice
from ..optim import build_scheduler
from .checkpoint import CHECKPOINT_FORMAT, LAST, VAL_BY_IDENTITY, copy_run, find_attached_runs, read_checkpoint
from .state import TrainState

EXTENDABLE = ("train.epochs", "train.patience")  # how long to train: may change when resuming


# --------------------------------------------------------------------------- data


@dataclass
class FoldData:
    identities: np.ndarray  # identity of every training image
    paths: np.ndarray  # its prepared image
    train_idx: np.ndarray
    val_idx: np.ndarray
    classes: list[str]  # identities trained on; ArcFace class i is classes[i]
    train_labels: np.ndarray  # class index of each train_idx image


def training_table(data_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """The validated competition and the run's record of its training table.

    The record (``images``: filename -> identity) goes into every checkpoint, so a resume can
    say exactly what changed in ``train.csv`` since the run started; the trainer adds
    ``encounters`` (filename -> encounter, given or inferred, which the folds never split)
    once the weights are resolved, since inferring them reads every image.
    """
    comp = load_competition(data_dir, check_images=True)
    names = list(map(str, comp.train["filename"]))
    return comp, {"images": dict(zip(names, map(str, comp.train["identity"])))}


def _fold_data(cfg: Config, comp: Any, prepared_root: Path, progress: bool,
               encounters: dict[str, str] | None) -> FoldData:
    """Prepare the competition's training images and split off the fold (never splitting an encounter;
    ``encounters`` None: a run started before encounters were recorded keeps its image-wise split)."""
    d = cfg.data
    prepared = prepare_images(list(comp.train["path"]), prepared_root, d.alpha_mode, d.crop_margin, d.prepared_size,
                              workers=d.workers, progress=progress)
    identities = comp.train["identity"].astype(str).to_numpy()
    paths = np.array([str(prepared[str(p)]) for p in comp.train["path"]])  # by path: names may repeat in sub-folders
    groups = None if encounters is None else [encounters[str(f)] for f in comp.train["filename"]]
    split = fold_split(identities, d, report=progress, groups=groups)
    classes = sorted(set(identities[split.train_idx]))
    class_of = {c: i for i, c in enumerate(classes)}
    return FoldData(identities, paths, split.train_idx, split.val_idx, classes,
                    np.array([class_of[i] for i in identities[split.train_idx]]))


def check_validation_split(cfg: Config, data: FoldData) -> None:
    """Refuse, before training, a validation split in which no individual appears twice: nothing to score."""
    val = data.identities[data.val_idx]
    if len(val) and len(set(val)) == len(val):
        d = cfg.data
        raise JaguarKitError(
            f"data.fold={d.fold} of data.num_folds={d.num_folds}: its {len(val)} validation images show no identity "
            "twice, so validation has nothing to score; give identities more images (about 2 x data.num_folds "
            "each, in separate encounters), use fewer folds (--set data.num_folds=2) or train on every image "
            "without validation (--set data.fold=-1)")


def check_trainable(cfg: Config) -> None:
    """Settings that cannot train, refused before any work, naming the setting."""
    tc, lc = cfg.train, cfg.loss
    if tc.epochs < 1:
        raise JaguarKitError(f"train.epochs={tc.epochs}: nothing to train (at least 1)")
    if lc.triplet_weight > 0 and tc.p < 2:
        raise JaguarKitError(f"train.p={tc.p}: the batch-hard triplet loss needs at least 2 identities per batch "
                             "(or set loss.triplet_weight=0)")
    if lc.triplet_weight > 0 and tc.k < 2:
        raise JaguarKitError(f"train.k={tc.k}: the batch-hard triplet loss needs at least 2 images per identity "
                             "(or set loss.triplet_weight=0)")
    if tc.grad_accum < 1:
        raise JaguarKitError(f"train.grad_accum={tc.grad_accum}: must be at least 1")
    if tc.lr <= 0 or not math.isfinite(tc.lr):
        raise JaguarKitError(f"train.lr={tc.lr}: must be a positive number")


def _table_changes(old: dict[str, str], new: dict[str, str]) -> str:
    """What changed between two ``filename -> identity`` tables, in words."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    relabelled = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    new_ids = sorted(set(new.values()) - set(old.values()))
    gone_ids = sorted(set(old.values()) - set(new.values()))
    parts = []
    for items, what in ((added, "image(s) added"), (removed, "image(s) removed"), (relabelled, "image(s) relabelled"),
                        (new_ids, "identity(ies) added"), (gone_ids, "identity(ies) removed")):
        if items:
            parts.append(f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return "; ".join(parts)



# --------------------------------------------------------------------------- resume


# How a notebook starts a new run: its own earlier output, attached, is what it would resume.
NEW_RUN = ("remove this notebook's own output from its inputs (the Input panel; `jaguar-kit kaggle push` without "
           "--resume) so this version's output starts a new run, or add \"train.resume=never\" to OVERRIDES")


@dataclass
class ResumePlan:
    checkpoint: Path | None  # None: a fresh start
    messages: list[str] = field(default_factory=list)
    extended: bool = False  # train.epochs / patience changed: the schedule is rebuilt


def _requested(cfg: Config, memory_plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The result-deciding values of ``cfg`` with a stored memory plan applied (P lowered to fit)."""
    fields = cfg.result_fields()
    for dotted, value in memory_plan.items():
        section, key = dotted.split(".", 1)
        if key in fields.get(section, {}):
            fields[section][key] = value
    return fields


def plan_resume(cfg: Config, run_dir: Path, table: dict[str, Any], search_roots: list[Path]) -> ResumePlan:
    """Decide where training starts: fresh, or from which ``last.pt``, and check it may.

    ``train.resume``: ``auto`` takes the run folder's own ``last.pt``, else copies the newest
    attached run folder of the same name (a previous Kaggle version's output) in whole;
    ``never`` starts over; a path continues that checkpoint. Raising ``train.epochs`` (or
    ``train.patience``) extends the run; any other changed setting is refused by name.
    """
    tc = cfg.train
    plan = ResumePlan(None)
    if tc.resume == "never":
        return plan
    attached = None
    if tc.resume not in ("auto", ""):
        plan.checkpoint = Path(tc.resume)
    elif (run_dir / LAST).is_file():
        plan.checkpoint = run_dir / LAST
    else:
        candidates = find_attached_runs(run_dir.name, search_roots)
        if not candidates:
            return plan
        attached = candidates[0]
        plan.checkpoint = attached / LAST  # checked where it lies: nothing is copied into the output before

    meta = read_checkpoint(plan.checkpoint, verify=False)
    if meta.format != CHECKPOINT_FORMAT:
        raise JaguarKitError(f"{plan.checkpoint}: written by jaguar_kit {meta.version} in another "
                             "checkpoint format; start a new run (train.resume=never) or use model.init_from")
    changes = diff_configs(_requested(meta.run_config, {}), _requested(cfg, meta.memory_plan))
    refused = [c for c in changes if c[0] not in EXTENDABLE]
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise JaguarKitError(f"{plan.checkpoint}: made with another config ({listed}); only train.epochs and "
                             "train.patience may change when resuming: " + advice(
                                 "restore the settings, use another --out, or --set train.resume=never to start over",
                                 f"restore them in the settings cell, or train them as a new run: {NEW_RUN}"))
    if changes:
        plan.extended = True
        plan.messages.append("changed since the checkpoint: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in changes))
    old_images = meta.data.get("images", {})
    if old_images and old_images != table["images"]:
        what = _table_changes(old_images, table["images"])
        if not tc.accept_data_change:
            raise JaguarKitError(
                f"{plan.checkpoint}: train.csv changed since this run started ({what}): resuming would move images "
                "between training and validation. " + advice(
                    "Use another --out (optionally --set model.init_from=THIS/last.pt), or --set "
                    "train.accept_data_change=true to continue on the new table",
                    f"To train on the new table as a new run, {NEW_RUN} (optionally with "
                    "\"model.init_from=THIS/last.pt\" in OVERRIDES); or add \"train.accept_data_change=true\" to "
                    "OVERRIDES to continue this run on it"))
        if set(old_images.values()) != set(table["images"].values()):
            raise JaguarKitError(f"{plan.checkpoint}: train.csv changed ({what}): the identities differ, so the "
                                 "ArcFace head cannot continue; " + advice(
                                     "start a new run with --set model.init_from=THIS/last.pt",
                                     f"{NEW_RUN}, with \"model.init_from=THIS/last.pt\" in OVERRIDES"))
        plan.messages.append(f"continuing on a changed train.csv ({what}), as train.accept_data_change asks")
    if attached is not None:
        copied = copy_run(attached, run_dir)
        plan.messages.insert(0, f"resuming the run attached at {attached} (copied {', '.join(copied)} to {run_dir})")
        plan.checkpoint = run_dir / LAST
    return plan


def extend_schedule(state: TrainState, cfg: Config, steps_per_epoch: int, warmup_steps: int, head_steps: int,
                    announce: bool) -> None:
    """Continue a run under a changed ``train.epochs`` / ``train.patience``.

    The cosine schedule is rebuilt over the new total and continues from the current step:
    a finished run that gets more epochs restarts warm from the rate its new position on
    the longer cosine gives, then decays to 0 at the new end.
    """
    tc = cfg.train
    state.stopper.patience = tc.patience
    state.scheduler = build_scheduler(state.optimizer, tc.epochs * steps_per_epoch, warmup_steps, head_steps)
    state.scheduler.last_epoch = state.global_step
    for group, base, factor in zip(state.optimizer.param_groups, state.scheduler.base_lrs, state.scheduler.lr_lambdas):
        group["lr"] = base * factor(state.global_step)
    if state.status == "finished" or (state.status == "early_stopped" and not state.stopper.should_stop):
        state.status = "running"
    if announce:
        peak = max(f(state.global_step) for f in state.scheduler.lr_lambdas)
        print(f"extending to {tc.epochs} epochs (patience {tc.patience}) from epoch {state.epoch}: the cosine schedule "
              f"is rebuilt over {tc.epochs} epochs and continues at {peak:.2f} x the peak rate")


# --------------------------------------------------------------------------- metrics


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    df = pd.DataFrame([{k: v for k, v in row.items() if k != VAL_BY_IDENTITY} for row in history])
    atomic_write_text(run_dir / "metrics.csv", df.to_csv(index=False))
    try:
        from ..viz import save_training_curves

        save_training_curves(df, run_dir / "curves.png")
    except ImportError as e:  # matplotlib missing: curves are a convenience, metrics.csv has the data
        print(f"note: no training-curve PNG ({e})")

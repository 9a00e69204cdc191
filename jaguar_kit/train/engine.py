"""The training engine: PK batches -> model -> ArcFace + triplet, resumable to the bit.

One function, :func:`train`, runs a fold from a config. It is what the command line, the
training kernel, the demo and the DDP launcher call. The run folder holds the config, the
per-epoch metrics (CSV), the training curves (PNG) and two checkpoints, ``last.pt`` and
``best.pt``, rewritten atomically: disk use stays bounded however long the run.

Exact resume: :class:`TrainState` owns everything that changes while training (model,
EMA, criterion, optimiser, scheduler, grad scaler, early stopping, position, history and
every RNG) behind one symmetric ``state_dict`` / ``load_state_dict``. The PK batches are a
pure function of (seed, epoch, rank) and augmentations are seeded per sample, so a run
killed at any step and resumed ends with the same weights as an uninterrupted one
(bitwise on CPU).

What is never lost or silently wrong: Ctrl-C (SIGINT) and SIGTERM finish the step and
write ``last.pt``; a non-finite loss stops the run and no non-finite weight is written; a
resume checks the config (raising ``train.epochs`` extends a run, any other change is
refused by name) and the training table; one process writes a run folder at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, diff_configs
from ..data.competition import load_competition
from ..data.dataset import ImageDataset, build_transform, loader_safe_opencv, sample_seed, worker_init
from ..data.encounters import train_encounters
from ..data.folds import fold_split
from ..data.prepare import prepare_images
from ..data.sampler import PKSampler
from ..device import DeviceInfo, select_device
from ..embed import compute_embeddings
from ..errors import JaguarKitError, plain_message
from ..files import atomic_write_text, fault_point, remove_stale_temporaries
from ..kaggle.env import advice, input_roots, default_prepared_root
from ..losses import ReIDCriterion
from ..metrics import bootstrap_interval, identity_balanced_map, trailing_mean
from ..models import build_model
from ..optim import build_optimizer, build_scheduler
from .checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    LAST,
    VAL_BY_IDENTITY,
    Checkpoint,
    RunLock,
    capture_rng,
    copy_run,
    find_attached_runs,
    fine_tuning_verdict,
    NonFiniteWeights,
    non_finite_tensors,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .memory import MemoryPlan, fit_batch, probe_step

CHECKPOINT_EVERY_S = 15 * 60  # a time-based `last.pt` between epochs, for hard kills
EXTENDABLE = ("train.epochs", "train.patience")  # how long to train: may change when resuming
SELECT_WINDOW = 3  # validations averaged to judge an epoch (EarlyStopping)


@dataclass
class EarlyStopping:
    """Patience on validation mAP; its state travels inside the checkpoint.

    An epoch is judged by the mean of its validation mAP and the ``window - 1`` before it
    (``metrics.trailing_mean``): the best model is the last of the best stretch of
    ``window`` validations, so one lucky validation cannot win alone, and ``best`` (that
    mean) overstates the chosen model less than a single best score would.
    """

    patience: int
    min_delta: float
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    window: int = SELECT_WINDOW
    recent: list[float] = field(default_factory=list)  # the last `window` scores

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True if it is a new best."""
        self.recent = [*self.recent, float(score)][-self.window:]
        smoothed = float(trailing_mean(self.recent, self.window)[-1])
        if smoothed > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = smoothed, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "recent": list(self.recent)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = float(d["best"]), int(d["best_epoch"]), int(d["bad_epochs"])
        self.recent = [float(x) for x in d.get("recent", [])]


class TrainModule(nn.Module):
    """Model and criterion as one module, so DDP synchronises the ArcFace weights too."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.criterion(self.model(x), y)


@dataclass
class TrainState:
    """Everything that changes while training, saved and restored as one.

    ``state_dict`` and ``load_state_dict`` are written side by side over the same fields,
    so a field cannot be saved and forgotten on resume (or the reverse).
    """

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stopper: EarlyStopping
    ema: nn.Module | None = None  # timm ModelEmaV3
    epoch: int = 0  # finished epochs
    next_batch: int = 0  # next batch within the epoch in progress
    global_step: int = 0  # optimiser steps
    status: str = "running"  # running | finished | early_stopped
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch (0: frozen baseline)
    sums: dict[str, float] = field(default_factory=dict)  # running loss sums of the epoch in progress

    _MODULES = ("model", "criterion", "optimizer", "scheduler", "scaler", "stopper")
    _VALUES = ("epoch", "next_batch", "global_step", "status", "history", "sums")

    def state_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {name: getattr(self, name).state_dict() for name in self._MODULES}
        d.update({name: getattr(self, name) for name in self._VALUES})
        d["ema"] = None if self.ema is None else self.ema.module.state_dict()
        d["rng"] = capture_rng()
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for name in self._MODULES:
            getattr(self, name).load_state_dict(d[name])
        for name in self._VALUES:
            setattr(self, name, d[name])
        self.history, self.sums = list(self.history), dict(self.sums)
        if self.ema is not None and d.get("ema") is not None:
            self.ema.module.load_state_dict(d["ema"])
        restore_rng(d["rng"])


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | early_stopped | interrupted
    epochs_done: int
    best_map: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    frozen_map: float | None = None  # the frozen backbone's own features on the same split (epoch 0)
    stop_reason: str = ""  # interrupted: "SIGINT" (Ctrl-C), "SIGTERM" or "time budget"
    best_epoch: int = -1  # the epoch of best.pt

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST

    def summary(self) -> str:
        best = "n/a" if self.best_map is None else f"{self.best_map:.4f}"
        text = (f"{self.run_dir}: {self.status} after {self.epochs_done} epochs, best val mAP {best} "
                f"(mean of up to {SELECT_WINDOW} validations)")
        if self.frozen_map is not None and self.best_map is not None:
            keep, why = fine_tuning_verdict(self.history, self.best_epoch, self.best_map)
            text += f"; {why}" if keep else f"; {why}: embed with frozen:BACKBONE, or train with a lower train.lr"
        return text


class TrainingDiverged(JaguarKitError):
    """A non-finite loss or weight: the run stops and keeps its last finite checkpoint."""


# --------------------------------------------------------------------------- signals


@contextmanager
def _stop_on_signals(flag: dict[str, Any], announce: bool) -> Iterator[None]:
    """SIGTERM (Kaggle, a scheduler) and SIGINT (Ctrl-C, Jupyter's Interrupt) ask for a clean stop.

    The step in progress finishes and ``last.pt`` is written. A second Ctrl-C aborts at once
    (the previous ``last.pt`` is intact).
    """
    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name
        if announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving last.pt "
                  "(Ctrl-C again to abort at once)", flush=True)

    try:
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: no handler, the time budget still applies
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _loader_worker_init(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C: the terminal sends it to the whole process group, and the
    main process, not its workers, decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_init(worker_id)


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


# --------------------------------------------------------------------------- the loop


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _device(cfg: Config, local_rank: int, world: int) -> DeviceInfo:
    if world == 1:
        return select_device(cfg.train.device)
    info = select_device("cuda" if torch.cuda.is_available() else "cpu")
    if info.device.type == "cuda":
        info = select_device(f"cuda:{local_rank}")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo")
    return info


def _memory_probe_wanted(info: DeviceInfo) -> bool:
    """Only a GPU's memory is tight enough to probe (the tests switch it on to inject an OOM on CPU)."""
    return info.device.type == "cuda"


def _fit_memory(cfg: Config, module: TrainModule, optimizer: torch.optim.Optimizer, n_classes: int,
                info: DeviceInfo, world: int, announce: bool) -> dict[str, Any]:
    """On CUDA, the probe step: checkpoint as few blocks as fit, then a lower P, until a step fits.

    Returns the changes as ``{"model.checkpoint_blocks": 14, "train.p": 6}`` (kept in the
    checkpoint, so a resume applies the same plan); on CPU nothing changes.
    """
    if not _memory_probe_wanted(info):
        return {}
    tc, model = cfg.train, module.model
    size = tuple(model.data_config["input_size"][-2:])
    total = len(model.checkpoint_blocks()) or 1  # no blocks found: all or nothing (timm's own)

    def try_step(p: int, blocks: int) -> int | None:
        model.set_checkpoint_blocks(blocks)
        return probe_step(module, optimizer, n_classes, p * tc.k, tc.k, size, info.device, info.amp_dtype)

    configured = total if cfg.model.grad_checkpointing else min(cfg.model.checkpoint_blocks, total)
    plan: MemoryPlan = fit_batch(try_step, tc.p, tc.k, total, configured)
    if world > 1:  # every rank trains with the most careful plan any rank needed
        agreed = torch.tensor([plan.p, -plan.blocks], device=info.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        plan.p, plan.blocks = int(agreed[0]), int(-agreed[1])
    model.set_checkpoint_blocks(plan.blocks)
    if announce:
        print(f"memory probe: {plan.describe()}")
    changes: dict[str, Any] = {}
    if plan.blocks != configured:
        if plan.grad_checkpointing:
            changes["model.grad_checkpointing"] = True
        else:
            changes["model.checkpoint_blocks"] = plan.blocks
    if plan.p != tc.p:
        changes["train.p"] = plan.p
    return changes


def _apply(cfg: Config, changes: dict[str, Any]) -> None:
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        setattr(getattr(cfg, section), key, value)


def train(
    cfg: Config,
    data_dir: str | Path,
    run_dir: str | Path,
    prepared_root: str | Path | None = None,
    progress: bool = True,
    resume_roots: list[Path] | None = None,
) -> TrainResult:
    """Train (or resume) one fold described by ``cfg`` and return where it ended.

    ``cfg.data.fold = -1`` trains on every training image without validation (the final
    model for a submission). Under ``torchrun`` (``WORLD_SIZE`` > 1) it runs as DDP: each
    rank draws its own PK batches, rank 0 alone validates, writes and reports.
    """
    import copy

    t_start = time.monotonic()
    cfg = copy.deepcopy(cfg)
    run_dir = Path(run_dir)
    rank, local_rank, world = _dist_info()
    is_main = rank == 0
    progress = progress and is_main
    check_trainable(cfg)
    try:
        with RunLock(run_dir) if is_main else nullcontext():
            return _train_locked(cfg, data_dir, run_dir, prepared_root, progress, resume_roots, t_start,
                                 rank, local_rank, world)
    except JaguarKitError as e:  # raised in a loader worker, torch wraps it in the worker's traceback
        if plain_message(e) == str(e):
            raise
        raise type(e)(plain_message(e)) from None


def _train_locked(cfg: Config, data_dir: str | Path, run_dir: Path, prepared_root: str | Path | None,
                  progress: bool, resume_roots: list[Path] | None, t_start: float, rank: int, local_rank: int,
                  world: int) -> TrainResult:
    is_main = rank == 0
    tc = cfg.train
    info = _device(cfg, local_rank, world)

    # --- the table, the resume decision, the model: all before any image is prepared -----
    comp, table = training_table(data_dir)
    if is_main:
        remove_stale_temporaries(run_dir)  # we hold the lock: no other writer's temporaries
        roots = resume_roots if resume_roots is not None else input_roots()
        plan = plan_resume(cfg, run_dir, table, roots)
        for m in plan.messages:
            print(m)
    if world > 1:
        dist.barrier()
        if not is_main:  # rank 0 has checked and copied; the others follow the run folder
            plan = ResumePlan(run_dir / LAST if (run_dir / LAST).is_file() else None)
    saved = read_checkpoint(plan.checkpoint) if plan.checkpoint is not None else None
    if saved is not None and saved.status != "running" and not plan.extended:
        # A finished run attached again: re-published whole, nothing prepared or retrained.
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if plan.checkpoint != run_dir / LAST:
                copy_run(plan.checkpoint.parent, run_dir)
            _write_metrics(run_dir, saved.history)
            print(f"this run is already {saved.status.replace('_', ' ')} after {saved.epoch} epochs "
                  f"(kept in {run_dir}); raise train.epochs to train longer")
        stopper = EarlyStopping(tc.patience, tc.min_delta)
        stopper.load_state_dict(saved.state["stopper"])
        return _result(run_dir, saved.status, saved.epoch, stopper, saved.history)

    trainer = Trainer(cfg, info, run_dir, comp, table, saved, rank, world, progress, t_start,
                      Path(prepared_root) if prepared_root else default_prepared_root())
    if saved is not None:
        trainer.resume(saved, plan)
        del saved
    elif is_main and len(trainer.data.val_idx) and (cfg.model.weights != "none" or cfg.model.init_from):
        trainer.validate_frozen()  # (random weights are no baseline)
    if trainer.state.status != "running" or trainer.state.epoch >= tc.epochs:  # extended, not beyond what is done
        return trainer.close_finished()
    return trainer.fit()


class Trainer:
    """One training session of a run: built from the config (and a checkpoint), then :meth:`fit`.

    Holds what the loop needs (model, data, :class:`TrainState`) so each step of the loop is
    a method; the state to save is ``self.state`` and nothing else.
    """

    def __init__(self, cfg: Config, info: DeviceInfo, run_dir: Path, comp: Any, table: dict[str, Any],
                 saved: Checkpoint | None, rank: int, world: int, progress: bool, t_start: float,
                 prepared_root: Path) -> None:
        tc = cfg.train
        self.cfg, self.info, self.run_dir, self.table = cfg, info, run_dir, table
        self.rank, self.world, self.is_main, self.progress, self.t_start = rank, world, rank == 0, progress, t_start
        self.memory_plan: dict[str, Any] = dict(saved.memory_plan) if saved else {}
        _apply(cfg, self.memory_plan)

        _seed_everything(tc.seed)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # The weights are resolved (or refused) here, before any image is prepared. A resumed
        # run takes every weight from its checkpoint: the pretrained source need not be attached.
        model = build_model(dataclasses.replace(cfg.model, weights="none", init_from="") if saved else cfg.model)
        if self.is_main and model.weights_report is not None:
            print(f"weights: {model.weights_report.summary()}")

        if saved is not None and "encounters" not in saved.data:  # its split is image-wise: keep it
            encounters = None
        else:
            names = map(str, comp.train["filename"])
            encounters = dict(zip(names, map(str, train_encounters(comp.train))))
            self.table = table = {**table, "encounters": encounters}
        self.data = data = _fold_data(cfg, comp, prepared_root, progress, encounters)
        if len(data.classes) < 2:
            raise JaguarKitError(f"only {len(data.classes)} identity in the training split of train.csv; "
                                 "re-identification training needs at least 2")
        check_validation_split(cfg, data)
        if saved is not None and list(saved.classes) != list(data.classes):
            raise JaguarKitError(f"{run_dir / LAST}: trained on other identities than this fold's; start a new run")

        criterion = ReIDCriterion(cfg.loss, cfg.model.embedding_dim, len(data.classes))
        self.module = module = TrainModule(model, criterion).to(info.device)
        optimizer = build_optimizer(model, criterion, tc)
        ema = None
        if tc.ema_decay > 0:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=tc.ema_decay)
        if saved is None:
            self.memory_plan = _fit_memory(cfg, module, optimizer, len(data.classes), info, world,
                                           announce=self.is_main)
            _apply(cfg, self.memory_plan)

        self.sampler = PKSampler(data.train_labels, tc.p, tc.k, seed=tc.seed,
                                 steps_per_epoch=tc.steps_per_epoch or None, rank=rank, world_size=world)
        self.batches_per_epoch = max(tc.grad_accum, len(self.sampler) // tc.grad_accum * tc.grad_accum)
        self.steps_per_epoch = self.batches_per_epoch // tc.grad_accum
        self.warmup_steps = int(tc.warmup_epochs * self.steps_per_epoch)
        self.head_steps = int(tc.head_epochs * self.steps_per_epoch)
        scheduler = build_scheduler(optimizer, tc.epochs * self.steps_per_epoch, self.warmup_steps, self.head_steps)
        self.state = TrainState(model, criterion, optimizer, scheduler,
                                torch.amp.GradScaler(info.device.type, enabled=info.use_grad_scaler),
                                EarlyStopping(tc.patience, tc.min_delta), ema)

        size = tuple(model.data_config["input_size"])[-2:]
        mean, std = model.data_config["mean"], model.data_config["std"]
        self.train_ds = ImageDataset(data.paths[data.train_idx], data.train_labels, build_transform(
            size, mean, std, train=True, augment=tc.augment, hflip=tc.hflip))
        self.val_ds = ImageDataset(data.paths[data.val_idx], None, build_transform(size, mean, std, train=False))
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.json")
            print(f"training on {info.description}; {len(data.train_idx)} train / {len(data.val_idx)} val images, "
                  f"{len(data.classes)} identities, {self.batches_per_epoch} batches of {tc.p}x{tc.k} per epoch")

    # --- starting points ---------------------------------------------------------------

    def resume(self, saved: Checkpoint, plan: ResumePlan) -> None:
        self.state.load_state_dict(saved.state)
        if plan.extended:
            _extend(self.state, self.cfg, self.steps_per_epoch, self.warmup_steps, self.head_steps,
                    announce=self.is_main)
        if self.is_main:
            s = self.state
            print(f"resumed {plan.checkpoint}: epoch {s.epoch}, batch {s.next_batch}, status {s.status}")

    def validate_frozen(self) -> None:
        """Epoch 0: what the pretrained backbone's own features score on the same split, the yardstick."""
        row = {"epoch": 0, **self.validate(frozen=True)}
        self.state.history.append(row)
        print(f"epoch 0 (frozen backbone):{_val_text(row)}")

    def close_finished(self) -> TrainResult:
        """Extended to no more epochs than are done: mark finished, write, report."""
        s = self.state
        s.status = "finished" if s.status == "running" else s.status
        if self.is_main:
            self.checkpoint(self.run_dir / LAST)
            _write_metrics(self.run_dir, s.history)
            print(f"already {s.epoch} epochs done, train.epochs={self.cfg.train.epochs}: nothing more to train")
        return _result(self.run_dir, s.status, s.epoch, s.stopper, s.history)

    # --- the loop ------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        s, tc = self.state, self.cfg.train
        self.ddp_module: nn.Module = self.module
        if self.world > 1:
            device_ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            self.ddp_module = nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)
        self.stop: dict[str, Any] = {"stop": ""}
        self.last_save = time.monotonic()
        with _stop_on_signals(self.stop, announce=self.is_main):
            while s.epoch < tc.epochs and s.status == "running":
                if self.train_epoch():
                    reason = self.stop["stop"] or "time budget"
                    self.checkpoint(self.run_dir / LAST)
                    if self.is_main:
                        why = self.stop["stop"] or f"time budget of {tc.time_budget_h:g} h reached"
                        print(f"stopped cleanly ({why}) at epoch {s.epoch + 1}, batch {s.next_batch}: "
                              f"{self.run_dir / LAST} saved; run the same command again to resume")
                    return _result(self.run_dir, "interrupted", s.epoch, s.stopper, s.history, reason)
                self.end_epoch()
        return _result(self.run_dir, s.status, s.epoch, s.stopper, s.history)

    def train_epoch(self) -> bool:
        """The rest of the epoch in progress; True if it stopped early (signal or time budget)."""
        s, tc, cfg, device = self.state, self.cfg.train, self.cfg, self.info.device
        self.module.train()
        loader_safe_opencv()  # before forking loader workers
        epoch = s.epoch
        batches = self.sampler.batches(epoch)[:self.batches_per_epoch]
        items = [[(i, sample_seed(tc.seed, epoch, b, j) + self.rank) for j, i in enumerate(batch)]
                 for b, batch in enumerate(batches)]
        loader = DataLoader(self.train_ds, batch_sampler=items[s.next_batch:], num_workers=cfg.data.workers,
                            pin_memory=device.type == "cuda", worker_init_fn=_loader_worker_init,
                            # its own generator: creating a loader must not draw from the global RNG
                            generator=torch.Generator().manual_seed(tc.seed + epoch))
        with tqdm(loader, total=self.batches_per_epoch, initial=s.next_batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                  disable=not self.progress, leave=False) as bar:
            for x, y, _ in bar:
                loss = self.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                if loss is None:
                    continue  # gradient accumulation: no optimiser step yet
                bar.set_postfix(loss=f"{loss:.3f}")
                stop_now = bool(self.stop["stop"]) or time.monotonic() - self.t_start > tc.time_budget_h * 3600
                if self.world > 1:
                    flag = torch.tensor([float(stop_now)], device=device)
                    dist.all_reduce(flag)
                    stop_now = bool(flag.item())
                if stop_now:
                    return True
                due = tc.checkpoint_every and s.global_step % tc.checkpoint_every == 0
                if (due or time.monotonic() - self.last_save > CHECKPOINT_EVERY_S) and \
                        s.next_batch < self.batches_per_epoch:
                    self.checkpoint(self.run_dir / LAST)
                    self.last_save = time.monotonic()
        return False

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Forward and backward one batch; after every ``grad_accum`` batches an optimiser step.

        Returns the batch loss once an optimiser step was taken (else None). A non-finite
        loss (or, without a GradScaler, gradient) stops the run before anything is saved.
        """
        s, tc, info = self.state, self.cfg.train, self.info
        with torch.autocast(info.device.type, dtype=info.amp_dtype, enabled=info.amp_dtype is not None):
            loss, parts = self.ddp_module(x, y)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise self._diverged(f"the loss is {loss_value}")
        s.scaler.scale(loss / tc.grad_accum).backward()
        s.next_batch += 1
        for name, value in {"loss": loss_value, **{k: float(v) for k, v in parts.items()}, "n": 1}.items():
            s.sums[name] = s.sums.get(name, 0.0) + value
        if s.next_batch % tc.grad_accum:
            return None
        s.scaler.unscale_(s.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), tc.clip_grad if tc.clip_grad > 0 else math.inf)
        if not info.use_grad_scaler and not torch.isfinite(grad_norm):
            raise self._diverged("the gradient is not finite")  # (with a GradScaler an overflow only skips the step)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        s.global_step += 1
        fault_point("train-step")
        if s.ema is not None:
            s.ema.update(s.model, step=s.global_step)
        return loss_value

    def end_epoch(self) -> None:
        """Validate, early-stop, write the checkpoints, metrics and curves."""
        s, tc = self.state, self.cfg.train
        epoch = s.epoch + 1
        n = max(s.sums.get("n", 0), 1)
        row = {"epoch": epoch, "train_loss": s.sums.get("loss", 0.0) / n,
               **{k: v / n for k, v in s.sums.items() if k not in ("loss", "n")},
               "lr": s.optimizer.param_groups[-1]["lr"], "val_map": float("nan"), "val_rank1": float("nan")}
        improved = False
        has_val = len(self.data.val_idx) > 0
        if self.is_main and has_val and (epoch % tc.val_every == 0 or epoch == tc.epochs):
            row.update(self.validate())
            improved = s.stopper.update(row["val_map"], epoch)
        elif not has_val:
            improved = True  # no validation: the newest model is the best we know
        row["elapsed_s"] = time.monotonic() - self.t_start
        s.history.append(row)
        s.epoch, s.next_batch, s.sums = epoch, 0, {}
        if s.stopper.should_stop:
            s.status = "early_stopped"
        elif s.epoch >= tc.epochs:
            s.status = "finished"
        if self.is_main:
            if improved:
                self.checkpoint(self.run_dir / BEST)
            self.checkpoint(self.run_dir / LAST)
            self.last_save = time.monotonic()
            _write_metrics(self.run_dir, s.history)
            print(_epoch_line(row, improved))
        if self.world > 1:
            dist.barrier()

    # --- helpers -------------------------------------------------------------------------

    def validate(self, frozen: bool = False) -> dict[str, Any]:
        """Identity-balanced mAP (with its bootstrap interval over identities) and rank-1 on the validation
        images (EMA weights when kept), plus each identity's mAP (``VAL_BY_IDENTITY``) for paired comparisons."""
        s = self.state
        model: nn.Module = s.ema.module if s.ema is not None and not frozen else s.model
        if frozen:
            from ..models import FrozenBackbone

            model = FrozenBackbone(s.model.backbone, s.model.spec)
        was_training = model.training
        emb = compute_embeddings(model.eval(), self.val_ds, self.info.device,
                                 batch_size=self.cfg.train.p * self.cfg.train.k, workers=self.cfg.data.workers,
                                 amp_dtype=self.info.amp_dtype)
        model.train(was_training)
        if not np.isfinite(emb).all():  # the model diverged, not the metric
            raise self._diverged("the validation embeddings are not finite")
        score = identity_balanced_map(emb @ emb.T, self.data.identities[self.data.val_idx])
        per_identity = score.per_identity["map"].astype(float).tolist()
        lo, hi = bootstrap_interval(per_identity)
        return {"val_map": score.map, "val_map_lo": lo, "val_map_hi": hi, "val_rank1": score.rank1,
                VAL_BY_IDENTITY: per_identity}

    def checkpoint(self, path: Path) -> None:
        """Write the run's state to ``path`` (rank 0); non-finite weights stop the run instead."""
        if not self.is_main:
            return
        payload = Checkpoint(self.cfg.to_dict(), self.state.state_dict(), list(map(str, self.data.classes)),
                             self.memory_plan, self.table).to_dict()
        try:
            save_checkpoint(path, payload)
        except NonFiniteWeights as e:
            raise self._diverged(f"{len(non_finite_tensors(payload))} weight tensors are not finite") from e

    def _diverged(self, what: str) -> TrainingDiverged:
        s = self.state
        return TrainingDiverged(
            f"training diverged at epoch {s.epoch + 1}, step {s.global_step + 1}: {what} "
            f"(train.lr={self.cfg.train.lr:g}); lower train.lr. Nothing non-finite was saved: "
            f"{self.run_dir / LAST} keeps the last finite state")


def _extend(state: TrainState, cfg: Config, steps_per_epoch: int, warmup_steps: int, head_steps: int,
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


def _result(run_dir: Path, status: str, epochs: int, stopper: EarlyStopping, history: list[dict[str, float]],
            stop_reason: str = "") -> TrainResult:
    frozen = next((r["val_map"] for r in history if r.get("epoch") == 0), None)
    best = None if stopper.best == -math.inf else stopper.best
    return TrainResult(run_dir, status, epochs, best, history, frozen, stop_reason, stopper.best_epoch)


def _val_text(row: dict[str, Any]) -> str:
    if math.isnan(row["val_map"]):
        return ""
    interval = f" (90% {row['val_map_lo']:.4f}-{row['val_map_hi']:.4f})" if "val_map_lo" in row else ""
    return f"  val mAP {row['val_map']:.4f}{interval}  rank-1 {row['val_rank1']:.4f}"


def _epoch_line(row: dict[str, Any], improved: bool) -> str:
    return f"epoch {row['epoch']}: loss {row['train_loss']:.4f}{_val_text(row)}{'  *best*' if improved else ''}"


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    df = pd.DataFrame([{k: v for k, v in row.items() if k != VAL_BY_IDENTITY} for row in history])
    atomic_write_text(run_dir / "metrics.csv", df.to_csv(index=False))
    try:
        from ..viz import save_training_curves

        save_training_curves(df, run_dir / "curves.png")
    except ImportError as e:  # matplotlib missing: curves are a convenience, metrics.csv has the data
        print(f"note: no training-curve PNG ({e})")


def train_folds(cfg: Config, data_dir: str | Path, out_dir: str | Path, folds: list[int] | None = None,
                progress: bool = True) -> list[TrainResult]:
    """Cross-validation: folds one after another into ``out_dir/fold{k}``, each resumable.

    A finished fold is skipped on rerun (its checkpoint says so). All folds share one
    prepared-image cache.
    """
    import copy

    out_dir = Path(out_dir)
    results = []
    for k in folds if folds is not None else range(cfg.data.num_folds):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold = k
        results.append(train(fold_cfg, data_dir, out_dir / f"fold{k}", prepared_root=out_dir / "prepared",
                             progress=progress))
    return results


def launch_ddp(config_path: str | Path, data_dir: str | Path, run_dir: str | Path, nproc: int = 2,
               extra: list[str] | None = None) -> int:
    """Run :func:`train` on ``nproc`` processes with torchrun (Kaggle's T4 x2).

    Started as a subprocess because multiprocessing's spawn cannot re-import a notebook's
    ``__main__``. Returns torchrun's exit status.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "jaguar_kit.cli", "train", "--config", str(config_path), "--data", str(data_dir),
           "--out", str(run_dir), *(extra or [])]
    print(" ".join(cmd))
    return subprocess.call(cmd)

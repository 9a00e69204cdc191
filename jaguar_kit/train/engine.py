"""The training engine: PK batches -> model -> ArcFace + triplet, resumable to the bit.

One function, :func:`train`, runs a fold from a config. It is what the command line, the
training kernel, the demo and the DDP launcher call. The run folder holds the config, the
per-epoch metrics (CSV), the training curves (PNG) and two checkpoints, ``last.pt`` and
``best.pt``, rewritten atomically: disk use stays bounded however long the run.

Exact resume: ``last.pt`` holds the model, EMA, criterion (ArcFace weights), optimiser,
scheduler, grad scaler, early-stopping state, epoch, next batch within the epoch and every
RNG. The PK batches are a pure function of (seed, epoch, rank) and augmentations are
seeded per sample, so a run killed at any step and resumed ends with the same weights as
an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import contextmanager
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

from .. import __version__
from ..config import Config
from ..data.competition import load_competition
from ..data.dataset import ImageDataset, build_transform, sample_seed, worker_init
from ..data.folds import make_folds, split_indices
from ..data.prepare import prepare_images
from ..data.sampler import PKSampler
from ..device import select_device
from ..embed import compute_embeddings
from ..errors import JaguarKitError
from ..files import atomic_write_text, fault_point, remove_stale_temporaries
from ..losses import ReIDCriterion
from ..metrics import identity_balanced_map
from ..models import build_model
from ..optim import build_optimizer, build_scheduler
from .checkpoint import BEST, LAST, capture_rng, find_resume_checkpoint, load_checkpoint, restore_rng, save_checkpoint

CHECKPOINT_EVERY_S = 15 * 60  # a time-based `last.pt` between epochs, for hard kills


@dataclass
class EarlyStopping:
    """Patience on validation mAP; its state travels inside the checkpoint."""

    patience: int
    min_delta: float
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True if it is a new best."""
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = float(d["best"]), int(d["best_epoch"]), int(d["bad_epochs"])


class TrainModule(nn.Module):
    """Model and criterion as one module, so DDP synchronises the ArcFace weights too."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.criterion(self.model(x), y)


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | early_stopped | interrupted
    epochs_done: int
    best_map: float | None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST


@contextmanager
def _stop_on_sigterm(flag: dict[str, bool]) -> Iterator[None]:
    """SIGTERM (Kaggle stopping a session, a scheduler pre-empting) asks for a clean stop."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
    except ValueError:  # not the main thread: no handler, the time budget still applies
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


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
    rank draws its own PK batches, rank 0 alone validates and writes.
    """
    t_start = time.monotonic()
    run_dir = Path(run_dir)
    rank, local_rank, world = _dist_info()
    is_main = rank == 0
    tc = cfg.train

    # --- data: validated up front, prepared once (by rank 0; the others read the cache) ----
    device_info = select_device(tc.device if world == 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        if device_info.device.type == "cuda":
            device_info = select_device(f"cuda:{local_rank}")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_info.device.type == "cuda" else "gloo")
    prepared_root = Path(prepared_root) if prepared_root else run_dir.parent / "prepared"
    if is_main:
        data = _fold_data(cfg, data_dir, prepared_root, progress)
    if world > 1:
        dist.barrier()
        if not is_main:
            data = _fold_data(cfg, data_dir, prepared_root, progress=False)
    device = device_info.device
    identities, prepared_paths, train_idx, val_idx = data.identities, data.paths, data.train_idx, data.val_idx
    classes, train_labels = data.classes, data.train_labels

    # --- model, loss, optimiser ----------------------------------------------------------
    _seed_everything(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(cfg.model)  # also switches on gradient checkpointing when configured
    criterion = ReIDCriterion(cfg.loss, cfg.model.embedding_dim, len(classes))
    module = TrainModule(model, criterion).to(device)
    optimizer = build_optimizer(model, criterion, tc)
    sampler = PKSampler(train_labels, tc.p, tc.k, seed=tc.seed, steps_per_epoch=tc.steps_per_epoch or None,
                        rank=rank, world_size=world)
    batches_per_epoch = max(tc.grad_accum, len(sampler) // tc.grad_accum * tc.grad_accum)
    steps_per_epoch = batches_per_epoch // tc.grad_accum
    scheduler = build_scheduler(optimizer, tc.epochs * steps_per_epoch, int(tc.warmup_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=device_info.use_grad_scaler)
    ema = None
    if tc.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=tc.ema_decay)
    stopper = EarlyStopping(tc.patience, tc.min_delta)
    history: list[dict[str, float]] = []
    epoch, next_batch, global_step, status = 0, 0, 0, "running"
    sums = {"loss": 0.0, "arcface": 0.0, "triplet": 0.0, "n": 0}  # running means of the epoch in progress

    # --- resume --------------------------------------------------------------------------
    fingerprint = cfg.fingerprint()
    ckpt_path = None
    if tc.resume == "auto":
        roots = resume_roots if resume_roots is not None else _default_resume_roots()
        ckpt_path = find_resume_checkpoint(run_dir, fingerprint, roots) if is_main else run_dir / LAST
        if world > 1:
            dist.barrier()
            ckpt_path = run_dir / LAST if (run_dir / LAST).is_file() else None
    elif tc.resume not in ("never", ""):
        ckpt_path = Path(tc.resume)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        if state.get("fingerprint") != fingerprint and tc.resume == "auto":
            raise JaguarKitError(f"{ckpt_path}: made with another config; refusing to resume it")
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        stopper.load_state_dict(state["early_stopping"])
        epoch, next_batch, global_step = state["epoch"], state["next_batch"], state["global_step"]
        history, status, sums = list(state["history"]), state["status"], dict(state["epoch_sums"])
        restore_rng(state["rng"])
        if is_main:
            print(f"resumed {ckpt_path}: epoch {epoch}, batch {next_batch}, status {status}")
        if status in ("finished", "early_stopped"):
            return TrainResult(run_dir, status, epoch, _best(stopper), history)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        cfg.save(run_dir / "config.json")
        print(f"training on {device_info.description}; {len(train_idx)} train / {len(val_idx)} val images, "
              f"{len(classes)} identities, {batches_per_epoch} batches of {tc.p}x{tc.k} per epoch")

    size = tuple(model.data_config["input_size"])[-2:]
    mean, std = model.data_config["mean"], model.data_config["std"]
    train_ds = ImageDataset(prepared_paths[train_idx], train_labels, build_transform(
        size, mean, std, train=True, augment=tc.augment, hflip=tc.hflip))
    val_ds = ImageDataset(prepared_paths[val_idx], None, build_transform(size, mean, std, train=False))
    ddp_module = module
    if world > 1:
        ddp_module = nn.parallel.DistributedDataParallel(
            module, device_ids=[local_rank] if device.type == "cuda" else None)

    def checkpoint(path: Path, status_: str) -> None:
        if not is_main:
            return
        save_checkpoint(path, {
            "format": 1, "version": __version__, "config": cfg.to_dict(), "fingerprint": fingerprint,
            "classes": list(map(str, classes)), "model": model.state_dict(),
            "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": None if ema is None else ema.module.state_dict(),
            "early_stopping": stopper.state_dict(), "epoch": epoch, "next_batch": next_batch,
            "global_step": global_step, "history": history, "status": status_, "epoch_sums": sums,
            "rng": capture_rng(),
        })

    stop = {"stop": False}
    budget_s = tc.time_budget_h * 3600
    last_save = time.monotonic()
    with _stop_on_sigterm(stop):
        while epoch < tc.epochs and status == "running":
            module.train()
            batches = sampler.batches(epoch)[:batches_per_epoch]
            items = [[(i, sample_seed(tc.seed, epoch, b, j) + rank) for j, i in enumerate(batch)]
                     for b, batch in enumerate(batches)]
            loader = DataLoader(train_ds, batch_sampler=items[next_batch:], num_workers=cfg.data.workers,
                                pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                                # its own generator: creating a loader must not draw from the global RNG
                                generator=torch.Generator().manual_seed(tc.seed + epoch))
            bar = tqdm(loader, total=batches_per_epoch, initial=next_batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       disable=not (progress and is_main), leave=False)
            for x, y, _ in bar:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=device_info.amp_dtype, enabled=device_info.amp_dtype is not None):
                    loss, parts = ddp_module(x, y)
                scaler.scale(loss / tc.grad_accum).backward()
                next_batch += 1
                sums["loss"] += float(loss.detach())
                sums["arcface"] += float(parts["arcface"])
                sums["triplet"] += float(parts["triplet"])
                sums["n"] += 1
                if next_batch % tc.grad_accum:
                    continue
                if tc.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(module.parameters(), tc.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                fault_point("train-step")
                if ema is not None:
                    ema.update(model, step=global_step)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                stop_now = stop["stop"] or time.monotonic() - t_start > budget_s
                if world > 1:
                    flag = torch.tensor([float(stop_now)], device=device)
                    dist.all_reduce(flag)
                    stop_now = bool(flag.item())
                if stop_now:
                    status = "interrupted"
                    break
                due = tc.checkpoint_every and global_step % tc.checkpoint_every == 0
                if (due or time.monotonic() - last_save > CHECKPOINT_EVERY_S) and next_batch < batches_per_epoch:
                    checkpoint(run_dir / LAST, "running")
                    last_save = time.monotonic()
            bar.close()
            if status == "interrupted":
                break

            # --- end of epoch: validate, early-stop, write ----------------------------
            row = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["n"], 1),
                   "arcface": sums["arcface"] / max(sums["n"], 1), "triplet": sums["triplet"] / max(sums["n"], 1),
                   "lr": optimizer.param_groups[-1]["lr"], "val_map": float("nan"), "val_rank1": float("nan")}
            improved = False
            if is_main and len(val_idx) and ((epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs):
                eval_model = ema.module if ema is not None else model
                emb = compute_embeddings(eval_model, val_ds, device, batch_size=tc.p * tc.k,
                                         workers=cfg.data.workers, amp_dtype=device_info.amp_dtype)
                score = identity_balanced_map(emb @ emb.T, identities[val_idx])
                row["val_map"], row["val_rank1"] = score.map, score.rank1
                improved = stopper.update(score.map, epoch + 1)
            elif not len(val_idx):
                improved = True  # no validation: the newest model is the best we know
            row["elapsed_s"] = time.monotonic() - t_start
            history.append(row)
            epoch, next_batch = epoch + 1, 0
            sums = dict.fromkeys(sums, 0)
            if stopper.should_stop:
                status = "early_stopped"
            elif epoch >= tc.epochs:
                status = "finished"
            if is_main:
                if improved:
                    checkpoint(run_dir / BEST, status)
                checkpoint(run_dir / LAST, status)
                last_save = time.monotonic()
                _write_metrics(run_dir, history)
                print(_epoch_line(row, improved))
            if world > 1:
                dist.barrier()
        if status == "interrupted":
            checkpoint(run_dir / LAST, "running")
            if is_main:
                print(f"stopped cleanly at epoch {epoch}, batch {next_batch}; run again to resume")
    return TrainResult(run_dir, status, epoch, _best(stopper), history)


@dataclass
class FoldData:
    identities: np.ndarray  # identity of every training image
    paths: np.ndarray  # its prepared image
    train_idx: np.ndarray
    val_idx: np.ndarray
    classes: list[str]  # identities trained on; ArcFace class i is classes[i]
    train_labels: np.ndarray  # class index of each train_idx image


def _fold_data(cfg: Config, data_dir: str | Path, prepared_root: Path, progress: bool) -> FoldData:
    """Validate the competition folder, prepare its images, split off the fold."""
    comp = load_competition(data_dir, check_images=True)
    d = cfg.data
    prepared = prepare_images(list(comp.train["path"]), prepared_root, d.alpha_mode, d.crop_margin, d.prepared_size,
                              workers=d.workers, progress=progress)
    identities = comp.train["identity"].to_numpy()
    paths = np.array([str(prepared[name]) for name in comp.train["filename"]])
    if d.fold >= 0:
        folds = make_folds(identities, d.num_folds, d.seed, d.split)
        train_idx, val_idx = split_indices(folds, d.fold)
        if progress and folds.small_identities:
            print(f"note: {len(folds.small_identities)} identities have fewer images than folds: "
                  f"{', '.join(map(str, folds.small_identities[:8]))}")
    else:  # fold -1: every image trains, nothing validates (the final model for a submission)
        train_idx, val_idx = np.arange(len(identities)), np.array([], dtype=int)
    classes = sorted(set(identities[train_idx]))
    class_of = {c: i for i, c in enumerate(classes)}
    return FoldData(identities, paths, train_idx, val_idx, classes, np.array([class_of[i] for i in identities[train_idx]]))


def _best(stopper: EarlyStopping) -> float | None:
    return None if stopper.best == -math.inf else stopper.best


def _epoch_line(row: dict[str, float], improved: bool) -> str:
    val = "" if math.isnan(row["val_map"]) else f"  val mAP {row['val_map']:.4f}  rank-1 {row['val_rank1']:.4f}"
    return f"epoch {row['epoch']}: loss {row['train_loss']:.4f}{val}{'  *best*' if improved else ''}"


def _write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    df = pd.DataFrame(history)
    atomic_write_text(run_dir / "metrics.csv", df.to_csv(index=False))
    try:
        from ..viz import save_training_curves

        save_training_curves(df, run_dir / "curves.png")
    except ImportError as e:  # matplotlib missing: curves are a convenience, metrics.csv has the data
        print(f"note: no training-curve PNG ({e})")


def _default_resume_roots() -> list[Path]:
    from ..kaggle.env import input_root

    return [input_root()]


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

    Started as a subprocess because spawning from a notebook's ``__main__`` fails
    (facts.md). Returns torchrun's exit status.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "jaguar_kit.cli", "train", "--config", str(config_path), "--data", str(data_dir),
           "--out", str(run_dir), *(extra or [])]
    print(" ".join(cmd))
    return subprocess.call(cmd)



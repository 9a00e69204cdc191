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

Around the loop: the state and result types (``state``), the run folder's guards, resume
plan, schedule extension and metrics (``runs``), the GPU memory plan (``memory``), folds and DDP (``launch``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config
from ..data.dataset import ImageDataset, build_transform, loader_safe_opencv, sample_seed, worker_init
from ..data.encounters import train_encounters
from ..data.sampler import PKSampler
from ..device import DeviceInfo, select_device
from ..embed import compute_embeddings
from ..errors import JaguarKitError, plain_message
from ..files import RunLock, fault_point, remove_stale_temporaries
from ..kaggle.env import default_prepared_root, input_roots
from ..losses import ReIDCriterion
from ..metrics import bootstrap_interval, identity_balanced_map
from ..models import FrozenBackbone, build_model
from ..optim import build_optimizer, build_scheduler
from .checkpoint import (
    BEST,
    LAST,
    VAL_BY_IDENTITY,
    Checkpoint,
    NonFiniteWeights,
    copy_run,
    non_finite_tensors,
    read_checkpoint,
    save_checkpoint,
)
from .memory import apply_plan, plan_memory
from .runs import (
    ResumePlan,
    _fold_data,
    check_trainable,
    check_validation_split,
    extend_schedule,
    plan_resume,
    training_table,
    write_metrics,
)
from .state import EarlyStopping, TrainingDiverged, TrainModule, TrainResult, TrainState, run_result

CHECKPOINT_EVERY_S = 15 * 60  # a time-based `last.pt` between epochs, for hard kills


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
            write_metrics(run_dir, saved.history)
            print(f"this run is already {saved.status.replace('_', ' ')} after {saved.epoch} epochs "
                  f"(kept in {run_dir}); raise train.epochs to train longer")
        stopper = EarlyStopping(tc.patience, tc.min_delta)
        stopper.load_state_dict(saved.state["stopper"])
        return run_result(run_dir, saved.status, saved.epoch, stopper, saved.history)

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
        apply_plan(cfg, self.memory_plan)

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
            ema = ModelEmaV3(model, decay=tc.ema_decay)
        if saved is None:
            self.memory_plan = plan_memory(cfg, module, optimizer, len(data.classes), info, world,
                                           announce=self.is_main)
            apply_plan(cfg, self.memory_plan)

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
            extend_schedule(self.state, self.cfg, self.steps_per_epoch, self.warmup_steps, self.head_steps,
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
            write_metrics(self.run_dir, s.history)
            print(f"already {s.epoch} epochs done, train.epochs={self.cfg.train.epochs}: nothing more to train")
        return run_result(self.run_dir, s.status, s.epoch, s.stopper, s.history)

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
                    return run_result(self.run_dir, "interrupted", s.epoch, s.stopper, s.history, reason)
                self.end_epoch()
        return run_result(self.run_dir, s.status, s.epoch, s.stopper, s.history)

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
            write_metrics(self.run_dir, s.history)
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


def _val_text(row: dict[str, Any]) -> str:
    if math.isnan(row["val_map"]):
        return ""
    interval = f" (90% {row['val_map_lo']:.4f}-{row['val_map_hi']:.4f})" if "val_map_lo" in row else ""
    return f"  val mAP {row['val_map']:.4f}{interval}  rank-1 {row['val_rank1']:.4f}"


def _epoch_line(row: dict[str, Any], improved: bool) -> str:
    return f"epoch {row['epoch']}: loss {row['train_loss']:.4f}{_val_text(row)}{'  *best*' if improved else ''}"

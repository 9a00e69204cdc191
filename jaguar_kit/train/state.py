"""What a training run holds and returns: the module trained, its state, early stopping, the result.

:class:`TrainState` owns everything that changes while training (model, EMA, criterion,
optimiser, scheduler, grad scaler, early stopping, position, history and every RNG) behind
one symmetric ``state_dict`` / ``load_state_dict``: what a checkpoint saves and a resume restores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import JaguarKitError
from ..metrics import trailing_mean
from .checkpoint import BEST, capture_rng, fine_tuning_verdict, restore_rng

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


def run_result(run_dir: Path, status: str, epochs: int, stopper: EarlyStopping, history: list[dict[str, float]],
               stop_reason: str = "") -> TrainResult:
    frozen = next((r["val_map"] for r in history if r.get("epoch") == 0), None)
    best = None if stopper.best == -math.inf else stopper.best
    return TrainResult(run_dir, status, epochs, best, history, frozen, stop_reason, stopper.best_epoch)

"""Runs of runs: cross-validation folds one after another, and DDP on several processes."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

from ..config import Config
from .engine import train
from .state import TrainResult


def train_folds(cfg: Config, data_dir: str | Path, out_dir: str | Path, folds: list[int] | None = None,
                progress: bool = True) -> list[TrainResult]:
    """Cross-validation: folds one after another into ``out_dir/fold{k}``, each resumable.

    A finished fold is skipped on rerun (its checkpoint says so). All folds share one
    prepared-image cache.
    """
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "jaguar_kit.cli", "train", "--config", str(config_path), "--data", str(data_dir),
           "--out", str(run_dir), *(extra or [])]
    print(" ".join(cmd))
    return subprocess.call(cmd)

"""Checkpoints and run folders: verified atomic files, safe loads, RNG capture, one writer.

A checkpoint is a plain dict of tensors, numbers, strings and lists saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``: a file from an
attached dataset can never run code when it is loaded. ``torch.save`` writes a zip
archive whose members carry CRC-32s; every load checks them first, so a checkpoint with
flipped bytes is reported as corrupted instead of loading as different weights.

A run folder (``config.json``, ``metrics.csv``, ``curves.png``, ``last.pt``, ``best.pt``)
is one unit: resuming from an attached output brings all of it, and one process at a time
writes it (an OS lock on ``.lock``, present only while a run is writing).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..version import __version__
from ..config import Config, config_from_dict
from ..errors import JaguarKitError
from ..files import atomic_path, fault_point
from ..kaggle.env import find_files
from ..metrics import paired_difference
from ..models.backbones import frozen_source

LAST = "last.pt"
BEST = "best.pt"
RUN_FILES = ("config.json", "metrics.csv", "curves.png", BEST, LAST)  # copied in this order: last.pt last
WEIGHT_KEYS = ("model", "criterion", "ema")
CHECKPOINT_FORMAT = 2  # a checkpoint of another format is not resumed (its TrainState may differ)


@dataclass
class Checkpoint:
    """A training checkpoint: the run's metadata beside its ``TrainState.state_dict()``.

    ``to_dict`` and ``from_dict`` are written side by side over the same fields, and every
    reader goes through them: no key is written and never read, or read under another name.
    On disk it stays one flat dict (the metadata keys next to the state's), so files written
    before this type existed read the same.
    """

    config: dict[str, Any]  # the run's Config.to_dict()
    state: dict[str, Any]  # TrainState.state_dict(): weights, optimiser, progress, RNG
    classes: list[str] = field(default_factory=list)  # the ArcFace head's identities, in order
    memory_plan: dict[str, Any] = field(default_factory=dict)  # settings the GPU memory probe changed
    data: dict[str, Any] = field(default_factory=dict)  # the training table the run split (training_table)
    format: int = CHECKPOINT_FORMAT
    version: str = __version__

    _META = ("format", "version", "config", "classes", "memory_plan", "data")
    _DROPPED = ("fingerprint",)  # written until 0.2.0 and never read: the resume check compares the settings

    def to_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self._META}, **self.state}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Checkpoint":
        meta = {name: d[name] for name in cls._META if name in d}
        state = {k: v for k, v in d.items() if k not in cls._META and k not in cls._DROPPED}
        meta.setdefault("format", 0)  # a file without one predates the format numbers
        meta.setdefault("version", "?")
        return cls(state=state, **{"config": {}, **meta})

    @property
    def run_config(self) -> Config:
        """The run's settings as a :class:`Config`."""
        return config_from_dict(self.config)

    @property
    def status(self) -> str:
        return self.state["status"]

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def history(self) -> list[dict[str, float]]:
        return list(self.state.get("history", []))

    @property
    def best_map(self) -> float:
        """The best validation mAP the run reached (-inf before its first validation)."""
        return float(self.state["stopper"]["best"])

    @property
    def best_epoch(self) -> int:
        """The epoch whose model is ``best.pt``."""
        return int(self.state["stopper"]["best_epoch"])

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The model's weights: the EMA copy when the run kept one and ``use_ema``."""
        ema = self.state.get("ema")
        return ema if use_ema and ema is not None else self.state["model"]


class NonFiniteWeights(JaguarKitError):
    """Refused to write a checkpoint whose weights hold NaN or infinity."""


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point weights in ``state`` that hold NaN or infinity."""
    bad = []
    for key in WEIGHT_KEYS:
        for name, t in (state.get(key) or {}).items():
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                bad.append(f"{key}.{name}")
    return bad


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a kill at any instant leaves the previous file intact.

    Non-finite weights are never written: the previous file is kept and the caller told.
    """
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteWeights(f"{path}: not written: {len(bad)} weight tensors are not finite ({bad[0]}, ...); "
                             "the previous checkpoint is kept")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            fault_point("checkpoint-write")


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint's archive before unpickling anything: what it is, whether it is whole.

    Raises a one-line error saying which of "not a checkpoint", "truncated" or "corrupted".
    """
    path = Path(path)
    if not path.is_file():
        raise JaguarKitError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        what = "empty" if not magic else "not a zip archive"
        raise JaguarKitError(f"{path}: not a PyTorch checkpoint ({what}; torch.save writes a zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise JaguarKitError(f"{path}: truncated or damaged checkpoint (its zip directory is unreadable: {e})") from e
    if bad is not None:
        raise JaguarKitError(f"{path}: corrupted checkpoint ({bad} fails its CRC check); use another copy")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load a verified checkpoint without unpickling arbitrary objects; one-line errors otherwise.

    ``verify=False`` skips the CRC pass (which reads the whole file) for a quick look at
    the metadata of a file that is verified before it is used.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_file():
        raise JaguarKitError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=not verify)
    except pickle.UnpicklingError as e:
        raise JaguarKitError(
            f"{path}: refused: it holds Python objects other than tensors and plain data, and "
            "loading them could run code (jaguar_kit checkpoints never do)"
        ) from e
    except Exception as e:  # noqa: BLE001 - a damaged archive raises many types
        raise JaguarKitError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:160]})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise JaguarKitError(f"{path}: not a jaguar_kit checkpoint (no 'model' entry)")
    return state


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """:func:`load_checkpoint` as a :class:`Checkpoint`: what every reader of a run's checkpoint uses."""
    return Checkpoint.from_dict(load_checkpoint(path, map_location, verify))


def capture_rng() -> dict[str, Any]:
    """Every RNG the training loop touches, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def find_attached_runs(run_name: str, search_roots: list[Path]) -> list[Path]:
    """Run folders named ``run_name`` holding a ``last.pt`` under the input roots, newest first.

    On Kaggle the previous version's output is attached read-only under /kaggle/input;
    only a folder with the same name as this run's is a candidate, so the folds of a
    cross-validation never resume each other.
    """
    found = [p.parent for p in find_files(lambda name: name == LAST, roots=search_roots) if p.parent.name == run_name]
    return sorted(found, key=lambda d: (os.path.getmtime(d / LAST), str(d)), reverse=True)


def copy_run(src: Path, dst: Path) -> list[str]:
    """Copy a run folder's files into ``dst`` (each atomically, ``last.pt`` last); returns their names.

    A kill part-way leaves no ``last.pt``, so the next attempt copies again.
    """
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in RUN_FILES:
        if (src / name).is_file():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
            copied.append(name)
    return copied


VAL_BY_IDENTITY = "val_map_by_identity"  # a history row's per-identity validation mAP (sorted identities)


def fine_tuning_verdict(history: list[dict[str, Any]], best_epoch: int, best_map: float) -> tuple[bool, str]:
    """(keep the fine-tuned model, why): does the model of ``best_epoch`` beat the frozen backbone (epoch 0)?

    The rule: the fine-tuned model is kept only when it beats the frozen backbone beyond the
    noise of the validation identities: the paired bootstrap over identities of (fine-tuned
    minus frozen) per-identity mAP, on the same validation images, has its whole 90% interval
    above 0 (``metrics.paired_difference``). Otherwise the simpler model, the frozen
    backbone, stands. Without a frozen baseline (random initial weights) the fine-tuned
    model is all there is; a run recorded before per-identity scores compares ``best_map``
    with the frozen mean, as before.
    """
    rows = {int(r["epoch"]): r for r in history if "epoch" in r}
    frozen, tuned = rows.get(0), rows.get(best_epoch)
    if frozen is None:
        return True, "no frozen baseline to compare with"
    if tuned is None or VAL_BY_IDENTITY not in frozen or VAL_BY_IDENTITY not in tuned:
        keep = best_map > frozen["val_map"]
        return keep, (f"best validation mAP {best_map:.4f} {'beats' if keep else 'does not beat'} the frozen "
                      f"backbone's {frozen['val_map']:.4f} (a run without per-identity scores: means compared)")
    d = paired_difference(tuned[VAL_BY_IDENTITY], frozen[VAL_BY_IDENTITY])
    if d.clears_noise:
        return True, f"fine-tuning (epoch {best_epoch}) beats the frozen backbone by {d}"
    return False, (f"fine-tuning (epoch {best_epoch}) does not beat the frozen backbone beyond the noise: {d}, "
                   "which includes 0")


def model_source(checkpoint: str | Path) -> str:
    """What to embed with: the checkpoint, or ``frozen:BACKBONE`` when its run's fine-tuning did
    not beat the frozen backbone beyond the noise (:func:`fine_tuning_verdict`)."""
    ckpt = read_checkpoint(checkpoint, verify=False)
    keep, why = fine_tuning_verdict(ckpt.history, ckpt.best_epoch, ckpt.best_map)
    if keep:
        return str(checkpoint)
    model = ckpt.run_config.model
    lost = f"{checkpoint}: {why}"
    if model.init_from:  # that backbone came from another run: no frozen:NAME rebuilds it
        print(f"{lost}, which came from {model.init_from}; embedding with the checkpoint anyway")
        return str(checkpoint)
    print(f"{lost}; embedding with {frozen_source(model.backbone)} instead")
    return frozen_source(model.backbone)

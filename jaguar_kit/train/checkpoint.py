"""Checkpoints: atomic writes, safe loads, RNG capture, resume discovery.

A checkpoint is a plain dict of tensors, numbers, strings and lists saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``: a file from an
attached dataset can never run code when it is loaded.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import JaguarKitError
from ..files import atomic_path, fault_point

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a kill at any instant leaves the previous file intact."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            fault_point("checkpoint-write")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise JaguarKitError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaguarKitError(
            f"{path}: refused to load: the file holds pickled objects beyond tensors and plain "
            f"data (possibly code), which is never executed ({first[:160]})"
        ) from e
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise JaguarKitError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:160]})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise JaguarKitError(f"{path}: not a jaguar_kit checkpoint (no 'model' entry)")
    return state


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


def find_resume_checkpoint(run_dir: Path, fingerprint: str, search_roots: list[Path]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start.

    The run folder is looked at first; it must hold the same config (a different one is an
    error, never resumed silently). Then attached inputs (e.g. the previous kernel
    version's output under /kaggle/input) are searched for the newest ``last.pt`` with the
    same fingerprint, which is copied into the run folder.
    """
    own = run_dir / LAST
    if own.is_file():
        meta = load_checkpoint(own)
        if meta.get("fingerprint") != fingerprint:
            raise JaguarKitError(
                f"{own}: made with another config (fingerprint {meta.get('fingerprint')} != "
                f"{fingerprint}); use another --out, or --set train.resume=never to start over"
            )
        return own
    candidates = []
    for root in search_roots:
        if not root.is_dir():
            continue
        for path in root.rglob(LAST):
            try:
                meta = load_checkpoint(path)
            except JaguarKitError:
                continue
            if meta.get("fingerprint") == fingerprint:
                candidates.append(path)
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: (os.path.getmtime(p), str(p)))
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(own) as tmp:
        shutil.copyfile(newest, tmp)
    print(f"resuming from {newest} (copied to {own})")
    return own


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns ``(model, config)``. The backbone is built without pretrained weights (the
    checkpoint carries them), so nothing is fetched.
    """
    from ..config import config_from_dict
    from ..models import build_model

    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    cfg.model.weights = "none"
    cfg.model.init_from = ""
    model = build_model(cfg.model)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg

"""The resumable chunk caches' files: what embeddings and local features share.

A chunk is a compressed ``.npz`` holding its arrays, the names of its images and a
fingerprint of everything it was computed from, written atomically. It is read back only
if it is complete, intact and made for exactly this input: anything else (a torn file,
another fingerprint, other names, a missing array) reads as ``None`` and is recomputed
(:func:`jaguar_kit.files.load_npz` reads the file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import JaguarKitError
from .files import atomic_path, fault_point, load_npz

log = logging.getLogger(__name__)


def chunk_fingerprint(base: str, names: Sequence[str], contents: Sequence[str] = ()) -> str:
    """What a chunk was made from: settings and weights (``base``), names, image digests."""
    return hashlib.sha256(json.dumps([base, list(names), list(contents)]).encode()).hexdigest()[:24]


def save_chunk(path: Path, fingerprint: str, names: Sequence[str], fault: str, **arrays: np.ndarray) -> None:
    """Write a chunk atomically (``fault`` names the test kill point inside the write)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, names=np.array(list(names)), fingerprint=np.array(fingerprint), **arrays)
            fault_point(fault)


def load_chunk(path: Path, fingerprint: str, names: Sequence[str], fields: Sequence[str],
               what: str) -> dict[str, np.ndarray] | None:
    """The chunk's ``fields`` if the file is complete and made for exactly this input, else None.

    No file is a chunk not computed yet; a damaged one (``what`` names it) is said in a warning.
    """
    if not path.exists():
        return None
    try:
        z = load_npz(path, ("fingerprint", "names", *fields), what)
    except JaguarKitError as e:
        log.warning("%s; computing it again", e)
        return None
    if str(z["fingerprint"]) != fingerprint or list(z["names"]) != list(names):
        return None
    return {name: z[name] for name in fields}


__all__ = ["chunk_fingerprint", "load_chunk", "save_chunk"]

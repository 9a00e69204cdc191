"""Encounters: the photos one pass of an animal in front of a camera gave (a burst, both flanks).

Photos of one encounter share background, light and pose, so a validation image whose
encounter-mate is in training is matched by its scene as much as by its coat: random
folds overstate the test (facts.md). Folds therefore never split an encounter
(``folds.make_folds(groups=...)``).

Where train.csv names no encounter (:data:`competition.ENCOUNTER_COLUMNS`), it is inferred,
within each identity, first from the photos' EXIF (:func:`photo_clock`):

    photos with a DateTimeOriginal, taken by the same camera (Make, Model and body serial
    number, where present; a photo that names none of them counts as one unnamed camera),
    are one encounter while each follows the one before it by at most ``gap_s`` seconds
    (:data:`EXIF_GAP_S`, 60 s: a burst and the pass it belongs to, not the next visit);

then, for the photos without an EXIF time, as near-duplicate groups, the scheme the best
documented jaguar validation used (facts.md):

    two photos of the same identity whose perceptual hashes (:func:`image_hash`) differ in
    at most ``NEAR_DUPLICATE_BITS`` of their 256 bits are of one encounter, and encounters
    are the connected components of that relation.

The hash is a difference hash of the whole photo (background included: the background is
what an encounter shares) in grey at 17 x 16 pixels: cheap, deterministic and torch-free.
On the synthetic encounters photos of one encounter differ in 34 bits (median; 90%: 55),
photos of other encounters of the same identity in 99 or more, unrelated photos in about
half (128).

Decoding a full 3000 x 2000 PNG costs ~0.2-0.5 s, so hashes are computed on threads (OpenCV
releases the GIL) and kept in ``encounter_hashes.json`` in the prepared-image cache, keyed by
each file's path, size and modification time: training and inference hash a photo once.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
from PIL import ExifTags, Image, UnidentifiedImageError

from ..files import atomic_write_text
from ..kaggle.env import default_prepared_root
from .images import decode_image

HASH_CACHE = "encounter_hashes.json"

HASH_SIZE = 16  # a 16 x 16 grid of horizontal differences: 256 bits
NEAR_DUPLICATE_BITS = 64  # at most this many differing bits (of 256, a quarter): one encounter
EXIF_GAP_S = 60.0  # one camera's photos of one identity at most this many seconds apart: one encounter
_EXIF_TIME = "%Y:%m:%d %H:%M:%S"
_EPOCH = datetime(1970, 1, 1)


def photo_clock(path: str | Path) -> tuple[float | None, str]:
    """(EXIF DateTimeOriginal as seconds, the camera: "Make|Model|serial"); (None, "") without a readable time.

    Only the header is read. A PNG's EXIF counts when its eXIf chunk comes before the pixels (after
    them, reading it would decode the whole frame).
    """
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
            else:
                exif = im.getexif()
            sub = exif.get_ifd(ExifTags.IFD.Exif)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):  # PIL's errors for unreadable headers
        return None, ""
    stamp = sub.get(ExifTags.Base.DateTimeOriginal)
    try:  # the camera's wall clock, no time zone: read as UTC (only differences matter)
        taken = datetime.strptime(str(stamp).strip("\x00 "), _EXIF_TIME) if stamp else None
    except ValueError:  # "0000:00:00 00:00:00" and other cameras' placeholders: no time
        taken = None
    if taken is None:
        return None, ""
    names = (exif.get(ExifTags.Base.Make), exif.get(ExifTags.Base.Model), sub.get(ExifTags.Base.BodySerialNumber))
    return (taken - _EPOCH).total_seconds(), "|".join("" if v is None else str(v).strip("\x00 ") for v in names)


def time_groups(seconds: Sequence[float], cameras: Sequence[str], gap_s: float = EXIF_GAP_S) -> np.ndarray:
    """Encounters of photos by clock: per camera, time-sorted photos at most ``gap_s`` apart chain into one."""
    t = np.asarray(seconds, dtype=np.float64)
    cams = np.asarray([str(c) for c in cameras])
    out = np.empty(len(t), dtype=np.int64)
    label = 0
    for cam in np.unique(cams):
        rows = np.flatnonzero(cams == cam)
        rows = rows[np.argsort(t[rows], kind="stable")]
        breaks = np.concatenate([[True], np.diff(t[rows]) > gap_s])
        out[rows] = label + np.cumsum(breaks) - 1
        label += int(breaks.sum())
    return out


def image_hash(path: str | Path) -> np.ndarray:
    """The photo's difference hash: 256 booleans, True where a pixel is brighter than its right neighbour."""
    rgb, _ = decode_image(path)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (HASH_SIZE + 1, HASH_SIZE), interpolation=cv2.INTER_AREA).astype(np.int16)
    return (small[:, 1:] > small[:, :-1]).ravel()


def image_hashes(paths: Sequence[str | Path], cache: Path | None = None) -> np.ndarray:
    """:func:`image_hash` of each path, (N, 256) booleans, through the cache file ``cache`` (None: none)."""
    def key(p: str | Path) -> str:
        st = os.stat(p)
        return f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}"

    keys = [key(p) for p in paths]
    known: dict[str, str] = {}
    if cache is not None and cache.is_file():
        try:
            known = dict(json.loads(cache.read_text()))
        except (OSError, ValueError, TypeError):
            known = {}  # a damaged cache is rebuilt
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for i, h in zip(todo, pool.map(image_hash, [paths[i] for i in todo])):
                known[keys[i]] = np.packbits(h).tobytes().hex()
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache, json.dumps(known))
            except OSError:
                pass  # a cache that cannot be written only costs time
    bits = [np.unpackbits(np.frombuffer(bytes.fromhex(known[k]), np.uint8)).astype(bool) for k in keys]
    return np.stack(bits) if bits else np.zeros((0, HASH_SIZE**2), bool)


def near_duplicate_groups(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Connected components of "hashes differ in at most ``max_bits`` bits": a component index per row."""
    h = np.asarray(hashes, dtype=bool)
    n = len(h)
    close = (h[:, None, :] != h[None, :, :]).sum(axis=2) <= max_bits
    component = np.full(n, -1, dtype=np.int64)
    for start in range(n):
        if component[start] >= 0:
            continue
        label, frontier = component.max() + 1, [start]
        component[start] = label
        while frontier:
            reach = np.flatnonzero(close[frontier].any(axis=0) & (component < 0))
            component[reach] = label
            frontier = list(reach)
    return component


def infer_encounters(identities: Sequence[str], paths: Sequence[str | Path],
                     max_bits: int = NEAR_DUPLICATE_BITS, cache: Path | None = None,
                     gap_s: float = EXIF_GAP_S) -> np.ndarray:
    """Each photo's inferred encounter within its identity: by EXIF time and camera where a photo has
    them, else by near-duplicate hashes (module docstring). Names start with ``~``; the two kinds never meet."""
    ids = np.asarray([str(i) for i in identities])
    paths = list(paths)
    clocks = [photo_clock(p) for p in paths]
    timed = np.array([t is not None for t, _ in clocks], dtype=bool)
    untimed = np.flatnonzero(~timed)
    hashes = np.zeros((len(ids), HASH_SIZE**2), bool)
    if len(untimed):
        hashes[untimed] = image_hashes([paths[i] for i in untimed], cache)
    out = np.empty(len(ids), dtype=object)
    for identity in np.unique(ids):
        rows = np.flatnonzero((ids == identity) & timed)
        if len(rows):
            groups = time_groups([clocks[i][0] for i in rows], [clocks[i][1] for i in rows], gap_s)
            out[rows] = [f"~{identity}~exif{c}" for c in groups]
        rows = np.flatnonzero((ids == identity) & ~timed)
        if len(rows):
            out[rows] = [f"~{identity}~{c}" for c in near_duplicate_groups(hashes[rows], max_bits)]
    return out


def train_encounters(train: pd.DataFrame, cache: Path | None = None) -> np.ndarray:
    """Each training photo's encounter: train.csv's where given, inferred for the others.

    ``train`` is ``Competition.train`` (identity, path, encounter). Photos with an empty
    encounter cell are grouped among themselves by :func:`infer_encounters`; inferred names
    start with ``~`` so they never meet a given one. ``cache``: the hash cache file
    (None: :data:`HASH_CACHE` in the prepared-image cache).
    """
    given = train["encounter"].astype(str).to_numpy() if "encounter" in train else np.full(len(train), "")
    out = given.astype(object)
    missing = np.flatnonzero(given == "")
    if len(missing):
        out[missing] = infer_encounters(train["identity"].to_numpy()[missing], train["path"].to_numpy()[missing],
                                        cache=cache if cache is not None else default_prepared_root() / HASH_CACHE)
    return out


__all__ = ["HASH_SIZE", "NEAR_DUPLICATE_BITS", "EXIF_GAP_S", "HASH_CACHE", "image_hash", "image_hashes",
           "near_duplicate_groups", "photo_clock", "time_groups", "infer_encounters", "train_encounters"]

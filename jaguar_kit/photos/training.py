"""Fine-tune on your own labelled photos, with the competition's training engine.

``jaguar-kit train --photos SOURCE --out RUN`` takes a folder with a sub-folder per individual,
a CSV ``path,identity[,x,y,w,h][,encounter]`` or a catalogue folder (its photos under their
reviewed individuals) and writes them into the run folder as a competition-shaped folder::

    RUN/photos_data/train.csv             filename,ground_truth[,encounter], sorted by filename
    RUN/photos_data/train/<content key>   each photo, cut to its box

so that the one training engine (:func:`jaguar_kit.train.engine.train`) trains on it with
every guard it has: the validation split by individual and encounter, the frozen-backbone
baseline at epoch 0, resume after a kill (the same command again), the run lock, the time
budget. Files are named by content (the photo's digest plus its box, never an individual's
name) and written atomically: a rerun reuses them, and a changed photo set changes
``train.csv``, which the engine's resume check names. Rows are sorted by filename, so the
split does not depend on the order the photos were listed in.

A photo without a box is hard-linked (copied where a link is refused); a boxed one is cut
out (JPEG quality 95 for a JPEG, PNG otherwise, which keeps an alpha mask).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from ..data.images import cut_box, decode_image
from ..data.prepare import JPEG_QUALITY
from ..errors import JaguarKitError
from ..files import RunLock, atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from ..processes import run_tasks
from .catalogue import NPZ, catalogue_photos, load_catalogue
from .inputs import Photo, mark_kit_folder, photo_digest, photo_key, read_photos

if TYPE_CHECKING:
    from ..train.engine import TrainResult

DATA_DIR = "photos_data"
MIN_INDIVIDUALS = 2  # with at least MIN_PHOTOS photos each: a same-individual pair to learn from and validate on
MIN_PHOTOS = 2


def training_photos(source: str | Path, exclude: Sequence[str | Path] = ()) -> list[Photo]:
    """The labelled photos of ``source``: a catalogue folder's, else :func:`read_photos`' (every photo named)."""
    source = Path(source)
    if source.is_dir() and (source / NPZ).is_file():
        return catalogue_photos(load_catalogue(source))
    return read_photos(source, need_identity=True, exclude=exclude)


def check_enough(photos: Sequence[Photo], source: str | Path) -> None:
    """Refuse, in one line, a photo set too small to train on (saying what is needed)."""
    counts: dict[str, int] = {}
    for p in photos:
        counts[p.identity] = counts.get(p.identity, 0) + 1
    enough = [i for i, n in counts.items() if n >= MIN_PHOTOS]
    if len(enough) < MIN_INDIVIDUALS:
        raise JaguarKitError(
            f"{source}: {len(photos)} photo(s) of {len(counts)} individual(s), {len(enough)} of them with "
            f"{MIN_PHOTOS} or more photos; training needs at least {MIN_INDIVIDUALS} individuals with at least "
            f"{MIN_PHOTOS} photos each (more individuals and photos per individual train a better model)")


def _file_name(photo: Photo, key: str) -> str:
    suffix = photo.path.suffix.lower()
    if photo.box is None:
        return key + suffix  # the file itself: its format keeps its extension
    return key + (".jpg" if suffix in (".jpg", ".jpeg") else ".png")


def _write_one(task: tuple[str, tuple[int, int, int, int] | None, str, str]) -> str | None:
    """Place one photo (linked, copied or cut to its box) at ``dst``; the problem in one line, or None."""
    src, box, dst, where = task
    try:
        if box is None:
            try:
                os.link(src, dst)  # atomic: the name appears with the whole file
            except OSError:  # another file system, or links refused: a copy
                atomic_write_bytes(dst, Path(src).read_bytes())
            return None
        rgb, mask = cut_box(*decode_image(src), box, where)
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        if dst.endswith(".jpg"):
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        else:
            ok, buf = cv2.imencode(".png", bgr if mask is None else np.dstack([bgr, mask]))
        if not ok:
            return f"{where}: OpenCV could not encode the cut-out photo"
        atomic_write_bytes(dst, buf.tobytes())
        return None
    except JaguarKitError as e:
        return str(e) if where in str(e) else f"{where}: {e}"
    except OSError as e:
        return f"{where}: {src}: {e.strerror or e}"


def write_training_folder(photos: Sequence[Photo], folder: str | Path, workers: int = 0,
                          progress: bool = True) -> Path:
    """Write ``photos`` as a competition-shaped folder (see the module docstring); returns it.

    The same photo listed twice under one individual is one row; under two individuals it
    is refused (which is it?), naming both.
    """
    folder = mark_kit_folder(folder)  # never read back as photos
    images = folder / "train"
    images.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(images)
    digests: dict[Path, str] = {}
    rows: dict[str, Photo] = {}  # file name -> photo
    for p in tqdm(photos, desc="content keys", unit="photo", disable=not progress or len(photos) < 200, leave=False):
        if p.path not in digests:
            digests[p.path] = photo_digest(p.path)
        name = _file_name(p, photo_key(p, digests[p.path]))
        first = rows.setdefault(name, p)
        if first.identity != p.identity:
            raise JaguarKitError(f"{p.origin}: the same photo is listed as {first.identity!r} and, at "
                                 f"{first.origin}, as {p.identity!r}; give each photo one individual")
    todo = [(str(p.path), p.box, str(images / name), p.origin) for name, p in rows.items()
            if not (images / name).is_file()]
    problems = []
    bar = tqdm(total=len(todo), desc="photos for training", unit="photo", disable=not progress or not todo)
    for err in run_tasks(_write_one, todo, workers, ordered=False, min_tasks=8):
        if err:
            problems.append(err)
        bar.update()
    bar.close()
    if problems:
        raise JaguarKitError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    for stale in set(os.listdir(images)) - set(rows):  # a photo no longer listed (or relabelled away)
        if not stale.startswith("."):
            (images / stale).unlink(missing_ok=True)
    encounters = any(p.encounter for p in rows.values())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["filename", "ground_truth"] + (["encounter"] if encounters else []))
    for name in sorted(rows):
        p = rows[name]
        writer.writerow([name, p.identity] + ([p.encounter or ""] if encounters else []))
    if not (folder / "train.csv").is_file() or (folder / "train.csv").read_text(encoding="utf-8") != text.getvalue():
        atomic_write_text(folder / "train.csv", text.getvalue())
    return folder


@contextmanager
def photos_as_competition(source: str | Path | Sequence[Photo], run_dir: str | Path, workers: int = 0,
                          progress: bool = True) -> Iterator[Path]:
    """``RUN/photos_data`` written from labelled photos (or those of ``source``, see
    :func:`training_photos`), held for this process while the caller trains on it (a second
    ``train --photos`` into the same run is refused)."""
    run_dir = Path(run_dir)
    photos = training_photos(source, exclude=[run_dir]) if isinstance(source, (str, Path)) else list(source)
    check_enough(photos, source if isinstance(source, (str, Path)) else "photos")
    folder = run_dir / DATA_DIR
    with RunLock(folder, purpose="another `train --photos` trains on this run's photos"):
        yield write_training_folder(photos, folder, workers=workers, progress=progress)


def train_on_photos(cfg: Config, source: str | Path, run_dir: str | Path, prepared_root: str | Path | None = None,
                    progress: bool = True) -> TrainResult:
    """Train (or resume) a re-ID model on labelled photos (see the module docstring); ``run_dir/best.pt``
    then indexes them: ``jaguar-kit index --photos SOURCE --model RUN/best.pt --out CATALOGUE``."""
    from ..train.engine import train  # torch: loaded once the photos are found good (bad ones fail fast)

    with photos_as_competition(source, run_dir, workers=cfg.data.workers, progress=progress) as data:
        return train(cfg, data, run_dir, prepared_root=prepared_root, progress=progress)


__all__ = ["DATA_DIR", "check_enough", "photos_as_competition", "train_on_photos", "training_photos",
           "write_training_folder"]

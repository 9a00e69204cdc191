"""An ecologist's own photos: a folder per individual, a CSV with boxes, or a competition folder.

What :func:`read_photos` accepts:

- a folder with one sub-folder per individual (``photos/Dajun/2023/IMG_0001.JPG``: the first
  folder level names the individual; deeper folders are allowed). Photos lying directly in
  the folder have no individual (fine for ``identify`` and ``cluster``, refused by ``index``).
- a CSV with ``path,identity`` and optional ``x,y,w,h`` (a box in pixels of the photo as it is
  displayed, EXIF orientation applied) to cut one animal out of a whole camera-trap frame.
  Paths are relative to the CSV's folder (sub-folders allowed) or absolute; a frame with two
  animals is two rows. ``identity`` may be empty for unlabelled photos.
- a competition folder (``train.csv`` with ``filename,ground_truth``): its train images.

- a single photo (``--photos IMG_0001.JPG``): that photo, unlabelled.

Whole frames with MegaDetector's boxes are cut into one photo per animal by
:func:`jaguar_kit.photos.detections.read_detections`, from the photos read here.

Photos are JPEG, PNG, TIFF, BMP, WebP or JPEG 2000 (:data:`IMAGE_EXTENSIONS`), of any size,
with or without an alpha mask; other files in a folder are listed in one line. Every problem
is reported as one line naming the file, the CSV line and what is wrong. Identities are
normalised (:func:`~jaguar_kit.photos.names.normalise_name`); two spellings that become one
name are named in a warning.

A folder is walked by the one input walker's policy (:func:`jaguar_kit.kaggle.env.walk_inputs`):
links are followed, each real folder is read once (at its shallowest path, so a link loop
neither repeats photos nor moves them to another individual), hidden entries are skipped.
Folders the kit wrote (catalogues, caches, outputs: :func:`mark_kit_folder`) are never read
as photos.

:func:`prepare_photos` then decodes each photo once into a small JPEG keyed by the *content*
(a digest of the file's bytes, plus the box): a renamed or moved photo is not prepared or
embedded again, and a changed one is. The cache folder follows the prepared-image cache's
conventions (:func:`jaguar_kit.data.prepare.prepared_dir`: one folder per setting), in a
``by-content`` sub-folder, written atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..data.competition import ENCOUNTER_COLUMNS, load_competition
from ..data.images import IMAGE_EXTENSIONS, decode_image
from ..data.prepare import load_prepared, prepared_dir, prepared_jpeg, resize_longest
from ..errors import JaguarKitError
from ..files import atomic_write_bytes, atomic_write_text, file_digest
from ..kaggle.env import walk_inputs
from ..processes import run_tasks
from .names import few, normalise_name

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "filename", "file", "image")
IDENTITY_COLUMNS = ("identity", "ground_truth", "individual", "id", "name")
BOX_COLUMNS = ("x", "y", "w", "h")
CONTENT_DIR = "by-content"
THUMB_SIZE = 160
KIT_MARKER = ".jaguar-kit"  # in every folder the kit writes: never read as photos
PHOTO_DEPTH = 32  # folder levels below a photo folder that are read
_FORMATS_TEXT = ", ".join(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Photo:
    """One photo (or one boxed animal in a photo) to index, identify or cluster.

    ``name`` is how people see it (the path relative to the folder or CSV given);
    ``origin`` is where it was listed (``photos.csv line 4``) for error messages.
    """

    path: Path
    identity: str | None = None
    box: tuple[int, int, int, int] | None = None  # x, y, w, h in pixels
    name: str = ""
    origin: str = ""
    encounter: str | None = None  # the pass in front of a camera it was taken on (CSV column), if given

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.path.name)
        if not self.origin:
            object.__setattr__(self, "origin", str(self.path))

    @property
    def label(self) -> str:
        """The name, with the box when there is one (one frame may hold several animals)."""
        return self.name if self.box is None else f"{self.name} [{','.join(map(str, self.box))}]"


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def mark_kit_folder(folder: str | Path) -> Path:
    """Mark ``folder`` (created if needed) as written by the kit, so no reader takes it for photos.

    Every catalogue, cache and output folder gets the marker: an output placed inside the
    photo folder is not read back as photos on the next run.
    """
    folder = Path(folder)
    if not (folder / KIT_MARKER).is_file():
        atomic_write_text(folder / KIT_MARKER, "Written by jaguar-kit: this folder is never read as photos.\n")
    return folder


def is_kit_folder(folder: str | Path) -> bool:
    """True if the kit wrote ``folder`` (see :func:`mark_kit_folder`)."""
    return (Path(folder) / KIT_MARKER).is_file()


def _raise_problems(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise JaguarKitError(problems[0] + more)


def read_photos(source: str | Path, folder_labels: bool = True, need_identity: bool = False,
                exclude: Sequence[str | Path] = ()) -> list[Photo]:
    """The photos a folder, a CSV, a competition folder or one photo file is (see the module docstring).

    ``folder_labels``: a folder's first level names the individual (else every photo in it is
    unlabelled, whatever its sub-folder, e.g. camera stations). ``need_identity``: every photo
    must have an individual (for building a catalogue). ``exclude``: folders never read (the
    run's output folder, also before it carries the kit's marker).
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() == ".csv":
            photos = _read_csv(source)
        elif _is_image(source):
            photos = [Photo(source, None, None, source.name, str(source))]
        else:
            raise JaguarKitError(f"{source}: neither a photo ({_FORMATS_TEXT}) nor a .csv with path,identity")
    elif source.is_dir():
        if is_kit_folder(source):
            raise JaguarKitError(f"{source}: a folder jaguar-kit wrote (a catalogue, cache or output: it holds "
                                 f"{KIT_MARKER}), not photos; give the folder of your photos")
        excluded = {os.path.realpath(e) for e in exclude}
        if os.path.realpath(source) in excluded:
            raise JaguarKitError(f"{source}: is this run's output folder; give the folder of your photos")
        if (source / "train.csv").is_file():  # a competition folder: its train images
            photos = _read_competition(source)
        else:
            photos = _read_folder(source, folder_labels, excluded)
    else:
        raise JaguarKitError(f"{source}: not found (expected a folder of photos, a CSV with path,identity, or a photo)")
    if need_identity:
        bad = [p for p in photos if p.identity is None]
        if bad:
            where = ("no individual (it lies directly in the folder)" if source.is_dir() else
                     "an empty identity" if source.suffix.lower() == ".csv" else "no individual (a single photo)")
            raise JaguarKitError(
                f"{bad[0].origin}: {where}; a catalogue and training need every photo's individual: put photos in a "
                f"sub-folder named after the individual, or fill the identity column"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )
    return photos


def _read_folder(root: Path, folder_labels: bool, excluded: set[str] = frozenset()) -> list[Photo]:
    photos: list[Photo] = []
    skipped: list[str] = []  # files that are not photos
    kit: list[str] = []  # folders the kit wrote
    too_deep: list[str] = []
    broken: list[str] = []  # links to nothing, unreadable entries
    spellings: dict[str, set[str]] = {}
    for folder in walk_inputs([root], PHOTO_DEPTH):
        rel_dir = folder.path.relative_to(root)
        if folder.depth and (is_kit_folder(folder.path) or os.path.realpath(folder.path) in excluded):
            kit.append(rel_dir.as_posix())
            folder.dirs.clear()
            continue
        if folder.depth == PHOTO_DEPTH and folder.dirs:
            too_deep.append(rel_dir.as_posix())
        broken.extend((rel_dir / b).as_posix() for b in folder.broken)
        for f in folder.files:
            rel = rel_dir / f
            if not _is_image(rel):
                skipped.append(rel.as_posix())
                continue
            identity = None
            if folder_labels and len(rel.parts) > 1:
                identity = normalise_name(rel.parts[0]) or None
                spellings.setdefault(identity, set()).add(rel.parts[0])
            photos.append(Photo(folder.path / f, identity, None, rel.as_posix(), str(folder.path / f)))
    if kit:
        log.warning("%s: %d folder(s) written by jaguar-kit (catalogues, caches, outputs) are not read as photos: %s",
                    root, len(kit), few(kit))
    if skipped:
        log.warning("%s: %d file(s) skipped, not a photo format read here (%s): %s", root, len(skipped),
                    _FORMATS_TEXT, few(skipped))
    if broken:
        log.warning("%s: %d entr%s skipped, a link to nothing or not a readable file: %s", root, len(broken),
                    "y" if len(broken) == 1 else "ies", few(broken))
    if too_deep:
        log.warning("%s: folders more than %d levels down are not read: below %s", root, PHOTO_DEPTH, few(too_deep))
    if not photos:
        raise JaguarKitError(f"{root}: no photos found in it or its sub-folders ({_FORMATS_TEXT})")
    _warn_merged_names(spellings, root)
    return sorted(photos, key=lambda p: p.name)


def _warn_merged_names(spellings: dict[str, set[str]], where: Path) -> None:
    """One line naming every identity that was spelled more than one way in the input."""
    merged = {name: sorted(raw) for name, raw in spellings.items() if len(raw) > 1}
    if merged:
        listed = "; ".join(f"{name!r} from {' and '.join(map(ascii, raw))}" for name, raw in sorted(merged.items()))
        log.warning("%s: %d individual name(s) spelled in more than one way are taken as one each (Unicode "
                    "normalised, spaces trimmed): %s", where, len(merged), listed)


def _read_competition(root: Path) -> list[Photo]:
    comp = load_competition(root, check_images=False)
    return [
        Photo(Path(p), normalise_name(str(i)), None, str(f), f"{root / 'train.csv'} ({f})", str(e) or None)
        for f, i, p, e in zip(comp.train["filename"], comp.train["identity"], comp.train["path"], comp.train["encounter"])
    ]


def _pick(header: list[str], names: Sequence[str]) -> str | None:
    lower = {h.lower(): h for h in header}
    return next((lower[n] for n in names if n in lower), None)


def _read_csv(path: Path) -> list[Photo]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise JaguarKitError(f"{path}: cannot read as a UTF-8 CSV ({e})") from e
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    photos: list[Photo] = []
    problems: list[str] = []
    spellings: dict[str, set[str]] = {}
    try:
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [h.strip() for h in row]
                path_col = _pick(header, PATH_COLUMNS)
                id_col = _pick(header, IDENTITY_COLUMNS)
                box_cols = [_pick(header, (c,)) for c in BOX_COLUMNS]
                encounter_col = _pick(header, ENCOUNTER_COLUMNS)
                if path_col is None:
                    hint = " - wrong delimiter? expected ','" if len(header) == 1 and (";" in row[0] or "\t" in row[0]) else ""
                    raise JaguarKitError(
                        f"{path}: line {line}: no path column (expected path,identity[,x,y,w,h]); "
                        f"columns found: {', '.join(map(repr, header))}{hint}"
                    )
                if any(box_cols) and not all(box_cols):
                    missing = [c for c, b in zip(BOX_COLUMNS, box_cols) if b is None]
                    raise JaguarKitError(f"{path}: line {line}: box columns need all of x,y,w,h; missing {','.join(missing)}")
                col = {h: i for i, h in enumerate(header)}
                continue
            where = f"{path} line {line}"
            if len(row) != len(header):
                problems.append(f"{where}: {len(row)} fields, but the header has {len(header)}")
                continue
            def cell(name: str | None, row: list[str] = row) -> str:
                return row[col[name]].strip() if name else ""

            rel = cell(path_col)
            if not rel:
                problems.append(f"{where}: empty path")
                continue
            file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
            if not file.is_file():
                problems.append(f"{where}: {rel}: file not found (paths are relative to the CSV's folder {path.parent})")
                continue
            if not _is_image(file):
                problems.append(f"{where}: {rel}: not a {_FORMATS_TEXT} file")
                continue
            box = None
            if all(box_cols):
                values = [cell(c) for c in box_cols]
                if any(values):
                    try:
                        nums = [float(v) for v in values]
                        if not all(np.isfinite(nums)):
                            raise ValueError
                    except ValueError:
                        problems.append(f"{where}: box x,y,w,h = {','.join(values)}: expected four numbers (pixels)")
                        continue
                    x, y, w, h = (round(v) for v in nums)
                    if w <= 0 or h <= 0 or x < 0 or y < 0:
                        problems.append(f"{where}: box x,y,w,h = {','.join(values)}: needs x,y >= 0 and w,h > 0")
                        continue
                    box = (x, y, w, h)
            raw = row[col[id_col]] if id_col else ""
            identity = normalise_name(raw) or None
            if identity:
                spellings.setdefault(identity, set()).add(raw)
            photos.append(Photo(file, identity, box, rel, where, cell(encounter_col) or None))
    except csv.Error as e:
        raise JaguarKitError(f"{path}: line {reader.line_num}: cannot parse CSV ({e})") from e
    if header is None:
        raise JaguarKitError(f"{path}: empty CSV (expected a header path,identity[,x,y,w,h])")
    _raise_problems(problems)
    if not photos:
        raise JaguarKitError(f"{path}: no data rows")
    _warn_merged_names(spellings, path)
    return photos


# --- content keys and the prepared cache ---------------------------------------------------


def photo_digest(path: str | Path) -> str:
    """A digest of the file's bytes (what a photo *is*, wherever it lies and whatever its name)."""
    return file_digest(path, 32, "photo")


def photo_key(photo: Photo, digest: str | None = None) -> str:
    """The content key of a photo: its bytes' digest, plus the box if any."""
    digest = digest or photo_digest(photo.path)
    return digest if photo.box is None else f"{digest}-{'-'.join(map(str, photo.box))}"


def key_digest(key: str) -> str:
    """The file digest a content key (:func:`photo_key`) starts with."""
    return key.split("-", 1)[0]


def prepare_one_photo(src: Path, box, dst: Path, alpha_mode: str, margin: float, size: int, where: str) -> None:
    """Decode one photo and store it prepared (:func:`~jaguar_kit.data.prepare.prepared_jpeg`), atomically."""
    atomic_write_bytes(dst, prepared_jpeg(*decode_image(src), alpha_mode, margin, size, where, box))


def _work(task) -> str | None:
    src, box, dst, mode, margin, size, where = task
    try:
        prepare_one_photo(Path(src), box, Path(dst), mode, margin, size, where)
        return None
    except JaguarKitError as e:
        msg = str(e)
        return msg if msg.startswith(where) or where in msg else f"{where}: {msg}"
    except Exception as e:  # noqa: BLE001 - reported per photo, with where it was listed
        return f"{where}: {src}: {type(e).__name__}: {e}"


def prepare_photos(
    photos: Sequence[Photo],
    cache_root: str | Path,
    alpha_mode: str = "crop",
    margin: float = 0.05,
    size: int = 768,
    workers: int = 0,
    progress: bool = True,
) -> tuple[list[str], list[Path]]:
    """Content keys and prepared JPEGs of ``photos`` (decoded once; a rerun skips finished ones).

    Problems (unreadable photos, boxes outside the photo) are all collected and raised as one
    line naming the first; the photos prepared meanwhile stay in the cache.
    """
    out_dir = prepared_dir(mark_kit_folder(cache_root), alpha_mode, margin, size) / CONTENT_DIR
    digests: dict[Path, str] = {}
    keys, files, todo, seen = [], [], [], set()
    for p in tqdm(photos, desc="content keys", unit="photo", disable=not progress or len(photos) < 200, leave=False):
        if p.path not in digests:
            digests[p.path] = photo_digest(p.path)
        key = photo_key(p, digests[p.path])
        dst = out_dir / key[:2] / f"{key}.jpg"
        keys.append(key)
        files.append(dst)
        if key not in seen and not dst.is_file():
            todo.append((str(p.path), p.box, str(dst), alpha_mode, float(margin), int(size), p.origin))
        seen.add(key)
    problems: list[str] = []
    bar = tqdm(total=len(todo), desc="prepare photos", unit="photo", disable=not progress or not todo)
    for err in run_tasks(_work, todo, workers, chunksize=4, min_tasks=5):
        if err:
            problems.append(err)
        bar.update()
    bar.close()
    _raise_problems(problems)
    return keys, files


def thumbnail_bytes(prepared: str | Path, size: int = THUMB_SIZE, quality: int = 80) -> bytes:
    """A small JPEG of a prepared photo (for catalogues and report pages)."""
    rgb = resize_longest(load_prepared(prepared), size)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise JaguarKitError(f"{prepared}: could not make a thumbnail")
    return buf.tobytes()


def duplicate_files(photos: Sequence[Photo], keys: Sequence[str]) -> list[tuple[str, list[str], list[str]]]:
    """Same content listed under different individuals: ``(key, identities, names)`` per case."""
    by_key: dict[str, list[Photo]] = {}
    for p, k in zip(photos, keys):
        by_key.setdefault(k, []).append(p)
    out = []
    for k, group in by_key.items():
        ids = sorted({p.identity for p in group if p.identity is not None})
        if len(ids) > 1:
            out.append((k, ids, [p.name for p in group]))
    return out


__all__ = [
    "Photo",
    "duplicate_files",
    "file_digest",
    "is_kit_folder",
    "mark_kit_folder",
    "photo_key",
    "key_digest",
    "prepare_photos",
    "read_photos",
    "thumbnail_bytes",
]

"""Whole camera-trap frames and MegaDetector's boxes: one photo per animal it found.

Most camera-trap collections are whole frames that went through MegaDetector, whose batch
output is the field's common format. What this reader relies on, from the format's own
document ("MegaDetector output format", https://lila.science/megadetector-output-format):

- ``info.format_version`` is required, a string-formatted float (``"1.0"`` to ``"1.6"``
  so far); only major version 1 is read here.
- ``detection_categories`` is required: string ids to names (``"1": "animal"``, ``"2":
  "person"``, ``"3": "vehicle"``); tools depend on the name ``animal``, so that name, not the
  id, says which boxes are animals. Categories not listed count as no detection.
- ``images`` is required (possibly empty). Each has ``file`` (typically relative to the
  folder the detector ran on; absolute paths and backslashes are valid), ``detections``
  (an empty list when nothing was found) and an optional ``failure`` (a string when the
  file was not processed; its detections are then null or missing).
- a detection has ``category`` (an id of ``detection_categories``), ``conf`` (0 to 1) and
  ``bbox`` = ``[x_min, y_min, width, height]`` relative to the image's width and height,
  origin at the top left. Video entries (``frame_rate``) use the same layout; they are not
  photos and are skipped here.
- ``info.detector_metadata.typical_detection_threshold`` (format 1.2+) is the detector's
  recommended default confidence threshold: 0.2 for MegaDetector v5, the default here when
  the file names none. The document warns that the best value varies between data sets.

Orientation: MegaDetector loads a frame with PIL and rotates it by its EXIF orientation
before detecting, so its boxes are relative to the frame as displayed. The kit's
:func:`~jaguar_kit.data.images.decode_image` decodes JPEGs the same way (OpenCV applies the
EXIF orientation), so the frame's size is read as displayed: the header's size, width and
height swapped for JPEG orientations 5 to 8. (MegaDetector leaves the mirrored orientations
2, 4, 5 and 7, which cameras do not write, unapplied.)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image  # a header read for the size (Pillow: torchvision's dependency, so timm's)

from ..data.images import IMAGE_EXTENSIONS
from ..errors import JaguarKitError
from .inputs import Photo
from .names import few

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.2  # MegaDetector v5's typical_detection_threshold
ANIMAL = "animal"
_ROUNDING = 1e-3  # the format rounds boxes to 4 decimals: x_min + width may pass 1 by that
_EXIF_ORIENTATION = 0x0112
_SWAPPED = {5, 6, 7, 8}  # EXIF orientations that turn the frame by 90 degrees


def read_detections(json_path: str | Path, image_root: str | Path, threshold: float | None = None,
                    photos: Sequence[Photo] | None = None) -> list[Photo]:
    """One :class:`Photo` per animal box at or above ``threshold`` in MegaDetector's output.

    ``image_root``: the folder the detector ran on (the JSON's paths are relative to it).
    ``threshold``: None takes the file's ``typical_detection_threshold``, else
    :data:`DEFAULT_THRESHOLD`. ``photos``: the frames as the kit read them (a folder per
    individual, a CSV with identities): detections are matched to them by file, so each box
    keeps its frame's identity, name and encounter; frames listed only in the JSON are left
    out, and photos that already have a box (CSV ``x,y,w,h``) are kept as they are. Boxes
    are named ``FRAME#1``, ``FRAME#2``, ... Frames without an animal box, failed frames and
    frames not matched are counted in a log line each.
    """
    json_path = Path(json_path)
    data = _load(json_path)
    animal_ids = {str(k) for k, v in data["detection_categories"].items() if str(v).strip().lower() == ANIMAL}
    if threshold is None:
        threshold = _typical_threshold(data)
    if not 0 <= threshold <= 1:
        raise JaguarKitError(f"detection threshold {threshold} is not a confidence from 0 to 1")
    root = Path(image_root).absolute()
    listed = None if photos is None else {os.path.realpath(p.path): p for p in photos if p.box is None}
    out: list[Photo] = [] if photos is None else [p for p in photos if p.box is not None]
    seen: dict[str, int] = {}
    empty, failed, unlisted, not_photos, crowded = [], [], [], [], []
    for i, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        rel, path = _entry_path(entry, where, root)
        where = f"{where} ({rel})"
        real = os.path.realpath(path)
        if real in seen:
            raise JaguarKitError(f"{where}: the frame is listed twice (also images[{seen[real]}])")
        seen[real] = i
        kept = _animal_boxes(entry, where, animal_ids, threshold)
        frame = Photo(path, name=rel, origin=where) if listed is None else listed.pop(real, None)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            not_photos.append(rel)
            continue
        if frame is None:
            unlisted.append(rel)
            continue
        if kept is None:
            failed.append(rel)
            continue
        if listed is None and not path.is_file():
            raise JaguarKitError(f"{where}: file not found under {root}")
        if not kept:
            empty.append(rel)
            continue
        if len(kept) > 1 and frame.identity is not None:
            crowded.append(frame.name)
        width, height = _displayed_size(path, where)
        for k, (j, bbox) in enumerate(kept, 1):
            out.append(Photo(path, frame.identity, _pixel_box(bbox, width, height), f"{frame.name}#{k}",
                             f"{where} detection {j}", frame.encounter))
    _report(json_path, threshold, empty, failed, unlisted, not_photos, crowded,
            [] if listed is None else sorted(p.name for p in listed.values()))
    if not out:
        raise JaguarKitError(f"{json_path}: no animal box at confidence {threshold:g} or more"
                             + ("" if photos is None else f" in the photos listed (paths are relative to {root})"))
    return out


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise JaguarKitError(f"{path}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaguarKitError(f"{path}: not a MegaDetector output file (not valid JSON: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise JaguarKitError(f"{path}: not a MegaDetector output file (no top-level 'images' list)")
    info = data.get("info")
    version = str(info.get("format_version", "")) if isinstance(info, dict) else ""
    if version.split(".")[0] != "1":
        raise JaguarKitError(f"{path}: MegaDetector output format version {version or '(missing info.format_version)'}"
                             " is not read here (expected 1.x)")
    cats = data.get("detection_categories")
    if not isinstance(cats, dict) or ANIMAL not in {str(v).strip().lower() for v in cats.values()}:
        raise JaguarKitError(f"{path}: detection_categories has no {ANIMAL!r} category (found {cats!r})")
    return data


def _typical_threshold(data: dict) -> float:
    meta = data["info"].get("detector_metadata")
    value = meta.get("typical_detection_threshold") if isinstance(meta, dict) else None
    return float(value) if _is_number(value) and 0 <= value <= 1 else DEFAULT_THRESHOLD


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _entry_path(entry, where: str, root: Path) -> tuple[str, Path]:
    """The entry's file, relative to ``root`` (as posix text), and its path; never outside ``root``."""
    file = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(file, str) or not file.strip():
        raise JaguarKitError(f"{where}: no 'file' (each image entry needs the path of its frame)")
    path = Path(os.path.normpath(root / file.replace("\\", "/")))
    try:
        rel = path.relative_to(os.path.normpath(root)).as_posix()
    except ValueError:
        rel = ""
    if not rel or rel == "." or rel.startswith("../"):
        raise JaguarKitError(f"{where} ({file}): lies outside the image folder {root}")
    return rel, path


def _animal_boxes(entry: dict, where: str, animal_ids: set[str], threshold: float) -> list | None:
    """``(index, bbox)`` of the entry's animal boxes at or above ``threshold``; None for a failed frame.

    Every detection is checked, whatever its category: a broken box means a broken file."""
    if entry.get("failure"):
        return None
    dets = entry.get("detections")
    if not isinstance(dets, list):
        raise JaguarKitError(f"{where}: 'detections' is {type(dets).__name__}, expected a list (or a 'failure')")
    kept = []
    for j, d in enumerate(dets):
        at = f"{where} detection {j}"
        if not isinstance(d, dict) or "category" not in d:
            raise JaguarKitError(f"{at}: expected an object with category, conf and bbox")
        conf, bbox = d.get("conf"), d.get("bbox")
        if not _is_number(conf) or not 0 <= conf <= 1:
            raise JaguarKitError(f"{at}: conf {conf!r} is not a number from 0 to 1")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise JaguarKitError(f"{at}: bbox {bbox!r} is not four numbers [x_min, y_min, width, height]")
        x, y, w, h = bbox
        if min(bbox) < 0 or w <= 0 or h <= 0 or x + w > 1 + _ROUNDING or y + h > 1 + _ROUNDING:
            raise JaguarKitError(f"{at}: bbox {bbox} lies outside the image (relative coordinates 0..1, "
                                 "[x_min, y_min, width, height])")
        if str(d["category"]) in animal_ids and conf >= threshold:
            kept.append((j, bbox))
    return kept


def _displayed_size(path: Path, where: str) -> tuple[int, int]:
    """Width and height of the frame as displayed (see the module docstring), from its header."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = im.format == "JPEG" and im.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPPED
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable headers
        raise JaguarKitError(f"{where}: cannot read the image's size ({e})") from e
    return (height, width) if turned else (width, height)


def _pixel_box(bbox, width: int, height: int) -> tuple[int, int, int, int]:
    """Relative ``[x_min, y_min, width, height]`` as pixels ``(x, y, w, h)`` inside the frame."""
    x0, y0 = round(bbox[0] * width), round(bbox[1] * height)
    x1, y1 = min(width, round((bbox[0] + bbox[2]) * width)), min(height, round((bbox[1] + bbox[3]) * height))
    return x0, y0, x1 - x0, y1 - y0


def _report(json_path: Path, threshold: float, empty: list[str], failed: list[str], unlisted: list[str],
            not_photos: list[str], crowded: list[str], missing: list[str]) -> None:
    if empty:
        log.warning("%s: %d frame(s) without an animal box at confidence %g or more are left out: %s",
                    json_path, len(empty), threshold, few(empty))
    if failed:
        log.warning("%s: %d frame(s) MegaDetector failed on (their 'failure') are left out: %s",
                    json_path, len(failed), few(failed))
    if not_photos:
        log.warning("%s: %d entr%s not a photo (%s), e.g. videos, are left out: %s", json_path, len(not_photos),
                    "y is" if len(not_photos) == 1 else "ies are", ", ".join(IMAGE_EXTENSIONS), few(not_photos))
    if unlisted:
        log.warning("%s: %d frame(s) not among the photos given are left out: %s", json_path, len(unlisted),
                    few(unlisted))
    if missing:
        log.warning("%s: %d photo(s) given have no entry in it and are left out: %s", json_path, len(missing),
                    few(missing))
    if crowded:
        log.warning("%s: %d labelled frame(s) hold several animal boxes, each given the frame's individual: "
                    "check them (a CSV with x,y,w,h can name each): %s", json_path, len(crowded), few(crowded))


__all__ = ["DEFAULT_THRESHOLD", "read_detections"]

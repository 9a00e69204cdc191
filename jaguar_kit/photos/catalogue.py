"""Catalogues of known individuals: index photos of named animals, with their calibration.

A catalogue is a folder::

    CATALOGUE/catalogue.npz   embeddings, content keys, identities, names, paths, boxes,
                              thumbnails, and a JSON header (model, preprocessing, calibration)
    CATALOGUE/catalogue.json  the same header, readable (counts per individual, warnings)
    CATALOGUE/cache/          prepared photos and embedding chunks (safe to delete)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import JaguarKitError
from ..files import RunLock, atomic_path, atomic_write_text, file_sha256, load_npz
from ..local import ImageFeatures
from ..models.backbones import frozen_backbone
from ..version import __version__
from .calibration import (
    DEFAULT_TARGET_FMR,
    Calibration,
    calibrate,
    calibration_banner,
    hold_out_scores,
    suspected_duplicates,
)
from .coat import coat_hold_out, photo_features
from .inputs import (
    Photo,
    duplicate_files,
    mark_kit_folder,
    photo_digest,
    photo_key,
    prepare_photos,
    read_photos,
    thumbnail_bytes,
)
from .model import Model, embed_prepared, load_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COAT_CHOICES = ("auto", "on", "off")
NPZ = "catalogue.npz"
SUMMARY = "catalogue.json"


@dataclass
class Catalogue:
    """Embeddings of known individuals' photos, their model and calibration (see the module docstring)."""

    keys: list[str]
    identities: list[str]
    names: list[str]
    paths: list[str]
    boxes: np.ndarray  # (N, 4) int, -1 where no box
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    thumbs: list[bytes]
    model: dict  # source + Model.fingerprint
    calibration: Calibration | None = None
    warnings: list[str] = field(default_factory=list)
    folder: Path | None = None
    embedded_now: int = 0  # photos embedded by the call that built it (the others were reused)
    encounters: list[str] = field(default_factory=list)  # each photo's encounter ("" unknown; empty list: none)

    def photos(self) -> list[Photo]:
        """The catalogue's photos as recorded (paths, boxes, individuals, encounters), not re-read;
        each one's ``origin`` names the catalogue (see :func:`catalogue_photos` to check them)."""
        where = self.folder / NPZ if self.folder is not None else Path(NPZ)
        encounters = self.encounters or [""] * len(self)
        return [Photo(Path(path), ident, None if box[0] < 0 else tuple(int(v) for v in box), name,
                      f"{where} ({name})", enc or None)
                for path, ident, box, name, enc in zip(self.paths, self.identities, self.boxes, self.names, encounters)]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def individuals(self) -> list[str]:
        return sorted(set(self.identities))

    def cache_dir(self, fallback: str | Path | None = None) -> Path:
        """Where photos identified or grouped against this catalogue are prepared and embedded: its
        own ``cache`` (so identify and cluster reuse each other's work), or ``fallback`` when the
        catalogue is not writable (a shared, read-only copy)."""
        cache = self.folder / "cache" if self.folder is not None else None
        if cache is not None and (os.access(cache, os.W_OK) if cache.exists() else os.access(self.folder, os.W_OK)):
            return cache
        if fallback is None:
            raise JaguarKitError(f"{self.folder or 'catalogue'}: not writable; give a cache folder (an output folder)")
        return Path(fallback)

    @property
    def banner(self) -> str | None:
        """One line when the catalogue's own calibration shows the model cannot separate its individuals."""
        return calibration_banner(self.calibration)

    def codes(self) -> tuple[np.ndarray, list[str]]:
        codes, uniques = pd.factorize(pd.Series(self.identities, dtype=object))
        return codes, [str(u) for u in uniques]

    def header(self) -> dict:
        counts = pd.Series(self.identities).value_counts().sort_index()
        return {
            "format": FORMAT_VERSION,
            "jaguar_kit": __version__,
            "model": self.model,
            "photos": len(self),
            "individuals": len(counts),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "warnings": self.warnings,
            "photos_per_individual": {str(k): int(v) for k, v in counts.items()},
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``catalogue.npz`` and ``catalogue.json`` into ``folder`` atomically."""
        folder = mark_kit_folder(folder)  # a catalogue is never read as photos
        lengths = np.array([len(t) for t in self.thumbs], np.int64)
        blob = np.frombuffer(b"".join(self.thumbs), np.uint8) if self.thumbs else np.zeros(0, np.uint8)
        header = self.header()
        with atomic_path(folder / NPZ) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, keys=np.array(self.keys, dtype=str), identities=np.array(self.identities, dtype=str),
                names=np.array(self.names, dtype=str), paths=np.array(self.paths, dtype=str),
                boxes=self.boxes.astype(np.int64).reshape(-1, 4), embeddings=self.embeddings.astype(np.float32),
                encounters=np.array(self.encounters or [""] * len(self), dtype=str),
                thumb_lengths=lengths, thumbs=blob, header=np.array(json.dumps(header)),
            )
        atomic_write_text(folder / SUMMARY, json.dumps(header, indent=1) + "\n")
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Catalogue:
        folder = Path(folder)
        path = folder / NPZ if folder.is_dir() else folder
        if not path.is_file():
            raise JaguarKitError(f"{folder}: no catalogue here (make one with: jaguar-kit index --photos DIR --out {folder})")
        z = load_npz(path, ("header", "thumb_lengths", "thumbs", "keys", "identities", "names", "paths", "boxes",
                            "embeddings"), "readable jaguar_kit catalogue", optional=("encounters",))
        try:
            header = json.loads(str(z["header"]))
            lengths = z["thumb_lengths"]
            blob = z["thumbs"].tobytes()
            ends = np.cumsum(lengths)
            thumbs = [blob[e - n:e] for n, e in zip(lengths, ends)]
            cat = cls(list(map(str, z["keys"])), list(map(str, z["identities"])), list(map(str, z["names"])),
                      list(map(str, z["paths"])), z["boxes"], z["embeddings"], thumbs, header["model"],
                      Calibration.from_dict(header.get("calibration")), list(header.get("warnings", [])),
                      path.parent)
            cat.encounters = list(map(str, z["encounters"])) if "encounters" in z else []
        except (KeyError, ValueError, TypeError) as e:
            raise JaguarKitError(f"{path}: damaged or not a readable jaguar_kit catalogue (header: {type(e).__name__}: "
                                 f"{e})") from e
        if header.get("format") != FORMAT_VERSION:
            raise JaguarKitError(f"{path}: catalogue format {header.get('format')}, this jaguar_kit reads {FORMAT_VERSION}")
        n = len(cat.keys)
        if not (len(cat.identities) == len(cat.names) == len(cat.paths) == len(thumbs) == n
                and cat.embeddings.shape[0] == n and cat.boxes.shape == (n, 4)):
            raise JaguarKitError(f"{path}: damaged catalogue (its arrays have different lengths)")
        if not np.isfinite(cat.embeddings).all():
            raise JaguarKitError(f"{path}: damaged catalogue (non-finite embeddings)")
        return cat

    def check_model(self, model: Model) -> None:
        """Refuse to mix embeddings of different models or preprocessing."""
        mine = {k: self.model.get(k) for k in model.fingerprint}
        if mine != model.fingerprint:
            diff = ", ".join(f"{k} {mine[k]!r} != {v!r}" for k, v in model.fingerprint.items() if mine[k] != v)
            raise JaguarKitError(
                f"{self.folder or 'catalogue'}: made with model {self.model.get('source')} ({diff}); embeddings of "
                f"different models cannot be compared: use that model, or index into a new catalogue"
            )


def _box_array(photos: Sequence[Photo]) -> np.ndarray:
    return np.array([p.box if p.box is not None else (-1, -1, -1, -1) for p in photos], np.int64).reshape(-1, 4)


def build_catalogue(photos: Sequence[Photo] | str | Path, model: Model, folder: str | Path,
                    target_false_merge: float = DEFAULT_TARGET_FMR, replace: bool = False, progress: bool = True,
                    workers: int = 0, coat: str = "auto") -> Catalogue:
    """Index ``photos`` of known individuals into the catalogue ``folder`` (created or updated).

    An existing catalogue is updated: the photos listed now replace their earlier entries (a
    relabelled photo takes its new individual), the others stay (``replace`` drops them), and
    only photos whose content is not in it yet are embedded. The model must be the one the
    catalogue was made with. The calibration is refitted on the result; ``coat`` (``auto``,
    ``on``, ``off``): whether it fuses coat-pattern evidence (:mod:`.coat`) with the global score
    -- ``auto`` where the catalogue's own held-out photos are decided correctly more often with it.

    One writer at a time: the whole update holds the folder's lock (a second ``index`` waits
    for the first), and the catalogue is read under it, so concurrent runs add to each other
    instead of one overwriting the other; a killed run leaves the previous catalogue whole.
    """
    check_target(target_false_merge)
    if coat not in COAT_CHOICES:
        raise JaguarKitError(f"coat-pattern evidence: choose one of {', '.join(COAT_CHOICES)}, got {coat!r}")
    if not isinstance(photos, (list, tuple)):
        photos = read_photos(photos, need_identity=True)
    missing = [p for p in photos if p.identity is None]
    if missing:
        raise JaguarKitError(f"{missing[0].origin}: no individual given; a catalogue needs every photo's individual")
    folder = Path(folder)
    with RunLock(folder, purpose="another `index` updates this catalogue", wait=True):
        cat = _build(photos, model, folder, target_false_merge, replace, progress, workers, coat)
    for w in cat.warnings:  # the one place they are shown (the command line does not print them again)
        log.warning("warning: %s", w)
    return cat


def _build(photos: Sequence[Photo], model: Model, folder: Path, target_false_merge: float, replace: bool,
           progress: bool, workers: int, coat: str = "auto") -> Catalogue:
    old = Catalogue.load(folder) if (folder / NPZ).is_file() else None  # read under the lock: the latest
    if old is not None:
        old.check_model(model)
    cache = folder / "cache"
    keys, files = prepare_photos(photos, cache / "prepared", model.alpha_mode, model.margin, model.prepared_size,
                                 workers=workers, progress=progress)
    known = {} if old is None else {k: i for i, k in enumerate(old.keys)}
    # one entry per (content, individual); the same file under two individuals stays, with a warning
    entries: dict[tuple[str, str], int] = {}
    for i, (p, k) in enumerate(zip(photos, keys)):
        entries.setdefault((k, p.identity), i)
    listed = list(entries.values())
    todo_unique = list({keys[i]: i for i in listed if keys[i] not in known}.values())
    new_emb = {}
    if todo_unique:
        k2 = [keys[i] for i in todo_unique]
        new_emb = dict(zip(k2, embed_prepared(model, k2, [files[i] for i in todo_unique], cache, progress)))

    def vector(i: int) -> np.ndarray:
        k = keys[i]
        return new_emb[k] if k in new_emb else old.embeddings[known[k]]

    thumbs_new = {}
    for i in listed:
        if keys[i] not in known and keys[i] not in thumbs_new:
            thumbs_new[keys[i]] = thumbnail_bytes(files[i])
    rows_keys = [keys[i] for i in listed]
    rows_ids = [photos[i].identity for i in listed]
    rows_names = [photos[i].name for i in listed]
    rows_paths = [str(photos[i].path.resolve()) for i in listed]
    rows_boxes = [_box_array([photos[i]])[0] for i in listed]
    rows_emb = [vector(i) for i in listed]
    rows_thumbs = [thumbs_new.get(keys[i]) or old.thumbs[known[keys[i]]] for i in listed]
    rows_enc = [photos[i].encounter or "" for i in listed]
    if old is not None:
        relisted = set(rows_keys)
        relabelled = sorted({(old.names[j], old.identities[j]) for j, k in enumerate(old.keys)
                             if k in relisted and (k, old.identities[j]) not in entries})
        for name, ident in relabelled[:5]:
            log.info("%s: was %s, now listed under another individual", name, ident)
        if not replace:
            for j, k in enumerate(old.keys):
                if k not in relisted:
                    rows_keys.append(k)
                    rows_ids.append(old.identities[j])
                    rows_names.append(old.names[j])
                    rows_paths.append(old.paths[j])
                    rows_boxes.append(old.boxes[j])
                    rows_emb.append(old.embeddings[j])
                    rows_thumbs.append(old.thumbs[j])
                    rows_enc.append(old.encounters[j] if old.encounters else "")
    emb = np.stack(rows_emb).astype(np.float32)
    cat = Catalogue(rows_keys, rows_ids, rows_names, rows_paths, np.array(rows_boxes, np.int64).reshape(-1, 4), emb,
                    rows_thumbs, model_record(model), encounters=rows_enc)
    cat.warnings = _same_file_warnings(photos, keys)
    features = None
    if coat != "off":
        try:
            features = photo_features(cat.photos(), cat.keys, cache, workers, progress)
        except JaguarKitError as e:
            if coat == "on":
                raise
            cat.warnings.append(f"coat-pattern evidence left out: {e}")
    cat.calibration, more = calibrate_catalogue(cat, target_false_merge, features, coat)
    cat.warnings += more
    cat.save(folder)
    cat.embedded_now = len(todo_unique)
    return cat


def check_target(target_false_merge: float) -> float:
    """The target false-merge rate, refused unless strictly between 0 and 1 (a share of photos)."""
    if not (isinstance(target_false_merge, (int, float)) and 0 < target_false_merge < 1):
        raise JaguarKitError(f"target false-merge rate must be between 0 and 1 (a share, e.g. 0.05), "
                             f"got {target_false_merge}")
    return float(target_false_merge)


def _same_file_warnings(photos: Sequence[Photo], keys: Sequence[str]) -> list[str]:
    """One warning per set of individuals that share photo files (not one per file)."""
    by_ids: dict[tuple[str, ...], list[str]] = {}
    for _, ids, names in duplicate_files(photos, keys):
        by_ids.setdefault(tuple(ids), []).append(names[0])
    return [f"the same photo is listed under {len(ids)} individuals ({', '.join(ids)}): "
            f"{len(names)} file{'s' if len(names) > 1 else ''}, e.g. {', '.join(names[:3])}"
            for ids, names in by_ids.items()]


def calibrate_catalogue(cat: Catalogue, target_false_merge: float, features: list[ImageFeatures] | None = None,
                        coat: str = "auto") -> tuple[Calibration | None, list[str]]:
    """The catalogue's calibration and its warnings.

    Suspected duplicate individuals are found first, on similarities (see
    :func:`~.calibration.suspected_duplicates`), reported, and kept out of the fit: inside it,
    their photos would count as "new" while matching a known name, and push the threshold up
    until most known photos are called new. With the photos' local ``features``, a second
    calibration fuses coat-pattern evidence; it is used when ``coat`` is ``on``, or ``auto`` and
    it decides more of the held-out known photos correctly (both shares are recorded).
    """
    codes, uniques = cat.codes()
    encounters = cat.encounters or [""] * len(cat)
    hold = hold_out_scores(cat.embeddings, codes, len(uniques), encounters)
    dups = suspected_duplicates(cat.identities, hold)
    warnings = [d.message() for d in dups]
    excluded = sorted({d.excluded for d in dups})
    keep = np.flatnonzero(~np.isin(np.array(cat.identities, dtype=object), excluded))
    ids, emb, enc = [cat.identities[i] for i in keep], cat.embeddings[keep], [encounters[i] for i in keep]
    try:
        cal = calibrate(emb, ids, target_false_merge, None if excluded else hold, encounters=enc)
        if features is not None:
            kept_codes, kept_ids = pd.factorize(pd.Series(ids, dtype=object))
            evidence = coat_hold_out([features[i] for i in keep], kept_codes, len(kept_ids), enc,
                                     [cat.keys[i] for i in keep])
            fused = calibrate(emb, ids, target_false_merge, None if excluded else hold, evidence, enc)
            compared = {"global score": cal.estimated["decided_correctly"],
                        "global score + coat pattern": fused.estimated["decided_correctly"]}
            if fused.uses_coat and (coat == "on" or compared["global score + coat pattern"] > compared["global score"]):
                cal = fused
            cal.estimated["decided_correctly_by_evidence"] = compared
    except JaguarKitError as e:
        return None, warnings + [f"not calibrated: {e}"]
    cal.excluded = excluded
    return cal, warnings


def catalogue_photos(cat: Catalogue) -> list[Photo]:
    """The photos a catalogue lists, under its (reviewed) individuals: its recorded paths and boxes.

    Each photo must still be the one that was indexed (its content key): a photo moved,
    deleted or edited since is refused in one line naming it, never re-embedded or trained
    on under a label that was given to other pixels.
    """
    photos, problems = [], []
    digests: dict[str, str] = {}
    for key, photo in zip(cat.keys, cat.photos()):
        path = str(photo.path)
        if not photo.path.is_file():
            problems.append(f"{photo.origin}: {path} not found (moved or deleted since it was indexed)")
            continue
        if path not in digests:
            digests[path] = photo_digest(photo.path)
        if photo_key(photo, digests[path]) != key:
            problems.append(f"{photo.origin}: {path} changed since it was indexed (other content)")
            continue
        photos.append(photo)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise JaguarKitError(problems[0] + more + "; index the photos again from their folder or CSV")
    return photos


def photos_to_reindex(catalogue: str | Path, out: str | Path, model: str | None) -> list[Photo]:
    """The photos of ``catalogue`` to embed with another ``model`` into the new catalogue ``out``
    (never the same folder: the old catalogue stays as it is, to compare and fall back on)."""
    if os.path.realpath(catalogue) == os.path.realpath(out):
        raise JaguarKitError(f"{out}: re-indexing writes a new catalogue and leaves {catalogue} as it is; give "
                             "another --out (compare the two, then keep the better one)")
    if not model:
        raise JaguarKitError(f"{catalogue}: re-indexing needs the new model: --model RUN/best.pt")
    return catalogue_photos(load_catalogue(catalogue))


def model_record(model: Model) -> dict:
    """What a catalogue records of its model: the source (a checkpoint as an absolute path, with
    the file's SHA-256, so it is found again when moved) and the fingerprint."""
    record = {"source": model.source, **model.fingerprint}
    if frozen_backbone(model.source) is None:
        path = Path(model.source).resolve()
        record.update(source=str(path), file_sha256=file_sha256(path))
    return record


def find_model_file(cat: Catalogue) -> str:
    """The catalogue's model: ``frozen:...`` as recorded, or its checkpoint, verified by digest.

    Looks at the recorded path, then for a file of the same name in the catalogue folder, the
    folder that holds it, and the current folder (a moved catalogue or checkpoint); the file
    must have the recorded SHA-256 (catalogues made before it was recorded: checked by weights
    when loaded).
    """
    source = str(cat.model.get("source", ""))
    if frozen_backbone(source) is not None:
        return source
    recorded = Path(source)
    want = cat.model.get("file_sha256")
    places = [recorded] + [d / recorded.name for d in ([cat.folder, cat.folder.parent] if cat.folder else []) + [Path.cwd()]]
    changed = None
    for path in dict.fromkeys(places):
        if not path.is_file():
            continue
        if want is None or file_sha256(path) == want:
            return str(path)
        changed = changed or path
    where = f"{recorded}, beside the catalogue or in the current folder"
    if changed is not None:
        raise JaguarKitError(f"{cat.folder or 'catalogue'}: its model {recorded.name} was not found with its digest "
                             f"({changed} is another file of that name); pass the checkpoint it was made with: --model PATH")
    raise JaguarKitError(f"{cat.folder or 'catalogue'}: its model {recorded.name} is not at {where}; pass it: --model PATH")


def catalogue_model(cat: Catalogue, device: str = "auto", weights: str = "auto") -> Model:
    """Load the model a catalogue was made with (found by :func:`find_model_file`), with its preprocessing."""
    return load_model(find_model_file(cat), device=device, weights=weights, prepared_size=cat.model["prepared_size"],
                      tta=cat.model["tta"])


def load_catalogue(folder: str | Path) -> Catalogue:
    return Catalogue.load(folder)

"""Catalogues of known individuals: index photos, calibrate a `new` decision, identify.

A catalogue is a folder::

    CATALOGUE/catalogue.npz   embeddings, content keys, identities, names, paths, boxes,
                              thumbnails, and a JSON header (model, preprocessing, calibration)
    CATALOGUE/catalogue.json  the same header, readable (counts per individual, warnings)
    CATALOGUE/cache/          prepared photos and embedding chunks (safe to delete)

**Scores.** A photo's score against an individual is its best cosine similarity to any of
that individual's catalogue photos (one good view of the same flank is what identifies a
jaguar; a mean over all photos would punish individuals photographed from both sides).

**Calibration** (:func:`calibrate`), on the catalogue alone, by holding identities out:
every identity in turn is removed from the catalogue (leave-one-identity-out: the limit of
leave-some-identities-out folds, and exact here because removing an identity only removes
columns of the photo x individual score matrix) and its photos are scored against the
others as "new individuals"; every photo is also scored against its own individual without
itself, as a "known" photo. The threshold is the best-match score that new-individual photos
exceed at the target false-merge rate (default 5%: the share of photos of an unseen animal
that would be attached to a known one). A logistic fit of score -> "this candidate is the
right individual" over each photo's top candidates (known and new cases weighted equally)
turns scores into probabilities; the threshold is stored as both a score and a probability.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import JaguarKitError
from .files import atomic_path, atomic_write_text
from .photos import Photo, duplicate_files, prepare_photos, read_photos, thumbnail_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NPZ = "catalogue.npz"
SUMMARY = "catalogue.json"
DEFAULT_TARGET_FMR = 0.05
FIT_TOP_K = 5  # candidates per photo used to fit the probabilities (what a person is shown)
MIN_IDENTITIES = 3  # to calibrate: at least this many individuals, some with 2+ photos


# --- the model ------------------------------------------------------------------------------


@dataclass
class Model:
    """A loaded embedding model with the preprocessing its embeddings depend on."""

    module: object  # torch.nn.Module
    source: str
    digest: str
    alpha_mode: str = "crop"
    margin: float = 0.05
    prepared_size: int = 768
    tta: str = "none"
    device: object = None
    amp_dtype: object = None

    @property
    def fingerprint(self) -> dict:
        """Everything an embedding depends on; two catalogues with different ones never mix."""
        return {"digest": self.digest, "alpha_mode": self.alpha_mode, "margin": self.margin,
                "prepared_size": self.prepared_size, "tta": self.tta}


def load_model(source: str | Path, device: str = "auto", weights: str = "auto", prepared_size: int | None = None,
               tta: str = "none") -> Model:
    """A training checkpoint (``best.pt``) or ``frozen:BACKBONE`` (pretrained, e.g. ``frozen:efficientnet-lite0``).

    A checkpoint brings its own preprocessing (alpha mode, margin, prepared size); a frozen
    backbone uses the config defaults. ``tta`` is ``none`` by default: flips hurt on jaguars
    (a mirrored left flank is not the right flank).
    """
    from .config import Config
    from .device import select_device
    from .embed import weights_digest

    info = select_device(device)
    source = str(source)
    if source.startswith("frozen:"):
        from .models import build_frozen_model

        cfg = Config()
        module = build_frozen_model(source.split(":", 1)[1], weights)
    else:
        from .train.checkpoint import load_model_from_checkpoint

        module, cfg = load_model_from_checkpoint(source, info.device)
    module = module.to(info.device).eval()
    d = cfg.data
    return Model(module, source, weights_digest(module), d.alpha_mode, float(d.crop_margin),
                 int(prepared_size or d.prepared_size), tta, info.device, info.amp_dtype)


def embed_photos(model: Model, photos: Sequence[Photo], cache_dir: str | Path, progress: bool = True,
                 batch_size: int = 32, workers: int = 0) -> tuple[list[str], np.ndarray, list[Path]]:
    """Content keys, L2-normalised embeddings (N, D) and prepared files of ``photos``.

    Prepared photos and embedding chunks are cached under ``cache_dir`` (resumable).
    """
    cache_dir = Path(cache_dir)
    keys, files = prepare_photos(photos, cache_dir / "prepared", model.alpha_mode, model.margin,
                                 model.prepared_size, workers=workers, progress=progress)
    return keys, embed_prepared(model, keys, files, cache_dir, progress, batch_size), files


def embed_prepared(model: Model, keys: Sequence[str], files: Sequence[Path], cache_dir: str | Path,
                   progress: bool = True, batch_size: int = 32) -> np.ndarray:
    """Embeddings of prepared photos (rows follow ``keys``; each distinct key is embedded once)."""
    from .embed import embed_images

    first: dict[str, Path] = {}
    for k, f in zip(keys, files):
        first.setdefault(k, f)
    unique = list(first)
    if not unique:
        return np.zeros((0, 0), np.float32)
    res = embed_images(model.module, unique, [first[k] for k in unique], Path(cache_dir) / "embeddings" / model.digest,
                       model.device, tta=model.tta, batch_size=batch_size,
                       preprocessing={"alpha": model.alpha_mode, "margin": model.margin, "size": model.prepared_size,
                                      "keys": "content"},
                       amp_dtype=model.amp_dtype, tag="photos", progress=progress, weights_id=model.digest)
    row = {k: i for i, k in enumerate(unique)}
    return res.embeddings[[row[k] for k in keys]].astype(np.float32)


# --- scores and calibration -------------------------------------------------------------------


def individual_scores(sim: np.ndarray, codes: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Best similarity of each row to each individual, and the column (photo) that gave it.

    ``sim`` (Q, N) similarities to catalogue photos whose individuals are ``codes`` (N,);
    returns ``(scores (Q, I), best photo index (Q, I))``; ``-inf`` where an individual has no
    usable photo (e.g. masked out with -inf).
    """
    q = sim.shape[0]
    scores = np.full((q, n_ids), -np.inf, dtype=np.float64)
    best = np.full((q, n_ids), -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_ids + 1))
    for i in range(n_ids):
        cols = order[bounds[i]:bounds[i + 1]]
        if len(cols):
            block = sim[:, cols]
            j = block.argmax(axis=1)
            scores[:, i] = block[np.arange(q), j]
            best[:, i] = cols[j]
    return scores, best


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, ridge: float = 1e-3,
                 iterations: int = 50) -> tuple[float, float]:
    """``(a, b)`` of P(y=1 | x) = sigmoid(a x + b), weighted, by Newton's method.

    Two parameters on one feature: a dozen lines of numpy do it exactly, so scikit-learn (not a
    dependency of the wheel, which installs with --no-deps on Kaggle) is not needed. A small
    ridge keeps separable data (a very good model) finite.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    mu, sd = x.mean(), x.std() or 1.0
    X = np.stack([(x - mu) / sd, np.ones_like(x)], 1)
    beta = np.zeros(2)
    for _ in range(iterations):
        p = _sigmoid(X @ beta)
        grad = X.T @ (w * (p - y)) + ridge * w.sum() * np.array([beta[0], 0.0])
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + ridge * w.sum() * np.diag([1.0, 0.0]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0] / sd), float(beta[1] - beta[0] * mu / sd)


def threshold_for_rate(new_scores: np.ndarray, target: float) -> float:
    """The lowest score threshold at which at most ``target`` of ``new_scores`` reach it (>=)."""
    v = np.sort(np.asarray(new_scores, np.float64))[::-1]
    v = v[np.isfinite(v)]
    if not len(v):
        return float("-inf")
    allowed = int(np.floor(target * len(v) + 1e-9))
    if allowed >= len(v):
        return float(v[-1])
    if allowed == 0:
        return float(np.nextafter(v[0], np.inf))
    return float((v[allowed] + v[allowed - 1]) / 2) if v[allowed] < v[allowed - 1] else float(np.nextafter(v[allowed], np.inf))


@dataclass
class Calibration:
    """The `new`-individual decision and the score -> probability map of a catalogue."""

    threshold: float  # best-match score at or above which a photo is attached to a known individual
    probability_threshold: float  # the same threshold as a probability
    a: float  # P = sigmoid(a * score + b)
    b: float
    target_false_merge: float
    estimated: dict = field(default_factory=dict)  # rates on the catalogue itself (leave-one-identity-out)
    method: str = "leave-one-identity-out"

    def probability(self, scores) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(scores, np.float64) + self.b)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("threshold", "probability_threshold", "a", "b", "target_false_merge",
                                              "estimated", "method")}

    @classmethod
    def from_dict(cls, d: dict | None) -> Calibration | None:
        return None if not d else cls(**d)


@dataclass
class HoldOut:
    """Leave-one-identity-out scores of catalogue photos (what calibration learns from)."""

    scores: np.ndarray  # (N, I) best match per individual, the photo itself excluded
    own: np.ndarray  # (N,) score against its own individual (-inf: its only photo)
    new_top: np.ndarray  # (N,) best score when its individual is absent
    new_arg: np.ndarray  # (N,) which individual that best score belongs to


def hold_out_scores(embeddings: np.ndarray, codes: np.ndarray, n_ids: int) -> HoldOut:
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -np.inf)
    scores, _ = individual_scores(sim, codes, n_ids)
    rows = np.arange(len(codes))
    own = scores[rows, codes].copy()
    others = scores.copy()
    others[rows, codes] = -np.inf
    new_arg = others.argmax(axis=1)
    return HoldOut(scores, own, others[rows, new_arg], new_arg)


def calibrate(embeddings: np.ndarray, identities: Sequence[str], target_false_merge: float = DEFAULT_TARGET_FMR,
              hold: HoldOut | None = None) -> Calibration:
    """Fit the threshold and the probabilities on a catalogue (see the module docstring)."""
    if not 0 < target_false_merge < 1:
        raise JaguarKitError(f"target false-merge rate must be between 0 and 1, got {target_false_merge}")
    codes, uniques = pd.factorize(pd.Series(list(identities), dtype=object))
    n_ids = len(uniques)
    h = hold or hold_out_scores(embeddings, codes, n_ids)
    known = np.isfinite(h.own)
    if n_ids < MIN_IDENTITIES or known.sum() < 2:
        raise JaguarKitError(
            f"catalogue: {n_ids} individuals, {int(known.sum())} photos with another photo of the same individual; "
            f"calibrating the `new` decision needs at least {MIN_IDENTITIES} individuals and some with 2+ photos"
        )
    t = threshold_for_rate(h.new_top, target_false_merge)
    # Probability fit: each photo once as a known individual (its top candidates, the right one
    # labelled 1) and once as a new one (its top candidates among the others, all 0).
    k = min(FIT_TOP_K, n_ids)
    xs, ys, ws = [], [], []
    kn = np.flatnonzero(known)
    top_known = np.argsort(-h.scores[kn], axis=1)[:, :k]
    s_known = np.take_along_axis(h.scores[kn], top_known, 1)
    y_known = top_known == codes[kn, None]
    others = h.scores.copy()
    others[np.arange(len(codes)), codes] = -np.inf
    s_new = -np.sort(-others, axis=1)[:, :k]
    for s, y, weight in ((s_known, y_known, 1.0 / max(len(kn), 1)), (s_new, np.zeros_like(s_new, bool), 1.0 / len(codes))):
        ok = np.isfinite(s)
        xs.append(s[ok])
        ys.append(y[ok])
        ws.append(np.full(ok.sum(), weight))
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    a, b = fit_logistic(x, y, w)
    if a <= 0:  # scores carry no signal here (a model that cannot tell these animals apart): flat probabilities
        a, b = 0.0, float(np.log(max((w * y).sum(), 1e-9) / max((w * (1 - y)).sum(), 1e-9)))
    top_known_score = np.maximum(h.own, h.new_top)[known]
    right = (h.own >= h.new_top)[known]
    estimated = {
        "false_merge": float(np.mean(h.new_top >= t)),
        "false_split": float(np.mean(top_known_score < t)),
        "wrong_individual": float(np.mean((top_known_score >= t) & ~right)),
        "top1_known": float(np.mean(right)),
        "photos": len(codes),
        "known_photos": int(known.sum()),
        "individuals": int(n_ids),
    }
    cal = Calibration(float(t), float(_sigmoid(a * t + b)), a, b, float(target_false_merge), estimated)
    return cal


def duplicate_identity_pairs(identities: Sequence[str], hold: HoldOut, threshold: float,
                             min_share: float = 0.5) -> list[tuple[str, str, int, int]]:
    """Pairs ``(A, B, photos of A attached to B, photos of A)`` where, with A held out, at least
    ``min_share`` of A's photos would be attached to B: possibly one animal under two names."""
    codes, uniques = pd.factorize(pd.Series(list(identities), dtype=object))
    merged = hold.new_top >= threshold
    out = []
    for a in range(len(uniques)):
        mine = codes == a
        n = int(mine.sum())
        hits = np.bincount(hold.new_arg[mine & merged], minlength=len(uniques))
        if not hits.any():
            continue
        b = int(hits.argmax())
        if hits[b] >= max(1, int(np.ceil(min_share * n))) and (n >= 2 or hits[b] >= 1):
            out.append((str(uniques[a]), str(uniques[b]), int(hits[b]), n))
    return out


# --- the catalogue --------------------------------------------------------------------------


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

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def individuals(self) -> list[str]:
        return sorted(set(self.identities))

    def codes(self) -> tuple[np.ndarray, list[str]]:
        codes, uniques = pd.factorize(pd.Series(self.identities, dtype=object))
        return codes, [str(u) for u in uniques]

    def header(self) -> dict:
        from . import __version__

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
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(t) for t in self.thumbs], np.int64)
        blob = np.frombuffer(b"".join(self.thumbs), np.uint8) if self.thumbs else np.zeros(0, np.uint8)
        header = self.header()
        with atomic_path(folder / NPZ) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, keys=np.array(self.keys, dtype=str), identities=np.array(self.identities, dtype=str),
                names=np.array(self.names, dtype=str), paths=np.array(self.paths, dtype=str),
                boxes=self.boxes.astype(np.int64).reshape(-1, 4), embeddings=self.embeddings.astype(np.float32),
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
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                lengths = z["thumb_lengths"]
                blob = z["thumbs"].tobytes()
                ends = np.cumsum(lengths)
                thumbs = [blob[e - n:e] for n, e in zip(lengths, ends)]
                cat = cls(list(map(str, z["keys"])), list(map(str, z["identities"])), list(map(str, z["names"])),
                          list(map(str, z["paths"])), z["boxes"], z["embeddings"], thumbs, header["model"],
                          Calibration.from_dict(header.get("calibration")), list(header.get("warnings", [])),
                          path.parent)
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise JaguarKitError(f"{path}: not a readable jaguar_kit catalogue ({type(e).__name__}: {e})") from e
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
                    workers: int = 0) -> Catalogue:
    """Index ``photos`` of known individuals into the catalogue ``folder`` (created or updated).

    An existing catalogue is updated: the photos listed now replace their earlier entries (a
    relabelled photo takes its new individual), the others stay (``replace`` drops them), and
    only photos whose content is not in it yet are embedded. The model must be the one the
    catalogue was made with. The calibration is refitted on the result.
    """
    if not isinstance(photos, (list, tuple)):
        photos = read_photos(photos, need_identity=True)
    missing = [p for p in photos if p.identity is None]
    if missing:
        raise JaguarKitError(f"{missing[0].origin}: no individual given; a catalogue needs every photo's individual")
    folder = Path(folder)
    old = Catalogue.load(folder) if (folder / NPZ).is_file() else None
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
    listed = [i for i in entries.values()]
    todo = [i for i in listed if keys[i] not in known]
    todo_unique = list({keys[i]: i for i in todo}.values())
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
    warnings: list[str] = []
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
    for k, ids, names in duplicate_files(photos, keys):
        warnings.append(f"the same photo is listed under {len(ids)} individuals ({', '.join(ids)}): {', '.join(names[:3])}")
    emb = np.stack(rows_emb).astype(np.float32)
    model_info = {"source": model.source, **model.fingerprint}
    cat = Catalogue(rows_keys, rows_ids, rows_names, rows_paths, np.array(rows_boxes, np.int64).reshape(-1, 4), emb,
                    rows_thumbs, model_info)
    try:
        codes, uniques = cat.codes()
        hold = hold_out_scores(emb, codes, len(uniques))
        cat.calibration = calibrate(emb, cat.identities, target_false_merge, hold)
        if cat.calibration.a <= 0:
            warnings.append("this model's scores do not separate the right individual from the others on this "
                            "catalogue: probabilities are flat and decisions unreliable; use a fine-tuned model")
        for a, b, hits, n in duplicate_identity_pairs(cat.identities, hold, cat.calibration.threshold):
            warnings.append(f"{a} and {b} may be the same animal: with {a} left out, {hits} of its {n} photos "
                            f"match {b} above the threshold; compare them and merge the names if so")
    except JaguarKitError as e:
        warnings.append(f"not calibrated: {e}")
    cat.warnings = warnings
    for w in warnings:
        log.warning(w)
    cat.save(folder)
    cat.embedded_now = len(todo_unique)
    return cat


def load_catalogue(folder: str | Path) -> Catalogue:
    return Catalogue.load(folder)


# --- identification ---------------------------------------------------------------------------


@dataclass
class Identification:
    """Result of :func:`identify`: one row per query photo in ``table`` plus what the report needs."""

    table: pd.DataFrame
    photos: list[Photo]
    keys: list[str]
    prepared: list[Path]
    top_ids: np.ndarray  # (Q, k) individual names
    top_scores: np.ndarray  # (Q, k)
    top_probs: np.ndarray  # (Q, k)
    top_photo: np.ndarray  # (Q, k) catalogue row of each candidate's best-matching photo
    decisions: list[str]
    catalogue: Catalogue

    def save_csv(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)


def what_to_check(decision: str, ids, scores, probs, cal: Calibration | None, same_file: str | None) -> str:
    """A short instruction for the person reviewing one photo."""
    if same_file:
        return f"Same file as catalogue photo {same_file} ({ids[0] if decision != 'new' else 'listed there'})."
    if cal is None:
        return f"Uncalibrated catalogue (too few individuals): compare with {ids[0]} by eye."
    if decision == "new":
        return (f"Likely a new individual: no candidate reaches p={cal.probability_threshold:.2f}. Compare the coat "
                f"pattern with {ids[0]} (p={probs[0]:.2f}); if it is not, give it a new name and add it to the catalogue.")
    if len(ids) > 1 and scores[1] >= cal.threshold:
        return (f"{ids[1]} also passes the threshold (p={probs[1]:.2f}): compare both on the same flank; "
                f"if they are one animal, merge their names.")
    # within a tenth of the way from the threshold to a perfect score: worth a closer look
    if scores[0] < cal.threshold + 0.1 * (1 - cal.threshold):
        return f"Close to the threshold: confirm against {ids[0]}'s photos on the same flank."
    return f"Strong match with {ids[0]}: a glance at the same flank is enough."


def identify_embeddings(catalogue: Catalogue, embeddings: np.ndarray, top_k: int = 5):
    """Top-k individuals, scores, probabilities, best catalogue photos and decisions for embeddings."""
    codes, uniques = catalogue.codes()
    if embeddings.shape[1] != catalogue.embeddings.shape[1]:
        raise JaguarKitError(f"embedding size {embeddings.shape[1]} differs from the catalogue's "
                             f"{catalogue.embeddings.shape[1]}: another model")
    sim = embeddings.astype(np.float32) @ catalogue.embeddings.T
    scores, best = individual_scores(sim, codes, len(uniques))
    k = min(top_k, len(uniques))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, 1)
    top_photo = np.take_along_axis(best, order, 1)
    top_ids = np.array(uniques, dtype=object)[order]
    cal = catalogue.calibration
    if cal is None:
        top_probs = np.full(top_scores.shape, np.nan)
        decisions = [str(t) for t in top_ids[:, 0]]
    else:
        top_probs = cal.probability(top_scores)
        decisions = [str(top_ids[i, 0]) if top_scores[i, 0] >= cal.threshold else "new" for i in range(len(order))]
    return top_ids, top_scores, top_probs, top_photo, decisions


def identify(catalogue: Catalogue | str | Path, photos: Sequence[Photo] | str | Path, model: Model | None = None,
             top_k: int = 5, cache_dir: str | Path | None = None, progress: bool = True,
             workers: int = 0) -> Identification:
    """Identify each photo against the catalogue: top-k individuals, probabilities, a decision.

    ``model`` defaults to the catalogue's own (loaded from its recorded source); another one is
    refused. Query photos are prepared and embedded under ``cache_dir`` (default: a ``cache``
    folder in the catalogue).
    """
    cat = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    if not isinstance(photos, (list, tuple)):
        photos = read_photos(photos, folder_labels=False)
    if model is None:
        model = load_model(cat.model["source"], prepared_size=cat.model["prepared_size"], tta=cat.model["tta"])
    cat.check_model(model)
    cache = Path(cache_dir) if cache_dir else (cat.folder or Path(".")) / "cache"
    keys, emb, files = embed_photos(model, photos, cache, progress=progress, workers=workers)
    return _identification(cat, photos, keys, files, emb, top_k)


def _identification(cat: Catalogue, photos, keys, files, emb, top_k) -> Identification:
    top_ids, top_scores, top_probs, top_photo, decisions = identify_embeddings(cat, emb, top_k)
    cal = cat.calibration
    by_key = {}
    for j, k in enumerate(cat.keys):
        by_key.setdefault(k, j)
    rows = []
    for i, p in enumerate(photos):
        same = cat.names[by_key[keys[i]]] if keys[i] in by_key else None
        check = what_to_check(decisions[i], list(top_ids[i]), list(top_scores[i]), list(top_probs[i]), cal, same)
        row = {"photo": p.label, "path": str(p.path), "decision": decisions[i],
               "probability": round(float(top_probs[i, 0]), 4), "score": round(float(top_scores[i, 0]), 4)}
        if p.identity is not None:
            row["true_identity"] = p.identity
        for r in range(top_ids.shape[1]):
            row[f"id_{r + 1}"] = top_ids[i, r]
            row[f"score_{r + 1}"] = round(float(top_scores[i, r]), 4)
            row[f"prob_{r + 1}"] = round(float(top_probs[i, r]), 4)
            row[f"match_{r + 1}"] = cat.names[top_photo[i, r]]
        row["check"] = check
        rows.append(row)
    return Identification(pd.DataFrame(rows), list(photos), keys, files, top_ids, top_scores, top_probs, top_photo,
                          decisions, cat)


# --- open-set evaluation ------------------------------------------------------------------------


def open_set_split(identities: Sequence[str], new_share: float = 0.3, query_share: float = 0.5,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An identity-disjoint split: ``(catalogue rows, known-query rows, new-query rows)``.

    ``new_share`` of the individuals are held out entirely (their photos are new-individual
    queries); of each remaining individual ``query_share`` of the photos are queries and the
    rest (at least one) form the catalogue.
    """
    ids = np.asarray(list(identities), dtype=object)
    uniques = sorted(set(ids))
    if len(uniques) < 4:
        raise JaguarKitError(f"open-set split: {len(uniques)} individuals; needs at least 4")
    if not 0 < new_share < 1:
        raise JaguarKitError(f"open-set split: the share of new individuals must be between 0 and 1, got {new_share}")
    rng = np.random.default_rng(seed)
    n_new = min(len(uniques) - MIN_IDENTITIES, max(1, round(new_share * len(uniques))))
    new = set(rng.choice(uniques, n_new, replace=False))
    cat_rows, known_rows, new_rows = [], [], []
    for u in uniques:
        rows = np.flatnonzero(ids == u)
        if u in new:
            new_rows.extend(rows)
            continue
        rows = rng.permutation(rows)
        n_q = min(len(rows) - 1, round(query_share * len(rows)))
        known_rows.extend(rows[:n_q])
        cat_rows.extend(rows[n_q:])
    return np.sort(cat_rows), np.sort(known_rows), np.sort(new_rows)


def evaluate_open_set(embeddings: np.ndarray, identities: Sequence[str], new_share: float = 0.3,
                      query_share: float = 0.5, seed: int = 0, target_false_merge: float = DEFAULT_TARGET_FMR,
                      top_k: int = 5) -> dict:
    """Build a catalogue from part of the known individuals, calibrate it on itself, identify the
    rest and the held-out individuals: top-1/top-5 of known, AUROC known vs. new, and the
    realised false-merge and false-split rates at the calibrated threshold beside the target."""
    from .metrics import open_set_scores

    ids = [str(i) for i in identities]
    cat_rows, known_rows, new_rows = open_set_split(ids, new_share, query_share, seed)
    cat_ids = [ids[i] for i in cat_rows]
    cal = calibrate(embeddings[cat_rows], cat_ids, target_false_merge)
    n = len(cat_rows)
    cat = Catalogue([str(i) for i in cat_rows], cat_ids, cat_ids, [""] * n, np.full((n, 4), -1),
                    embeddings[cat_rows].astype(np.float32), [b""] * n, {}, cal)
    q = np.concatenate([known_rows, new_rows]).astype(np.int64)
    top_ids, top_scores, _, _, _ = identify_embeddings(cat, embeddings[q], max(5, top_k))
    figures = open_set_scores(top_ids, top_scores, [ids[i] for i in q], set(cat_ids), cal.threshold)
    figures.update({
        "target_false_merge": target_false_merge,
        "threshold": cal.threshold,
        "probability_threshold": cal.probability_threshold,
        "catalogue_photos": int(n),
        "catalogue_individuals": len(set(cat_ids)),
        "new_individuals": len({ids[i] for i in new_rows}),
        "calibration_estimate": cal.estimated,
    })
    return figures


def catalogue_demo(data_dir: str | Path, model_source: str | Path | Model, out_dir: str | Path,
                   new_share: float = 0.3, seed: int = 0, prepared_size: int | None = None,
                   target_false_merge: float = DEFAULT_TARGET_FMR, progress: bool = True) -> dict:
    """The own-photos journey on a labelled folder (the demo's synthetic train photos).

    Holds ``new_share`` of the individuals out as new, indexes half of each other individual's
    photos into ``out_dir/catalogue``, identifies the rest and the held-out ones, and writes
    ``identify.csv``, ``report.html`` and ``figures.json`` into ``out_dir``. Returns the figures:
    top-1/top-5 of known individuals, AUROC known vs. new, the realised false-merge rate beside its
    target, the false-split rate, and index / identify throughput (photos per second).
    A model fine-tuned on these same individuals has seen the "new" ones: its figures are then
    optimistic (train it on the catalogue individuals only for an honest open-set figure).
    """
    from .metrics import open_set_scores
    from .pipeline import write_json
    from .report import write_identify_report

    out = Path(out_dir)
    photos = read_photos(data_dir, need_identity=True)
    cat_rows, known_rows, new_rows = open_set_split([p.identity for p in photos], new_share, 0.5, seed)
    model = model_source if isinstance(model_source, Model) else load_model(model_source, prepared_size=prepared_size)
    t = time.perf_counter()
    cat = build_catalogue([photos[i] for i in cat_rows], model, out / "catalogue", target_false_merge, progress=progress)
    index_s = time.perf_counter() - t
    queries = [photos[i] for i in np.concatenate([known_rows, new_rows])]
    t = time.perf_counter()
    res = identify(cat, queries, model=model, cache_dir=out / "cache", progress=progress)
    identify_s = time.perf_counter() - t
    res.save_csv(out / "identify.csv")
    page = write_identify_report(res, out / "report.html", title="Identification report (demo: held-out jaguars are new)")
    f = open_set_scores(res.top_ids, res.top_scores, [p.identity for p in queries], set(cat.identities),
                        cat.calibration.threshold if cat.calibration else float("-inf"))
    figures = {
        "model": model.source,
        "catalogue_photos": len(cat),
        "known_individuals": len(cat.individuals),
        "new_individuals": len({photos[i].identity for i in new_rows}),
        **f,
        "target_false_merge": target_false_merge,
        "threshold": None if cat.calibration is None else cat.calibration.threshold,
        "index_photos_per_s": len(cat) / max(index_s, 1e-9),
        "identify_photos_per_s": len(queries) / max(identify_s, 1e-9),
        "warnings": cat.warnings,
        "report": str(page),
    }
    write_json(out / "figures.json", figures)
    return figures


__all__ = [
    "Calibration",
    "Catalogue",
    "Identification",
    "Model",
    "build_catalogue",
    "calibrate",
    "catalogue_demo",
    "duplicate_identity_pairs",
    "embed_photos",
    "evaluate_open_set",
    "fit_logistic",
    "hold_out_scores",
    "identify",
    "identify_embeddings",
    "individual_scores",
    "load_catalogue",
    "load_model",
    "open_set_split",
    "threshold_for_rate",
    "what_to_check",
]

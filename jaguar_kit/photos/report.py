"""``report.html``: the page a person opens offline to review matches, and to decide on them.

The page is rendered from the Jinja2 templates in ``templates/`` with autoescaping on: every
name (photo, individual, group) is escaped by the engine, wherever it appears. Identification:
each photo beside its candidate individuals (each shown by its best-matching catalogue photo)
with score, probability, the decision and what to check. Clustering: each group with its
members. Both carry review controls (confirm, reject, rename; sorting and filtering) run by the
page's own script, which exports ``decisions.csv`` for ``jaguar-kit review``
(:mod:`jaguar_kit.photos.review`).

Up to :data:`INLINE_PHOTOS` photos the page is one self-contained file (thumbnails as ``data:``
URIs) that can be mailed or copied to a field laptop; above it the thumbnails are files in a
``thumbs/`` folder beside the page, loaded lazily.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..files import atomic_write_bytes, atomic_write_text
from .cluster import Clustering
from .coat import match_picture
from .identify import Identification
from .inputs import Photo, thumbnail_bytes

# A page with up to this many photos embeds its thumbnails. Each photo brings itself and its
# top-5 candidates: 6 thumbnails of ~4.5 KB, ~6 KB as base64, so ~35 KB a photo (1.4 MB for
# 40 measured) and ~7 MB at 200: under the 10-25 MB that mail services accept. Above, the
# thumbnails go to files beside the page (THUMBS) with lazy loading.
INLINE_PHOTOS = 200
THUMBS = "thumbs"
_CONTENT_KEY = re.compile(r"[0-9a-f]+(-\d+)*")  # a digest, plus a box's numbers: safe as a file name

_ENV = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def data_uri(jpeg: bytes | None) -> str:
    """A ``data:image/jpeg;base64,...`` URI; a grey 1x1 GIF when there is no picture."""
    if not jpeg:
        return "data:image/gif;base64,R0lGODlhAQABAIAAAMzMzAAAACH5BAAAAAAALAAAAAABAAEAAAICRAEAOw=="
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _thumb(path) -> bytes | None:
    try:
        return thumbnail_bytes(path)
    except Exception:  # noqa: BLE001 - a missing picture must not cost the whole page
        return None


class _Thumbs:
    """Where the page's pictures come from: ``data:`` URIs, or files in ``thumbs/`` beside the page.

    The files a page uses are listed in ``thumbs/.PAGE.manifest``; rewriting the page removes
    those it no longer uses (and only those: nothing else in the folder is touched).
    """

    def __init__(self, page: Path, n_photos: int):
        self.inline = n_photos <= INLINE_PHOTOS
        self.folder = page.parent / THUMBS
        self.manifest = self.folder / f".{page.name}.manifest"
        self.written: set[str] = set()

    def finish(self) -> None:
        """Record the files written; remove the previous render's files that are not used now."""
        before = set(self.manifest.read_text().split()) if self.manifest.is_file() else set()
        for name in before - self.written:
            if name.endswith(".jpg") and _CONTENT_KEY.fullmatch(name[:-4]):  # never a file the kit did not name
                (self.folder / name).unlink(missing_ok=True)
        if self.written:
            atomic_write_text(self.manifest, "\n".join(sorted(self.written)) + "\n")
        elif before:
            self.manifest.unlink(missing_ok=True)

    def src(self, key: str, jpeg: Callable[[], bytes | None]) -> str:
        if self.inline:
            return data_uri(jpeg())
        name = (key if _CONTENT_KEY.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()) + ".jpg"
        if name not in self.written:
            data = jpeg()
            if not data:
                return data_uri(None)
            atomic_write_bytes(self.folder / name, data)
            self.written.add(name)
        return f"{THUMBS}/{name}"


def _p(prob: float) -> str:
    return "n/a" if not np.isfinite(prob) else f"{prob:.2f}"


def _line(text: str, cls: str = "", prefix: str = "") -> dict:
    return {"text": text, "cls": cls, "prefix": prefix}


def _figure(src: str, lines: list[dict], prob: float | None = None) -> dict:
    finite = prob is not None and np.isfinite(prob)
    return {"src": src, "lines": lines, "prob": prob if finite else None,
            "prob_width": f"{max(0.0, min(1.0, prob)) * 100:.0f}" if finite else "0"}


def _part(text: str, badge: str = "", cls: str = "") -> dict:
    return {"text": text, "badge": badge, "cls": cls}


def _row(label: str, *parts: dict | str) -> dict:
    return {"label": label, "parts": [p if isinstance(p, dict) else _part(p) for p in parts]}


def _calibration_rows(cat) -> list[dict]:
    cal = cat.calibration
    rows = [_row("Catalogue", f"{len(cat)} photos of {len(cat.individuals)} individuals"),
            _row("Model", str(cat.model.get("source", "")))]
    if cal is None:
        rows.append(_row("Decision", _part("uncalibrated", badge="uncal"),
                         " too few individuals to calibrate a new-individual threshold: every photo gets its "
                         "closest individual"))
    else:
        e = cal.estimated
        if cal.uses_coat:
            rows.append(_row("Decision rule", f"known individual when its probability ≥ {cal.probability_threshold:.2g}"
                                              f" (one calibration over the global score and the coat pattern's "
                                              f"matched keypoints), else ", _part("new", badge="new")))
        else:
            rows.append(_row("Decision rule", f"known individual when its probability ≥ "
                                              f"{cal.probability_threshold:.2g} (score ≥ {cal.threshold:.3f}), else ",
                             _part("new", badge="new")))
        rows.append(_row("Calibration", f"target false-merge rate {cal.target_false_merge:.0%} (photos of an unseen "
                                        f"animal attached to a known one); on the catalogue, holding each individual "
                                        f"out: false merges {e.get('false_merge', float('nan')):.1%}, known photos "
                                        f"called new {e.get('false_split', float('nan')):.1%}"))
    rows += [_row("Warning", _part(w, cls="wrong")) for w in cat.warnings]
    return rows


def _photo_data(photo: Photo, key: str) -> dict:
    """What decisions.csv needs to find the photo again: its file, content key and box."""
    return {"label": photo.label, "name": photo.name, "path": str(photo.path.resolve()), "key": key,
            "box": "" if photo.box is None else ",".join(map(str, photo.box))}


def _page_id(kind: str, items) -> str:
    """Keys the page's saved review state: the same photos with the same proposals share it."""
    text = "\n".join([kind, *(f"{k}\t{p}" for k, p in items)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _render(template: str, path: Path, thumbs: _Thumbs, **context) -> Path:
    atomic_write_text(path, _ENV.get_template(template).render(lazy=not thumbs.inline, **context))
    thumbs.finish()
    return path


def _identify_entries(ident: Identification, thumbs: _Thumbs) -> list[dict]:
    """One entry per query photo: the photo, its candidates, the decision, what to check and review data."""
    cat = ident.catalogue
    cal = cat.calibration
    out = []
    for i, photo in enumerate(ident.photos):
        decision = ident.decisions[i]
        badge = "uncal" if cal is None else "new" if decision == "new" else "known"
        qlines = [_line(photo.label, "name"), _line(decision, f"badge {badge}", "decision: ")]
        if photo.identity is not None:
            ok = photo.identity == decision or (decision == "new" and photo.identity not in cat.individuals)
            qlines.append(_line(photo.identity, "right" if ok else "wrong", "listed as: "))
        query = _figure(thumbs.src(ident.keys[i], lambda f=ident.prepared[i]: _thumb(f)), qlines)
        candidates = []
        for r in range(ident.top_ids.shape[1]):
            who = str(ident.top_ids[i, r])
            prob = float(ident.top_probs[i, r])
            j = int(ident.top_photo[i, r])
            passes = cal is not None and bool(ident.top_passes[i, r])
            evidence = f"score {ident.top_scores[i, r]:.3f}"
            if ident.top_inliers is not None:
                evidence += f" · {int(ident.top_inliers[i, r])} keypoints"
            lines = [_line(f"{r + 1}. {who}", "name"), _line(f"{evidence} · p {_p(prob)}"),
                     _line(f"via {cat.names[j]}", "muted")]
            fig = _figure(thumbs.src(cat.keys[j], lambda j=j: cat.thumbs[j]), lines, prob)
            fig["cls"] = "chosen" if (r == 0 and decision == who) else ("passes" if passes else "")
            candidates.append(fig)
        matches = None
        points = ident.match_points[i] if ident.match_points is not None else None
        if points is not None and len(points):  # why: the same rosettes, joined by lines
            j = int(ident.top_photo[i, 0])
            box = None if cat.boxes[j][0] < 0 else tuple(int(v) for v in cat.boxes[j])
            picture = lambda photo=photo, j=j, box=box, points=points: match_picture(  # noqa: E731
                photo, cat.paths[j], box, points)
            matches = {"src": thumbs.src(f"match-{ident.keys[i]}-{cat.keys[j]}", picture), "text": f"{len(points)} matched keypoints between this photo and "
                                                          f"{cat.names[j]} ({ident.top_ids[i, 0]})"}
        p0 = float(ident.top_probs[i, 0])
        s = ident.top_scores[i]
        # most uncertain first: closest to the decision threshold (uncalibrated: smallest lead of the first candidate)
        uncertainty = (-abs(p0 - cal.probability_threshold) if cal is not None
                       else -(float(s[0] - s[1]) if len(s) > 1 else 1.0))
        out.append({**_photo_data(photo, ident.keys[i]), "id": f"p{i}", "query": query, "candidates": candidates,
                    "proposed": decision, "decision_class": "new" if decision == "new" else "known",
                    "probability": f"{p0:.4f}" if np.isfinite(p0) else "",
                    "uncertainty": f"{uncertainty:.4f}", "check": str(ident.table["check"].iloc[i]), "matches": matches,
                    "search": " ".join([photo.label, decision, *map(str, ident.top_ids[i])])})
    return out


def write_identify_report(ident: Identification, path: str | Path, title: str = "Identification report") -> Path:
    """``report.html`` for :func:`jaguar_kit.photos.identify.identify`."""
    path = Path(path)
    thumbs = _Thumbs(path, len(ident.photos))
    entries = _identify_entries(ident, thumbs)
    n_new = sum(d == "new" for d in ident.decisions)
    rows = [_row("Photos", f"{len(ident.photos)}: {len(ident.photos) - n_new} matched to a known individual, "
                           f"{n_new} ", _part("new", badge="new")), *_calibration_rows(ident.catalogue)]
    return _render("identify.html", path, thumbs, title=title, summary=rows, entries=entries,
                   banner=ident.catalogue.banner, individuals=ident.catalogue.individuals,
                   page_id=_page_id("identify", [(e["key"], e["proposed"]) for e in entries]))


def write_cluster_report(result: Clustering, path: str | Path, title: str = "Clustering report") -> Path:
    """``report.html`` for :func:`jaguar_kit.photos.cluster.cluster`: each group with its members."""
    path = Path(path)
    thumbs = _Thumbs(path, len(result.photos))
    ident = result.identification
    known = set(ident.catalogue.individuals) if ident is not None else set()
    n_groups = len(result.group_names)
    rows = [_row("Photos", f"{len(result.photos)} in {n_groups} groups "
                           f"({sum(1 for g in range(n_groups) if (result.groups == g).sum() == 1)} single photos)"),
            _row("Linking rule", f"two photos with similarity ≥ {result.threshold:.3f} are in the same group")]
    if ident is not None:
        rows += _calibration_rows(ident.catalogue)

    def member(i: int) -> dict:
        p = result.photos[i]
        lines = [_line(p.label, "name")]
        if ident is not None:
            lines.append(_line(f"closest known: {ident.top_ids[i, 0]} (p {_p(float(ident.top_probs[i, 0]))})"))
        if p.identity is not None:
            lines.append(_line(f"listed as: {p.identity}"))
        src = thumbs.src(result.keys[i], lambda f=result.prepared[i]: _thumb(f))
        return {**_photo_data(p, result.keys[i]), "figure": _figure(src, lines)}

    def reference(members: np.ndarray, base: str) -> dict | None:
        """The catalogue photo that best matches the group's individual, to compare with."""
        best = None
        for i in members:
            for r in range(ident.top_ids.shape[1]):
                if ident.top_ids[i, r] == base and (best is None or ident.top_scores[i, r] > best[0]):
                    best = (ident.top_scores[i, r], int(ident.top_photo[i, r]))
        if best is None:
            return None
        j = best[1]
        lines = [_line(f"catalogue: {base}", "name"), _line(ident.catalogue.names[j], "muted")]
        return _figure(thumbs.src(ident.catalogue.keys[j], lambda: ident.catalogue.thumbs[j]), lines)

    groups, singles = [], []
    for g, name in enumerate(result.group_names):
        members = np.flatnonzero(result.groups == g)
        base = name if name in known else None  # the known individual it is attached to (else new-NNN, group-NNN)
        badge = "new" if name.startswith("new-") else "known" if ident is not None else "uncal"
        probability = uncertainty = ""
        if ident is not None:
            probs = ident.top_probs[members, 0]
            probability = f"{np.nanmean(probs):.4f}" if np.isfinite(probs).any() else ""
            # most uncertain first: the share of members whose own decision disagrees with the group's
            uncertainty = f"{np.mean([ident.decisions[i] != (base or 'new') for i in members]):.4f}"
        entry = {"id": f"g{g}", "name": name, "proposed": base or name, "badge": badge,
                 "decision_class": "known" if base else "new", "probability": probability,
                 "uncertainty": uncertainty, "check": result.group_checks[g],
                 "size_text": f"{len(members)} photo{'s' if len(members) != 1 else ''}",
                 "members": [member(i) for i in members],
                 "reference": reference(members, base) if base else None}
        entry["search"] = " ".join([name, *(m["label"] for m in entry["members"])])
        (singles if len(members) == 1 and badge != "known" else groups).append(entry)
    return _render("cluster.html", path, thumbs, title=title, summary=rows, groups=groups, singles=singles,
                   banner=ident.catalogue.banner if ident is not None else None,
                   individuals=sorted(known),
                   page_id=_page_id("cluster", [(m["key"], e["proposed"]) for e in groups + singles
                                                for m in e["members"]]))


__all__ = ["INLINE_PHOTOS", "data_uri", "write_cluster_report", "write_identify_report"]

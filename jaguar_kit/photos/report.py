"""``report.html``: one self-contained page a person opens offline to review matches.

Every thumbnail is embedded as a ``data:`` URI (no file next to the page is needed, so the
page can be mailed or copied to a field laptop). Identification: each photo beside its
candidate individuals (each shown by its best-matching catalogue photo) with score,
probability, the decision and what to check. Clustering: each group with its members.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from ..files import atomic_write_text
from .cluster import Clustering
from .identify import Identification
from .inputs import thumbnail_bytes

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:20px;color:#222;background:#f6f6f3}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:24px 0 8px}
.summary{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;font-size:14px;line-height:1.5}
.summary td{padding:1px 12px 1px 0}
.entry{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:10px}
.row{display:flex;gap:10px;align-items:flex-start;flex-wrap:wrap}
figure{margin:0;width:170px;font-size:12px;line-height:1.35}
figure img{width:160px;height:120px;object-fit:contain;background:#222;border:4px solid #ccc;border-radius:4px;display:block}
figure.query img{border-color:#3050c0}
figure.chosen img{border-color:#1a8f2e}
figure.passes img{border-color:#e0a000}
.name{font-weight:600;word-break:break-all}
.bar{height:6px;background:#e4e4e4;border-radius:3px;margin-top:2px;width:160px}
.bar span{display:block;height:6px;border-radius:3px;background:#1a8f2e}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:13px;color:#fff}
.known{background:#1a8f2e} .new{background:#d06a00} .uncal{background:#777}
.check{margin-top:8px;font-size:14px;background:#fffbe6;border-left:4px solid #e0a000;padding:4px 8px}
.sep{width:2px;align-self:stretch;background:#ddd;margin:0 4px}
.muted{color:#777} .wrong{color:#b00020;font-weight:600} .right{color:#1a8f2e;font-weight:600}
.legend span{margin-right:14px}
.single .badge{margin-bottom:3px}
"""


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


def _page(title: str, summary_rows: list[tuple[str, str]], body: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary_rows)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<div class=\"summary\"><table>{rows}</table></div>\n{body}\n</body></html>\n")


def _figure(uri: str, lines: list[str], cls: str = "", prob: float | None = None) -> str:
    bar = ""
    if prob is not None and np.isfinite(prob):
        bar = f"<div class=\"bar\"><span style=\"width:{max(0.0, min(1.0, prob)) * 100:.0f}%\"></span></div>"
    text = "<br>".join(lines)
    return f"<figure class=\"{cls}\"><img src=\"{uri}\" alt=\"\">{bar}<figcaption>{text}</figcaption></figure>"


def _calibration_rows(cat) -> list[tuple[str, str]]:
    cal = cat.calibration
    rows = [("Catalogue", f"{len(cat)} photos of {len(cat.individuals)} individuals"),
            ("Model", html.escape(str(cat.model.get("source", ""))))]
    if cal is None:
        rows.append(("Decision", "<span class=\"badge uncal\">uncalibrated</span> too few individuals to calibrate "
                                 "a new-individual threshold: every photo gets its closest individual"))
    else:
        e = cal.estimated
        rows.append(("Decision rule", f"known individual when its probability &ge; {cal.probability_threshold:.2f} "
                                      f"(score &ge; {cal.threshold:.3f}), else <span class=\"badge new\">new</span>"))
        rows.append(("Calibration", f"target false-merge rate {cal.target_false_merge:.0%} (photos of an unseen "
                                    f"animal attached to a known one); on the catalogue, holding each individual out: "
                                    f"false merges {e.get('false_merge', float('nan')):.1%}, known photos called new "
                                    f"{e.get('false_split', float('nan')):.1%}"))
    for w in cat.warnings:
        rows.append(("Warning", f"<span class=\"wrong\">{html.escape(w)}</span>"))
    return rows


def identify_entries(ident: Identification, query_thumbs: list[bytes | None]) -> list[str]:
    """One HTML block per query photo: the photo, its candidates, the decision and what to check."""
    cat = ident.catalogue
    cal = cat.calibration
    t = None if cal is None else cal.threshold
    out = []
    for i, photo in enumerate(ident.photos):
        decision = ident.decisions[i]
        badge = ("uncal" if cal is None else "new" if decision == "new" else "known")
        qlines = [f"<span class=\"name\">{html.escape(photo.label)}</span>",
                  f"decision: <span class=\"badge {badge}\">{html.escape(decision)}</span>"]
        if photo.identity is not None:
            ok = photo.identity == decision or (decision == "new" and photo.identity not in cat.individuals)
            qlines.append(f"listed as: <span class=\"{'right' if ok else 'wrong'}\">{html.escape(photo.identity)}</span>")
        cells = [_figure(data_uri(query_thumbs[i]), qlines, "query"), "<div class=\"sep\"></div>"]
        for r in range(ident.top_ids.shape[1]):
            who = str(ident.top_ids[i, r])
            prob = float(ident.top_probs[i, r])
            j = int(ident.top_photo[i, r])
            passes = t is not None and ident.top_scores[i, r] >= t
            cls = "chosen" if (r == 0 and decision == who) else ("passes" if passes else "")
            lines = [f"<span class=\"name\">{r + 1}. {html.escape(who)}</span>",
                     f"score {ident.top_scores[i, r]:.3f} &middot; p {'n/a' if not np.isfinite(prob) else f'{prob:.2f}'}",
                     f"<span class=\"muted\">via {html.escape(cat.names[j])}</span>"]
            cells.append(_figure(data_uri(cat.thumbs[j]), lines, cls, prob))
        check = html.escape(str(ident.table["check"].iloc[i]))
        out.append(f"<section class=\"entry\" data-photo=\"{html.escape(photo.label)}\">"
                   f"<div class=\"row\">{''.join(cells)}</div><div class=\"check\">Check: {check}</div></section>")
    return out


def write_identify_report(ident: Identification, path: str | Path, title: str = "Identification report") -> Path:
    """``report.html`` for :func:`jaguar_kit.photos.identify.identify`."""
    thumbs = [_thumb(f) for f in ident.prepared]
    n_new = sum(d == "new" for d in ident.decisions)
    rows = _calibration_rows(ident.catalogue)
    rows.insert(0, ("Photos", f"{len(ident.photos)}: {len(ident.photos) - n_new} matched to a known individual, "
                              f"{n_new} <span class=\"badge new\">new</span>"))
    legend = ("<p class=\"legend\"><span>blue frame: the photo</span><span>green: the decision</span>"
              "<span>amber: also above the threshold</span><span>bar: probability</span></p>")
    body = legend + "\n".join(identify_entries(ident, thumbs))
    atomic_write_text(path, _page(title, rows, body))
    return Path(path)


def write_cluster_report(result: Clustering, path: str | Path, title: str = "Clustering report") -> Path:
    """``report.html`` for :func:`jaguar_kit.photos.cluster.cluster`: each group with its members."""
    thumbs = [_thumb(f) for f in result.prepared]
    n_groups = len(result.group_names)
    rows = [("Photos", f"{len(result.photos)} in {n_groups} groups "
                       f"({sum(1 for g in range(n_groups) if (result.groups == g).sum() == 1)} single photos)"),
            ("Linking rule", f"two photos with similarity &ge; {result.threshold:.3f} are in the same group")]
    if result.identification is not None:
        rows += _calibration_rows(result.identification.catalogue)
    ident = result.identification

    def member(i: int) -> str:
        p = result.photos[i]
        lines = [f"<span class=\"name\">{html.escape(p.label)}</span>"]
        if ident is not None:
            lines.append(f"closest known: {html.escape(str(ident.top_ids[i, 0]))} (p {ident.top_probs[i, 0]:.2f})")
        if p.identity is not None:
            lines.append(f"listed as: {html.escape(p.identity)}")
        return f"<div class=\"member\" data-photo=\"{html.escape(p.label)}\">{_figure(data_uri(thumbs[i]), lines)}</div>"

    def reference(members: np.ndarray, name: str) -> str:
        """The catalogue photo that best matches the group's individual, to compare with."""
        if ident is None or name.startswith("new-"):
            return ""
        base = name.rsplit("-", 1)[0] if name not in ident.catalogue.individuals else name
        best = None
        for i in members:
            for r in range(ident.top_ids.shape[1]):
                if ident.top_ids[i, r] == base and (best is None or ident.top_scores[i, r] > best[0]):
                    best = (ident.top_scores[i, r], int(ident.top_photo[i, r]))
        if best is None:
            return ""
        j = best[1]
        lines = [f"<span class=\"name\">catalogue: {html.escape(base)}</span>",
                 f"<span class=\"muted\">{html.escape(ident.catalogue.names[j])}</span>"]
        return _figure(data_uri(ident.catalogue.thumbs[j]), lines, "chosen") + "<div class=\"sep\"></div>"

    body, singles = [], []
    for g, name in enumerate(result.group_names):
        members = np.flatnonzero(result.groups == g)
        badge = "new" if name.startswith("new-") else "known" if ident is not None else "uncal"
        if len(members) == 1 and badge != "known":  # single new photos: one compact section below
            singles.append(f"<div class=\"single\" data-group=\"{html.escape(name)}\"><span class=\"badge {badge}\">"
                           f"{html.escape(name)}</span>{member(members[0])}</div>")
            continue
        body.append(f"<section class=\"entry group\" data-group=\"{html.escape(name)}\"><h2><span class=\"badge {badge}\">"
                    f"{html.escape(name)}</span> {len(members)} photo{'s' if len(members) != 1 else ''}</h2>"
                    f"<div class=\"row\">{reference(members, name)}{''.join(member(i) for i in members)}</div>"
                    f"<div class=\"check\">Check: {html.escape(result.group_checks[g])}</div></section>")
    if singles:
        body.append(f"<section class=\"entry singles\"><h2>{len(singles)} photos that match no other photo</h2>"
                    f"<div class=\"row\">{''.join(singles)}</div><div class=\"check\">Check: each may be a new "
                    f"individual seen once, or a poor view of an animal in a group above.</div></section>")
    atomic_write_text(path, _page(title, rows, "\n".join(body)))
    return Path(path)


__all__ = ["data_uri", "write_cluster_report", "write_identify_report"]

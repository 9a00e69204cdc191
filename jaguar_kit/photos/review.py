"""Apply a person's review (``decisions.csv``, exported by ``report.html``) to a catalogue.

``decisions.csv`` has one row per reviewed photo (photos not reviewed are not in it)::

    photo,path,key,box,kind,group,proposed,action,name,reviewer,decided_at

``action`` is ``confirm`` (the photo is ``proposed``), ``reject`` (it is not), ``rename`` (it
is ``name``: another known individual, or a new one that now gets its name) or ``skip``.
Confirmed and renamed photos join the catalogue through
:func:`jaguar_kit.photos.catalogue.build_catalogue` with the catalogue's own model, so only
they are embedded and the catalogue recalibrates; a confirmed proposal that names no known
individual (``new``, ``new-001``) is recorded but added only once it is renamed. Rejected
photos are recorded and not added.

Every decision applied is appended to ``CATALOGUE/history.jsonl`` (one JSON object a line:
who, when, which photo, what, under which name), after the catalogue is saved. A decision
already in the history (same photo content key, action and name) is not applied again, so
applying the same ``decisions.csv`` twice changes nothing, and a run killed between the two
writes is completed by the next one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import JaguarKitError
from ..files import fault_point
from .calibration import DEFAULT_TARGET_FMR
from .catalogue import Catalogue, build_catalogue, catalogue_model
from .inputs import Photo, _raise_problems, photo_key
from .model import Model
from .names import normalise_name

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
COLUMNS = ("photo", "path", "key", "box", "kind", "group", "proposed", "action", "name", "reviewer", "decided_at")
REQUIRED = ("path", "key", "action")
ACTIONS = ("confirm", "reject", "rename", "skip")
RESERVED_NAMES = {"new"}  # identify's word for "no known individual"
MAX_NAME = 200  # characters: a name, not a paste


@dataclass(frozen=True)
class Decision:
    """One row of ``decisions.csv``; ``name`` is the individual it is filed under ("" when not added)."""

    line: int
    photo: Photo
    key: str
    kind: str
    group: str
    proposed: str
    action: str
    name: str
    reviewer: str
    decided_at: str

    @property
    def adds(self) -> bool:
        return bool(self.name) and self.action in ("confirm", "rename")

    @property
    def identity(self) -> tuple[str, str, str]:
        """What makes a decision the same one again (applied once)."""
        return self.key, self.action, self.name


def _box(text: str) -> tuple[int, int, int, int] | None:
    if not text.strip():
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ValueError
    x, y, w, h = map(int, parts)
    if w <= 0 or h <= 0:
        raise ValueError
    return x, y, w, h


def read_decisions(path: str | Path, individuals: set[str]) -> list[Decision]:
    """The decisions in ``path``, every row checked (one line per problem, all raised as one error).

    ``individuals``: the catalogue's; a confirmed proposal outside them (``new``, ``new-001``)
    is kept with no name (recorded, not added).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise JaguarKitError(f"{path}: cannot read as a UTF-8 CSV ({e})") from e
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[str]]] = []  # (the line each row starts on, its cells)
    start = 1
    try:
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise JaguarKitError(f"{path}: line {reader.line_num}: cannot parse CSV ({e})") from e
    if not rows:
        raise JaguarKitError(f"{path}: empty; expected the decisions.csv that report.html exports")
    header = [h.strip().lower() for h in rows[0][1]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        hint = " - wrong delimiter? expected ','" if len(header) == 1 and (";" in header[0] or "\t" in header[0]) else ""
        raise JaguarKitError(f"{path}: line {rows[0][0]}: no {', '.join(missing)} column; expected the decisions.csv "
                             f"that report.html exports ({','.join(COLUMNS)}){hint}")
    col = {h: i for i, h in enumerate(header)}
    problems: list[str] = []
    decisions: list[Decision] = []
    seen: dict[str, Decision] = {}
    for line, row in rows[1:]:
        where = f"{path} line {line}"
        if len(row) != len(header):
            problems.append(f"{where}: {len(row)} fields, but the header has {len(header)}")
            continue
        cell = {c: row[col[c]].strip() if c in col else "" for c in COLUMNS}
        action = cell["action"].lower()
        if action not in ACTIONS:
            problems.append(f"{where}: action {cell['action']!r}; expected one of {', '.join(ACTIONS)}")
            continue
        if action == "skip":
            continue
        if not cell["path"] or not cell["key"]:
            problems.append(f"{where}: empty {'path' if not cell['path'] else 'key'}")
            continue
        try:
            box = _box(cell["box"])
        except ValueError:
            problems.append(f"{where}: box {cell['box']!r}: expected x,y,w,h in pixels")
            continue
        proposed = normalise_name(cell["proposed"])
        name = normalise_name(cell["name"])
        if action == "rename":
            if not name:
                problems.append(f"{where}: rename without a name")
                continue
        elif action == "confirm":
            name = proposed if proposed in individuals else ""  # `new`, `new-001`: rename it to add it
        else:
            name = ""
        if name and (name.lower() in RESERVED_NAMES or len(name) > MAX_NAME
                     or any(unicodedata.category(c).startswith("C") for c in name)):
            problems.append(f"{where}: {name[:40]!r} cannot name an individual (reserved word, control character "
                            f"or over {MAX_NAME} characters)")
            continue
        file = Path(cell["path"])
        photo = Photo(file, name or None, box, cell["photo"] or file.name, where)
        if name:  # it will be embedded: it must be the photo the page showed
            if not file.is_file():
                problems.append(f"{where}: {file}: file not found (moved since the page was made?)")
                continue
            try:
                key = photo_key(photo)
            except JaguarKitError as e:
                problems.append(f"{where}: {e}")
                continue
            if key != cell["key"]:
                problems.append(f"{where}: {file}: its content changed since the page was made (key {key}, "
                                f"the page showed {cell['key']}); identify it again")
                continue
        d = Decision(line, photo, cell["key"], cell["kind"], normalise_name(cell["group"]), proposed, action, name,
                     cell["reviewer"], cell["decided_at"])
        earlier = seen.get(d.key)
        if earlier is not None and (earlier.action, earlier.name) != (action, name):
            problems.append(f"{where}: {photo.name} was decided differently on line {earlier.line} "
                            f"({earlier.action} {earlier.name}): keep one")
            continue
        if earlier is None:
            seen[d.key] = d
            decisions.append(d)
    _raise_problems(problems)
    return decisions


def read_history(catalogue: str | Path) -> list[dict]:
    """Every decision applied to the catalogue folder, oldest first (``history.jsonl``)."""
    path = Path(catalogue) / HISTORY
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed writer: its decision is applied again next time
            log.warning("%s line %d: not a complete record (ignored)", path, n)
    return out


def _append_history(folder: Path, records: list[dict]) -> None:
    """Append records in one write, flushed to disk; a cut last line is closed first."""
    path = folder / HISTORY
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class ReviewResult:
    """What :func:`apply_decisions` did."""

    applied: list[Decision] = field(default_factory=list)
    already: int = 0  # decisions found in the history (applied before)
    catalogue: Catalogue | None = None
    new_individuals: list[str] = field(default_factory=list)
    history: Path | None = None

    def summary(self) -> str:
        counts = {a: sum(d.action == a for d in self.applied) for a in ("confirm", "rename", "reject")}
        added = sum(d.adds for d in self.applied)
        text = (f"{len(self.applied)} decisions applied ({counts['confirm']} confirmed, {counts['rename']} renamed, "
                f"{counts['reject']} rejected): {added} photos added")
        if self.new_individuals:
            text += f", new individuals: {', '.join(self.new_individuals)}"
        unnamed = sum(d.action == "confirm" and not d.name for d in self.applied)
        if unnamed:  # `new`, `new-001`, or a name this catalogue does not have
            text += (f"; {unnamed} confirmed without an individual of this catalogue to join: recorded, not added "
                     f"(Rename them in the page to add them)")
        if self.already:
            text += f"; {self.already} applied before (unchanged)"
        if self.catalogue is not None:
            text += f"; catalogue now {len(self.catalogue)} photos of {len(self.catalogue.individuals)} individuals"
        return text


def apply_decisions(catalogue: str | Path, decisions: str | Path, model: Model | None = None, device: str = "auto",
                    progress: bool = True) -> ReviewResult:
    """Apply ``decisions`` (a decisions.csv) to the catalogue folder (see the module docstring)."""
    folder = Path(catalogue)
    cat = Catalogue.load(folder)
    rows = read_decisions(decisions, set(cat.individuals))
    done = {(h.get("key"), h.get("action"), h.get("name")) for h in read_history(folder)}
    todo = [d for d in rows if d.identity not in done]
    result = ReviewResult(already=len(rows) - len(todo), history=folder / HISTORY)
    if not todo:
        return result
    adds = [d for d in todo if d.adds]
    if adds:
        if model is None:
            model = catalogue_model(cat, device=device)
        target = cat.calibration.target_false_merge if cat.calibration is not None else DEFAULT_TARGET_FMR
        before = set(cat.individuals)
        result.catalogue = build_catalogue([d.photo for d in adds], model, folder, target_false_merge=target,
                                           progress=progress)
        result.new_individuals = sorted(set(result.catalogue.individuals) - before)
    fault_point("review-history")  # tests: a kill here leaves the catalogue updated, the history not yet
    in_catalogue = set(cat.keys)
    for d in todo:
        if d.action == "reject" and d.key in in_catalogue:
            log.warning("%s: %s is in the catalogue already; a reject does not remove it (index with --replace)",
                        d.photo.origin, d.photo.name)
    applied_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _append_history(folder, [{"applied_at": applied_at, "decided_at": d.decided_at, "reviewer": d.reviewer,
                              "key": d.key, "path": str(d.photo.path), "photo": d.photo.name, "kind": d.kind,
                              "group": d.group, "proposed": d.proposed, "action": d.action, "name": d.name,
                              "outcome": "added" if d.adds else "recorded", "decisions": str(Path(decisions))}
                             for d in todo])
    result.applied = todo
    return result


__all__ = ["ACTIONS", "COLUMNS", "HISTORY", "Decision", "ReviewResult", "apply_decisions", "read_decisions",
           "read_history"]

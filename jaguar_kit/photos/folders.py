"""A folder per group of a clustering, holding its photos as links or copies, written safely.

Names come from people (an individual called ``../../victim`` or ``<b>Bob</b>``) and photo
names from folders (``a/x.png`` next to ``a__x.png``), so every folder and file name is made
by :func:`~jaguar_kit.photos.names.safe_component`, made unique (a short digest of the name,
or of the photo's content, when two would coincide, case-insensitively as on macOS and
Windows), and checked to resolve inside the output folder.

The kit never replaces or removes a file it did not write: ``manifest.json`` lists what a run
wrote (each link with its target, each copy with its content digest); the next run into the
same folder first removes exactly those entries that are still as written, then writes its
own. Anything else found where a file would go is left, and named in one warning line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..errors import JaguarKitError
from ..files import atomic_path, atomic_write_text, is_inside
from .cluster import Clustering
from .inputs import mark_kit_folder, photo_digest
from .names import MAX_COMPONENT_BYTES, few, safe_component, short_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _unique(component: str, used: set[str], distinct: str, keep_suffix: bool) -> str:
    """``component``, or with ``-DIGEST`` (of ``distinct``) before its extension if already ``used``."""
    stem, dot, suffix = component.rpartition(".") if keep_suffix and "." in component else (component, "", "")
    n, unique = 0, component
    while unique.casefold() in used:
        n += 1
        tag = short_digest(distinct) if n == 1 else f"{short_digest(distinct)}-{n}"
        unique = f"{safe_component(stem, max_bytes=MAX_COMPONENT_BYTES - len(tag) - 1)}-{tag}{dot}{suffix}"
    used.add(unique.casefold())
    return unique


def _plan(result: Clustering) -> list[tuple[str, str, int]]:
    """``(folder, file, photo index)`` per photo: one safe, unique component each."""
    used_folders = {MANIFEST.casefold()}
    folders = [_unique(safe_component(n), used_folders, n, False) for n in result.group_names]
    used_files: dict[str, set[str]] = {f: set() for f in folders}
    plan = []
    for i, p in enumerate(result.photos):
        folder = folders[result.groups[i]]
        base = p.name.replace("/", "__").replace("\\", "__")
        if p.box is not None:
            stem, dot, suffix = base.rpartition(".") if "." in base else (base, "", "")
            base = f"{stem}_box{'-'.join(map(str, p.box))}{dot}{suffix}"
        name = _unique(safe_component(base, keep_suffix=True), used_files[folder], result.keys[i], True)
        plan.append((folder, name, i))
    return plan


def _safe_entry(out_dir: Path, rel: object, depth: int) -> Path | None:
    """``out_dir / rel`` if ``rel`` (read from a manifest) is a plain relative path inside it."""
    if not isinstance(rel, str):
        return None
    parts = rel.split("/")
    if len(parts) != depth or any(p in ("", ".", "..") or "\\" in p for p in parts):
        return None
    path = out_dir.joinpath(*parts)
    return path if is_inside(path.parent, out_dir) else None


def _remove_previous(out_dir: Path) -> set[str]:
    """Remove what the previous run listed in its manifest and is still as it wrote it.

    Returns the group folders of that run that could not be removed (they hold other files).
    """
    path = out_dir / MANIFEST
    try:
        old = json.loads(path.read_text())
        files, folders = list(old["files"]), list(old["folders"])
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JaguarKitError(f"{path}: unreadable ({e}); it lists what the previous run wrote, so nothing is "
                             f"replaced: fix or delete it, or choose another output folder") from e
    for entry in files:
        dst = _safe_entry(out_dir, entry.get("path") if isinstance(entry, dict) else None, 2)
        if dst is None:
            continue
        if "link" in entry:
            ours = dst.is_symlink() and os.readlink(dst) == entry["link"]
        else:
            ours = dst.is_file() and not dst.is_symlink() and photo_digest(dst) == entry.get("digest")
        if ours:
            dst.unlink()
    kept = set()
    for rel in folders:
        folder = _safe_entry(out_dir, rel, 1)
        if folder is None or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            folder.rmdir()
        except OSError:  # not empty: it holds files the kit did not write
            kept.add(rel)
    path.unlink()
    return kept


def write_group_folders(result: Clustering, out_dir: str | Path, mode: str = "link") -> Path:
    """A folder per group holding its photos, as symbolic links (``link``) or copies (``copy``).

    A rerun into ``out_dir`` replaces what the previous run wrote there, and nothing else
    (see the module docstring).
    """
    if mode not in ("link", "copy"):
        raise JaguarKitError(f"folders: expected link or copy, got {mode!r}")
    out_dir = Path(out_dir)
    inside = [p for p in result.photos if is_inside(p.path, out_dir)]
    if inside:
        raise JaguarKitError(f"{out_dir}: holds photos being grouped ({inside[0].path}); write the group folders "
                             f"elsewhere (another --out)")
    mark_kit_folder(out_dir)
    ours = _remove_previous(out_dir)
    plan, left = [], []
    for folder, name, i in _plan(result):
        dst = out_dir / folder / name
        if os.path.lexists(dst) or (os.path.lexists(dst.parent) and not (dst.parent.is_dir()
                                                                          and is_inside(dst.parent, out_dir))):
            left.append(f"{folder}/{name}")
        else:
            plan.append((folder, name, i))
    created = sorted({f for f, _, _ in plan if not os.path.lexists(out_dir / f)} | ours)
    entries = []
    for folder, name, i in plan:
        p = result.photos[i]
        entries.append({"path": f"{folder}/{name}", "photo": str(p.path),
                        **({"link": str(p.path.resolve())} if mode == "link" else {"digest": result.keys[i][:32]})})
    # listed before anything is written: a killed run's files are still known as the kit's
    manifest = {"mode": mode, "folders": created, "files": entries}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    for (folder, name, i), entry in zip(plan, entries):
        dst = out_dir / folder / name
        dst.parent.mkdir(exist_ok=True)
        if mode == "link":
            os.symlink(entry["link"], dst)
        else:
            with atomic_path(dst) as tmp:
                shutil.copyfile(result.photos[i].path, tmp)
    if left:
        log.warning("%s: %d file(s) already there were not written by jaguar-kit and are left as they are; those "
                    "photos are not in the group folders: %s", out_dir, len(left), few(left))
    return out_dir


__all__ = ["MANIFEST", "write_group_folders"]

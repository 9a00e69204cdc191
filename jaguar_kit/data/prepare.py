"""The prepared-image cache: decode each competition image once, not every epoch.

Decoding a full 3000 x 2000 RGBA PNG costs about 0.16 s per core. :func:`prepare_images`
decodes each image once, applies the alpha mode (crop / blank / ignore), shrinks it so
its longest side is at most ``size`` (``cv2.INTER_AREA``; smaller images are not
enlarged) and stores it; training then reads the small file with :func:`load_prepared`.

Stored format: JPEG quality 95, chosen by measurement (``benchmarks/bench_prepare.py``,
2 shared CPU cores, 3000 x 2000 RGBA sources, 768 px prepared, 384 px training resize):
training loader on the original PNGs 3.2 img/s; on the JPEG cache 106 img/s (33x, the
target is >= 20x) at ~120 KB per image. PNG level 1 reaches only 14x at 560 KB; raw .npy
102x but ~1 MB per image (2.4 GB for the competition, all of it kernel output on Kaggle)
for speed the loader does not need. Quality 95 keeps the rosette pattern; the 4:2:0 chroma
subsampling loses colour detail the model barely uses.

Cache layout and keys::

    cache_root / "crop-m0.05-s768-jpg95-v2" / <source folder name> / <file name>.<bytes>.jpg

- The folder name holds every setting and ``PREP_VERSION``: a changed setting or a changed
  preprocessing never reuses stale files.
- Files keep their source folder's name as a sub-folder, so ``train/x.png`` and
  ``test/x.png`` (or ``Ana/x.jpg`` and ``Bo/x.jpg``) never collide. The key ignores the
  absolute path on purpose: the same data attached at another ``/kaggle/input/...`` path
  reuses the cache.
- ``manifest.jsonl`` holds one record per prepared file, appended the moment the file is
  in place: the digest (SHA-256) of the prepared JPEG, the source's size, modification time
  and digest, and whether its mask was empty. A prepared file is reused only when its
  record exists, its bytes still have the recorded digest (a damaged file is prepared
  again), and its source is unchanged (same size and time, or else the same digest: a
  different picture under the same name is prepared anew). A file without a record (the
  process was killed between the two writes) is prepared again, so a resumed run reports
  the same empty masks as a clean one. A torn last line of a killed run is ignored.
- Writes are atomic (temporary file + ``os.replace``): a killed run leaves at most a
  hidden ``.*.tmp-*`` file, which is never read.
- From a script without an ``if __name__ == "__main__":`` guard, worker processes would
  re-run the script (``spawn`` imports it again) and respawn forever: such a call runs in
  this process instead, with a warning.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..errors import JaguarKitError
from ..files import atomic_write_bytes, atomic_write_text, fault_point, file_digest
from ..config import AlphaMode, check_choice
from ..processes import run_tasks
from .images import apply_alpha_mode, cut_box, decode_image_bytes, mask_is_empty

log = logging.getLogger(__name__)

PREP_VERSION = 2  # bump when the preprocessing or the cache's layout changes: old caches are then not reused
FORMAT = "jpg95"
JPEG_QUALITY = 95
MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"


class PrepareResult(dict):
    """``{source file name: prepared file}`` plus a summary of the call.

    Keys are the sources' file names (``train_0001.png``). When one call holds several
    different sources with the same file name (``train/x.png`` and ``test/x.png``), those
    are keyed ``folder/name`` instead and the bare name raises a KeyError saying so. Any
    source can also be looked up by its path (a ``Path`` or the path string) or by any
    trailing part of it that names one source only (``Ana/x.jpg``, as a CSV lists it).

    ``made``: images prepared now; ``skipped``: already in the cache; ``empty_masks``:
    keys of the images whose mask was fully transparent (kept whole); ``damaged``: cached
    files whose bytes no longer matched their digest (prepared again).
    """

    def __init__(
        self,
        mapping: dict[str, Path],
        by_path: dict[str, Path],
        ambiguous: dict[str, list[str]],
        made: int,
        skipped: int,
        empty_masks: list[str],
        damaged: list[str] | None = None,
    ):
        super().__init__(mapping)
        self.by_path = by_path
        self.ambiguous = ambiguous
        self.made = made
        self.skipped = skipped
        self.empty_masks = empty_masks
        self.damaged = damaged or []
        self._suffixes: dict[str, set[str]] | None = None

    def _by_suffix(self, key: str) -> set[str]:
        if self._suffixes is None:
            self._suffixes = {}
            for src in self.by_path:
                parts = Path(src).parts
                for k in range(1, len(parts) + 1):
                    self._suffixes.setdefault("/".join(parts[-k:]), set()).add(src)
        return self._suffixes.get(Path(key).as_posix(), set())

    def __missing__(self, key):
        if str(key) in self.by_path:
            return self.by_path[str(key)]
        if key in self.ambiguous:
            raise KeyError(
                f"{key}: several prepared sources have this file name ({', '.join(self.ambiguous[key])}); "
                "look it up by its path or as folder/name"
            )
        found = self._by_suffix(str(key))
        if len(found) == 1:
            return self.by_path[found.pop()]
        if found:
            raise KeyError(f"{key}: several prepared sources end with this path ({', '.join(sorted(found))})")
        raise KeyError(key)

    def summary(self) -> str:
        damaged = f", {len(self.damaged)} damaged in the cache (made again)" if self.damaged else ""
        return (
            f"{len(self)} prepared images ({self.made} new, {self.skipped} from the cache{damaged}), "
            f"{len(self.empty_masks)} with an empty mask (kept whole)"
        )


def _result_keys(sources: list[Path]) -> tuple[list[str], dict[str, list[str]]]:
    """File names as keys, ``folder/name`` (or the full path) where names clash."""
    by_name: dict[str, list[Path]] = {}
    for src in sources:
        by_name.setdefault(src.name, []).append(src)
    ambiguous = {n: [str(s) for s in group] for n, group in by_name.items() if len(group) > 1}
    rel_count: dict[str, int] = {}
    for src in sources:
        rel = f"{src.parent.name}/{src.name}"
        rel_count[rel] = rel_count.get(rel, 0) + 1
    keys = []
    for src in sources:
        rel = f"{src.parent.name}/{src.name}"
        keys.append(src.name if src.name not in ambiguous else rel if rel_count[rel] == 1 else str(src))
    return keys, ambiguous


def prepared_dir(cache_root: str | Path, alpha_mode: str, margin: float, size: int) -> Path:
    """The cache folder for one set of settings, e.g. ``cache_root/crop-m0.05-s768-jpg95-v2``.

    The margin only matters for ``crop`` and is left out of the other modes' names.
    """
    check_choice("data.alpha_mode", alpha_mode, AlphaMode)
    if size < 1:
        raise JaguarKitError(f"prepared image size must be >= 1, got {size}")
    margin_part = f"-m{margin:g}" if alpha_mode == "crop" else ""
    return Path(cache_root) / f"{alpha_mode}{margin_part}-s{size}-{FORMAT}-v{PREP_VERSION}"


def prepared_file(out_dir: str | Path, src: str | Path) -> Path:
    """Where ``src`` goes in the cache folder ``out_dir`` (see the module's key rules)."""
    src = Path(src)
    try:
        nbytes = src.stat().st_size
    except OSError as e:
        raise JaguarKitError(f"{src}: cannot read image ({e.strerror or e})") from e
    return Path(out_dir) / (src.parent.name or "_") / f"{src.name}.{nbytes}.jpg"


def resize_longest(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the longest side is ``size`` (INTER_AREA); never enlarges."""
    h, w = rgb.shape[:2]
    if max(h, w) <= size:
        return rgb
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, new, interpolation=cv2.INTER_AREA)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepared_jpeg(rgb: np.ndarray, mask: np.ndarray | None, alpha_mode: str, margin: float, size: int, where: str,
                  box=None) -> bytes:
    """The one preparation of an image, for the competition's images and own photos alike: the box
    (x, y, w, h) cut out, the mask applied (``alpha_mode``), the longest side shrunk to ``size``, JPEG."""
    rgb, mask = cut_box(rgb, mask, box, where)
    out = resize_longest(apply_alpha_mode(np.ascontiguousarray(rgb), mask, alpha_mode, margin), size)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise JaguarKitError(f"{where}: OpenCV could not encode the prepared image")
    return buf.tobytes()


def _prepare_record(src: Path, dst: Path, alpha_mode: str, margin: float, size: int) -> dict:
    """Prepare one image into ``dst`` atomically; returns its manifest record (without ``file``)."""
    try:
        st = src.stat()
        data = src.read_bytes()
    except OSError as e:
        raise JaguarKitError(f"{src}: cannot read image ({e.strerror or e})") from e
    rgb, mask = decode_image_bytes(data, src)
    empty = mask_is_empty(mask)
    jpeg = prepared_jpeg(rgb, mask, alpha_mode, margin, size, str(src))
    atomic_write_bytes(dst, jpeg)
    return {"sha256": _sha256(jpeg), "src_size": st.st_size, "src_mtime_ns": st.st_mtime_ns,
            "src_sha256": _sha256(data), "empty_mask": empty}


def prepare_one(src: Path, dst: Path, alpha_mode: str, margin: float, size: int) -> bool:
    """Prepare one image into ``dst`` atomically; returns True when its mask was empty."""
    return _prepare_record(Path(src), Path(dst), alpha_mode, margin, size)["empty_mask"]


def _work(task: tuple[str, str, str, float, int]) -> tuple[str, str | None, dict | None]:
    """Process-pool entry: never raises, so one bad file does not stop the others."""
    src, dst, mode, margin, size = task
    try:
        return src, None, _prepare_record(Path(src), Path(dst), mode, margin, size)
    except JaguarKitError as e:
        return src, str(e), None
    except Exception as e:  # noqa: BLE001 - reported per file, with its name
        return src, f"{src}: {type(e).__name__}: {e}", None


def read_manifest(out_dir: str | Path) -> dict[str, dict]:
    """``{cache-relative prepared file: record}``; the last record of a file wins.

    Lines that are not complete JSON objects (the torn last line of a killed run) are skipped.
    """
    records: dict[str, dict] = {}
    try:
        raw = (Path(out_dir) / MANIFEST).read_bytes()
    except OSError:
        return records
    for line in raw.split(b"\n")[:-1]:  # the part after the last newline is unfinished
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("file"), str) and isinstance(rec.get("sha256"), str):
            records[rec["file"]] = rec
    return records


class _ManifestLog:
    """Appends one record per line; each line goes out in one ``write`` (O_APPEND), so two
    processes preparing into one cache interleave whole lines."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.fd: int | None = None

    def append(self, record: dict) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            except OSError as e:
                raise JaguarKitError(f"{self.path}: cannot write the prepared-image manifest ({e.strerror or e})") from e
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            os.write(self.fd, line)
        except OSError as e:
            raise JaguarKitError(f"{self.path}: cannot write the prepared-image manifest ({e.strerror or e})") from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _guarded(lineno: int, tree: ast.Module) -> bool:
    """True if ``lineno`` lies inside a top-level ``if __name__ == "__main__":`` block."""
    for node in tree.body:
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
            continue
        sides = [node.test.left, *node.test.comparators]
        names = {n.id for n in sides if isinstance(n, ast.Name)}
        consts = {n.value for n in sides if isinstance(n, ast.Constant)}
        if "__name__" in names and "__main__" in consts and node.lineno <= lineno <= (node.end_lineno or lineno):
            return True
    return False


def main_script_unguarded() -> str | None:
    """The main script's path when this call comes from its top-level code outside an
    ``if __name__ == "__main__":`` guard, else None.

    Worker processes started with ``spawn`` import the main script again; unguarded, the
    import calls this function again, which starts workers again, forever. Notebooks,
    ``python -c`` and the console have no script file and are safe.
    """
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main is None or not main_file or multiprocessing.parent_process() is not None:
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return None
    try:
        tree = ast.parse(Path(main_file).read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return str(main_file)  # cannot tell: the safe answer
    return None if _guarded(frame.f_lineno, tree) else str(main_file)


def _check_cached(src: Path, dst: Path, rec: dict | None, log_: _ManifestLog) -> str:
    """``ok``, ``missing`` (not prepared, or no record), ``changed`` (another source) or ``damaged``."""
    if rec is None or not dst.is_file():
        return "missing"
    try:
        st = src.stat()
    except OSError as e:
        raise JaguarKitError(f"{src}: cannot read image ({e.strerror or e})") from e
    if (st.st_size, st.st_mtime_ns) != (rec.get("src_size"), rec.get("src_mtime_ns")):
        if file_digest(src, what="image") != rec.get("src_sha256"):
            return "changed"
        try:  # same content, touched: remember the new time so it is not hashed again
            log_.append({**rec, "src_mtime_ns": st.st_mtime_ns})
        except JaguarKitError:
            pass  # a read-only cache still serves
    try:
        if file_digest(dst, what="prepared image") != rec["sha256"]:
            return "damaged"
    except JaguarKitError:  # gone or unreadable since is_file(): prepared again
        return "damaged"
    return "ok"


def prepare_images(
    paths: Sequence[Path],
    cache_root: str | Path,
    alpha_mode: str = "crop",
    margin: float = 0.05,
    size: int = 768,
    workers: int = 2,
    progress: bool = True,
) -> PrepareResult:
    """Prepare every image once into the cache; returns ``{source file name: prepared file}``
    (see :class:`PrepareResult` for name clashes and lookups by path).

    Resumable (finished and verified files are skipped), parallel over ``workers``
    processes, and atomic per file. Images that fail to decode are all reported in one
    :class:`JaguarKitError` at the end, naming the first; the others stay in the cache.
    """
    out_dir = prepared_dir(cache_root, alpha_mode, margin, size)
    sources = list(dict.fromkeys(Path(p) for p in paths))  # a path given twice counts once
    by_path: dict[str, Path] = {}
    owner: dict[Path, Path] = {}
    for src in sources:
        dst = prepared_file(out_dir, src)
        if dst in owner:
            raise JaguarKitError(
                f"{src}: same folder name, file name and size as {owner[dst]}: they would share "
                f"the prepared file {dst}; use distinct folder names"
            )
        owner[dst] = src
        by_path[str(src)] = dst
    keys, ambiguous = _result_keys(sources)
    mapping = {key: by_path[str(src)] for key, src in zip(keys, sources)}

    records = read_manifest(out_dir)
    manifest = _ManifestLog(out_dir)
    todo: list[tuple[str, str, str, float, int]] = []
    damaged: list[str] = []
    try:
        for src in sources:
            dst = by_path[str(src)]
            rel = dst.relative_to(out_dir).as_posix()
            state = _check_cached(src, dst, records.get(rel), manifest)
            if state != "ok":
                todo.append((str(src), str(dst), alpha_mode, float(margin), int(size)))
                if state == "damaged":
                    damaged.append(str(dst))
        if damaged:
            log.warning("%d prepared images were damaged (digest differs from the manifest) and are made again: %s%s",
                        len(damaged), damaged[0], " ..." if len(damaged) > 1 else "")
        if todo:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise JaguarKitError(f"{out_dir}: cannot create the prepared-image folder ({e.strerror or e})") from e
            if not (out_dir / SETTINGS).is_file():
                atomic_write_text(out_dir / SETTINGS, json.dumps(
                    {"version": PREP_VERSION, "format": FORMAT, "alpha_mode": alpha_mode, "margin": margin,
                     "size": size}, indent=1) + "\n")
        errors = _run(todo, out_dir, workers, progress, records, manifest)
    finally:
        manifest.close()

    empty_masks = [k for k, d in mapping.items() if records.get(d.relative_to(out_dir).as_posix(), {}).get("empty_mask")]
    if errors:
        done = sum(1 for d in by_path.values() if d.relative_to(out_dir).as_posix() in records)
        more = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
        raise JaguarKitError(f"{sorted(errors)[0]}{more}; the {done} images prepared are kept in {out_dir}")
    result = PrepareResult(mapping, by_path, ambiguous, made=len(todo), skipped=len(mapping) - len(todo),
                           empty_masks=empty_masks, damaged=damaged)
    log.info("%s in %s", result.summary(), out_dir)
    if empty_masks:
        shown = ", ".join(empty_masks[:5])
        log.warning(
            "%d images have an empty (fully transparent) mask and were kept whole: %s%s",
            len(empty_masks),
            shown,
            " ..." if len(empty_masks) > 5 else "",
        )
    return result


def _run(todo: list, out_dir: Path, workers: int, progress: bool, records: dict[str, dict],
         manifest: _ManifestLog) -> list[str]:
    """Prepare ``todo``; each finished file's record goes into ``records`` and the manifest
    at once. Returns the error lines of the files that failed."""
    errors: list[str] = []
    bar = tqdm(total=len(todo), desc=f"prepare {out_dir.name}", unit="img", disable=not progress or not todo)

    def collect(results) -> None:
        for src, err, rec in results:
            if err:
                errors.append(err)
            else:
                rec = {"file": Path(by_src[src][1]).relative_to(out_dir).as_posix(), **rec}
                manifest.append(rec)
                records[rec["file"]] = rec
                fault_point("prepare-image")
            bar.update()

    by_src = {t[0]: t for t in todo}
    if workers > 1 and len(todo) > 1:
        script = main_script_unguarded()
        if script:
            log.warning("prepare_images: %s calls it outside `if __name__ == \"__main__\":`, where worker processes "
                        "would run the script again; preparing in this process instead (add the guard to use "
                        "%d workers)", script, workers)
            workers = 0
    try:
        collect(run_tasks(_work, todo, workers, ordered=False))
    finally:
        bar.close()
    return errors


def load_prepared(path: str | Path) -> np.ndarray:
    """Read a prepared image as RGB uint8 (a small JPEG: a few ms at 768 px).

    A missing file or a damaged one (cut short: no end-of-image marker) is refused in one
    line naming it, rather than decoded into a partly grey picture.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise JaguarKitError(
            f"{path}: prepared image missing (removed after it was prepared?); rerun to prepare it again"
        ) from None
    except OSError as e:
        raise JaguarKitError(f"{path}: cannot read prepared image ({e.strerror or e})") from e
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise JaguarKitError(
            f"{path}: prepared image damaged (truncated or not a JPEG); rerun prepare: it is made again"
        )
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise JaguarKitError(f"{path}: prepared image corrupt (cannot decode); rerun prepare: it is made again")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


__all__ = [
    "PREP_VERSION",
    "PrepareResult",
    "prepared_dir",
    "prepare_images",
    "prepared_file",
    "prepare_one",
    "read_manifest",
    "main_script_unguarded",
    "resize_longest",
    "load_prepared",
]

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

    cache_root / "crop-m0.05-s768-jpg95-v1" / <source folder name> / <file name>.<bytes>.jpg

- The folder name holds every setting and ``PREP_VERSION``: a changed setting or a changed
  preprocessing never reuses stale files.
- Files keep their source folder's name as a sub-folder, so ``train/x.png`` and
  ``test/x.png`` never collide; the source's size in bytes is in the name, so a different
  image with the same name is prepared anew. The key ignores the absolute path on
  purpose: the same data attached at another ``/kaggle/input/...`` path reuses the cache.
- Writes are atomic (temporary file + ``os.replace``): a killed run leaves at most a
  hidden ``.*.tmp-*`` file, which is never read; the next run skips finished files.
- ``manifest.json`` in the folder records the settings and the images whose mask was
  empty (kept whole, see :mod:`jaguar_kit.data.images`), so a resumed run still reports them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..errors import JaguarKitError
from ..files import atomic_write_bytes, atomic_write_text
from .images import ALPHA_MODES, apply_alpha_mode, decode_image, mask_is_empty

log = logging.getLogger(__name__)

PREP_VERSION = 1  # bump when the preprocessing changes: old caches are then not reused
FORMAT = "jpg95"
JPEG_QUALITY = 95
MANIFEST = "manifest.json"


class PrepareResult(dict):
    """``{source file name: prepared file}`` plus a summary of the call.

    Keys are the sources' file names (``train_0001.png``). When one call holds several
    different sources with the same file name (``train/x.png`` and ``test/x.png``), those
    are keyed ``folder/name`` instead and the bare name raises a KeyError saying so. Any
    source can also be looked up by its path (a ``Path`` or the path string).

    ``made``: images prepared now; ``skipped``: already in the cache; ``empty_masks``:
    keys of the images whose mask was fully transparent (kept whole).
    """

    def __init__(
        self,
        mapping: dict[str, Path],
        by_path: dict[str, Path],
        ambiguous: dict[str, list[str]],
        made: int,
        skipped: int,
        empty_masks: list[str],
    ):
        super().__init__(mapping)
        self.by_path = by_path
        self.ambiguous = ambiguous
        self.made = made
        self.skipped = skipped
        self.empty_masks = empty_masks

    def __missing__(self, key):
        if str(key) in self.by_path:
            return self.by_path[str(key)]
        if key in self.ambiguous:
            raise KeyError(
                f"{key}: several prepared sources have this file name ({', '.join(self.ambiguous[key])}); "
                "look it up by its path or as folder/name"
            )
        raise KeyError(key)

    def summary(self) -> str:
        return (
            f"{len(self)} prepared images ({self.made} new, {self.skipped} from the cache), "
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
    """The cache folder for one set of settings, e.g. ``cache_root/crop-m0.05-s768-jpg95-v1``.

    The margin only matters for ``crop`` and is left out of the other modes' names.
    """
    if alpha_mode not in ALPHA_MODES:
        raise JaguarKitError(f"alpha mode {alpha_mode!r} unknown (expected one of {', '.join(ALPHA_MODES)})")
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


def prepare_one(src: Path, dst: Path, alpha_mode: str, margin: float, size: int) -> bool:
    """Prepare one image into ``dst`` atomically; returns True when its mask was empty."""
    rgb, mask = decode_image(src)
    empty = mask_is_empty(mask)
    out = resize_longest(apply_alpha_mode(rgb, mask, alpha_mode, margin), size)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise JaguarKitError(f"{src}: OpenCV could not encode the prepared image")
    atomic_write_bytes(dst, buf.tobytes())
    return empty


def _work(task: tuple[str, str, str, float, int]) -> tuple[str, str | None, bool]:
    """Process-pool entry: never raises, so one bad file does not stop the others."""
    src, dst, mode, margin, size = task
    try:
        return src, None, prepare_one(Path(src), Path(dst), mode, margin, size)
    except JaguarKitError as e:
        return src, str(e), False
    except Exception as e:  # noqa: BLE001 - reported per file, with its name
        return src, f"{src}: {type(e).__name__}: {e}", False


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; avoid oversubscribing the cores


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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

    Resumable (finished files are skipped), parallel over ``workers`` processes, and
    atomic per file. Images that fail to decode are all reported in one
    :class:`JaguarKitError` at the end, naming the first; the others stay in the cache.
    """
    out_dir = prepared_dir(cache_root, alpha_mode, margin, size)
    sources = list(dict.fromkeys(Path(p) for p in paths))  # a path given twice counts once
    by_path: dict[str, Path] = {}
    owner: dict[Path, Path] = {}
    todo: list[tuple[str, str, str, float, int]] = []
    for src in sources:
        dst = prepared_file(out_dir, src)
        if dst in owner:
            raise JaguarKitError(
                f"{src}: same folder name, file name and size as {owner[dst]}: they would share "
                f"the prepared file {dst}; use distinct folder names"
            )
        owner[dst] = src
        by_path[str(src)] = dst
        if not dst.is_file():
            todo.append((str(src), str(dst), alpha_mode, float(margin), int(size)))
    keys, ambiguous = _result_keys(sources)
    mapping = {key: by_path[str(src)] for key, src in zip(keys, sources)}

    errors: list[str] = []
    empty_now: list[str] = []
    bar = tqdm(total=len(todo), desc=f"prepare {out_dir.name}", unit="img", disable=not progress or not todo)

    def collect(results) -> None:
        for src, err, empty in results:
            if err:
                errors.append(err)
            elif empty:
                empty_now.append(src)
            bar.update()

    if workers <= 1 or len(todo) <= 1:
        collect(map(_work, todo))
    else:
        # spawn, not fork: the caller may have torch/OpenMP threads running, which a
        # forked child can deadlock on.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(16, len(todo) // (workers * 8)))
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker) as pool:
            collect(pool.imap_unordered(_work, todo, chunksize=chunk))
    bar.close()

    # The manifest keeps the empty-mask list across resumed runs (cache-relative names).
    manifest_path = out_dir / MANIFEST
    manifest = _read_manifest(manifest_path)
    empty_rel = set(manifest.get("empty_masks", []))
    empty_rel.update(str(by_path[s].relative_to(out_dir)) for s in empty_now)
    if todo and len(errors) < len(todo):
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "version": PREP_VERSION,
            "format": FORMAT,
            "alpha_mode": alpha_mode,
            "margin": margin,
            "size": size,
            "empty_masks": sorted(empty_rel),
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    empty_masks = [s for s, d in mapping.items() if str(d.relative_to(out_dir)) in empty_rel]

    if errors:
        done = sum(1 for d in by_path.values() if d.is_file())
        more = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
        raise JaguarKitError(
            f"{sorted(errors)[0]}{more}; the {done} images prepared are kept in {out_dir}"
        )
    result = PrepareResult(
        mapping, by_path, ambiguous, made=len(todo), skipped=len(mapping) - len(todo), empty_masks=empty_masks
    )
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


def load_prepared(path: str | Path) -> np.ndarray:
    """Read a prepared image as RGB uint8 (a small JPEG: a few ms at 768 px)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise JaguarKitError(f"{path}: cannot read prepared image (missing or corrupt; delete it to redo it)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


__all__ = [
    "PREP_VERSION",
    "PrepareResult",
    "prepared_dir",
    "prepare_images",
    "prepared_file",
    "prepare_one",
    "resize_longest",
    "load_prepared",
]

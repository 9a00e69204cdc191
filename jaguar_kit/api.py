"""The few calls a script needs, in one place (``import jaguar_kit as jk`` exposes them lazily).

::

    import jaguar_kit as jk
    model = jk.load_model("frozen:efficientnet-lite0")          # or a training run's best.pt
    cat = jk.build_catalogue("photos/", model, "catalogue/")       # a folder per individual, or a CSV
    result = jk.identify(cat, "new_photos/")                       # top-k, probabilities, known or `new`
    print(result.table[["photo", "decision", "probability"]])
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .photos.catalogue import Catalogue, build_catalogue, catalogue_model, load_catalogue
from .photos.cluster import Clustering, cluster
from .photos.evaluate import evaluate_open_set as _evaluate_open_set
from .photos.folders import write_group_folders
from .photos.identify import Identification, identify
from .photos.inputs import Photo, read_photos
from .photos.model import Model, load_model
from .photos.model import embed_photos as embed_photos_cached
from .photos.report import write_cluster_report, write_identify_report


def photo_embeddings(model: Model, images: Sequence[str | Path | Photo] | str | Path,
                     cache_dir: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """L2-normalised embeddings (N, D) of image files, ``Photo`` objects, or a folder / CSV of photos.

    Rows follow the input order. ``cache_dir`` keeps prepared photos and embeddings between
    calls (default: a temporary folder, removed afterwards).
    """
    if isinstance(images, (str, Path)):
        photos = read_photos(images, folder_labels=False)
    else:
        photos = [p if isinstance(p, Photo) else Photo(Path(p)) for p in images]
    if cache_dir is not None:
        return embed_photos_cached(model, photos, cache_dir, progress=progress)[1]
    with tempfile.TemporaryDirectory(prefix="jaguar_kit-") as tmp:
        return embed_photos_cached(model, photos, tmp, progress=progress)[1]


def update_catalogue(catalogue: Catalogue | str | Path, photos, model: Model | None = None,
                     progress: bool = False) -> Catalogue:
    """Add (or relabel) photos in an existing catalogue; only photos new to it are embedded."""
    cat = catalogue if isinstance(catalogue, Catalogue) else load_catalogue(catalogue)
    if cat.folder is None:
        raise ValueError("update_catalogue: the catalogue has no folder (load it with load_catalogue)")
    if model is None:
        model = catalogue_model(cat)
    target = cat.calibration.target_false_merge if cat.calibration else 0.05
    return build_catalogue(photos, model, cat.folder, target_false_merge=target, progress=progress)


def evaluate_open_set(embeddings: np.ndarray, identities: Sequence[str], new_share: float = 0.3, seed: int = 0,
                      target_false_merge: float = 0.05) -> dict:
    """Open-set figures on an identity-disjoint split (see :func:`jaguar_kit.photos.evaluate.evaluate_open_set`)."""
    return _evaluate_open_set(np.asarray(embeddings, np.float32), identities, new_share=new_share, seed=seed,
                             target_false_merge=target_false_merge)


def _renamed(old: str, new, why: str):
    """``new`` under its 0.2 name ``old``, with a DeprecationWarning; removed in 0.3."""
    def call(*args, **kwargs):
        warnings.warn(f"jk.{old} is now jk.{new.__name__} ({why}); the old name goes in 0.3",
                      DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    call.__name__ = call.__qualname__ = old
    call.__doc__ = f"Renamed :func:`{new.__name__}` (kept for 0.2 scripts)."
    return call


embed_photos = _renamed("embed_photos", photo_embeddings,
                        "photos.model.embed_photos is the cached one returning keys, vectors and files")
score = _renamed("score", evaluate_open_set, "pipeline.score is the competition mAP")


def write_report(result: Identification | Clustering, path: str | Path) -> Path:
    """The self-contained ``report.html`` of an identification or a clustering."""
    if isinstance(result, Clustering):
        return write_cluster_report(result, path)
    return write_identify_report(result, path)


__all__ = [
    "build_catalogue",
    "cluster",
    "embed_photos",
    "evaluate_open_set",
    "identify",
    "load_catalogue",
    "load_model",
    "photo_embeddings",
    "read_photos",
    "score",
    "update_catalogue",
    "write_group_folders",
    "write_report",
]

"""jaguar_kit: animal re-identification for Kaggle's jaguar-re-id and camera-trap collections.

``import jaguar_kit as jk`` is cheap (no torch, numpy or pandas yet); the script-level calls
are loaded on first use: ``jk.load_model``, ``jk.photo_embeddings``, ``jk.read_photos``,
``jk.build_catalogue``, ``jk.load_catalogue``, ``jk.update_catalogue``, ``jk.identify``,
``jk.cluster``, ``jk.evaluate_open_set``, ``jk.write_report`` (see :mod:`jaguar_kit.api`); the
0.2 names ``jk.embed_photos`` and ``jk.score`` still work, with a DeprecationWarning.
"""

from .version import __version__

_API = (
    "load_model",
    "photo_embeddings",
    "embed_photos",
    "read_photos",
    "build_catalogue",
    "load_catalogue",
    "update_catalogue",
    "identify",
    "cluster",
    "evaluate_open_set",
    "score",
    "write_report",
    "write_group_folders",
)


def __getattr__(name: str):
    if name in _API:
        from . import api

        globals().update({n: getattr(api, n) for n in _API})  # later look-ups skip this function
        return globals()[name]
    raise AttributeError(f"module 'jaguar_kit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))

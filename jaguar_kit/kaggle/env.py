"""Where a run reads and writes: Kaggle's folders on Kaggle, overridable folders elsewhere.

Every path comes from here, and every one can be redirected with an environment variable,
so the same kernel runs unchanged on Kaggle, on a workstation and in the tests:

- ``JAGUAR_KIT_INPUT``: the read-only input root (Kaggle: ``/kaggle/input``)
- ``JAGUAR_KIT_WORKING``: the writable output root (Kaggle: ``/kaggle/working``; else ``./work``)

Standard library only: a kernel imports this before anything else is installed.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..errors import JaguarKitError

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
WHEEL_GLOB = "jaguar_kit-*.whl"
# /kaggle/input/datasets/<owner>/<slug>/x.whl is 3 folders down; allow two more for a
# dataset uploaded with sub-folders or a version folder, but never walk a whole image set.
WHEEL_SEARCH_DEPTH = 5


def is_kaggle() -> bool:
    """True inside a Kaggle kernel session (interactive or batch)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def input_root() -> Path:
    """The read-only input root: ``$JAGUAR_KIT_INPUT`` or ``/kaggle/input``."""
    env = os.environ.get("JAGUAR_KIT_INPUT")
    return Path(env).expanduser() if env else KAGGLE_INPUT


def working_root() -> Path:
    """The writable root a run writes under (kept as the kernel's output on Kaggle)."""
    env = os.environ.get("JAGUAR_KIT_WORKING")
    if env:
        return Path(env).expanduser()
    return KAGGLE_WORKING if is_kaggle() else Path.cwd() / "work"


def default_cache_dir() -> Path:
    """Where prepared images and embedding chunks are cached by default."""
    return working_root() / "cache"


def _version_key(wheel: Path) -> tuple:
    """Sort key for ``jaguar_kit-VERSION-...whl``: the version, then the file's age."""
    version = wheel.name.split("-")[1] if wheel.name.count("-") >= 2 else "0"
    try:  # packaging ships with pip and with Kaggle's image, but is not our dependency
        from packaging.version import InvalidVersion, Version

        try:
            vkey: tuple = (1, Version(version))
        except InvalidVersion:
            vkey = (0, version)
    except ImportError:
        vkey = (1, tuple(int(p) for p in re.findall(r"\d+", version)))
    return (vkey, wheel.stat().st_mtime)


def find_wheel(search_root: str | Path | None = None, max_depth: int = WHEEL_SEARCH_DEPTH) -> Path:
    """The newest ``jaguar_kit-*.whl`` under the input root, in whatever layout Kaggle mounts.

    Kaggle mounts a dataset at ``/kaggle/input/datasets/<owner>/<slug>/`` or the legacy
    ``/kaggle/input/<slug>/`` (sometimes as links): search instead of hard-coding. The
    walk is bounded to ``max_depth`` folders so a large attached image set costs nothing.
    """
    root = Path(search_root).expanduser() if search_root is not None else input_root()
    if not root.is_dir():
        raise JaguarKitError(
            f"{root}: input folder not found; attach the jaguar-kit-wheel dataset "
            "or set JAGUAR_KIT_INPUT to the folder holding the wheel"
        )
    found: dict[Path, Path] = {}  # resolved -> as found (links may show one file twice)
    base_depth = len(root.parts)
    # followlinks: the legacy layout may link to the new one; the depth bound stops loops.
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if len(here.parts) - base_depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for wheel in here.glob(WHEEL_GLOB):
            if wheel.is_file():
                found.setdefault(wheel.resolve(), wheel)
    if not found:
        raise JaguarKitError(
            f"{root}: no {WHEEL_GLOB} within {max_depth} folder levels; attach the "
            "jaguar-kit-wheel dataset (made by build_dataset.py) to this kernel"
        )
    return max(found.values(), key=_version_key)


def install_command(wheel: str | Path, python: str | Path | None = None) -> list[str]:
    """The offline pip command that installs our wheel, leaving the image's packages alone.

    ``--no-deps``: torch, timm, numpy, pandas, cv2 and tqdm are already in Kaggle's image and
    must not be replaced. ``--force-reinstall`` so a re-uploaded wheel of the same version
    replaces an older install.
    """
    return [
        str(python or sys.executable), "-m", "pip", "install",
        "--no-index", "--no-deps", "--force-reinstall", "--quiet", str(wheel),
    ]


__all__ = [
    "is_kaggle",
    "input_root",
    "working_root",
    "default_cache_dir",
    "find_wheel",
    "install_command",
]

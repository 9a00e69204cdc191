"""Where a run reads and writes, and the one place that searches the inputs.

The same kernel runs unchanged on Kaggle, on a workstation and in the tests because every
path comes from here:

- :func:`input_roots`: the read-only inputs, ``/kaggle/input`` or ``$JAGUAR_KIT_INPUT``
  (``~`` expanded; several folders separated by ``os.pathsep``). The only reader of it.
- :func:`working_root`: the kernel's output, ``/kaggle/working`` or ``$JAGUAR_KIT_WORKING``
  (``./work`` off Kaggle).
- :func:`default_prepared_root`: the prepared-image cache, a scratch folder outside the output.
- :func:`walk_inputs`: the one bounded walk over the inputs. Kaggle mounts the same kind of
  input at several depths (``competitions/<slug>/``, ``datasets/<owner>/<slug>/``,
  ``notebooks/<user>/<slug>/``, ``models/<owner>/<model>/<framework>/<variation>/<version>/``
  and the legacy ``<slug>/``), so things are found by searching, never by a fixed path.

Standard library only: a kernel imports this right after installing the wheel.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlparse

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
# Disk outside /kaggle/working: the session's disk is far larger than the ~20 GB output, and
# nothing written there is kept as the version's output (users create /kaggle/temp for this).
KAGGLE_SCRATCH = Path("/kaggle/temp")
# The deepest mount: /kaggle/input/models/<owner>/<model>/<framework>/<variation>/<version>/
# is 6 folders down; one more for a copy kept in a sub-folder. Never a whole image tree.
INPUT_DEPTH = 7
HUB_HOST = "huggingface.co"


def is_kaggle() -> bool:
    """True inside a Kaggle kernel session (interactive or batch)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def advice(command_line: str, notebook: str) -> str:
    """The next step in the user's own words: ``notebook`` inside a Kaggle session (the settings
    cell, *Add Input*, the notebook's settings), ``command_line`` elsewhere (``--out``, ``--set``).

    The one place a message chooses its wording by where it runs.
    """
    return notebook if is_kaggle() else command_line


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def input_roots() -> list[Path]:
    """The read-only input folders: ``$JAGUAR_KIT_INPUT`` (``os.pathsep``-separated, ``~``
    expanded, empty entries ignored) or ``/kaggle/input``."""
    raw = os.environ.get("JAGUAR_KIT_INPUT", "")
    roots = [Path(p.strip()).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    return roots or [KAGGLE_INPUT]


def working_root() -> Path:
    """The writable root a run writes under (kept as the kernel's output on Kaggle)."""
    env = _env_path("JAGUAR_KIT_WORKING")
    if env:
        return env
    return KAGGLE_WORKING if is_kaggle() else Path.cwd() / "work"


def default_cache_dir() -> Path:
    """Where embedding chunks are cached: inside the output, so the next version reuses them."""
    return working_root() / "cache"


def default_prepared_root() -> Path:
    """Where the prepared-image cache lives (decoded, resized images; rebuilt in minutes).

    ``$JAGUAR_KIT_PREPARED`` if set. On Kaggle a scratch folder outside ``/kaggle/working``
    (``/kaggle/temp/jaguar_kit/prepared``, else the system temp folder): in the working
    folder it would be saved into every version's output. Elsewhere ``working_root()/prepared``.
    Training and embedding share it, so images are prepared once per session.
    """
    env = _env_path("JAGUAR_KIT_PREPARED")
    if env:
        return env
    if not is_kaggle():
        return working_root() / "prepared"
    if KAGGLE_WORKING.is_dir():  # the real Kaggle container: /kaggle is ours to write
        try:
            (KAGGLE_SCRATCH / "jaguar_kit").mkdir(parents=True, exist_ok=True)
            return KAGGLE_SCRATCH / "jaguar_kit" / "prepared"
        except OSError:
            pass
    return Path(tempfile.gettempdir()) / "jaguar_kit" / "prepared"


def internet_on(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub is reachable, decided in at most ``timeout`` seconds.

    Kaggle exposes no variable for its "Internet" switch; with it off, name resolution fails
    at once, so one TCP connect to the hub (``$HF_ENDPOINT`` if set) answers cheaply and
    offline-safe. ``HF_HUB_OFFLINE=1`` (the hub library's own switch) means off without trying.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "")).hostname or HUB_HOST
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- the walker


@dataclass
class InputFolder:
    """One folder met by :func:`walk_inputs`. Empty ``dirs`` (or filter it) to prune below."""

    path: Path
    depth: int  # 0 for a root
    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # neither a file nor a folder: broken links, devices


def walk_inputs(roots: Iterable[str | Path] | None = None, max_depth: int = INPUT_DEPTH) -> Iterator[InputFolder]:
    """Every folder under the input roots, shallowest first, by one policy.

    - at most ``max_depth`` folders below a root (a root is depth 0);
    - links to folders are followed (Kaggle's legacy ``/kaggle/input/<slug>`` may link to
      the new layout), and each real folder is visited once, so a link loop or an input
      mounted at two paths costs one visit and nothing is reported twice;
    - hidden entries (``.name``: folders and files) are skipped;
    - unreadable folders are skipped silently (an input is searched, not validated);
    - a caller may prune below a folder by emptying its ``dirs`` before the next step.
    """
    seen: set[str] = set()
    queue: deque[tuple[Path, int]] = deque(
        (Path(r).expanduser(), 0) for r in (input_roots() if roots is None else roots)
    )
    while queue:
        folder, depth = queue.popleft()
        try:
            real = os.path.realpath(folder)
            if real in seen or not folder.is_dir():
                continue
            seen.add(real)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        here = InputFolder(folder, depth)
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=True):
                    here.dirs.append(e.name)
                elif e.is_file(follow_symlinks=True):
                    here.files.append(e.name)
                else:
                    here.broken.append(e.name)
            except OSError:
                here.broken.append(e.name)
        yield here
        if depth < max_depth:
            queue.extend((folder / d, depth + 1) for d in here.dirs)


def find_folders(
    match: Callable[[InputFolder], bool],
    roots: Iterable[str | Path] | None = None,
    max_depth: int = INPUT_DEPTH,
    descend: bool = False,
) -> list[Path]:
    """Folders under the inputs for which ``match`` is true, shallowest first.

    ``descend=False`` does not search inside a match (a competition folder's image tree, a
    hub copy's sub-folders).
    """
    found = []
    for f in walk_inputs(roots, max_depth):
        if match(f):
            found.append(f.path)
            if not descend:
                f.dirs.clear()
    return found


def find_files(
    match: Callable[[str], bool], roots: Iterable[str | Path] | None = None, max_depth: int = INPUT_DEPTH
) -> list[Path]:
    """Files under the inputs whose name satisfies ``match``, shallowest first, each real file once."""
    found: dict[str, Path] = {}
    for f in walk_inputs(roots, max_depth):
        for name in f.files:
            if match(name):
                found.setdefault(os.path.realpath(f.path / name), f.path / name)
    return list(found.values())


__all__ = [
    "KAGGLE_INPUT",
    "KAGGLE_WORKING",
    "INPUT_DEPTH",
    "InputFolder",
    "is_kaggle",
    "advice",
    "input_roots",
    "working_root",
    "default_cache_dir",
    "default_prepared_root",
    "internet_on",
    "walk_inputs",
    "find_folders",
    "find_files",
]

"""Files the kit writes and reads back: atomic writes, one writer per folder, safe ``.npz`` reads.

Every artifact is written to a temporary file in the same folder, flushed to disk and
moved into place with ``os.replace`` (atomic on POSIX). A crash leaves at most a
``*.tmp-*`` file, which no reader ever opens. A folder that one command updates as a unit
(a training run, a catalogue) is written by one process at a time (:class:`RunLock`), and
every ``.npz`` is read through :func:`load_npz`, which turns damage into one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import signal
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import JaguarKitError
from .kaggle.env import advice

log = logging.getLogger(__name__)
LOCK = ".lock"

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content.
    A full disk is reported as a one-line :class:`JaguarKitError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as e:  # a read-only or forbidden output folder: one line, not a traceback
        if _disk_full(e):
            raise JaguarKitError(f"{path}: disk full while writing; the previous version of this file is kept") from e
        raise JaguarKitError(f"{path}: cannot write here ({e.strerror or e}: {e.filename or path.parent})") from e
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if _disk_full(e):
            raise JaguarKitError(
                f"{path}: disk full while writing; the previous version of this file is kept"
            ) from e
        raise


def _disk_full(e: BaseException | None) -> bool:
    """True if ``e`` or an exception it arose from is ENOSPC/EDQUOT.

    Writers wrap the OSError: torch.save's zip writer, for one, re-raises it as a
    RuntimeError while closing the archive.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in blocks: the content key of every cache.

    Raises ``OSError`` for an unreadable file; callers say what the file was for.
    (A block loop rather than ``hashlib.file_digest``, which needs Python 3.11.)
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path, length: int = 64, what: str = "file") -> str:
    """The first ``length`` hex digits of :func:`file_sha256`: the one digest of a file for
    every cache and manifest (images, prepared files, photos, checkpoints). A missing or
    unreadable file is one line saying what the file was for (``what``)."""
    try:
        return file_sha256(path)[:length]
    except FileNotFoundError:
        raise JaguarKitError(f"{path}: {what} not found") from None
    except OSError as e:
        raise JaguarKitError(f"{path}: cannot read {what} ({e.strerror or e})") from e


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True if ``path``, with every link resolved, lies in ``root`` (or is it): a name
    joined to a folder may not lead out of it through ``..``, a separator or a link."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left by writers that were killed; returns how many.

    A temporary file's name carries its writer's process id (``.NAME.tmp-PID-XXXX``); those
    of a process still running are another writer's work in progress and are kept, so two
    processes may share a folder (two embedders on one cache) without breaking each other.
    """
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp-*") if not _writer_alive(p.name)] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _writer_alive(name: str) -> bool:
    pid = name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
    if not pid.isdigit():
        return False  # an older name without a pid
    if int(pid) == os.getpid():
        return True  # ours: another thread may be writing it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def fault_point(name: str) -> None:
    """Signal this process at a named point, for fault-injection tests.

    Armed only by ``JAGUAR_KIT_FAULT=name:N[:SIGNAL]``: the N-th time ``name`` is reached the
    process sends itself SIGNAL (default SIGKILL), so the reliability tests land a real kill
    or a real Ctrl-C (``SIGINT``) at an exact instant such as mid-checkpoint-write.
    """
    spec = os.environ.get("JAGUAR_KIT_FAULT", "")
    if not spec.startswith(name + ":"):
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    count, _, signame = spec[len(name) + 1:].partition(":")
    if _fault_counts[name] == int(count):
        os.kill(os.getpid(), signal.Signals[signame or "SIGKILL"])


_fault_counts: dict[str, int] = {}


class RunLock:
    """One writer per folder: an exclusive ``flock`` on ``FOLDER/.lock``, removed at exit.

    The kernel drops the lock when the process dies, however it dies, so a killed writer
    never blocks the next one. A second writer stops with the holder's process id, or with
    ``wait`` waits for it (saying so once). ``purpose`` names the writers in the message.
    """

    def __init__(self, folder: str | Path, purpose: str = "another training run writes this folder",
                 wait: bool = False) -> None:
        self.path = Path(folder) / LOCK
        self.purpose = purpose
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JaguarKitError(f"{self.path.parent}: cannot create the folder ({e.strerror})") from e
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise JaguarKitError(f"{self.path.parent}: cannot write the folder ({e.strerror})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                if not self.wait:
                    os.close(fd)
                    raise JaguarKitError(f"{self.path.parent}: in use by process {holder} ({self.purpose}); "
                                         + advice("wait for it to finish or use another --out",
                                                  "wait for it to finish")) from None
                log.warning("%s: in use by process %s (%s); waiting for it to finish", self.path.parent, holder,
                            self.purpose)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            try:  # the holder we waited for may have removed the file: lock the one on disk
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before closing: no one can lock it in between
            os.close(self._fd)
            self._fd = None


# What a damaged .npz raises while it is read: a truncated zip (BadZipFile, EOFError), a
# flipped bit in a compressed member (zlib.error) or in a CRC (BadZipFile), a broken array
# header (ValueError, SyntaxError, tokenize.TokenError), a flipped compression-method field
# (NotImplementedError), a missing array (KeyError).
NPZ_DAMAGE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, SyntaxError,
              tokenize.TokenError, NotImplementedError)


def load_npz(path: str | Path, keys: Sequence[str], what: str, optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the ``.npz`` at ``path``, all read now (no pickles), and those of
    ``optional`` that it has (arrays added in later versions of a file).

    The one reader of every ``.npz`` the kit writes: a missing file, damage or a missing
    array is a one-line :class:`JaguarKitError` naming the file and ``what`` it should be
    (caches catch it and recompute).
    """
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("not an .npz archive")
        with z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise KeyError(f"no {missing[0]!r} array")
            return {k: z[k] for k in [*keys, *optional] if k in z.files}
    except FileNotFoundError:
        raise JaguarKitError(f"{path}: {what} not found") from None
    except NPZ_DAMAGE as e:
        why = (str(e).splitlines() or [""])[0].strip("'\"")[:160]
        raise JaguarKitError(f"{path}: damaged or not a {what} ({type(e).__name__}{': ' + why if why else ''})") from e

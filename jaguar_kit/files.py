"""Atomic writes: a killed process never leaves a file that later loads as valid.

Every artifact is written to a temporary file in the same folder, flushed to disk and
moved into place with ``os.replace`` (atomic on POSIX). A crash leaves at most a
``*.tmp-*`` file, which no reader ever opens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import JaguarKitError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content.
    A full disk is reported as a one-line :class:`JaguarKitError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left by writers that were killed; returns how many.

    Call only where no other process is writing into ``folder``.
    """
    folder = Path(folder)
    stale = list(folder.glob(".*.tmp-*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


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

"""One process-pool runner for the CPU-bound per-image work (preparing, local features, synthesis).

``spawn``, not ``fork``: the caller may have torch/OpenMP or OpenCV threads running, which a
forked child can deadlock on. Each worker runs OpenCV single-threaded: one image per
process already uses every core.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import cv2

T = TypeVar("T")
R = TypeVar("R")


def _single_threaded() -> None:
    cv2.setNumThreads(1)


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], workers: int, ordered: bool = True,
              chunksize: int | None = None, min_tasks: int = 2) -> Iterator[R]:
    """``fn`` over ``tasks``, results yielded as they finish (in task order with ``ordered``).

    With ``workers <= 1`` or fewer than ``min_tasks`` tasks (a pool costs more than a few
    images) it runs in this process; otherwise in a spawn pool of ``min(workers, len(tasks))``
    processes, closed when the iteration ends. ``fn`` must be a module-level function.
    """
    if workers <= 1 or len(tasks) < max(2, min_tasks):
        yield from map(fn, tasks)
        return
    n = min(workers, len(tasks))
    chunk = chunksize or max(1, min(16, len(tasks) // (n * 8)))
    with multiprocessing.get_context("spawn").Pool(n, initializer=_single_threaded) as pool:
        run = pool.imap if ordered else pool.imap_unordered
        yield from run(fn, tasks, chunksize=chunk)


__all__ = ["run_tasks"]

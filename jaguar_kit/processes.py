"""One process-pool runner for the CPU-bound per-image work (preparing, local features, synthesis).

``spawn``, not ``fork``: the caller may have torch/OpenMP or OpenCV threads running, which a
forked child can deadlock on. Each worker runs OpenCV single-threaded: one image per
process already uses every core.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import cv2

from .errors import JaguarKitError

T = TypeVar("T")
R = TypeVar("R")


def _single_threaded() -> None:
    cv2.setNumThreads(1)


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], workers: int, ordered: bool = True,
              chunksize: int | None = None, min_tasks: int = 2) -> Iterator[R]:
    """``fn`` over ``tasks``, results yielded as they finish (in task order with ``ordered``).

    With ``workers <= 1`` or fewer than ``min_tasks`` tasks (a pool costs more than a few
    images) it runs in this process; otherwise in a spawn pool of ``min(workers, len(tasks))``
    processes. ``fn`` must be a module-level function. A worker that dies (killed, out of
    memory) stops the run with one line instead of being replaced forever; tasks not yet
    started are cancelled when the caller stops early.
    """
    if workers <= 1 or len(tasks) < max(2, min_tasks):
        yield from map(fn, tasks)
        return
    n = min(workers, len(tasks))
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_single_threaded)
    try:
        if ordered:
            yield from pool.map(fn, tasks, chunksize=chunksize or max(1, min(16, len(tasks) // (n * 8))))
        else:
            for future in as_completed([pool.submit(fn, t) for t in tasks]):
                yield future.result()
    except BrokenProcessPool as e:
        raise JaguarKitError(f"a worker process died ({e}); run again, or with fewer workers if memory ran out") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["run_tasks"]

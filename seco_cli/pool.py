"""A bounded process pool for per-image CPU work of the inference stages (dense CRF, PAR).

Workers are started with ``spawn`` (safe next to torch's threads) and run top-level functions
on plain numpy jobs; results come back to the parent, which alone writes them. At most
``window`` jobs are in flight, so the parent never holds the whole split in memory. With one
worker everything runs in this process (no pool, no pickling).

Start-up: a spawn worker imports what unpickling its job needs (:mod:`seco_cli.postprocess`,
torch-free, for the CRF jobs) and re-runs the top-level imports of the parent's main script
(as ``__mp_main__``). The ``seco`` CLI imports no torch there; a script that imports torch at
its top level gives every worker torch's seconds of import again.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

J = TypeVar("J")
R = TypeVar("R")


def resolve_workers(workers: int) -> int:
    """``workers``, or every core this process may use when it is 0."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _init_worker() -> None:
    """One thread per worker process: the pool is the parallelism.

    Does not import torch (the CRF jobs of :mod:`seco_cli.postprocess` never need it, and its
    import costs seconds per worker): the thread variables make a later import (PAR) start
    with one thread; a torch already imported (e.g. by the parent's main module, which spawn
    re-imports in every worker) is set to one thread directly.
    """
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def imap(fn: Callable[[J], R], jobs: Iterable[J], workers: int, window: int = 2) -> Iterator[R]:
    """``fn(job)`` for every job, in job order, over ``workers`` processes (1: in this one).

    ``jobs`` is consumed lazily: at most ``window × workers`` jobs are pending at a time.
    ``fn`` must be picklable (a top-level function or a ``functools.partial`` of one).
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        pending: deque[Future[R]] = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= window * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

"""Band work on threads: numpy and scipy release the GIL in their loops, so tasks that write disjoint parts of
an array can run side by side. At most `MAX_THREADS` threads (more only fight over a laptop's memory bandwidth).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_A = TypeVar("_A")
_B = TypeVar("_B")

#: Most threads used for band work.
MAX_THREADS = 4


def thread_count() -> int:
    """Threads for band work on this machine: its cores, at most `MAX_THREADS`."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def run_parallel(tasks: Sequence[Callable[[], None]]) -> None:
    """Run every task (each writes its own part of the result), on `thread_count()` threads when there are
    several tasks and cores, else one after another; an exception of any task is raised."""
    n_threads = min(len(tasks), thread_count())
    if n_threads < 2:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


def run_pair(first: Callable[[], _A], second: Callable[[], _B]) -> tuple[_A, _B]:
    """(`first()`, `second()`): `first` on a second thread while this one runs `second`, when there are two cores
    or more, else one after the other. Neither may import a module the other imports (two threads importing at
    once can meet in a circular import): import what they need before. An exception of either is raised."""
    if thread_count() < 2:
        return first(), second()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(first)
        second_result = second()
        return future.result(), second_result

"""Band work on threads: numpy and scipy release the GIL in their loops, so tasks that write disjoint parts of
an array can run side by side. At most `MAX_THREADS` threads (more only fight over a laptop's memory bandwidth).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

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

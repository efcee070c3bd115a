"""Ordered process-parallel map with a progress bar: the one way the toolkit fans work out over local cores."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], jobs: Iterable[T], workers: int, desc: str) -> Iterator[R]:
    """Yield ``fn(job)`` for each job in order, in ``workers`` spawned processes when > 1.

    ``fn`` must be a module-level function and jobs picklable. The progress bar shows only on a terminal. Spawned
    (not forked) workers start clean, whatever threads the parent runs.
    """
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        yield from tqdm(map(fn, jobs), total=len(jobs), desc=desc, disable=None)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc, disable=None)

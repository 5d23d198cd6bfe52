"""``run_bounded``: the one way a place runs its uploads in parallel.

``run_bounded(pool, fn, items, limit)`` calls ``fn(item)`` on ``pool`` for each item, with
at most ``limit`` calls submitted and not finished, so a place reading its items lazily
holds at most ``limit`` of them in memory. It returns when every call has finished. The
first failure seen is raised after the calls not yet started are cancelled and the
running ones have ended (none outlives the call). Thread-safe as ``pool`` is; ``fn``
counts what it delivered itself (the caller attaches the count to the error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any, TypeVar

T = TypeVar("T")


def run_bounded(pool: Executor, fn: Callable[[T], Any], items: Iterable[T], limit: int) -> None:
    """See the module docstring."""
    pending: set[Future[Any]] = set()
    try:
        for item in items:
            if len(pending) >= limit:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
            pending.add(pool.submit(fn, item))
        for f in pending:
            f.result()
    except BaseException:
        for f in pending:
            f.cancel()
        wait(pending)
        raise

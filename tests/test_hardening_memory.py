"""Bounded memory in a long-running plugin (issue 9 point 17): the queue's SQLite pages.

The queue keeps every routed study's ``done`` record, so its file grows for as long as
the plugin runs. What its pooled connections hold in memory must not grow with it:
each one's page cache is ``CACHE_KIB`` however large the file, also after a full scan
(``stats()``) through every connection of the pool at once. SQLite's own allocator
counter (``sqlite3_memory_used``, process-wide, the library Python's ``sqlite3`` uses)
measures it. Bench (e) in ``bench/bench_plugin.py`` measures what this does to
Orthanc's RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path

from dicomsync.queue import NewJob
from dicomsync.queue.sqlite import CACHE_KIB, POOL_SIZE, SQLiteQueue

STUDIES = 12_000  # about 4 MB of jobs table: twice SQLite's default 2,000 KiB cache
PAGES = ("page_count", "page_size")


def sqlite_library() -> ctypes.CDLL:
    # the library Python's _sqlite3 is linked against (Debian: libsqlite3.so.0); never a skip
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib


def filled_queue(path: Path) -> SQLiteQueue:
    q = SQLiteQueue(path)
    for start in range(0, STUDIES, 1000):
        q.enqueue_many(
            [
                NewJob("study", f"{i:08x}-{'a' * 35}", "b", f"1.2.826.0.1.3680043.8.498.{i:020d}")
                for i in range(start, start + 1000)
            ]
        )
        for job in q.lease("b", 1000, owner="node"):
            q.done(job, "f" * 64, 1)
    return q


def test_every_pooled_connection_keeps_a_small_page_cache_however_large_the_queue(
    tmp_path: Path,
) -> None:
    lib = sqlite_library()
    q = filled_queue(tmp_path / "queue.sqlite")
    try:
        with q._connection() as db:
            pages, page_size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in PAGES)
        assert pages * page_size > 1.5 * 2000 * 1024  # larger than a default cache
        before = lib.sqlite3_memory_used()
        # every connection of the pool busy at once, each scanning the whole table
        barrier = threading.Barrier(POOL_SIZE)
        sizes: list[int] = []
        errors: list[BaseException] = []

        def scan() -> None:
            try:
                with q._connection() as db:
                    barrier.wait(timeout=30)
                    sizes.append(int(db.execute("PRAGMA cache_size").fetchone()[0]))
                    rows = db.execute("SELECT * FROM jobs").fetchall()
                    assert len(rows) == STUDIES
                    barrier.wait(timeout=30)  # all scans done before any connection is freed
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=scan) for _ in range(POOL_SIZE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for _ in range(3):
            assert q.stats()["b"].done == STUDIES
        grown = lib.sqlite3_memory_used() - before
        # the pool's page caches, with room for SQLite's per-page headers; the default
        # cache (2,000 KiB each) held about 4 x 2 MB here
        assert grown < POOL_SIZE * CACHE_KIB * 1024 * 1.5 + 512 * 1024, grown
        assert sizes == [-CACHE_KIB] * POOL_SIZE
    finally:
        q.close()

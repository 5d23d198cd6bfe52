"""Queue at scale: the hot operations at 10k, 100k and 1M pending jobs, and draining a
backlog through the real worker lanes, on SQLite and on PostgreSQL.

(a) Medians, in ms, of ``lease`` (one job), ``done``, ``retry_later``, ``enqueue`` (a new
    job), ``next_due`` and ``stats()`` on a queue holding N pending ``study`` jobs of one
    destination (filled with ``enqueue_many`` in big transactions). Targets at 1M: each
    under 2 ms, ``stats()`` under 10 ms; the growth from 10k to 1M shows whether an
    operation scans.
(b) Drain: a backlog of ``study`` jobs sent by a ``WorkerPool`` lane (two threads) and the
    real ``RouteHandler`` -> ``transfer.send_study`` from a dicom_root of tiny one-instance
    studies to a zipped_root (each job writes one zip). Jobs/s with 1k pending against jobs/s
    with 100k pending: within 20% means the queue's cost does not grow with the backlog.
    Windows of the two backlogs alternate, round after round, and the medians are compared
    (the machine's other load then falls on both alike).

PostgreSQL runs on a throw-away cluster (tests/pg_cluster.py); skipped when
/usr/lib/postgresql/15/bin is missing. Usage::

    python bench/bench_queue.py [--sizes 10000,100000,1000000] [--backends sqlite,postgresql]
                                [--repeat 300] [--drain-backlogs 1000,100000]
                                [--drain-window 200] [--drain-rounds 6] [--no-drain]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import REPO, generate_root, report, workdir

sys.path.insert(0, str(REPO / "tests"))

from dicomsync.places.base import StudyRef
from dicomsync.places.dicom_root import DicomRoot
from dicomsync.places.zipped_root import ZippedRoot
from dicomsync.queue import NewJob, Queue, RetryPolicy
from dicomsync.queue.sqlite import SQLiteQueue
from dicomsync.route_handler import RouteHandler
from dicomsync.worker import Lane, WorkerPool

ENV = "DICOMSYNC_BENCH_PG_PASSWORD"
OPS = ("lease", "done", "retry", "enqueue", "next_due", "stats")


def fill(q: Queue, n: int, dest: str = "b", resource: Callable[[int], str] = str) -> None:
    """``n`` queued study jobs, 20,000 per transaction."""
    for first in range(0, n, 20_000):
        q.enqueue_many(
            [NewJob("study", resource(i), dest) for i in range(first, min(n, first + 20_000))]
        )


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def hot_operations(q: Queue, repeat: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {op: [] for op in OPS}
    clock = time.perf_counter
    for r in range(repeat):
        t = clock()
        (job,) = q.lease("b", 1, 300, owner="bench", kind="study")
        samples["lease"].append(clock() - t)
        t = clock()
        q.done(job, "fp", 1)
        samples["done"].append(clock() - t)
        (job,) = q.lease("b", 1, 300, owner="bench", kind="study")
        t = clock()
        q.retry_later(job, "down", delay=3600)
        samples["retry"].append(clock() - t)
        t = clock()
        q.enqueue(NewJob("study", f"new{r}", "b"))
        samples["enqueue"].append(clock() - t)
        t = clock()
        q.next_due("b", "study")
        samples["next_due"].append(clock() - t)
        if r % 3 == 0:
            t = clock()
            q.stats()
            samples["stats"].append(clock() - t)
    return {op: ms(s) for op, s in samples.items()}


# --- backends ----------------------------------------------------------------------------
@contextmanager
def backends(names: list[str], base: Path) -> Iterator[dict[str, Callable[[str], Queue]]]:
    """name -> open(label): a fresh, empty queue per label."""
    opened: dict[str, Callable[[str], Queue]] = {}
    if "sqlite" in names:
        opened["sqlite"] = lambda label: SQLiteQueue(base / f"{label}.sqlite", RetryPolicy())
    cluster = None
    if "postgresql" in names:
        if not Path("/usr/lib/postgresql/15/bin/postgres").exists():
            print("PostgreSQL 15 not installed: postgresql skipped", flush=True)
        else:
            from pg_cluster import PgCluster

            from dicomsync.pg import PgTarget
            from dicomsync.queue.postgres import PostgresQueue

            cluster = PgCluster().start()  # its own folder, readable by the postgres user
            os.environ[ENV] = cluster.password
            pg = cluster

            def open_pg(label: str) -> Queue:
                url = pg.create_database(f"q_{label.replace('-', '_')}")
                return PostgresQueue(PgTarget.checked(url, ENV, "dicomsync"), RetryPolicy())

            opened["postgresql"] = open_pg
    try:
        yield opened
    finally:
        if cluster is not None:
            cluster.stop()


def bench_operations(
    opened: dict[str, Callable[[str], Queue]], sizes: list[int], repeat: int
) -> dict[tuple[str, int], dict[str, float]]:
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name, open_queue in opened.items():
        for size in sizes:
            q = open_queue(f"ops-{size}")
            start = time.perf_counter()
            fill(q, size)
            filled = time.perf_counter() - start
            if name == "postgresql":
                q.stats()  # fold the fill's counter deltas, as the metrics loop does
                analyze(q)
            results[(name, size)] = figures = hot_operations(q, repeat)
            row = ", ".join(f"{op} {figures[op]:.3f}" for op in OPS)
            print(f"{name:10} {size:>9,} pending (filled in {filled:.0f}s): {row} ms", flush=True)
            q.close()
    return results


def analyze(q: Any) -> None:
    """PostgreSQL: autovacuum analyzes a freshly filled table later; do it now."""
    with q._write() as run:
        run("ANALYZE jobs")


# --- drain ---------------------------------------------------------------------------------
class Source(DicomRoot):
    """A dicom_root whose studies are named by job resource ``<key>#<n>``: study ``key``,
    sent under a new name each time, so every job writes a zip of its own."""

    def __init__(self, key: str, root: Path) -> None:
        super().__init__(key, root)
        self._refs = {ref.key: ref for ref in self.studies()}

    def ref_by_id(self, resource: str) -> StudyRef:
        base, _, n = resource.partition("#")
        ref = self._refs[base]
        return replace(ref, study=f"{ref.study}-{n}")

    def _folder(self, ref: StudyRef) -> Path:
        return self.root / ref.patient / ref.study.partition("-")[0]


class Drain:
    """A backlog of ``backlog`` jobs to a zipped_root, drained window by window through a
    WorkerPool lane (two threads) and the real RouteHandler."""

    def __init__(self, q: Queue, base: Path, label: str, backlog: int, studies: Path) -> None:
        self.q = q
        keys = sorted(ref.key for ref in DicomRoot("src", studies).studies())
        fill(q, backlog, dest="zips", resource=lambda i: f"{keys[i % len(keys)]}#{i}")
        if hasattr(q, "fold"):
            q.stats()
            analyze(q)
        self.zips = base / f"zips-{label}"
        self.zips.mkdir()
        self.handler = RouteHandler(
            lambda: Source("src", studies), lambda key: ZippedRoot(key, self.zips)
        )
        self.done = threading.Semaphore(0)
        self.handled = 0

    def _counted(self, job: Any) -> Any:
        result = self.handler(job)
        self.done.release()
        return result

    def window(self, jobs: int) -> float:
        """Jobs/s over ``jobs`` jobs, timed from the first one done (a warm lane)."""
        pool = WorkerPool(
            self.q, [Lane("zips", 2, kind="study")], {"study": self._counted}, poll_interval=1
        )
        pool.start()
        self.done.acquire()
        start = time.perf_counter()
        for _ in range(jobs):
            self.done.acquire()
        seconds = time.perf_counter() - start
        pool.stop()
        while self.done.acquire(blocking=False):  # the jobs in flight at the stop
            pass
        return jobs / seconds

    def close(self) -> None:
        self.handler.close()
        written = sum(1 for _ in self.zips.rglob("*.zip"))
        assert written >= 1, "no zip written"
        self.q.close()


def drain_rates(
    open_queue: Callable[[str], Queue],
    name: str,
    base: Path,
    backlogs: list[int],
    window: int,
    rounds: int,
    studies: Path,
) -> dict[int, float]:
    """Median jobs/s per backlog, the backlogs' windows interleaved round after round so
    that the machine's other load falls on both alike."""
    drains = {b: Drain(open_queue(f"drain-{b}"), base, f"{name}-{b}", b, studies) for b in backlogs}
    rates: dict[int, list[float]] = {b: [] for b in backlogs}
    for _ in range(rounds):
        for backlog, d in drains.items():
            rates[backlog].append(d.window(window))
    for d in drains.values():
        d.close()
    return {b: statistics.median(r) for b, r in rates.items()}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the cluster is stopped on the way
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--drain-window", type=int, default=200)
    parser.add_argument("--drain-rounds", type=int, default=6)
    parser.add_argument("--drain-backlogs", default="1000,100000")
    parser.add_argument("--no-drain", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    base = workdir("queue")
    rows: list[tuple[str, str]] = []
    with backends(args.backends.split(","), base) as opened:
        results = bench_operations(opened, sizes, args.repeat)
        for (name, size), figures in results.items():
            rows.append(
                (f"{name} {size:,} pending", ", ".join(f"{o} {figures[o]:.3f}" for o in OPS))
            )
        for name in opened:
            big, small = results.get((name, max(sizes))), results.get((name, min(sizes)))
            if big and small:
                growth = ", ".join(f"{o} x{big[o] / small[o]:.2f}" for o in OPS)
                rows.append((f"{name} growth {min(sizes):,} -> {max(sizes):,}", growth))
                slow = [o for o in OPS if big[o] > (10.0 if o == "stats" else 2.0)]
                verdict = f"over target: {', '.join(slow)}" if slow else "every median on target"
                rows.append((f"{name} at {max(sizes):,} (2 ms; stats 10 ms)", verdict))
        if not args.no_drain:
            studies = base / "tiny"
            if not studies.exists():
                generate_root(studies, 50, instances=1, pixel_bytes=16)
            backlogs = [int(b) for b in args.drain_backlogs.split(",")]
            window = min(args.drain_window, min(backlogs) // (args.drain_rounds + 1))
            for name, open_queue in opened.items():
                rates = drain_rates(
                    open_queue, name, base, backlogs, window, args.drain_rounds, studies
                )
                for backlog, rate in rates.items():
                    print(f"{name} drain: {rate:.0f} jobs/s with {backlog:,} pending", flush=True)
                    rows.append(
                        (
                            f"{name} drain, {backlog:,} pending"
                            f" (median of {args.drain_rounds} x {window} jobs)",
                            f"{rate:.0f}/s",
                        )
                    )
                low, high = min(rates), max(rates)
                ratio = rates[high] / rates[low]
                rows.append(
                    (
                        f"{name} drain {high:,} vs {low:,} pending",
                        f"x{ratio:.2f} ({'within' if abs(1 - ratio) <= 0.2 else 'outside'} 20%)",
                    )
                )
    report("queue at scale (medians, ms; other work on the machine shows in every figure)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

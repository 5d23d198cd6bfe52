"""The SQLite queue at scale: every hot statement is an index range (EXPLAIN QUERY PLAN), its
work does not grow with the backlog (SQLite's own VM step count, not a timer), the counters
behind ``stats()`` equal a recount after any sequence of operations, pruned done study jobs
keep their duplicate avoidance, and a schema-2 file migrates."""

from __future__ import annotations

import random
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dicomsync.queue import NewJob, RetryPolicy
from dicomsync.queue.sqlite import SQLiteQueue


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Traced(SQLiteQueue):
    """Records every statement its connections run, and counts SQLite VM steps."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.statements: list[str] = []
        self.steps = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _open(self) -> sqlite3.Connection:
        db = super()._open()
        db.set_trace_callback(self.statements.append)

        def step() -> int:
            self.steps += 1
            return 0

        db.set_progress_handler(step, 10)
        return db

    @contextmanager
    def measured(self) -> Iterator[list[str]]:
        self.statements.clear()
        self.steps = 0
        yield self.statements


def study(i: int, dest: str = "b", fp: str | None = None) -> NewJob:
    return NewJob("study", f"s{i}", dest, study_uid=f"1.2.{i}", fingerprint=fp)


def fill(q: SQLiteQueue, n: int, start: int = 0) -> None:
    for first in range(start, start + n, 5000):
        q.enqueue_many([study(i) for i in range(first, min(first + 5000, start + n))])
        q.enqueue_many(
            [NewJob("tags", f"i{i}", "splunk") for i in range(first, min(first + 5000, start + n))]
        )


def hot_operations(q: Traced, clock: Clock, serial: int) -> dict[str, Callable[[], object]]:
    """The operations a lane and the status page run all the time."""
    held: list = []

    def lease() -> None:
        held[:] = q.lease("b", 1, 60, owner="n", kind="study")

    return {
        "enqueue": lambda: q.enqueue(study(10_000_000 + serial)),
        "lease": lease,
        "done": lambda: q.done(held[0], "fp", 1),
        "lease again": lease,
        "retry": lambda: q.retry_later(held[0], "down", delay=5),
        "next_due": lambda: q.next_due("b", "study"),
        "next_due (any kind)": lambda: q.next_due("b"),
        "lease (any kind)": lambda: q.lease("splunk", 1, 60, owner="n"),
        "stats": lambda: q.stats(),
        "stats (kind)": lambda: q.stats(kind="tags"),
        "prune": lambda: q.prune("study", clock.now - 3600),
    }


def test_hot_statements_are_index_ranges_never_scans(tmp_path: Path) -> None:
    clock = Clock()
    q = Traced(tmp_path / "queue.sqlite", RetryPolicy(2, 30, 5), clock=clock)
    fill(q, 500)
    statements: set[tuple[str, str]] = set()
    for name, op in hot_operations(q, clock, 1).items():
        with q.measured() as ran:
            op()
        statements.update(
            (name, s)
            for s in ran
            if s.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE"))
        )
    db = sqlite3.connect(q.path)
    plans = {}
    for name, sql in statements:
        rows = db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        plans[(name, sql)] = [r[3] for r in rows]
    bad = {
        key: plan
        for key, plan in plans.items()
        # a scan of jobs, or an index search on the destination alone (every record of it)
        if any(re.search(r"\bSCAN (jobs|j)\b", line) for line in plan)
        or any(re.search(r"\(destination=\?\)$", line) for line in plan)
    }
    assert not bad, bad
    q.close()


@pytest.mark.parametrize("small, large", [(2_000, 40_000)])
def test_the_work_of_hot_operations_does_not_grow_with_the_backlog(
    tmp_path: Path, small: int, large: int
) -> None:
    """SQLite VM steps per operation at ``small`` and at ``large`` pending jobs: within 1.5x
    (a scan grows 20x). Deterministic: SQLite's instruction count, not a clock."""
    work: dict[int, dict[str, int]] = {}
    for size in (small, large):
        clock = Clock()
        q = Traced(tmp_path / f"q{size}.sqlite", RetryPolicy(2, 30, 5), clock=clock)
        fill(q, size)
        clock.now += 10
        work[size] = {}
        for name, op in hot_operations(q, clock, size).items():
            with q.measured():
                op()
            work[size][name] = q.steps
        q.close()
    grown = {
        name: (work[small][name], work[large][name])
        for name in work[small]
        if work[large][name] > 1.5 * work[small][name] + 5
    }
    assert not grown, grown


OPS = (
    "enqueue",
    "enqueue_tags",
    "lease",
    "done",
    "retry",
    "fail",
    "release",
    "requeue",
    "requeue_failed",
    "recover",
    "extend",
    "prune_study",
    "prune_tags",
    "tick",
)


def _recount(db: sqlite3.Connection) -> dict[tuple[str, str, str], tuple[int, int]]:
    rows = db.execute(
        "SELECT destination, kind, state, COUNT(*), TOTAL(delivered_count) FROM jobs"
        " GROUP BY destination, kind, state"
    ).fetchall()
    return {(d, k, s): (n, int(t)) for d, k, s, n, t in rows}


def _counters(db: sqlite3.Connection) -> dict[tuple[str, str, str], tuple[int, int]]:
    rows = db.execute("SELECT destination, kind, state, n, delivered FROM counts").fetchall()
    return {(d, k, s): (n, t) for d, k, s, n, t in rows if n or t}


@pytest.mark.parametrize("seed", range(12))
def test_counters_equal_a_recount_after_any_sequence_of_operations(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    clock = Clock()
    q = SQLiteQueue(tmp_path / "queue.sqlite", RetryPolicy(2, 30, 3), clock=clock)
    held: list = []
    pruned_tags: dict[str, int] = {}
    pruned_tags_delivered: dict[str, int] = {}
    for _ in range(400):
        op = rng.choice(OPS)
        dest = rng.choice(["a", "b"])
        if op == "enqueue":
            q.enqueue(study(rng.randrange(12), dest, rng.choice([None, "fp1", "fp2"])))
        elif op == "enqueue_tags":
            q.enqueue(NewJob("tags", f"i{rng.randrange(12)}", "splunk"))
        elif op == "lease":
            held += q.lease(rng.choice(["a", "b", "splunk"]), rng.randrange(1, 4), 30, owner="n")
        elif op in ("done", "retry", "fail", "release") and held:
            job = held.pop(rng.randrange(len(held)))
            sent = rng.randrange(4)
            if op == "done":
                fp = rng.choice(["fp1", "fp2"]) if job.kind == "study" else ""
                q.done(job, fp, sent, outcome="delivered")
            elif op == "retry":
                q.retry_later(job, "down", delivered=sent)
            elif op == "fail":
                q.fail(job, "refused", delivered=sent)
            else:
                q.release(job, "on hold")
        elif op == "requeue":
            q.requeue(rng.sample(range(1, 40), 3))
        elif op == "requeue_failed":
            q.requeue_failed(rng.choice([None, dest]))
        elif op == "recover":
            q.recover(rng.choice(["", "n", "other"]))
        elif op == "extend" and held:
            q.extend(held, 30)
        elif op == "prune_study":
            q.prune("study", clock.now - rng.choice([0, 20]))
        elif op == "prune_tags":
            before = clock.now - rng.choice([0, 20])
            with sqlite3.connect(q.path) as db:
                n, t = db.execute(
                    "SELECT COUNT(*), TOTAL(delivered_count) FROM jobs WHERE kind='tags'"
                    " AND state='done' AND next_attempt_at < ?",
                    (before,),
                ).fetchone()
            assert q.prune("tags", before) == n
            pruned_tags["splunk"] = pruned_tags.get("splunk", 0) + n
            pruned_tags_delivered["splunk"] = pruned_tags_delivered.get("splunk", 0) + int(t)
        elif op == "tick":
            clock.now += rng.choice([1, 10, 40])
    with sqlite3.connect(q.path) as db:
        counters = _counters(db)
        live = {key: value for key, value in counters.items() if key[2] != "pruned"}
        assert live == {k: v for k, v in _recount(db).items()}
        archived = {
            d: (n, int(t))
            for d, n, t in db.execute(
                "SELECT destination, COUNT(*), TOTAL(delivered_count) FROM done_studies"
                " GROUP BY destination"
            )
        }
        assert {k[0]: v for k, v in counters.items() if k[1:] == ("study", "pruned")} == {
            d: v for d, v in archived.items() if v != (0, 0)
        }
        tags = counters.get(("splunk", "tags", "pruned"), (0, 0))
        assert tags == (pruned_tags.get("splunk", 0), pruned_tags_delivered.get("splunk", 0))
    q.close()


def test_a_pruned_done_study_keeps_its_duplicate_avoidance(tmp_path: Path) -> None:
    clock = Clock()
    q = SQLiteQueue(tmp_path / "queue.sqlite", clock=clock)
    job_id = q.enqueue(study(1, fp="fp1")).job_id
    q.enqueue(study(2))
    for leased in q.lease("b", 2, 60):
        q.done(leased, f"fp{leased.id}", 3)
    clock.now += 100
    assert q.prune("study", clock.now - 50) == 2
    assert q.jobs(state="done") == [] and q.get(job_id) is None
    stats = q.stats()["b"]
    assert (stats.done, stats.delivered, stats.depth) == (2, 6, 0)
    assert q.fingerprints("b") == {"s1": f"fp{job_id}", "s2": f"fp{job_id + 1}"}
    # the same content: unchanged, no new record
    assert q.enqueue(study(1, fp=f"fp{job_id}")).action == "unchanged"
    assert q.get(job_id) is None
    # changed content: the same record comes back and is requeued, its totals kept
    again = q.enqueue(study(1, fp="other"))
    assert (again.job_id, again.action) == (job_id, "requeued")
    back = q.get(job_id)
    assert back is not None and (back.state, back.fingerprint, back.delivered_count) == (
        "queued",
        f"fp{job_id}",
        3,
    )
    stats = q.stats()["b"]
    assert (stats.done, stats.queued, stats.delivered) == (1, 1, 6)
    assert q.fingerprints("b") == {"s2": f"fp{job_id + 1}"}
    q.close()


def test_a_schema_2_queue_is_migrated_with_its_counts_and_pruned_totals(tmp_path: Path) -> None:
    from test_queue import SCHEMA_1

    path = tmp_path / "queue.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        db.executescript(
            "ALTER TABLE jobs ADD COLUMN outcome TEXT NOT NULL DEFAULT '';PRAGMA user_version = 2;"
        )
        rows = [
            ("study", "s1", "b", "done", "fp1", 5, 1.0, 7.0),
            ("study", "s2", "b", "queued", "", 0, 9.0, 8.0),
            ("tags", "i1", "splunk", "done", "", 2, 3.0, 3.0),
        ]
        db.executemany(
            "INSERT INTO jobs (kind, resource, destination, state, fingerprint, delivered_count,"
            " next_attempt_at, updated_at, queued_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
            " 1, 1)",
            rows,
        )
        db.execute("INSERT INTO meta VALUES ('pruned:tags:splunk', '40 90')")
        db.execute("INSERT INTO meta VALUES ('tags_cursor:n:splunk', '42')")
    clock = Clock()
    clock.now = 100.0
    q = SQLiteQueue(path, clock=clock)
    stats = q.stats()
    assert (stats["b"].done, stats["b"].queued, stats["b"].delivered) == (1, 1, 5)
    assert (stats["splunk"].done, stats["splunk"].delivered) == (41, 92)
    assert q.get_meta("tags_cursor:n:splunk") == "42"
    assert q.get_meta("pruned:tags:splunk") is None
    # a done record's next_attempt_at is its done time, as the rules now keep it
    assert q.prune("study", 7.5) == 1 and q.fingerprints("b") == {"s1": "fp1"}
    q.close()
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"jobs_queue", "jobs_leased", "jobs_age", "jobs_errors"} <= indexes
        assert "jobs_due" not in indexes
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3

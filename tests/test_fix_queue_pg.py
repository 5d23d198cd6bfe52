"""Races between nodes sharing the PostgreSQL queue, each forced at its narrowest point:
two prunes at once count each pruned record once; a study prune and an enqueue of the
same unchanged study never make a second job; two nodes restoring one pruned study at
once both succeed, on one record counted once."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import pytest

from dicomsync.pg import PgTarget
from dicomsync.queue import NewJob
from dicomsync.queue.postgres import PostgresQueue
from dicomsync.queue.sql import Runner

ENV = "DICOMSYNC_TEST_QUEUE_PASSWORD"


@pytest.fixture
def target(pg_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> PgTarget:
    monkeypatch.setenv(ENV, pg_cluster.password)
    return PgTarget.checked(pg_cluster.create_database(), ENV, "dicomsync_queue")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Slow(PostgresQueue):
    """A node whose prune stays open (``hold`` seconds) right after its DELETE."""

    hold = 0.0
    deleted = threading.Event()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Runner]:
        with super()._write() as run:

            def slow(sql: str, params: Mapping[str, Any] = {}) -> list[Any]:
                rows = run(sql, params)
                if "DELETE FROM jobs WHERE" in sql:
                    self.deleted.set()
                    time.sleep(self.hold)
                return rows

            yield slow


@pytest.fixture
def nodes(target: PgTarget) -> Iterator[tuple[Slow, PostgresQueue, Clock]]:
    clock = Clock()
    a, b = Slow(target, clock=clock), PostgresQueue(target, clock=clock)
    yield a, b, clock
    a.close()
    b.close()


@pytest.mark.parametrize("kind", ["tags", "study"])
def test_two_nodes_pruning_at_once_count_each_record_once(
    nodes: tuple[Slow, PostgresQueue, Clock], kind: str
) -> None:
    a, b, clock = nodes
    a.enqueue_many([NewJob(kind, f"r{i}", "d") for i in range(50)])
    for job in a.lease("d", 50, 60, owner="n1", kind=kind):
        assert a.done(job, "fp" if kind == "study" else "", delivered=2)
    clock.now = 200_000.0
    a.hold, a.deleted = 1.0, threading.Event()
    out: dict[str, int] = {}
    first = threading.Thread(target=lambda: out.__setitem__("a", a.prune(kind, 100_000.0)))
    first.start()
    assert a.deleted.wait(10)
    out["b"] = b.prune(kind, 100_000.0)  # while a's prune is not committed yet
    first.join()
    assert sorted(out.values()) == [0, 50]
    stats = b.stats()["d"]
    assert (stats.done, stats.delivered) == (50, 100)


def test_a_study_prune_racing_an_enqueue_of_the_unchanged_study_makes_no_new_job(
    nodes: tuple[Slow, PostgresQueue, Clock],
) -> None:
    a, b, clock = nodes
    a.enqueue(NewJob("study", "st1", "d"))
    [job] = a.lease("d", 1, 60, owner="n1", kind="study")
    assert a.done(job, "fp1", 3)
    clock.now = 200_000.0
    a.hold, a.deleted = 1.0, threading.Event()
    pruning = threading.Thread(target=a.prune, args=("study", 100_000.0))
    pruning.start()
    assert a.deleted.wait(10)
    again = b.enqueue(NewJob("study", "st1", "d", fingerprint="fp1"))  # a's prune still open
    pruning.join()
    assert (again.job_id, again.action) == (job.id, "unchanged")
    assert [j.id for j in b.jobs()] == [job.id]
    stats = b.stats()["d"]
    assert (stats.queued, stats.done, stats.delivered) == (0, 1, 3)


def test_two_nodes_restoring_one_pruned_study_at_once_both_succeed(
    nodes: tuple[Slow, PostgresQueue, Clock],
) -> None:
    a, b, clock = nodes
    a.enqueue(NewJob("study", "st1", "d"))
    [job] = a.lease("d", 1, 60, owner="n1", kind="study")
    assert a.done(job, "fp1", 3)
    clock.now = 200_000.0
    assert a.prune("study", 100_000.0) == 1
    restored = threading.Event()
    out: dict[str, Any] = {}

    def node_a() -> None:  # restores, then holds its transaction open
        with a._transaction() as tx:
            out["a"] = tx.find("study", "st1", "d")
            restored.set()
            time.sleep(1.0)

    first = threading.Thread(target=node_a)
    first.start()
    assert restored.wait(10)
    out["b"] = b.enqueue(NewJob("study", "st1", "d", fingerprint="fp2"))  # changed: requeued
    first.join()
    assert out["a"] == (job.id, "done", "fp1")
    assert (out["b"].job_id, out["b"].action) == (job.id, "requeued")
    stats = b.stats()["d"]
    assert (stats.queued, stats.done, stats.delivered) == (1, 0, 3)


@pytest.mark.parametrize("length", [20, 57, 63])
def test_notify_reaches_another_node_whatever_the_schema_name_length(
    pg_cluster: Any, monkeypatch: pytest.MonkeyPatch, length: int
) -> None:
    monkeypatch.setenv(ENV, pg_cluster.password)
    schema = ("q" * length)[:length]
    target = PgTarget.checked(pg_cluster.create_database(), ENV, schema)
    a, b = PostgresQueue(target), PostgresQueue(target)
    try:
        heard = threading.Event()
        a.subscribe(lambda destination: heard.set() if destination == "d" else None)
        time.sleep(0.5)  # the listening connection is up
        b.enqueue(NewJob("study", "st1", "d"))
        assert heard.wait(10), "no NOTIFY reached the other node"
    finally:
        a.close()
        b.close()


def test_the_counters_follow_a_change_made_with_another_search_path(
    pg_cluster: Any, target: PgTarget
) -> None:
    queue = PostgresQueue(target)
    try:
        queue.enqueue_many([NewJob("tags", f"i{i}", "d") for i in range(3)])
        with psycopg.connect(target.url, password=pg_cluster.password, autocommit=True) as c:
            c.execute("SET search_path = public")  # an operator's session
            c.execute(f"DELETE FROM {target.schema}.jobs WHERE resource = 'i0'")
        assert queue.stats()["d"].queued == 2
    finally:
        queue.close()

"""The PostgreSQL queue's own guarantees, on a real PostgreSQL 15 cluster (``pg_cluster``):
claims with SKIP LOCKED across queue objects (nodes), idempotent enqueue racing across
nodes, NOTIFY wake-ups across connections, versioned schema refused when newer, one-line
errors that never show the password, the DicomSync.Queue option, and counters equal to a
recount. The contract tests of tests/test_queue.py run on PostgreSQL too (conftest)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from dicomsync.errors import ConfigError, QueueError
from dicomsync.pg import PgTarget
from dicomsync.queue import NewJob, QueueConfig, open_queue
from dicomsync.queue.pg_schema import SCHEMA_VERSION
from dicomsync.queue.postgres import PostgresQueue
from dicomsync.routing import load

ENV = "DICOMSYNC_TEST_QUEUE_PASSWORD"


@pytest.fixture
def target(pg_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> PgTarget:
    monkeypatch.setenv(ENV, pg_cluster.password)
    return PgTarget.checked(pg_cluster.create_database(), ENV, "dicomsync")


@pytest.fixture
def nodes(target: PgTarget) -> Iterator[tuple[PostgresQueue, PostgresQueue]]:
    a, b = PostgresQueue(target), PostgresQueue(target)
    yield a, b
    a.close()
    b.close()


def study(i: int, dest: str = "b") -> NewJob:
    return NewJob("study", f"s{i}", dest, study_uid=f"1.2.{i}")


def test_two_nodes_claiming_at_once_never_get_the_same_job(
    nodes: tuple[PostgresQueue, PostgresQueue],
) -> None:
    a, b = nodes
    a.enqueue_many([study(i) for i in range(400)])
    got: dict[str, list[int]] = {"a": [], "b": []}
    lost: list[int] = []  # done() refused: someone else holds the lease now
    lock = threading.Lock()

    def drain(q: PostgresQueue, name: str) -> None:
        while jobs := q.lease("b", 3, 60, owner=name, kind="study"):
            with lock:
                got[name].extend(j.id for j in jobs)
            for job in jobs:
                if not q.done(job, "fp", 1):
                    with lock:
                        lost.append(job.id)

    threads = [
        threading.Thread(target=drain, args=(q, name))
        for q, name in ((a, "a"), (b, "b"))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = got["a"] + got["b"]
    assert lost == [] and len(every) == 400 and len(set(every)) == 400
    assert got["a"] and got["b"]  # both nodes took part
    assert a.stats()["b"].done == 400 and b.stats()["b"].done == 400


def test_a_claim_skips_a_row_another_transaction_holds(
    nodes: tuple[PostgresQueue, PostgresQueue], pg_cluster: Any, target: PgTarget
) -> None:
    """SKIP LOCKED: a job locked by another node's open transaction is passed over at once,
    not waited for."""
    a, _ = nodes
    first = a.enqueue(study(1)).job_id
    second = a.enqueue(study(2)).job_id
    with psycopg.connect(target.url, password=pg_cluster.password) as other:
        other.execute("SET search_path = dicomsync")
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first,))
        started = time.monotonic()
        claimed = a.lease("b", 2, 60, owner="a", kind="study")
        assert [j.id for j in claimed] == [second]
        assert time.monotonic() - started < 5
        other.rollback()
    assert [j.id for j in a.lease("b", 2, 60, owner="a", kind="study")] == [first]


def test_the_same_study_enqueued_by_two_nodes_at_once_is_one_job(
    nodes: tuple[PostgresQueue, PostgresQueue],
) -> None:
    """Both nodes see STABLE_STUDY for a study: whatever the interleaving, one record."""
    a, b = nodes
    barrier = threading.Barrier(2)
    results: dict[str, list[str]] = {}

    def enqueue(q: PostgresQueue, name: str) -> None:
        barrier.wait()
        results[name] = [r.action for r in q.enqueue_many([study(i) for i in range(300)])]

    threads = [threading.Thread(target=enqueue, args=(q, n)) for q, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert a.stats()["b"].queued == 300 and len(a.jobs(limit=1000)) == 300
    created = results["a"].count("created") + results["b"].count("created")
    assert created == 300


def test_notify_wakes_a_listener_of_another_node(
    nodes: tuple[PostgresQueue, PostgresQueue],
) -> None:
    a, b = nodes
    heard = threading.Event()
    destinations: list[str] = []

    def listener(destination: str) -> None:
        destinations.append(destination)
        heard.set()

    a.subscribe(listener)
    time.sleep(0.5)  # the listening connection is up
    b.enqueue(study(1, dest="zips"))
    assert heard.wait(10), "no NOTIFY reached the other node"
    assert "zips" in destinations


def test_a_newer_schema_is_refused_with_one_line(target: PgTarget, pg_cluster: Any) -> None:
    PostgresQueue(target).close()
    with psycopg.connect(target.url, password=pg_cluster.password, autocommit=True) as conn:
        conn.execute(f"UPDATE dicomsync.schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(QueueError) as caught:
        PostgresQueue(target)
    assert str(caught.value) == (
        f"the queue {target.describe()} was written by a newer dicomsync"
        f" (schema {SCHEMA_VERSION + 1})"
    )
    with psycopg.connect(target.url, password=pg_cluster.password, autocommit=True) as conn:
        conn.execute(f"UPDATE dicomsync.schema_version SET version = {SCHEMA_VERSION}")
    PostgresQueue(target).close()  # the current version opens again, nothing migrated twice


@pytest.mark.parametrize("case", ["wrong password", "no server", "no password"])
def test_connection_failures_are_one_line_queue_errors_without_the_password(
    case: str, pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_cluster.create_database()
    secret = "s3cret-Do-Not-Show"
    monkeypatch.setenv(ENV, secret if case != "no password" else "")
    if case == "no server":
        url = url.replace(f":{pg_cluster.port}/", ":1/")
        monkeypatch.setenv(ENV, secret)
    target = PgTarget.checked(url, ENV, "dicomsync")
    with pytest.raises(QueueError) as caught:
        PostgresQueue(target)
    message = str(caught.value)
    assert "\n" not in message and secret not in message
    assert message.startswith(f"cannot open the queue {url} (schema dicomsync): ")


def test_the_queue_option_picks_the_backend_and_refuses_a_password_in_the_url(
    target: PgTarget, tmp_path: Any
) -> None:
    section = {"Kind": "postgresql", "Url": target.url, "PasswordEnv": ENV}
    cfg = load({"DicomSync": {"Queue": section, "StateDirectory": str(tmp_path)}})
    assert cfg is not None and cfg.queue.kind == "postgresql"
    chosen = cfg.queue.target
    assert chosen is not None and (chosen.url, chosen.password_env, chosen.schema) == (
        target.url,
        ENV,
        "dicomsync_queue",
    )
    queue = open_queue(cfg.state_dir, cfg.retry, cfg.queue)
    assert isinstance(queue, PostgresQueue)
    queue.close()
    assert not (tmp_path / "queue.sqlite").exists()
    default = load({"DicomSync": {"StateDirectory": str(tmp_path)}})
    assert default is not None and default.queue == QueueConfig()
    with pytest.raises(ConfigError, match="Url must carry no password"):
        QueueConfig.parse({**section, "Url": "postgresql://dicomsync:pw@db:5432/orthanc"})


def test_jobs_and_cursor_commit_together_or_not_at_all(target: PgTarget, pg_cluster: Any) -> None:
    q = PostgresQueue(target)
    q.enqueue_many([NewJob("tags", "i1", "s")], meta={"cursor": "42"})
    with psycopg.connect(target.url, password=pg_cluster.password, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION dicomsync.boom() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER boom BEFORE UPDATE ON dicomsync.meta"
            " FOR EACH ROW EXECUTE FUNCTION dicomsync.boom()"
        )
    with pytest.raises(QueueError, match="disk full"):
        q.enqueue_many([NewJob("tags", "i9", "s")], meta={"cursor": "99"})
    assert q.get_meta("cursor") == "42" and q.find("tags", "i9", "s") is None
    q.close()


def test_counters_equal_a_recount_after_random_operations_on_two_nodes(
    nodes: tuple[PostgresQueue, PostgresQueue], pg_cluster: Any, target: PgTarget
) -> None:
    rng = random.Random(7)
    held: list[Any] = []
    for _ in range(300):
        q = rng.choice(nodes)
        op = rng.choice(["enqueue", "lease", "finish", "requeue", "prune", "recover", "stats"])
        if op == "enqueue":
            q.enqueue(study(rng.randrange(15), rng.choice(["a", "b"])))
        elif op == "lease":
            held += q.lease(rng.choice(["a", "b"]), 2, 0.05 if rng.random() < 0.2 else 60)
        elif op == "finish" and held:
            job = held.pop(rng.randrange(len(held)))
            end = rng.choice(["done", "retry", "fail"])
            if end == "done":
                q.done(job, rng.choice(["f1", "f2"]), rng.randrange(3))
            elif end == "retry":
                q.retry_later(job, "down", delay=0, delivered=1)
            else:
                q.fail(job, "no", delivered=2)
        elif op == "requeue":
            q.requeue(rng.sample(range(1, 30), 3))
        elif op == "prune":
            q.prune("study", time.time() + 1)
        elif op == "recover":
            q.recover("")
        else:
            q.stats()
    nodes[0].fold()
    with psycopg.connect(target.url, password=pg_cluster.password) as conn:
        conn.execute("SET search_path = dicomsync")
        recount = {
            (d, k, s): (int(n), int(t))
            for d, k, s, n, t in conn.execute(
                "SELECT destination, kind, state, COUNT(*), COALESCE(SUM(delivered_count), 0)"
                " FROM jobs GROUP BY 1, 2, 3"
            )
        }
        counted = {
            (d, k, s): (int(n), int(t))
            for d, k, s, n, t in conn.execute("SELECT * FROM counts")
            if (n, t) != (0, 0)
        }
        archived = conn.execute(
            "SELECT destination, COUNT(*), SUM(delivered_count) FROM done_studies GROUP BY 1"
        ).fetchall()
        assert conn.execute("SELECT COUNT(*) FROM count_deltas").fetchone() == (0,)
    assert {k: v for k, v in counted.items() if k[2] != "pruned"} == recount
    assert {k[0]: v for k, v in counted.items() if k[2] == "pruned"} == {
        d: (int(n), int(t)) for d, n, t in archived
    }


def test_claims_and_next_due_use_the_indexes_not_a_table_scan(
    target: PgTarget, pg_cluster: Any
) -> None:
    """EXPLAIN of the compiled claims on 30,000 pending jobs: index ranges, no scan."""
    from dicomsync.queue.compile import POSTGRES, update_where, where_values
    from dicomsync.queue.rules import LEASE, Where

    q = PostgresQueue(target)
    for first in range(0, 30_000, 10_000):
        q.enqueue_many([study(i) for i in range(first, first + 10_000)])
    q.enqueue_many([NewJob("tags", f"i{i}", "b") for i in range(2_000)])
    with psycopg.connect(target.url, password=pg_cluster.password, autocommit=True) as conn:
        conn.execute("SET search_path = dicomsync")
        conn.execute("ANALYZE jobs")
        plans = {}
        for kind in ("study", None):
            where = Where(destination="b", kind=kind, due=True, limit=1)
            params = {
                **where_values(where),
                "_now": time.time(),
                "owner": "n",
                "token": "t",
                "expires": time.time() + 60,
            }
            sql = update_where(LEASE, where, POSTGRES)
            rows = conn.execute(f"EXPLAIN {sql}", params).fetchall()
            plans[f"lease {kind}"] = "\n".join(r[0] for r in rows)
    q.close()
    for name, plan in plans.items():
        assert "Seq Scan on jobs" not in plan, (name, plan)
        assert "jobs_queue" in plan and "jobs_leased" in plan, (name, plan)

"""The durable queue on real SQLite files: idempotence, leases, backoff, recovery, several processes."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import dicomsync.queue.base as queue_base
from dicomsync.errors import ConfigError, QueueError
from dicomsync.queue import Delivered, Job, NewJob, Queue, RetryPolicy, SinkDelivered, open_queue
from dicomsync.queue.rules import RULES, Rule
from dicomsync.queue.schema import SCHEMA_VERSION
from dicomsync.queue.sqlite import SQLiteQueue


class Clock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def q(tmp_path: Path, clock: Clock, queue_backend: Callable[..., Queue]) -> Iterator[Queue]:
    """Per backend (``queue_backend``): every test taking ``q`` is a contract test."""
    queue = queue_backend(tmp_path, RetryPolicy(2, 30, 5), clock)
    yield queue
    queue.close()


def study(resource: str = "s1", dest: str = "b", fp: str | None = None) -> NewJob:
    return NewJob("study", resource, dest, study_uid=f"1.2.{resource}", fingerprint=fp)


def test_enqueue_is_idempotent_per_kind_resource_destination(q: SQLiteQueue) -> None:
    first = q.enqueue(study())
    again = q.enqueue(study())
    other_dest = q.enqueue(study(dest="zips"))
    other_kind = q.enqueue(NewJob("tags", "s1", "b"))
    assert first.action == "created" and again.action == "unchanged"
    assert again.job_id == first.job_id
    assert len({first.job_id, other_dest.job_id, other_kind.job_id}) == 3
    assert [j.state for j in q.jobs()] == ["queued"] * 3
    job = q.get(first.job_id)
    assert job is not None and job.study_uid == "1.2.s1" and job.attempts == 0


def test_lease_claims_once_and_done_records_fingerprint(q: SQLiteQueue, clock: Clock) -> None:
    job_id = q.enqueue(study()).job_id
    leased = q.lease("b", 5, 60, owner="node1")
    assert [j.id for j in leased] == [job_id]
    assert leased[0].state == "sending" and leased[0].attempts == 1
    assert leased[0].lease_owner == "node1" and leased[0].lease_expires_at == clock.now + 60
    assert q.lease("b", 5, 60) == []
    assert q.lease("zips", 5, 60) == []
    assert q.done(leased[0], "fp1", delivered=7)
    job = q.get(job_id)
    assert job is not None
    assert (job.state, job.fingerprint, job.delivered_count) == ("done", "fp1", 7)
    # done twice with the same lease changes nothing
    assert not q.done(leased[0], "fp1", delivered=7)
    assert q.get(job_id).delivered_count == 7  # type: ignore[union-attr]


def test_reenqueue_of_done_job_depends_on_fingerprint(q: SQLiteQueue) -> None:
    job_id = q.enqueue(study(fp="fp1")).job_id
    q.done(q.lease("b")[0], "fp1", 3)
    assert q.enqueue(study(fp="fp1")).action == "unchanged"
    assert q.get(job_id).state == "done"  # type: ignore[union-attr]
    assert q.enqueue(study(fp="fp2")).action == "requeued"
    job = q.get(job_id)
    assert job is not None and job.state == "queued" and job.attempts == 0
    q.done(q.lease("b")[0], "fp2", 1)
    # an unknown fingerprint (a new STABLE_STUDY) always means "check again"
    assert q.enqueue(study(fp=None)).action == "requeued"
    q.done(q.lease("b")[0], "fp2", 0)
    job = q.get(job_id)
    assert job is not None and job.delivered_count == 4 and job.fingerprint == "fp2"
    assert q.fingerprints("b") == {"s1": "fp2"}


def test_done_many_finishes_a_batch_in_one_call_job_by_job(q: SQLiteQueue, clock: Clock) -> None:
    ids = [q.enqueue(study(f"s{i}")).job_id for i in range(4)]
    leased = q.lease("b", 4, 30, owner="node1")
    assert q.enqueue(study("s1")).action == "rerun"  # s1 was stored again while sending
    clock.now += 31
    stolen = q.lease("b", 1, 30, owner="node2")[0]  # s0's lease expired and was taken over
    assert stolen.id == ids[0]
    answers = q.done_many(
        [(job, Delivered(f"fp{job.id}", 2)) for job in leased[1:]]
        + [(leased[0], Delivered("x", 9))]
    )
    assert answers == [True, True, True, False]
    states = {job_id: q.get(job_id) for job_id in ids}
    assert [(j.state, j.fingerprint, j.delivered_count) for j in states.values() if j] == [
        ("sending", "", 0),  # the other node's lease still holds
        ("queued", f"fp{ids[1]}", 2),  # the rerun: queued again for its new instances
        ("done", f"fp{ids[2]}", 2),
        ("done", f"fp{ids[3]}", 2),
    ]
    assert q.done_many([]) == []


def test_enqueue_while_sending_reruns_after_done(q: SQLiteQueue) -> None:
    job_id = q.enqueue(study()).job_id
    leased = q.lease("b")[0]
    assert q.enqueue(study()).action == "rerun"
    assert q.get(job_id).state == "sending"  # type: ignore[union-attr]
    q.done(leased, "fp1", 2)
    job = q.get(job_id)
    assert job is not None and job.state == "queued" and job.fingerprint == "fp1"
    again = q.lease("b")[0]
    assert again.id == job_id and again.attempts == 1


def test_enqueue_while_sending_then_failing_for_good_is_queued_again(
    q: SQLiteQueue, clock: Clock
) -> None:
    """A second STABLE_STUDY during a send that then fails is not forgotten."""
    job_id = q.enqueue(study()).job_id
    leased = q.lease("b")[0]
    assert q.enqueue(study()).action == "rerun"
    clock.now += 5
    assert q.fail(leased, "refused")
    job = q.get(job_id)
    assert job is not None and job.state == "queued" and job.attempts == 0
    assert job.last_error == "refused" and not job.rerun
    assert job.next_attempt_at == clock.now and job.queued_at == clock.now
    # and a plain failure (no rerun) still fails
    again = q.lease("b")[0]
    assert q.fail(again, "refused again")
    assert q.get(job_id).state == "failed"  # type: ignore[union-attr]
    # the last attempt of retry_later fails through the same rule
    q.requeue([job_id])
    for _ in range(q.policy.max_attempts):
        leased = q.lease("b")[0]
        if leased.attempts == q.policy.max_attempts:
            q.enqueue(study())  # rerun during the last attempt
        q.retry_later(leased, "down", delay=0)
    assert q.get(job_id).state == "queued"  # type: ignore[union-attr]
    # a lost lease changes nothing
    stale = q.lease("b")[0]
    q.recover()
    assert not q.fail(stale, "too late") and q.get(job_id).state == "queued"  # type: ignore[union-attr]


def test_retry_backoff_grows_with_jitter_up_to_cap_then_fails(q: SQLiteQueue, clock: Clock) -> None:
    job_id = q.enqueue(study()).job_id
    delays = []
    job: Job | None
    for attempt in range(1, 6):
        job = q.lease("b", 1, 60)[0]
        assert job.attempts == attempt
        q.retry_later(job, f"down {attempt}")
        job = q.get(job_id)
        assert job is not None
        if attempt < 5:
            assert job.state == "queued" and job.last_error == f"down {attempt}"
            delay = job.next_attempt_at - clock.now
            assert job.to_dict(clock.now)["retry_delay"] == pytest.approx(delay, abs=1e-3)
            ceiling = min(30.0, 2.0 * 2 ** (attempt - 1))
            assert ceiling / 2 <= delay <= ceiling
            delays.append(delay)
            assert q.lease("b") == []  # not due yet
            clock.now = job.next_attempt_at
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert job is not None and job.state == "failed"
    assert "gave up after 5 attempts" in job.last_error
    assert q.stats()["b"].failed == 1 and "down 5" in q.stats()["b"].last_error
    assert q.requeue_failed("other") == 0
    assert q.requeue_failed("b") == 1
    job = q.get(job_id)
    assert job is not None and (job.state, job.attempts, job.last_error) == ("queued", 0, "")


def test_policy_delay_bounds_and_validation() -> None:
    p = RetryPolicy(1, 8, 10)
    assert [p.delay(k, lambda: 1.0) for k in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert [p.delay(k, lambda: 0.0) for k in range(1, 5)] == [0.5, 1, 2, 4]
    assert RetryPolicy.from_config(
        {"BaseDelay": 3, "MaxDelay": 9, "MaxAttempts": 2}
    ) == RetryPolicy(3, 9, 2)
    for bad in (
        {"BaseDelay": 0},
        {"MaxDelay": 1, "BaseDelay": 5},
        {"MaxAttempts": 0},
        {"Base": 1},
        {"BaseDelay": "x"},
        [1],
    ):
        with pytest.raises(ConfigError):
            RetryPolicy.from_config(bad)


def test_fail_and_requeue_ids(q: SQLiteQueue) -> None:
    a = q.enqueue(study("a")).job_id
    b = q.enqueue(study("b")).job_id
    ja, jb = q.lease("b", 2)
    q.fail(ja, "refused")
    q.done(jb, "fp", 1)
    assert {j.id for j in q.jobs(state="failed")} == {a}
    assert q.requeue([a, b, 999]) == 2
    assert {j.state for j in q.jobs()} == {"queued"}
    with pytest.raises(QueueError):
        q.jobs(state="bogus")


def test_expired_lease_is_taken_over_and_old_holder_cannot_write(
    q: SQLiteQueue, clock: Clock
) -> None:
    job_id = q.enqueue(study()).job_id
    first = q.lease("b", 1, 30, owner="dead-node")[0]
    assert q.next_due("b") == clock.now + 30
    clock.now += 31
    second = q.lease("b", 1, 30, owner="node2")[0]
    assert second.id == job_id and second.attempts == 2
    assert not q.done(first, "stale", 1)
    assert not q.retry_later(first, "stale")
    assert q.done(second, "fresh", 2)
    assert q.get(job_id).fingerprint == "fresh"  # type: ignore[union-attr]


def test_extend_keeps_the_lease(q: SQLiteQueue, clock: Clock) -> None:
    q.enqueue(study())
    job = q.lease("b", 1, 30)[0]
    clock.now += 20
    assert q.extend([job], 30) == 1
    clock.now += 20
    assert q.lease("b", 1, 30) == []
    assert q.done(job, "fp")


def test_recover_takes_back_only_this_nodes_jobs(q: SQLiteQueue) -> None:
    q.enqueue(study("mine"))
    q.enqueue(study("theirs"))
    mine = q.lease("b", 1, 600, owner="A")[0]
    q.lease("b", 1, 600, owner="B")
    assert q.recover("A") == 1
    states = {j.resource: j.state for j in q.jobs()}
    assert states == {"mine": "queued", "theirs": "sending"}
    assert not q.done(mine, "late")
    assert q.recover() == 1  # no owner: everything still sending
    assert {j.state for j in q.jobs()} == {"queued"}


def test_stats_jobs_and_next_due(q: SQLiteQueue, clock: Clock) -> None:
    for r in ("a", "b", "c"):
        q.enqueue(study(r))
    clock.now += 10
    q.enqueue(study("z", dest="zips"))
    q.done(q.lease("b")[0], "fp", 5)
    job = q.lease("b")[0]
    q.retry_later(job, "B is down", delay=7)
    s = q.stats()
    assert (s["b"].queued, s["b"].sending, s["b"].done, s["b"].failed) == (2, 0, 1, 0)
    assert s["b"].delivered == 5 and s["b"].depth == 2
    assert s["b"].oldest_queued_age == pytest.approx(10)
    assert s["b"].last_error == "B is down"
    assert s["zips"].queued == 1 and s["zips"].oldest_queued_age == 0
    assert q.next_due("b") == clock.now - 10  # "c" has been due since it was enqueued
    assert [j.resource for j in q.jobs(destination="b", limit=1)] == ["b"]
    assert q.jobs(state="done")[0].to_dict()["fingerprint"] == "fp"
    assert "lease_token" not in q.jobs()[0].to_dict()


def test_meta_and_reopen_keeps_everything(tmp_path: Path) -> None:
    q1 = open_queue(tmp_path)
    q1.enqueue(study())
    q1.set_meta("cursor", "42")
    q1.set_meta("cursor", "43")
    q1.close()
    q2 = open_queue(tmp_path)
    assert q2.get_meta("cursor") == "43" and q2.get_meta("none") is None
    assert len(q2.jobs()) == 1
    q2.close()


def test_subscribers_hear_about_due_jobs(q: SQLiteQueue) -> None:
    heard: list[str] = []
    q.subscribe(heard.append)
    q.enqueue(study())
    q.enqueue(study())  # unchanged: no wake-up
    q.requeue_failed()
    q.enqueue(study("x", dest="zips"))
    assert heard == ["b", "zips"]


def test_threads_lease_each_job_exactly_once(
    tmp_path: Path, queue_backend: Callable[..., Queue]
) -> None:
    queue = queue_backend(tmp_path)
    queue.enqueue_many([study(f"s{i}") for i in range(200)])
    got: list[int] = []
    lock = threading.Lock()

    def drain() -> None:
        while jobs := queue.lease("b", 3, 60):
            for j in jobs:
                queue.done(j, "fp", 1)
            with lock:
                got.extend(j.id for j in jobs)

    threads = [threading.Thread(target=drain) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(set(got)) and len(got) == 200
    assert queue.stats()["b"].done == 200
    queue.close()


def _drain_in_process(path: str) -> list[int]:
    queue = SQLiteQueue(path)
    ids = []
    while jobs := queue.lease("b", 2, 60, owner="proc"):
        for j in jobs:
            queue.done(j, "fp", 1)
            ids.append(j.id)
    queue.close()
    return ids


def test_processes_lease_each_job_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    queue = SQLiteQueue(path)
    queue.enqueue_many([study(f"s{i}") for i in range(300)])
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_drain_in_process, [str(path)] * 4))
    ids = [i for r in results for i in r]
    assert len(ids) == 300 and len(set(ids)) == 300
    assert queue.stats()["b"].done == 300
    queue.close()


def test_unwritable_state_dir_is_a_queue_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(QueueError):
        SQLiteQueue(blocker / "sub" / "queue.sqlite")


# --- the state machine: the docstring's table is the code's --------------------------------
def _table_rows(doc: str) -> dict[str, tuple[str, ...]]:
    """The rows of the first ``====`` table of a docstring, cells split on 2+ spaces."""
    lines = [line.strip() for line in doc.splitlines()]
    rules = [i for i, line in enumerate(lines) if line.startswith("====")]
    body = lines[rules[1] + 1 : rules[2]]
    rows = [tuple(re.split(r"\s{2,}", line)) for line in body if line]
    return {row[0]: row for row in rows}


def test_the_docstring_transition_table_is_the_rules() -> None:
    rows = _table_rows(queue_base.__doc__ or "")
    assert rows == {rule.name: rule.cells() for rule in RULES}


def _one_record_per_state(q: Queue, clock: Clock) -> dict[str, Job]:
    """Records in each state (queued, sending, done, failed), all due."""
    for name in ("queued", "sending", "done", "failed"):
        q.enqueue(study(name))
    jobs = {j.resource: j for j in q.lease("b", 4, 60, owner="n")}
    q.done(jobs["done"], "fp", 1)
    q.fail(jobs["failed"], "refused")
    q.release(jobs["queued"], "on hold")
    clock.now += 1
    got = {name: q.find("study", name, "b") for name in jobs}
    assert {name: job.state for name, job in got.items() if job} == {n: n for n in jobs}
    return {**{n: j for n, j in got.items() if j}, "sending": jobs["sending"]}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_a_transition_changes_only_records_in_its_from_states(
    q: Queue, clock: Clock, rule: Rule
) -> None:
    """Every rule, applied through the backend's storage primitive to a record in every
    state: legal from ``rule.sources`` only (held rules: only with the lease token), and an
    illegal one changes nothing at all."""
    records = _one_record_per_state(q, clock)
    args = {
        "study_uid": "",
        "owner": "m",
        "token": "t2",
        "expires": clock.now + 60,
        "fingerprint": "fp2",
        "outcome": "delivered",
        "delivered": 1,
        "delay": 5.0,
        "error": "e",
    }
    for state, job in records.items():
        before = q.get(job.id)
        with q._transaction() as tx:
            if rule.held:
                assert tx.apply(rule, job.id, args, "not-the-token") is None
            answer = tx.apply(rule, job.id, args, job.lease_token)
        after = q.get(job.id)
        if state in rule.sources:
            assert answer == (rule.target(), "b") and after is not None
            assert after.state == rule.target() and after.updated_at == (
                clock.now if rule.touch else before.updated_at  # type: ignore[union-attr]
            )
        else:
            assert answer is None and after == before, (rule.name, state)


def test_done_on_a_rerun_and_retry_follow_the_table(q: Queue, clock: Clock) -> None:
    q.enqueue(study())
    (job,) = q.lease("b", 1, 60, owner="n")
    assert q.enqueue(study()).action == "rerun"
    assert q.done(job, "fp1", 2)
    again = q.find("study", "s1", "b")
    assert again is not None
    assert (again.state, again.attempts, again.next_attempt_at, again.lease_token) == (
        "queued",
        0,
        clock.now,
        "",
    )
    (job,) = q.lease("b", 1, 60, owner="n")
    assert q.retry_later(job, "busy", delay=7)
    job2 = q.get(job.id)
    assert job2 is not None and (job2.state, job2.attempts, job2.next_attempt_at) == (
        "queued",
        1,
        clock.now + 7,
    )


# --- what a done job records, by kind ---------------------------------------------------------
def test_a_tags_job_records_an_outcome_and_no_fingerprint(q: Queue) -> None:
    q.enqueue_many([NewJob("tags", f"i{i}", "splunk") for i in range(3)])
    a, b, c = q.lease("splunk", 3, 60, owner="n")
    assert q.done_many([(a, SinkDelivered("delivered", 3)), (b, SinkDelivered("gone", 0))]) == [
        True,
        True,
    ]
    with pytest.raises(ValueError, match="records an outcome, not a fingerprint"):
        q.done(c, "events", 1)
    assert q.get(c.id).state == "sending"  # type: ignore[union-attr]
    done = {j.resource: (j.fingerprint, j.outcome, j.delivered_count) for j in q.jobs("done")}
    assert done == {"i0": ("", "delivered", 3), "i1": ("", "gone", 0)}
    with pytest.raises(ValueError):
        SinkDelivered("events")  # type: ignore[arg-type]


def test_a_study_job_records_its_fingerprint_and_delivered(q: Queue) -> None:
    q.enqueue(study(fp="fp1"))
    (job,) = q.lease("b")
    q.done_many([(job, Delivered("fp1", 4))])
    done = q.find("study", "s1", "b")
    assert done is not None and (done.fingerprint, done.outcome) == ("fp1", "delivered")
    assert done.to_dict()["outcome"] == "delivered"


# --- schema versions ----------------------------------------------------------------------------
SCHEMA_1 = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, resource TEXT NOT NULL,
    destination TEXT NOT NULL, study_uid TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '', fingerprint TEXT NOT NULL DEFAULT '',
    delivered_count INTEGER NOT NULL DEFAULT 0, rerun INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT NOT NULL DEFAULT '', lease_token TEXT NOT NULL DEFAULT '',
    lease_expires_at REAL, queued_at REAL NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, UNIQUE (kind, resource, destination));
CREATE INDEX jobs_due ON jobs (destination, state, next_attempt_at);
CREATE INDEX jobs_updated ON jobs (updated_at);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
PRAGMA user_version = 1;
"""


def test_a_version_1_queue_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        rows = [
            ("tags", "i1", "splunk", "done", "events", 3),
            ("tags", "i2", "splunk", "done", "gone", 0),
            ("tags", "i3", "splunk", "queued", "", 0),
            ("study", "s1", "b", "done", "fp1", 5),
            ("study", "s2", "b", "failed", "", 0),
        ]
        db.executemany(
            "INSERT INTO jobs (kind, resource, destination, state, fingerprint, delivered_count,"
            " next_attempt_at, queued_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, 1, 1, 1)",
            rows,
        )
        db.execute("INSERT INTO meta VALUES ('tags_cursor:n:splunk', '42')")
    queue = SQLiteQueue(path)
    try:
        got = {
            j.resource: (j.state, j.fingerprint, j.outcome, j.delivered_count)
            for j in queue.jobs(limit=10)
        }
        assert got == {
            "i1": ("done", "", "delivered", 3),
            "i2": ("done", "", "gone", 0),
            "i3": ("queued", "", "", 0),
            "s1": ("done", "fp1", "delivered", 5),
            "s2": ("failed", "", "", 0),
        }
        assert queue.get_meta("tags_cursor:n:splunk") == "42"
        # the duplicate avoidance of study jobs is untouched by the migration
        assert queue.enqueue(study("s1", fp="fp1")).action == "unchanged"
        assert queue.enqueue(study("s1", fp="fp2")).action == "requeued"
    finally:
        queue.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    SQLiteQueue(path).close()  # opening a current file again changes nothing


def test_a_newer_queue_file_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(QueueError) as caught:
        SQLiteQueue(path)
    assert str(caught.value) == (
        f"{path} was written by a newer dicomsync (schema {SCHEMA_VERSION + 1})"
    )


# --- enqueue_many in bulk (PostgreSQL inserts a batch in one statement) -------------------------
def test_enqueue_many_with_a_key_twice_creates_it_once(q: Queue) -> None:
    results = q.enqueue_many([study("a"), study("b"), study("a"), study("b", dest="zips")])
    assert [r.action for r in results] == ["created", "created", "unchanged", "created"]
    assert results[0].job_id == results[2].job_id
    assert q.stats()["b"].queued == 2 and q.stats()["zips"].queued == 1


def test_a_pruned_done_study_keeps_its_duplicate_avoidance_in_a_batch(
    q: Queue, clock: Clock
) -> None:
    first = q.enqueue(study("a", fp="fp-a")).job_id
    q.enqueue(study("b", fp="fp-b"))
    for job in q.lease("b", 2, 60):
        q.done(job, f"fp-{job.resource}", 2)
    clock.now += 100
    assert q.prune("study", clock.now - 50) == 2
    assert q.get(first) is None and q.fingerprints("b") == {"a": "fp-a", "b": "fp-b"}
    results = q.enqueue_many([study("a", fp="fp-a"), study("b", fp="new"), study("c")])
    assert [(r.action) for r in results] == ["unchanged", "requeued", "created"]
    assert results[0].job_id == first
    back = q.get(results[1].job_id)
    assert back is not None and (back.state, back.delivered_count) == ("queued", 2)
    s = q.stats()["b"]
    assert (s.done, s.queued, s.delivered) == (1, 2, 4)

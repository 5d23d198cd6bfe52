"""The queue and worker parts the plugin's tag sinks rely on, over a real SQLite queue:
release (no attempt counted), held lanes, prune with cumulative stats, stats by kind,
and jobs enqueued together with a cursor."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from dicomsync.errors import QueueError, SinkFatal, SinkRetryable
from dicomsync.queue import Job, NewJob
from dicomsync.queue.sqlite import SQLiteQueue
from dicomsync.worker import Delivered, Lane, SinkDelivered, WorkerPool

from plugin_helpers import wait_for


def test_release_puts_a_job_back_without_counting_the_attempt(q: SQLiteQueue) -> None:
    q.enqueue(NewJob("tags", "i1", "splunk"))
    (job,) = q.lease("splunk", 1, owner="n")
    assert job.attempts == 1
    assert q.release(job, "token refused")
    again = q.get(job.id)
    assert again is not None
    assert (again.state, again.attempts, again.last_error) == ("queued", 0, "token refused")
    assert again.next_attempt_at <= time.time()
    assert not q.release(job, "twice")  # the lease is gone


def test_enqueue_many_stores_the_cursor_in_the_same_transaction(q: SQLiteQueue) -> None:
    q.enqueue_many([NewJob("tags", f"i{i}", "s") for i in range(3)], meta={"cursor": "42"})
    assert q.get_meta("cursor") == "42" and q.stats()["s"].queued == 3
    q.enqueue_many([], meta={"cursor": "43"})  # no jobs: the cursor still moves
    assert q.get_meta("cursor") == "43"
    # a transaction that fails on the cursor write keeps neither: jobs and cursor go together
    if not isinstance(q, SQLiteQueue):
        return  # PostgreSQL: tests/test_queue_pg.py
    with sqlite3.connect(q.path) as db:
        db.execute(
            "CREATE TRIGGER boom BEFORE UPDATE ON meta BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    with pytest.raises(QueueError, match="disk full"):
        q.enqueue_many([NewJob("tags", "i9", "s")], meta={"cursor": "99"})
    assert q.get_meta("cursor") == "43" and q.find("tags", "i9", "s") is None


def test_prune_forgets_done_jobs_and_keeps_the_counts(q: SQLiteQueue) -> None:
    q.enqueue_many([NewJob("tags", f"i{i}", "s") for i in range(4)])
    q.enqueue(NewJob("study", "st1", "b"))
    for job in q.lease("s", 3, owner="n"):
        q.done(job, delivered=5, outcome="delivered")
    (study,) = q.lease("b", 1, owner="n")
    q.done(study, "fp", 7)
    assert q.prune("tags", time.time() + 1) == 3
    assert q.prune("tags", time.time() + 1) == 0
    assert len(q.jobs(destination="s")) == 1  # the queued one stays
    s = q.stats()["s"]
    assert (s.done, s.queued, s.delivered) == (3, 1, 15)
    assert q.stats(kind="tags").keys() == {"s"} and q.stats(kind="study").keys() == {"b"}
    (last,) = q.lease("s", 1, owner="n")
    q.done(last, delivered=2, outcome="delivered")
    q.prune("tags", time.time() + 1)
    assert (q.stats(kind="tags")["s"].done, q.stats()["s"].delivered) == (4, 17)
    assert q.stats()["b"].done == 1  # study jobs are never pruned
    q.enqueue(NewJob("tags", "i0", "s"))  # a pruned instance fed again is simply new
    assert q.stats()["s"].queued == 1


def test_a_held_lane_keeps_its_jobs_queued_until_resumed(q: SQLiteQueue) -> None:
    refuse = threading.Event()
    refuse.set()
    calls: list[int] = []
    paused: list[str] = []

    def batch(jobs: list[Job]) -> list[SinkDelivered | BaseException]:
        calls.append(len(jobs))
        if refuse.is_set():
            return [SinkDelivered("delivered", 1)] + [SinkFatal("token refused")] * (len(jobs) - 1)
        return [SinkDelivered("delivered", 1)] * len(jobs)

    q.enqueue_many([NewJob("tags", f"i{i}", "splunk") for i in range(6)])
    q.enqueue(NewJob("study", "s1", "other"))
    pool = WorkerPool(
        q,
        [Lane("splunk", 1, kind="tags", batch=3), Lane("other", 1, kind="study")],
        {"study": lambda job: Delivered("fp", 1)},
        batch_handlers={"tags": batch},
        poll_interval=0.05,
        hold_on=(SinkFatal,),
        on_pause=lambda lane, exc: paused.append(f"{lane.name}: {exc}"),
    )
    pool.start()
    try:
        wait_for(lambda: pool.paused("tags:splunk") is not None)
        wait_for(lambda: q.stats()["other"].done == 1)  # the other lane is not held up
        time.sleep(0.3)  # a held lane leases nothing
        assert calls == [3]
        assert paused == ["tags:splunk: token refused"]
        s = q.stats()["splunk"]
        assert (s.done, s.queued, s.failed) == (1, 5, 0)
        assert all(j.attempts == 0 for j in q.jobs("queued", "splunk"))
        assert pool.state()["lanes"]["tags:splunk"]["paused"] == "token refused"
        refuse.clear()
        assert pool.resume("tags:splunk")
        wait_for(lambda: q.stats()["splunk"].done == 6)
        assert not pool.resume("tags:splunk")
        assert pool.paused("tags:splunk") is None and len(paused) == 1
    finally:
        pool.stop()


def test_a_batch_sharing_one_error_logs_one_line(
    q: SQLiteQueue, caplog: pytest.LogCaptureFixture
) -> None:
    busy = SinkRetryable("HEC busy (503)")

    def batch(jobs: list[Job]) -> list[SinkDelivered | BaseException]:
        return [busy] * len(jobs)

    q.enqueue_many([NewJob("tags", f"i{i}", "splunk") for i in range(3)])
    pool = WorkerPool(q, [Lane("splunk", 1, kind="tags", batch=3)], batch_handlers={"tags": batch})
    with caplog.at_level("WARNING", logger="dicomsync.worker"):
        pool.start()
        try:
            wait_for(
                lambda: all(
                    j.state == "queued" and j.attempts == 1 for j in q.jobs(destination="splunk")
                )
            )
        finally:
            pool.stop()
    lines = [r.getMessage() for r in caplog.records if "HEC busy" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("will retry (and 2 more job(s) of this batch)")
    assert all(j.last_error == "HEC busy (503)" and j.attempts == 1 for j in q.jobs("queued"))

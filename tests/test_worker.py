"""WorkerPool over a real SQLite queue, with plain handler functions injected."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomsync.errors import DicomSyncError, NotFound, Unreachable
from dicomsync.queue import Job, NewJob, RetryPolicy
from dicomsync.queue.sqlite import SQLiteQueue
from dicomsync.worker import Delivered, Lane, WorkerPool

from plugin_helpers import wait_for


def states(q: SQLiteQueue, dest: str) -> dict[str, str]:
    return {j.resource: j.state for j in q.jobs(destination=dest, limit=1000)}


def test_drains_every_destination_and_a_dead_one_holds_up_nobody(q: SQLiteQueue) -> None:
    release = threading.Event()
    seen: list[str] = []

    def handler(job: Job) -> Delivered:
        if job.destination == "dead":
            release.wait(30)
            raise Unreachable("dead is down")
        seen.append(job.resource)
        return Delivered(f"fp-{job.resource}", sent=2)

    for i in range(4):
        q.enqueue(NewJob("study", f"d{i}", "dead"))
    for i in range(20):
        q.enqueue(NewJob("study", f"s{i}", "b"))
    pool = WorkerPool(q, [Lane("dead", 2), Lane("b", 3)], {"study": handler}, poll_interval=60)
    pool.start()
    try:
        wait_for(lambda: q.stats()["b"].done == 20)
        # both of dead's threads are stuck in a send, and b drained anyway (a thread counts
        # as busy just after its lease: wait for that, bounded)
        wait_for(lambda: pool.state()["lanes"]["dead"]["busy"] == 2)
        assert pool.state()["lanes"]["dead"]["busy"] == 2
        assert q.stats()["dead"].sending == 2 and q.stats()["dead"].queued == 2
        assert q.stats()["b"].delivered == 40
        release.set()
        # every job of dead tried once (not only a moment when no thread holds one)
        wait_for(
            lambda: (
                q.stats()["dead"].sending == 0
                and all(j.last_error for j in q.jobs(destination="dead"))
            )
        )
    finally:
        assert pool.stop()
    dead = q.jobs(destination="dead")
    assert {j.last_error for j in dead} == {"dead is down"} and {j.attempts for j in dead} <= {1}
    assert sorted(seen) == sorted(f"s{i}" for i in range(20))


def test_outcomes_map_to_done_retry_and_fail(q: SQLiteQueue) -> None:
    def handler(job: Job) -> Delivered:
        if job.resource == "gone":
            raise NotFound("study gone")
        if job.resource == "flaky":
            raise Unreachable("connection refused")
        if job.resource == "bug":
            raise KeyError("oops")
        return Delivered("fp", 1)

    for r in ("ok", "gone", "flaky", "bug"):
        q.enqueue(NewJob("study", r, "b"))
    q.enqueue(NewJob("tags", "i1", "b"))  # no handler for this kind: failed, not stuck
    pool = WorkerPool(q, [Lane("b", 2)], {"study": handler}, poll_interval=60)
    pool.start()
    try:
        wait_for(
            lambda: (
                q.stats()["b"].sending == 0
                and q.stats()["b"].queued == 2
                and q.stats()["b"].done == 1
                and q.stats()["b"].failed == 2
            )
        )
    finally:
        pool.stop()
    jobs = {j.resource: j for j in q.jobs(destination="b")}
    assert jobs["ok"].state == "done"
    assert jobs["gone"].state == "failed" and jobs["gone"].last_error == "study gone"
    assert jobs["flaky"].state == "queued" and jobs["flaky"].last_error == "connection refused"
    assert jobs["flaky"].next_attempt_at > time.time() + 10  # backoff, not a hot loop
    assert jobs["bug"].state == "queued" and "internal error: KeyError" in jobs["bug"].last_error
    assert jobs["i1"].state == "failed" and "no handler" in jobs["i1"].last_error
    assert pool.state()["lanes"]["b"]["errors"] == 4


def test_enqueue_wakes_sleeping_workers(q: SQLiteQueue) -> None:
    done = threading.Event()

    def handler(job: Job) -> Delivered:
        done.set()
        return Delivered("fp")

    pool = WorkerPool(q, [Lane("b")], {"study": handler}, poll_interval=3600)
    pool.start()
    try:
        time.sleep(0.2)  # let the thread go to sleep on its event
        q.enqueue(NewJob("study", "s", "b"))
        assert done.wait(10), "an enqueue must wake the lane without waiting for the poll"
    finally:
        pool.stop()


def test_retry_becomes_due_without_an_enqueue(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite", RetryPolicy(0.2, 0.4, 5))
    calls: list[int] = []

    def handler(job: Job) -> Delivered:
        calls.append(job.attempts)
        if job.attempts < 3:
            raise Unreachable("not yet")
        return Delivered("fp")

    queue.enqueue(NewJob("study", "s", "b"))
    pool = WorkerPool(queue, [Lane("b")], {"study": handler}, poll_interval=3600)
    pool.start()
    try:
        wait_for(lambda: queue.stats()["b"].done == 1)
    finally:
        pool.stop()
    assert calls == [1, 2, 3]
    queue.close()


def test_stop_leaves_interrupted_jobs_for_recover(q: SQLiteQueue) -> None:
    started = threading.Event()
    release = threading.Event()

    def handler(job: Job) -> Delivered:
        started.set()
        release.wait(30)
        raise Unreachable("Orthanc is stopping")

    job_id = q.enqueue(NewJob("study", "s", "b")).job_id
    pool = WorkerPool(q, [Lane("b")], {"study": handler}, owner="node", poll_interval=60)
    pool.start()
    assert started.wait(10)
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    time.sleep(0.1)
    release.set()
    stopper.join(15)
    assert not pool.running
    job = q.get(job_id)
    assert job is not None and job.state == "sending" and job.last_error == ""
    assert q.recover("node") == 1
    assert q.get(job_id).state == "queued"  # type: ignore[union-attr]


def test_batch_handler_gets_several_jobs(q: SQLiteQueue) -> None:
    batches: list[int] = []

    def batch(jobs: list[Job]) -> list[Delivered | BaseException]:
        batches.append(len(jobs))
        return [Unreachable("busy") if j.resource == "i0" else Delivered("") for j in jobs]

    q.enqueue_many([NewJob("tags", f"i{i}", "splunk") for i in range(10)])
    pool = WorkerPool(
        q,
        [Lane("splunk", 1, kind="tags", batch=5)],
        batch_handlers={"tags": batch},
        poll_interval=60,
    )
    pool.start()
    try:
        wait_for(lambda: q.stats()["splunk"].done == 9)
    finally:
        pool.stop()
    assert batches == [5, 5]
    assert q.find("tags", "i0", "splunk").state == "queued"  # type: ignore[union-attr]


def test_start_after_an_unclean_stop_waits_for_the_old_threads_or_refuses(
    q: SQLiteQueue,
) -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def handler(job: Job) -> Delivered:
        runs.append(threading.current_thread().name)
        started.set()
        release.wait(30)
        return Delivered("fp")

    q.enqueue(NewJob("study", "s", "b"))
    pool = WorkerPool(q, [Lane("b")], {"study": handler}, owner="node", poll_interval=0.05)
    pool.start()
    assert started.wait(10)
    assert not pool.stop(timeout=0.1)  # the send is still running: an unclean stop
    with pytest.raises(DicomSyncError, match="still busy"):
        pool.start(wait=0.1)
    assert not pool.running and pool.state()["lanes"]["b"]["alive"] == 0
    release.set()
    q.enqueue(NewJob("study", "t", "b"))
    pool.start(wait=10)  # the old thread ended: a clean start with one thread per lane
    try:
        wait_for(lambda: q.stats()["b"].queued == 0 and q.stats()["b"].sending == 0)
        assert pool.state()["lanes"]["b"]["alive"] == 1
        alive = [t for t in threading.enumerate() if t.name == "dicomsync-b-0"]
        assert len(alive) == 1
    finally:
        assert pool.stop()


def test_niced_workers_and_the_threads_they_start_yield_the_cpu(q: SQLiteQueue) -> None:
    """Inside Orthanc the plugin's workers run niced, so ingest keeps the CPU."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[tuple[int, int]] = []

    def handler(job: Job) -> Delivered:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        with ThreadPoolExecutor(1) as pool:  # e.g. an orthanc place's upload threads
            child = pool.submit(
                lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            ).result()
        seen.append((own, child))
        return Delivered("fp", sent=1)

    q.enqueue(NewJob("study", "s", "b"))
    drain_one_niced(q, handler)
    assert seen == [(min(19, base + 5), min(19, base + 5))]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def drain_one_niced(q: SQLiteQueue, handler: Callable[[Job], Delivered]) -> None:
    """Run a pool with nice 5 until the one queued job is done."""
    pool = WorkerPool(q, [Lane("b", 1)], {"study": handler}, poll_interval=60, nice=5)
    pool.start()
    try:
        wait_for(lambda: q.stats()["b"].done == 1)
    finally:
        pool.stop()


def test_workers_started_by_a_niced_thread_get_the_same_nice_value(q: SQLiteQueue) -> None:
    """The workers' nice value is relative to the process, not to the thread that starts
    the pool: started from an already niced thread, they do not end at twice the
    increment."""
    import os

    from dicomsync.worker import lower_thread_priority

    process = os.getpriority(os.PRIO_PROCESS, os.getpid())
    seen: list[int] = []

    def handler(job: Job) -> Delivered:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return Delivered("fp", sent=1)

    def starter() -> None:
        lower_thread_priority(5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        drain_one_niced(q, handler)

    q.enqueue(NewJob("study", "s", "b"))
    t = threading.Thread(target=starter)
    t.start()
    t.join()
    assert seen == [min(19, process + 5)] * 2

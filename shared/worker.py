"""WorkerPool: drains the queue with threads per destination ("lanes").

Each lane (a destination, optionally one job kind) has its own threads, as many as
its ``concurrency``, so a dead or slow destination only ever occupies its own
threads. A thread leases one job (or a batch), calls the injected handler and
records the outcome:

- the handler returns ``Delivered(fingerprint, sent)`` (a study) or
  ``SinkDelivered(outcome, sent)`` (a sink's job; ``dicomsync.queue.records``): ``queue.done``;
- whatever an attempt raises, the instances it still delivered (``delivered_by``) are
  added to the job's count, so the count is every attempt's, not only the last one's;
- it raises a ``DicomSyncError`` with ``retryable`` set (network, 5xx, a send the
  destination does not fully hold yet): ``queue.retry_later`` (backoff with jitter,
  failed after the policy's last attempt);
- it raises any other ``DicomSyncError`` (not found, refused, authentication,
  config): ``queue.fail`` at once. These do not heal by waiting; fix the cause,
  then ``retry-failed``;
- it raises anything else (a bug): logged with its traceback and retried like a
  retryable error, so it ends as failed after the last attempt rather than looping.

While the pool stops, an error is not recorded: the job stays ``sending`` for this
node and ``recover`` takes it back at the next start, without a backoff delay.

Holding a lane: an error of one of the ``hold_on`` types (the plugin passes
``SinkFatal``: Splunk refuses the token) says the *destination* refuses us, not that
the job is bad. The job goes back to ``queued`` without counting the attempt
(``queue.release``), and the lane is paused: its threads lease nothing until
``resume(lane_name)`` (the plugin's sink restart). ``on_pause(lane, error)`` is
called once per pause, to report it.

Threads sleep on a per-lane ``threading.Event`` that the queue sets on enqueue,
and wake anyway when the next retry is due or after ``poll_interval`` (jobs
enqueued by another process, leases expired on a dead node). A heartbeat thread
extends the leases of jobs in flight. The pool knows nothing of Orthanc or of
place kinds: handlers do the work. ``Lane`` and the per-lane state: ``dicomsync.lanes``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dicomsync.errors import DicomSyncError, QueueError
from dicomsync.lanes import Lane, LaneState, lower_thread_priority
from dicomsync.queue.base import Job, Queue
from dicomsync.queue.records import Delivered, SinkDelivered, Success

__all__ = ["BatchHandler", "Delivered", "Handler", "Lane", "SinkDelivered", "WorkerPool"]
__all__ += ["delivered_by", "lower_thread_priority"]

log = logging.getLogger(__name__)


def delivered_by(error: BaseException) -> int:
    """Instances a failed attempt still delivered: a handler says so with a ``delivered``
    attribute on the error it raises (an upload that failed after 30 of 50 instances).
    The queue adds it to the job's count, so ``Delivered`` counts every attempt's work,
    not only the last one's (which sends only what the earlier ones left missing)."""
    n = getattr(error, "delivered", 0)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


Handler = Callable[[Job], Success]
BatchHandler = Callable[[list[Job]], Sequence["Success | BaseException"]]


class WorkerPool:
    def __init__(
        self,
        queue: Queue,
        lanes: Sequence[Lane],
        handlers: Mapping[str, Handler] | None = None,
        *,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
        owner: str = "",
        lease_seconds: float = 300.0,
        poll_interval: float = 5.0,
        hold_on: tuple[type[BaseException], ...] = (),
        on_pause: Callable[[Lane, BaseException], None] | None = None,
        nice: int = 0,
    ) -> None:
        self.queue = queue
        self.nice = nice
        self.handlers = dict(handlers or {})
        self.batch_handlers = dict(batch_handlers or {})
        self.hold_on = hold_on
        self.on_pause = on_pause
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self._lanes: dict[str, LaneState] = {}
        for lane in lanes:
            if lane.name in self._lanes:
                raise ValueError(f"two lanes for {lane.name}")
            self._lanes[lane.name] = LaneState(lane)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[int, Job] = {}
        self._heartbeat: threading.Thread | None = None
        self._lingering: list[threading.Thread] = []  # threads a stop() did not see end
        self.started_at: float | None = None

    # --- life cycle ---------------------------------------------------------------------
    def start(self, wait: float = 10.0) -> None:
        """Start the lane threads. Threads an earlier ``stop`` left running (a send that did
        not end within its timeout) are waited for up to ``wait`` seconds first; if one is
        still alive the pool refuses to start (``DicomSyncError``), rather than let it run on
        beside the new threads."""
        if self.started_at is not None:
            return
        deadline = time.monotonic() + wait
        for t in self._lingering:
            t.join(max(0.0, deadline - time.monotonic()))
        self._lingering = [t for t in self._lingering if t.is_alive()]
        if self._lingering:
            raise DicomSyncError(
                f"{len(self._lingering)} worker thread(s) of the last run are still busy; "
                "start again once they end",
                retryable=True,
            )
        self._stop.clear()
        self.queue.subscribe(self.wake)
        for state in self._lanes.values():
            for i in range(max(1, state.lane.concurrency)):
                t = threading.Thread(
                    target=self._run,
                    args=(state,),
                    name=f"dicomsync-{state.lane.name}-{i}",
                    daemon=True,
                )
                state.threads.append(t)
                t.start()
        self._heartbeat = threading.Thread(target=self._beat, name="dicomsync-lease", daemon=True)
        self._heartbeat.start()
        self.started_at = time.time()
        log.info(
            "workers started: %s",
            ", ".join(f"{s.lane.name}x{max(1, s.lane.concurrency)}" for s in self._lanes.values())
            or "none",
        )

    def request_stop(self) -> None:
        """Ask the threads to stop after their current job; from now on errors are not recorded."""
        self._stop.set()
        self.queue.unsubscribe(self.wake)
        for state in self._lanes.values():
            state.event.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop and join the threads; True when every thread ended within ``timeout``."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        clean = True
        threads = [t for s in self._lanes.values() for t in s.threads]
        if self._heartbeat is not None:
            threads.append(self._heartbeat)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            clean = clean and not t.is_alive()
        if not clean:
            log.warning(
                "workers still busy after %.0fs; their jobs are taken back at the next start",
                timeout,
            )
        self._lingering += [t for t in threads if t.is_alive()]
        for state in self._lanes.values():
            state.threads.clear()
        self._heartbeat = None
        self.started_at = None
        return clean

    @property
    def lingering(self) -> list[threading.Thread]:
        """Threads a ``stop`` did not see end that are still alive (a send in progress)."""
        return [t for t in self._lingering if t.is_alive()]

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self._stop.is_set()

    def wake(self, destination: str) -> None:
        """Called by the queue when a job for ``destination`` becomes due."""
        for state in self._lanes.values():
            if state.lane.destination == destination:
                state.event.set()

    def pause(self, lane_name: str, reason: str) -> bool:
        """Hold a lane: its threads lease nothing until ``resume``. True if it was running."""
        state = self._lanes[lane_name]
        with self._lock:
            was_running = state.paused is None
            state.paused = reason or "paused"
        return was_running

    def resume(self, lane_name: str) -> bool:
        """Let a held lane lease again; True if it was paused."""
        state = self._lanes[lane_name]
        with self._lock:
            was_paused = state.paused is not None
            state.paused = None
        state.event.set()
        return was_paused

    def paused(self, lane_name: str) -> str | None:
        """Why the lane is held, or None."""
        return self._lanes[lane_name].paused

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self.running,
                "started_at": self.started_at,
                "lanes": {
                    name: {
                        "destination": s.lane.destination,
                        "kind": s.lane.kind,
                        "concurrency": max(1, s.lane.concurrency),
                        "alive": sum(t.is_alive() for t in s.threads),
                        "busy": s.busy,
                        "handled": s.handled,
                        "errors": s.errors,
                        "last_error": s.last_error,
                        "paused": s.paused,
                    }
                    for name, s in self._lanes.items()
                },
            }

    # --- threads ------------------------------------------------------------------------
    def _run(self, state: LaneState) -> None:
        lane = state.lane
        if self.nice:
            lower_thread_priority(self.nice)
        while not self._stop.is_set():
            if state.paused is not None:
                self._wait(state, self.poll_interval)
                continue
            try:
                jobs = self.queue.lease(
                    lane.destination,
                    max(1, lane.batch),
                    self.lease_seconds,
                    owner=self.owner,
                    kind=lane.kind,
                )
            except QueueError as exc:
                log.error("%s: cannot lease jobs: %s", lane.name, exc)
                self._stop.wait(self.poll_interval)
                continue
            if not jobs:
                self._sleep(state)
                continue
            with self._lock:
                state.busy += 1
                self._in_flight.update((j.id, j) for j in jobs)
            try:
                if lane.batch > 1 and self._batch_handler(jobs) is not None:
                    self._handle_batch(state, jobs)
                else:
                    for job in jobs:
                        self._handle(state, job)
            finally:
                with self._lock:
                    state.busy -= 1
                    for j in jobs:
                        self._in_flight.pop(j.id, None)

    def _sleep(self, state: LaneState) -> None:
        timeout = self.poll_interval
        try:
            due = self.queue.next_due(state.lane.destination, state.lane.kind)
        except QueueError:
            due = None
        if due is not None:
            timeout = min(timeout, max(0.05, due - time.time()))
        self._wait(state, timeout)

    def _wait(self, state: LaneState, timeout: float) -> None:
        """Sleep on the lane's event. The lane's threads share it: once a stop is requested
        it stays set, or the first thread to wake would swallow the others' stop signal
        (they would sleep on until ``poll_interval``, past the stop's deadline)."""
        state.event.wait(timeout)
        if not self._stop.is_set():
            state.event.clear()

    def _handler(self, job: Job) -> Handler | None:
        return self.handlers.get(job.kind)

    def _batch_handler(self, jobs: list[Job]) -> BatchHandler | None:
        return self.batch_handlers.get(jobs[0].kind)

    def _handle(self, state: LaneState, job: Job) -> None:
        handler = self._handler(job)
        if handler is None:
            self._record(state, job, DicomSyncError(f"no handler for jobs of kind {job.kind!r}"))
            return
        try:
            result: Success | BaseException = handler(job)
        except Exception as exc:  # recorded below; never kills the thread
            result = exc
        self._record(state, job, result)

    def _handle_batch(self, state: LaneState, jobs: list[Job]) -> None:
        handler = self._batch_handler(jobs)
        assert handler is not None
        try:
            results = list(handler(jobs))
            if len(results) != len(jobs):
                raise DicomSyncError(f"batch handler answered {len(results)} of {len(jobs)} jobs")
        except Exception as exc:
            results = [exc] * len(jobs)
        results = [
            r
            if isinstance(r, (Delivered, SinkDelivered, BaseException))
            else DicomSyncError(f"batch handler answered {type(r).__name__} for a job")
            for r in results
        ]
        delivered = [
            (job, result)
            for job, result in zip(jobs, results, strict=True)
            if isinstance(result, (Delivered, SinkDelivered))
        ]
        if delivered:  # one queue transaction for the batch's successes
            try:
                self.queue.done_many(delivered)
                with self._lock:  # counted as ``_record`` counts a single job's success
                    state.handled += len(delivered)
            except (QueueError, ValueError) as exc:
                log.error(
                    "%d job(s): cannot record their outcome (%s); their leases will expire",
                    len(delivered),
                    exc,
                )
        # One log line per distinct error of the batch, not one per job.
        shared: dict[int, int] = {}
        for result in results:
            if isinstance(result, BaseException):
                shared[id(result)] = shared.get(id(result), 0) + 1
        logged: set[int] = set()
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                first = id(result) not in logged
                logged.add(id(result))
                self._record(state, job, result, quiet=not first, others=shared[id(result)] - 1)

    def _record(
        self,
        state: LaneState,
        job: Job,
        result: Success | BaseException,
        *,
        quiet: bool = False,
        others: int = 0,
    ) -> None:
        """Apply a job's outcome. ``quiet``: another job of the batch already logged this
        error; ``others``: how many more jobs of the batch share it (said in the log)."""
        more = f" (and {others} more job(s) of this batch)" if others else ""
        try:
            if isinstance(result, (Delivered, SinkDelivered)):
                self.queue.done_many([(job, result)])
                with self._lock:
                    state.handled += 1
                return
            if self._stop.is_set():
                log.info(
                    "job %d: interrupted by stop (%s); taken back at the next start", job.id, result
                )
                return
            with self._lock:
                state.errors += 1
                state.last_error = str(result)[:500]
            if self.hold_on and isinstance(result, self.hold_on):
                self.queue.release(job, str(result))
                if self.pause(state.lane.name, str(result)):
                    self._report_pause(state.lane, result)
                return
            if isinstance(result, DicomSyncError):
                if result.retryable:
                    if not quiet:
                        log.warning(
                            "job %d (%s -> %s), attempt %d: %s; will retry%s",
                            job.id,
                            job.resource,
                            job.destination,
                            job.attempts,
                            result,
                            more,
                        )
                    self.queue.retry_later(job, str(result), delivered=delivered_by(result))
                else:
                    if not quiet:
                        log.error(
                            "job %d (%s -> %s) failed: %s%s",
                            job.id,
                            job.resource,
                            job.destination,
                            result,
                            more,
                        )
                    self.queue.fail(job, str(result), delivered=delivered_by(result))
            else:
                if not quiet:
                    log.error(
                        "job %d (%s -> %s): unexpected %s: %s%s",
                        job.id,
                        job.resource,
                        job.destination,
                        type(result).__name__,
                        result,
                        more,
                        exc_info=result,
                    )
                self.queue.retry_later(
                    job,
                    f"internal error: {type(result).__name__}: {result}",
                    delivered=delivered_by(result),
                )
        except (QueueError, ValueError) as exc:  # ValueError: a success of the wrong kind
            log.error("job %d: cannot record its outcome (%s); its lease will expire", job.id, exc)

    def _report_pause(self, lane: Lane, error: BaseException) -> None:
        try:
            if self.on_pause is not None:
                self.on_pause(lane, error)
                return
        except Exception:
            log.exception("on_pause(%s) failed", lane.name)
        log.error("%s is on hold: %s", lane.name, error)

    def _beat(self) -> None:
        interval = max(0.5, self.lease_seconds / 3)
        while not self._stop.wait(interval):
            with self._lock:
                jobs = list(self._in_flight.values())
            if jobs:
                try:
                    self.queue.extend(jobs, self.lease_seconds)
                except QueueError as exc:
                    log.error("cannot extend leases: %s", exc)

"""``TagSinks``: the sinks of the ``DicomSync`` section, one worker lane each, their feed.

Nothing runs on Orthanc's callback threads: the upload path is not touched at all. New
instances reach the queue through the change-log feed (``tag_feed.TagFeed``).

**Lanes.** One lane per sink (``Lane(key, 1, kind="tags", batch=BATCH)``) leases up to
``BATCH`` instances; ``handle`` (the pool's batch handler for ``tags`` jobs) reads each
one's headers (from Orthanc's storage folder when that is safe, else through the REST
API: ``storage.InstanceEvents``), computes its events with
``dicomsync.tags.events_from_bytes`` (the CLI's code path) and sends them in one
``sink.send``. The lanes share an ``EventCache``: with several sinks, each instance is
normally read and parsed once, by whichever lane gets to it first (the lanes lease in the
feed's order, so they run close together).

Per job: every event delivered (or rejected for good by the sink) -> done;
``SinkRetryable`` -> retried with the queue's backoff; an unreadable file -> failed;
an instance deleted meanwhile -> done with nothing sent. A done job records a
``SinkDelivered`` outcome: ``delivered``, ``rejected`` (the sink refused some of its events
for good) or ``gone`` (deleted). ``SinkFatal`` (bad
token, unwritable index) holds the lane: its jobs go back to ``queued`` without counting
an attempt and the sink shows ``stopped`` with the error, until ``restart(key)``
(``POST /dicomsync/sinks/{key}/restart``) or an Orthanc restart. The sink's delivered
ledger makes every repeat free, so nothing reaches a sink twice.

Thread-safety: ``handle`` runs on every sink lane at once; each ``SinkState`` guards its
sink with ``lock``; sends need no lock of their own (``Sink.send`` is thread-safe and
returns its own rejections in its ``SendResult``). ``build``/``start``/``stop`` come from one controlling thread.
``handle`` never raises: it returns one result (``SinkDelivered`` or an exception) per job.
``stop`` never closes a sink under a ``handle`` still running (a lane that outlasted the
stop's deadline): the last such call closes the sinks when it ends; ``handle`` calls that
begin after ``stop`` answer ``SinkRetryable`` (the pool records nothing then).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomsync.errors import DicomSyncError, NotFound, SinkError, SinkFatal, SinkRetryable
from dicomsync.orthanc_client import OrthancClient
from dicomsync.queue import DestinationStats, Job, Queue
from dicomsync.routing import SyncConfig
from dicomsync.service.changelog import ChangeLog
from dicomsync.service.event_cache import EventCache
from dicomsync.service.metrics import MetricSink, label
from dicomsync.service.storage import InstanceEvents
from dicomsync.service.tag_feed import TAGS, TagFeed
from dicomsync.sinks.base import (
    Sink,
    build_sink,
    delivered_before,
    rejected_before,
    shared_ledger,
)
from dicomsync.worker import Lane, SinkDelivered, WorkerPool

log = logging.getLogger(__name__)

__all__ = ["BATCH", "TAGS", "EventCache", "SinkState", "TagSinks"]

BATCH = 50  # instances per lease: one sink.send per batch
CACHED_INSTANCES = 4 * BATCH  # events kept for the other sinks' lanes, per sink beyond one


@dataclass
class SinkState:
    """One configured sink: the sink object once built, and why it is stopped."""

    key: str
    kind: str
    sink: Sink | None = None
    error: str | None = None  # set while stopped
    rejected: int = 0
    last_rejected: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards ``sink`` itself


class TagSinks:
    def __init__(
        self,
        cfg: SyncConfig,
        queue: Queue,
        client: OrthancClient,
        storage: Path | None = None,
        changes: ChangeLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.client = client
        self.read_events = InstanceEvents(client, storage)
        self.states = {
            key: SinkState(key, str(section.get("Kind"))) for key, section in cfg.sinks.items()
        }
        self.pool: WorkerPool | None = None
        self.events = EventCache(CACHED_INSTANCES * (len(self.states) - 1))
        self.feed = TagFeed(cfg, queue, changes or ChangeLog(client), self.states, self.events)
        # sends in progress; a stop under running lanes leaves the closing to the last one
        self._busy = 0
        self._closing = False
        self._busy_lock = threading.Lock()

    @property
    def keys(self) -> list[str]:
        return list(self.states)

    @property
    def cursors(self) -> dict[str, int]:
        return self.feed.cursors

    def lanes(self) -> list[Lane]:
        return [Lane(key, 1, kind=TAGS, batch=BATCH) for key in self.states]

    # --- life cycle -----------------------------------------------------------------------
    def build(self) -> None:
        """Build the sinks (local files only, no network); before the workers start."""
        with self._busy_lock:
            self._closing = False
        for state in self.states.values():
            self._build(state)

    def start(self, pool: WorkerPool) -> None:
        """Start the feed; ``pool`` runs the sinks' lanes."""
        self.pool = pool
        self.feed.start()

    def stop(self, timeout: float = 10.0) -> threading.Thread | None:
        """Stop the feed (returns its thread if it outlasted ``timeout``); call after the
        worker pool stopped. Closes the sinks, or, while a lane that did not stop in time
        is still inside ``handle``, lets the last such call close them when it ends (a
        sink closed under a send would lose what the send delivered)."""
        feed = self.feed.stop(timeout)
        with self._busy_lock:
            self._closing = True
            busy = self._busy
        if busy:
            log.info("%d sink send(s) still running; the sinks close when they end", busy)
        else:
            self._close_sinks()
        return feed

    def _close_sinks(self) -> None:
        for state in self.states.values():
            with state.lock:
                sink, state.sink = state.sink, None
            if sink is not None:
                try:
                    sink.close()
                except Exception as exc:  # closing must never stop a shutdown
                    log.debug("closing sink %r: %s", state.key, exc)

    def _build(self, state: SinkState) -> None:
        with state.lock:
            if state.sink is not None:
                return
            try:
                # a shared (PostgreSQL) queue: the sinks' ledgers are shared there too
                with shared_ledger(self.cfg.queue.target):
                    state.sink = build_sink(
                        state.key, self.cfg.sinks[state.key], self.cfg.sinks_base
                    )
                state.error = None
            except DicomSyncError as exc:
                state.error = str(exc)
                log.error(
                    "sink %r is stopped: %s; fix it, then POST /dicomsync/sinks/%s/restart",
                    state.key,
                    exc,
                    state.key,
                )

    def on_pause(self, lane: Lane, error: BaseException) -> None:
        """The pool held a sink's lane (SinkFatal): one clear line, the jobs stay queued."""
        state = self.states.get(lane.destination)
        if state is not None:
            if state.sink is None and state.error:
                return  # it failed to build: that was reported at startup
            state.error = str(error)
        log.error(
            "sink %r stopped: %s; its instances stay queued until it is restarted "
            "(POST /dicomsync/sinks/%s/restart, or restart Orthanc)",
            lane.destination,
            error,
            lane.destination,
        )

    def restart(self, key: str) -> dict[str, Any]:
        """Build the sink if it failed to build, clear its error and let its lane lease again."""
        state = self.states[key]
        self._build(state)
        if state.sink is not None:
            state.error = None
            if self.pool is not None and self.pool.resume(f"{TAGS}:{key}"):
                log.warning("sink %r restarted", key)
        return self.status(key)

    # --- the worker's batch handler --------------------------------------------------------
    def handle(self, jobs: list[Job]) -> list[SinkDelivered | BaseException]:
        """Events of each leased instance, sent in one ``sink.send``; one result per job."""
        with self._busy_lock:
            if self._closing:  # stopped: the pool records nothing now; taken back at start
                return [SinkRetryable("the sinks are stopping")] * len(jobs)
            self._busy += 1
        try:
            return self._handle(jobs)
        finally:
            with self._busy_lock:
                self._busy -= 1
                last = self._closing and self._busy == 0
            if last:
                self._close_sinks()

    def _handle(self, jobs: list[Job]) -> list[SinkDelivered | BaseException]:
        state = self.states.get(jobs[0].destination)
        sink = state.sink if state is not None else None
        if state is None or sink is None:
            why = state.error if state is not None else "not configured"
            return [SinkFatal(f"sink {jobs[0].destination!r} is not running: {why}")] * len(jobs)
        results: list[SinkDelivered | BaseException | None] = [None] * len(jobs)
        event_ids: dict[int, list[str]] = {}
        events = []
        for i, job in enumerate(jobs):
            try:
                instance_events = self.events.get(job.resource, self.read_events)
            except NotFound:
                log.info("instance %s was deleted before its events were computed", job.resource)
                results[i] = SinkDelivered("gone", 0)
                continue
            except DicomSyncError as exc:  # unreadable file: fails; Orthanc stopping: retried
                results[i] = exc
                continue
            event_ids[i] = [e.id for e in instance_events]
            events.extend(instance_events)
        delivered: frozenset[str] | set[str] = frozenset()
        rejected: Mapping[str, str] = {}
        error: SinkError | None = None
        if events:
            try:
                result = sink.send(events)  # its rejections are this send's own
                delivered, rejected = result.delivered, result.rejected
            except SinkError as exc:
                delivered, rejected, error = delivered_before(exc), rejected_before(exc), exc
            if rejected:
                bad, reason = next(iter(rejected.items()))
                with state.lock:  # lanes may send at once: the counter is shared
                    state.rejected += len(rejected)
                    state.last_rejected = f"{bad}: {reason}"
        for i, ids in event_ids.items():
            missing = [e for e in ids if e not in delivered and e not in rejected]
            if not missing:
                refused = bool(rejected) and any(e in rejected for e in ids)
                sent = sum(e in delivered for e in ids)
                results[i] = SinkDelivered("rejected" if refused else "delivered", sent)
            else:
                results[i] = error or SinkRetryable(
                    f"sink {state.key!r} did not confirm {len(missing)} event(s), e.g. {missing[0]}"
                )
        return [r if r is not None else DicomSyncError("no result") for r in results]

    # --- status and metrics -----------------------------------------------------------------
    def running(self, key: str) -> bool:
        state = self.states[key]
        paused = self.pool.paused(f"{TAGS}:{key}") if self.pool is not None else None
        return state.sink is not None and paused is None and state.error is None

    def status(self, key: str, stats: DestinationStats | None = None) -> dict[str, Any]:
        state = self.states[key]
        if stats is None:
            stats = self.queue.stats(kind=TAGS).get(key)
        s = stats or DestinationStats(key)
        paused = self.pool.paused(f"{TAGS}:{key}") if self.pool is not None else None
        return {
            "Kind": state.kind,
            "State": "running" if self.running(key) else "stopped",
            "Error": state.error or paused,
            "Queued": s.queued,
            "Sending": s.sending,
            "Done": s.done,
            "Failed": s.failed,
            "DeliveredEvents": s.delivered,
            "RejectedEvents": state.rejected,
            "LastRejected": state.last_rejected or None,
            "OldestQueuedAge": s.oldest_queued_age,
            "LastError": s.last_error,
            "Cursor": self.cursors.get(key),
        }

    def all_status(self) -> dict[str, dict[str, Any]]:
        stats = self.queue.stats(kind=TAGS)
        return {key: self.status(key, stats.get(key)) for key in self.states}

    def reads(self) -> dict[str, int]:
        """How the lanes got instances' events: from the storage folder, through the REST
        API, or from another lane's read (the shared cache)."""
        return {
            "StorageFolder": self.read_events.direct,
            "RestApi": self.read_events.through_rest,
            "Shared": self.events.hits,
        }

    def details(self, key: str) -> dict[str, Any]:
        """The sink's own counters (may scan its index: for the sinks endpoint only)."""
        sink = self.states[key].sink
        if sink is None:
            return {}
        try:
            return sink.stats()
        except DicomSyncError as exc:
            return {"Error": str(exc)}

    def publish(self, metric: MetricSink) -> None:
        for key, st in self.all_status().items():
            lab = label("sink", key)
            metric(f"dicomsync_sink_queue_depth{lab}", float(st["Queued"] + st["Sending"]))
            metric(f"dicomsync_sink_jobs_failed{lab}", float(st["Failed"]))
            metric(f"dicomsync_sink_delivered_events{lab}", float(st["DeliveredEvents"]))
            metric(f"dicomsync_sink_rejected_events{lab}", float(st["RejectedEvents"]))
            metric(f"dicomsync_sink_running{lab}", 1.0 if st["State"] == "running" else 0.0)
            metric(
                f"dicomsync_sink_oldest_queued_age_seconds{lab}",
                float(st["OldestQueuedAge"] or 0.0),
            )

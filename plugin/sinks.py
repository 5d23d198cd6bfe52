"""Tag sinks inside the plugin: a durable feed of new instances, and one worker lane per sink.

Nothing runs on Orthanc's callback threads: the upload path is not touched at all.

**Feed.** A thread reads Orthanc's change log (``/changes``, in-process) and enqueues
one ``tags`` job per ``NewInstance`` change and sink (the Orthanc instance ID, nothing
parsed). Each sink has a cursor (the last change it was fed), stored in the queue's
meta table *in the same SQLite transaction* as the jobs those changes produced, so a
crash at any moment neither loses an instance nor needs a catch-up: the next start
reads on from the cursor. A sink seen for the first time starts at the beginning of
the change log (every instance Orthanc holds gets indexed, in the background), or at
its end with ``"SinksBackfill": false``. The feed holds back while a sink has more
than ``MAX_BACKLOG`` instances waiting, so a big backfill never floods the queue.

Why not ``OnStoredInstance``: that callback runs on the upload's HTTP thread and must
take the Python GIL for every instance, while the sink workers hold the GIL to parse.
A feed that reads the change log costs the upload path nothing, and it is already
the durable record Orthanc keeps. An instance is fed within ``FEED_INTERVAL`` seconds.

**Workers.** One lane per sink (``Lane(key, 1, kind="tags", batch=BATCH)``) leases
up to ``BATCH`` instances, reads each one's headers (from Orthanc's storage folder when
that is safe, else in-process through the REST API: ``plugin/storage.py``), computes
its events with ``dicomsync.tags.events_from_bytes`` (the CLI's code path) and sends
them in one ``sink.send``. The lanes share an ``EventCache``: with several sinks, each
instance is normally read and parsed once, by whichever lane gets to it first (the
lanes lease in the feed's order, so they run close together).

Per job: every event delivered (or rejected for good by the sink) -> done;
``SinkRetryable`` -> retried with the queue's backoff; an unreadable file -> failed;
an instance deleted meanwhile -> done with nothing sent. ``SinkFatal`` (bad token,
unwritable index) holds the lane: its jobs go back to ``queued`` without counting an
attempt and the sink shows ``stopped`` with the error, until
``POST /dicomsync/sinks/{key}/restart`` or an Orthanc restart. The sink's delivered
ledger makes every repeat free, so nothing reaches a sink twice.

Done ``tags`` jobs are pruned after ``PRUNE_AFTER`` seconds (their counts stay in
the statistics): the sink's ledger is the record of what it holds, and the queue's
table stays small however many instances pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomsync.errors import DicomSyncError, NotFound, SinkError, SinkFatal, SinkRetryable
from dicomsync.orthanc_client import OrthancClient
from dicomsync.plugin.metrics import label as prom_label
from dicomsync.plugin.storage import InstanceEvents
from dicomsync.queue import DestinationStats, Job, NewJob, Queue
from dicomsync.routing import SyncConfig
from dicomsync.sinks.base import Sink, build_sink, delivered_before
from dicomsync.tags import Event
from dicomsync.worker import Delivered, Lane, WorkerPool

log = logging.getLogger(__name__)

TAGS = "tags"
BATCH = 50  # instances per lease: one sink.send per batch
FEED_PAGE = 1000  # changes per /changes read
FEED_INTERVAL = 1.0  # seconds between reads of the change log when it is drained
MAX_BACKLOG = 20_000  # queued instances per sink before the feed holds back
PRUNE_AFTER = 120.0  # seconds a done tags job stays listed (/dicomsync/jobs?kind=tags)
PRUNE_EVERY = 15.0
CACHED_INSTANCES = 4 * BATCH  # events kept for the other sinks' lanes, per sink beyond one
BACKLOG_EVERY = 2.0  # seconds between backlog checks of the feed
FINGERPRINT = "events"  # what a done tags job records (its instance's events are delivered)
GONE = "gone"  # the instance was deleted before its events were computed

Metric = Callable[[str, float], None]


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
    send_lock: threading.Lock = field(default_factory=threading.Lock)  # one send at a time


class EventCache:
    """The events of recently read instances, shared by the sink lanes.

    ``get(instance, compute)`` returns the cached events or ``compute(instance)`` once: a lane
    asking for an instance another lane is computing waits for that result instead of
    reading the file again. Errors are not cached (each lane sees its own). ``forget``
    drops instances the feed sees stored again (Orthanc's ``OverwriteInstances``), also
    while they are being computed, so new content never gets old events. Bounded: the
    oldest entries go first; a lane that falls further behind simply computes again.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[str, list[Event]] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._stale: set[str] = set()  # forgotten while being computed

    def get(self, instance: str, compute: Callable[[str], list[Event]]) -> list[Event]:
        if self.size <= 0:
            return compute(instance)
        while True:
            with self._lock:
                events = self._items.get(instance)
                if events is not None:
                    self._items.move_to_end(instance)
                    self.hits += 1
                    return events
                waiting = self._pending.get(instance)
                if waiting is None:
                    mine = self._pending[instance] = threading.Event()
                    self.misses += 1
                    break
            waiting.wait(60)  # then look again: cached, or computed by us after an error
        events = None
        try:
            events = compute(instance)
            return events
        finally:
            with self._lock:
                del self._pending[instance]
                if events is not None and instance not in self._stale:
                    self._items[instance] = events
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
                self._stale.discard(instance)
            mine.set()

    def forget(self, instances: Iterable[str]) -> None:
        with self._lock:
            for instance in instances:
                self._items.pop(instance, None)
                if instance in self._pending:
                    self._stale.add(instance)


def cursor_key(node_id: str, sink: str) -> str:
    return f"tags_cursor:{node_id}:{sink}"


class TagSinks:
    """The sinks of the ``DicomSync`` section, their feed and their worker lanes."""

    def __init__(
        self, cfg: SyncConfig, queue: Queue, client: OrthancClient, storage: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.client = client
        self.read_events = InstanceEvents(client, storage)
        self.backfill = cfg.raw.get("SinksBackfill", True) is not False
        self.states = {
            key: SinkState(key, str(section.get("Kind"))) for key, section in cfg.sinks.items()
        }
        self.pool: WorkerPool | None = None
        self.events = EventCache(CACHED_INSTANCES * (len(self.states) - 1))
        self.cursors: dict[str, int] = {}
        self._open_keys: list[str] = list(self.states)
        self._backlog_checked = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def keys(self) -> list[str]:
        return list(self.states)

    def lanes(self) -> list[Lane]:
        return [Lane(key, 1, kind=TAGS, batch=BATCH) for key in self.states]

    # --- life cycle -----------------------------------------------------------------------
    def build(self) -> None:
        """Build the sinks (local files only, no network); before the workers start."""
        for state in self.states.values():
            self._build(state)

    def start(self, pool: WorkerPool) -> None:
        """Start the feed; ``pool`` runs the sinks' lanes."""
        self.pool = pool
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._feed_guarded, name="dicomsync-feed", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the feed; call after the worker pool stopped. Closes the sinks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
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
                state.sink = build_sink(state.key, self.cfg.sinks[state.key], self.cfg.sinks_base)
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
    def handle(self, jobs: list[Job]) -> list[Delivered | BaseException]:
        """Events of each leased instance, sent in one ``sink.send``; one result per job."""
        state = self.states.get(jobs[0].destination)
        sink = state.sink if state is not None else None
        if state is None or sink is None:
            why = state.error if state is not None else "not configured"
            return [SinkFatal(f"sink {jobs[0].destination!r} is not running: {why}")] * len(jobs)
        results: list[Delivered | BaseException | None] = [None] * len(jobs)
        event_ids: dict[int, list[str]] = {}
        events = []
        for i, job in enumerate(jobs):
            try:
                instance_events = self.events.get(job.resource, self.read_events)
            except NotFound:
                log.info("instance %s was deleted before its events were computed", job.resource)
                results[i] = Delivered(GONE, 0)
                continue
            except DicomSyncError as exc:  # unreadable file: fails; Orthanc stopping: retried
                results[i] = exc
                continue
            event_ids[i] = [e.id for e in instance_events]
            events.extend(instance_events)
        delivered: set[str] = set()
        rejected: dict[str, str] = {}
        error: SinkError | None = None
        if events:
            # ``sink.rejected`` belongs to the sink's last send: send and read it under one
            # lock, so a concurrent send cannot swap another batch's rejections in.
            with state.send_lock:
                try:
                    delivered = sink.send(events)
                except SinkError as exc:
                    delivered, error = delivered_before(exc), exc
                rejected = dict(sink.rejected)
            if rejected:
                state.rejected += len(rejected)
                bad, reason = next(iter(rejected.items()))
                state.last_rejected = f"{bad}: {reason}"
        for i, ids in event_ids.items():
            missing = [e for e in ids if e not in delivered and e not in rejected]
            if not missing:
                results[i] = Delivered(FINGERPRINT, sum(e in delivered for e in ids))
            else:
                results[i] = error or SinkRetryable(
                    f"sink {state.key!r} did not confirm {len(missing)} event(s), e.g. {missing[0]}"
                )
        return [r if r is not None else DicomSyncError("no result") for r in results]

    # --- the feed ---------------------------------------------------------------------------
    def _feed_guarded(self) -> None:
        try:
            self._feed()
        except Exception:
            log.exception("the tags feed stopped on an unexpected error")

    def _last_change(self) -> int:
        return int(self.client.get_json("/changes?last")["Last"])

    def _load_cursors(self) -> None:
        last = self._last_change()
        fresh: dict[str, str] = {}
        for key in self.states:
            stored = self.queue.get_meta(cursor_key(self.cfg.node_id, key))
            if stored is not None and int(stored) <= last:
                self.cursors[key] = int(stored)
                continue
            # first run of this sink (or Orthanc's database was replaced)
            self.cursors[key] = 0 if self.backfill else last
            fresh[cursor_key(self.cfg.node_id, key)] = str(self.cursors[key])
            log.info(
                "sink %r: first run, indexing %s",
                key,
                "every instance Orthanc holds" if self.backfill else "instances stored from now",
            )
        if fresh:
            self.queue.enqueue_many([], meta=fresh)

    def _feed(self) -> None:
        interval = min(FEED_INTERVAL, self.cfg.poll_interval)
        while not self._stop.is_set():
            try:
                self._load_cursors()
                break
            except DicomSyncError as exc:
                log.warning("tags feed: %s; trying again", exc)
                self._stop.wait(interval)
        next_prune = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_prune:
                    self.queue.prune(TAGS, time.time() - PRUNE_AFTER)
                    next_prune = time.monotonic() + PRUNE_EVERY
                more = self.feed_once()
            except DicomSyncError as exc:
                if self._stop.is_set():
                    return
                log.warning("tags feed: %s; trying again", exc)
                more = False
            except Exception:  # a bug must not end the feed for good: log it, go on
                log.exception("tags feed: unexpected error; trying again")
                more = False
            if not more:
                self._stop.wait(interval)

    def feed_once(self) -> bool:
        """Enqueue the instances of one page of changes; True when more pages are waiting."""
        if time.monotonic() >= self._backlog_checked + BACKLOG_EVERY:
            stats = self.queue.stats(kind=TAGS)
            self._open_keys = [k for k in self.states if _backlog(stats.get(k)) < MAX_BACKLOG]
            self._backlog_checked = time.monotonic()
        open_keys = self._open_keys
        if not open_keys:
            return False
        since = min(self.cursors[k] for k in open_keys)
        page = self.client.get_json(f"/changes?since={since}&limit={FEED_PAGE}")
        changes = page.get("Changes") or []
        if not changes:
            return False
        jobs: list[NewJob] = []
        for change in changes:
            if change.get("ChangeType") != "NewInstance":
                continue
            seq, instance = int(change["Seq"]), str(change["ID"])
            jobs += [NewJob(TAGS, instance, k) for k in open_keys if seq > self.cursors[k]]
        self.events.forget(j.resource for j in jobs)  # stored again: its content may differ
        last = max(int(c["Seq"]) for c in changes)
        moved = {k: max(self.cursors[k], last) for k in open_keys}
        self.queue.enqueue_many(
            jobs, meta={cursor_key(self.cfg.node_id, k): str(v) for k, v in moved.items()}
        )
        self.cursors.update(moved)
        return not page.get("Done", True)

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

    def publish(self, metric: Metric) -> None:
        for key, st in self.all_status().items():
            label = prom_label("sink", key)
            metric(f"dicomsync_sink_queue_depth{label}", float(st["Queued"] + st["Sending"]))
            metric(f"dicomsync_sink_jobs_failed{label}", float(st["Failed"]))
            metric(f"dicomsync_sink_delivered_events{label}", float(st["DeliveredEvents"]))
            metric(f"dicomsync_sink_rejected_events{label}", float(st["RejectedEvents"]))
            metric(f"dicomsync_sink_running{label}", 1.0 if st["State"] == "running" else 0.0)
            metric(
                f"dicomsync_sink_oldest_queued_age_seconds{label}",
                float(st["OldestQueuedAge"] or 0.0),
            )


def _backlog(stats: DestinationStats | None) -> int:
    return stats.queued + stats.sending if stats is not None else 0

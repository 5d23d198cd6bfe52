"""``TagFeed``: the tag sinks' durable feed of new instances from Orthanc's change log.

A thread reads the change log (``ChangeLog``, in-process inside the plugin) and enqueues
one ``tags`` job per ``NewInstance`` change and sink (the Orthanc instance ID, nothing
parsed). Each sink has a cursor (the last change it was fed), stored in the queue's meta
table *in the same SQLite transaction* as the jobs those changes produced, so a crash at
any moment neither loses an instance nor needs a catch-up: the next start reads on from
the cursor. A sink seen for the first time starts at the beginning of the change log
(every instance Orthanc holds gets indexed, in the background), or at its end with
``"SinksBackfill": false``. The feed holds back while a sink has more than
``MAX_BACKLOG`` instances waiting, so a big backfill never floods the queue.

Why not ``OnStoredInstance``: that callback runs on the upload's HTTP thread and must
take the Python GIL for every instance, while the sink workers hold the GIL to parse.
A feed that reads the change log costs the upload path nothing, and it is already
the durable record Orthanc keeps. An instance is fed within ``FEED_INTERVAL`` seconds.
Done ``tags`` jobs are pruned after ``PRUNE_AFTER`` seconds (their counts stay in the
statistics): the sink's ledger is the record of what it holds.

Several nodes (a queue on PostgreSQL, Orthanc's index shared): every node reads the same
change log, so each would enqueue every instance. There the feed also keeps one cursor per
sink for all nodes (``shared_cursor_key``, written with the jobs like the node's own) and
enqueues only the changes past it: a node reads each page (its own cursor still moves, and
its event cache forgets re-stored instances) but leaves out what another node already fed.
Two nodes reading one page at the same moment may both enqueue it: the queue keeps one
record per instance and sink, and the sink's ledger (shared too) sends nothing twice.

Thread-safety: ``start``/``stop`` from one controlling thread; the feed thread alone
moves the cursors (``cursors`` may be read from anywhere: a dict of ints). ``feed_once``
raises ``DicomSyncError`` (Orthanc or the queue failing); the thread logs it and tries
again, and logs (never dies of) any other error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from dicomsync.errors import DicomSyncError
from dicomsync.queue import DestinationStats, NewJob, Queue
from dicomsync.routing import SyncConfig
from dicomsync.service.changelog import ChangeLog
from dicomsync.service.event_cache import EventCache

log = logging.getLogger(__name__)

TAGS = "tags"
FEED_PAGE = 1000  # changes per /changes read
FEED_INTERVAL = 1.0  # seconds between reads of the change log when it is drained
MAX_BACKLOG = 20_000  # queued instances per sink before the feed holds back
PRUNE_AFTER = 120.0  # seconds a done tags job stays listed (/dicomsync/jobs?kind=tags)
PRUNE_EVERY = 15.0
BACKLOG_EVERY = 2.0  # seconds between backlog checks of the feed


def cursor_key(node_id: str, sink: str) -> str:
    return f"tags_cursor:{node_id}:{sink}"


def shared_cursor_key(sink: str) -> str:
    """The cursor every node sharing the queue (and Orthanc's change log) moves."""
    return f"tags_cursor:*:{sink}"


class TagFeed:
    def __init__(
        self,
        cfg: SyncConfig,
        queue: Queue,
        changes: ChangeLog,
        keys: Iterable[str],
        events: EventCache,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.changes = changes
        self.keys = list(keys)
        self.events = events
        self.backfill = cfg.sinks_backfill
        self.shared = cfg.queue.target is not None  # several nodes may feed this queue
        self.cursors: dict[str, int] = {}
        self._open_keys: list[str] = list(self.keys)
        self._backlog_checked = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._guarded, name="dicomsync-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> threading.Thread | None:
        """Stop the feed thread; returns it if it did not end within ``timeout``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        return thread if thread is not None and thread.is_alive() else None

    def _guarded(self) -> None:
        try:
            self._feed()
        except Exception:
            log.exception("the tags feed stopped on an unexpected error")

    def _load_cursors(self) -> None:
        last = self.changes.last()
        fresh: dict[str, str] = {}
        for key in self.keys:
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
        for key in self.keys if self.shared else ():
            if self._fed_by_others(key) > last:  # Orthanc's database was replaced
                fresh[shared_cursor_key(key)] = str(self.cursors[key])
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
            self._open_keys = [k for k in self.keys if _backlog(stats.get(k)) < MAX_BACKLOG]
            self._backlog_checked = time.monotonic()
        open_keys = self._open_keys
        if not open_keys:
            return False
        since = min(self.cursors[k] for k in open_keys)
        page = self.changes.page(since, FEED_PAGE)
        changes = page.changes
        if not changes:
            return False
        fed = {k: max(self.cursors[k], self._fed_by_others(k)) for k in open_keys}
        jobs: list[NewJob] = []
        stored_again: list[str] = []
        for change in changes:
            if change.get("ChangeType") != "NewInstance":
                continue
            seq, instance = int(change["Seq"]), str(change["ID"])
            stored_again += [instance] if seq > min(self.cursors[k] for k in open_keys) else []
            jobs += [NewJob(TAGS, instance, k) for k in open_keys if seq > fed[k]]
        self.events.forget(stored_again)  # stored again: its content may differ
        last = max(int(c["Seq"]) for c in changes)
        moved = {k: max(self.cursors[k], last) for k in open_keys}
        meta = {cursor_key(self.cfg.node_id, k): str(v) for k, v in moved.items()}
        # the shared cursor only grows: a node slower to commit never moves it back
        shared = {shared_cursor_key(k): max(v, fed[k]) for k, v in moved.items()}
        self.queue.enqueue_many(jobs, meta=meta, meta_max=shared if self.shared else None)
        self.cursors.update(moved)
        return page.done is False  # not page.get("Done", True)

    def _fed_by_others(self, key: str) -> int:
        """How far another node sharing the queue has fed sink ``key`` (0: none, or alone)."""
        if not self.shared:
            return 0
        stored = self.queue.get_meta(shared_cursor_key(key))
        return int(stored) if stored is not None and stored.isdigit() else 0


def _backlog(stats: DestinationStats | None) -> int:
    return stats.queued + stats.sending if stats is not None else 0

"""The route job handler: ``RouteHandler`` sends one Orthanc study to one place per job.

Called by the workers (``dicomsync.worker``) on their threads, one job at a time per
thread; thread-safe. Raises ``TransferError`` (retryable or not, with the instances
the destination already stored as ``error.delivered``) when a send fails, and what the
places raise (``dicomsync.errors`` types) while reading the study.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

from dicomsync.errors import TransferError
from dicomsync.places.base import Place
from dicomsync.queue.base import Job
from dicomsync.worker import Delivered

log = logging.getLogger(__name__)


class RouteHandler:
    """Handles ``study`` jobs: send Orthanc study ``job.resource`` to place ``job.destination``.

    ``source_factory`` builds the local Orthanc place (in the plugin, an
    ``OrthancPlace`` over the in-process transport); ``dest_factory`` builds a
    destination place by key. Each worker thread gets its own place objects (their
    keep-alive sessions and upload threads are reused job after job); those of a thread
    that ended are closed when another thread first asks, so the handler holds at most
    (threads alive + 1) x 2 places. ``close`` closes those of the threads not sending;
    a thread still sending closes its own when its send ends. Caches inside a place are
    bounded by the place.
    ``send_study`` diffs identities, so only missing instances travel, and verifies
    that the destination holds every SOP UID before the job counts as done. Each job
    is its own batch: ``dest.prepare`` runs before every send, so a place that caches
    a listing per batch (XNAT) never answers from a stale one.
    """

    def __init__(
        self,
        source_factory: Callable[[], Any],
        dest_factory: Callable[[str], Place],
    ) -> None:
        self._source_factory = source_factory
        self._dest_factory = dest_factory
        # thread -> its places; the places of threads that ended are closed and dropped
        self._by_thread: dict[threading.Thread, dict[str, Place]] = {}
        self._busy: set[threading.Thread] = set()  # threads inside ``__call__``
        self._closed = False
        self._lock = threading.Lock()

    def _place(self, key: str, factory: Callable[[], Place]) -> Place:
        me = threading.current_thread()
        with self._lock:
            places = self._by_thread.get(me)
            ended: list[Place] = []
            if places is None:
                for thread in [t for t in self._by_thread if not t.is_alive()]:
                    ended.extend(self._by_thread.pop(thread).values())
                places = self._by_thread[me] = {}
        _close_all(ended)
        place = places.get(key)
        if place is None:
            place = places[key] = factory()
        return place

    def held(self) -> int:
        """How many place objects the handler holds (for the tests of its bound)."""
        with self._lock:
            return sum(len(p) for p in self._by_thread.values())

    def source(self) -> Any:
        return self._place("\0source", self._source_factory)

    def __call__(self, job: Job) -> Delivered:
        me = threading.current_thread()
        with self._lock:
            self._busy.add(me)
        try:
            return self._send(job)
        finally:
            with self._lock:
                self._busy.discard(me)
                mine = self._by_thread.pop(me, {}) if self._closed else {}
            _close_all(mine.values())  # ``close`` came while this send ran

    def _send(self, job: Job) -> Delivered:
        from dicomsync.transfer import send_study

        source = self.source()
        dest = self._place(job.destination, lambda: self._dest_factory(job.destination))
        ref = source.ref_by_id(job.resource)
        identity = source.identity(ref)
        # A job is a batch of one: places that list once per batch (XNAT) list again now,
        # instead of answering from a listing an earlier job of this thread made.
        dest.prepare([(ref.key, identity)])
        outcome = send_study(source, ref, dest, identity=identity)
        if outcome.status in ("sent", "duplicate", "empty"):
            fingerprint = outcome.fingerprint or ""
            return Delivered(fingerprint, outcome.sent)
        error = TransferError(
            outcome.error or f"{ref}: send to {job.destination} failed",
            retryable=outcome.retryable,
        )
        error.delivered = outcome.sent  # type: ignore[attr-defined]  # see worker.delivered_by
        raise error

    def close(self, timeout: float | None = None) -> None:
        """Close the places of the threads that are not sending; a thread still inside a
        send closes its own when that send ends (closing them under it would fail the send
        for nothing). ``timeout``: seconds to wait for the closing (an XNAT logout may
        hang); the rest goes on on a ``dicomsync-close`` thread. Never raises."""
        with self._lock:
            self._closed = True
            idle = [t for t in self._by_thread if t not in self._busy]
            places = [p for t in idle for p in self._by_thread.pop(t).values()]
        if timeout is None or not places:
            _close_all(places)
            return
        closer = threading.Thread(
            target=_close_all, args=(places,), name="dicomsync-close", daemon=True
        )
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.info("closing %d place(s) goes on after the stop", len(places))


def _close_all(places: Collection[Place]) -> None:
    for place in places:
        try:
            place.close()
        except Exception as exc:  # closing must never stop a shutdown
            log.debug("closing %r: %s", place, exc)

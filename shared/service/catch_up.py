"""``RouteCursor``: the routes' cursor into Orthanc's change log, and the catch-up.

Orthanc keeps its list of "not yet stable" studies in memory only, so a crash (or a
stop) before StableAge swallows their STABLE_STUDY. The cursor, stored in the queue's
meta table under ``changes_cursor:<node id>``, marks how far every change is known to
be routed:

- ``catch_up_once()`` (at start, through ``run_catch_up`` until it succeeds): routes
  the studies changed since the stored cursor, each with its fingerprint so a study
  delivered unchanged stays done, then stores the log's end as the cursor. The first
  run only sets the cursor (studies already stored are for backfill); a cursor beyond
  the log's end (Orthanc's database replaced) is reset. A study that fails to route is
  held (``Intake.hold``) and the cursor stays where it was.
- ``advance()`` (the metrics loop): a change older than StableAge + ``CURSOR_SLACK``
  has had its STABLE_STUDY handed over. The cursor moves to the newest such sample of
  the log's end only once the catch-up ran, every handed-over study is routed
  (``Intake.idle``) and none is held, so a restart's catch-up still sees a study whose
  routing failed.

Reads go through ``ChangeLog``, and neither move passes a hole in the seqs that may
still fill (``ChangeLog``: a change committed after a higher one was read). Thread-safety: ``run_catch_up``/``catch_up_once`` on the
catch-up thread, ``advance`` on the metrics thread (``caught_up`` is the only state they
share, a flag set once); ``reset`` from the controlling thread while neither runs.
``catch_up_once`` and ``advance`` raise ``DicomSyncError`` (Orthanc, the queue).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dicomsync.errors import DicomSyncError
from dicomsync.queue import Queue
from dicomsync.service.changelog import PAGE, ChangeLog
from dicomsync.service.intake import Intake

log = logging.getLogger(__name__)

CURSOR_SLACK = 30.0  # seconds after StableAge before a change counts as routed


class RouteCursor:
    def __init__(
        self,
        node_id: str,
        queue: Queue,
        changes: ChangeLog,
        intake: Intake,
        stable_age: float,
        stop: threading.Event,
        fingerprint: Callable[[str], str | None],
        retry_interval: float,
    ) -> None:
        self.key = f"changes_cursor:{node_id}"
        self.queue = queue
        self.changes = changes
        self.intake = intake
        self.stable_age = stable_age
        self.stop = stop
        self.fingerprint = fingerprint
        self.retry_interval = retry_interval
        self.caught_up = False
        self._samples: list[tuple[float, int]] = []

    def reset(self) -> None:
        """Back to the state before a start."""
        self._samples = []
        self.caught_up = False

    def run_catch_up(self) -> None:
        """Run ``catch_up_once`` until it succeeds (Orthanc or the queue may be busy at start);
        the cursor does not move on its timer before that."""
        while not self.stop.is_set():
            try:
                self.catch_up_once()
                self.caught_up = True
                return
            except DicomSyncError as exc:
                log.warning("catch-up of changes missed while down: %s; trying again", exc)
            self.stop.wait(self.retry_interval)

    def catch_up_once(self) -> None:
        """Route studies changed since the stored cursor whose STABLE_STUDY a crash or a stop
        swallowed. The first run only sets the cursor. A study that fails to route is held
        and the cursor stays where it was."""
        queue = self.queue
        last = self.changes.last()
        cursor = queue.get_meta(self.key)
        if cursor is None or int(cursor) > last:
            queue.set_meta(self.key, str(last))
            return
        seq, studies, reached = int(cursor), set(), last
        while seq < last and not self.stop.is_set():
            page = self.changes.page(seq, PAGE)
            for change in page.changes:
                if change.get("Seq", 0) > last:
                    break
                studies.update(self.changes.study_of(change))
            if page.held:  # a hole that may still fill: the cursor stops before it
                reached = min(last, page.last if page.last is not None else seq)
                break
            seq = max(seq + 1, page.last if page.last is not None else seq + 1)
            if page.done:
                break
        routed = failed = 0
        for study_id in studies:
            if self.stop.is_set():
                return
            try:
                fingerprint = self.fingerprint(study_id)
                if fingerprint is not None:
                    results = self.intake.route_study(study_id, fingerprint)
                    routed += sum(r.action != "unchanged" for r in results)
            except Exception as exc:
                self.intake.hold(study_id, exc)
                failed += 1
        if not failed and reached > int(cursor):
            queue.set_meta(self.key, str(reached))
        if routed:
            log.warning(
                "caught up %d route job(s) for studies changed while Orthanc was down", routed
            )

    def advance(self) -> None:
        """Every change older than StableAge + slack has had its STABLE_STUDY enqueued, unless
        its routing failed: while a study is unrouted (or the catch-up has not run) the
        cursor stays put, so a restart's catch-up still sees that study's changes."""
        now = time.monotonic()
        last = self.changes.last()
        self._samples.append((now, last))
        ripe = [s for s in self._samples if s[0] <= now - self.stable_age - CURSOR_SLACK]
        if ripe and self.caught_up and self.intake.idle and not self.intake.unrouted():
            stored = int(self.queue.get_meta(self.key) or 0)
            to = self.changes.settled(ripe[-1][1])  # never past a hole that may still fill
            if to > stored:
                self.queue.set_meta(self.key, str(to))
            self._samples = [s for s in self._samples if s not in ripe[:-1]]

"""``ChangeLog``: the one reader of Orthanc's change log (``GET /changes``).

Two cursors read it: the routes' catch-up cursor (``catch_up.RouteCursor``) and the tag
sinks' feed (``tag_feed.TagFeed``). Both go through this class, so the shape of Orthanc's
answer is read in one place. Each cursor keeps its own durability rules (where it is
stored, when it moves); this class only reads.

Contract:

- ``last()``: the sequence number of the newest change (``/changes?last``);
- ``page(since, limit)``: up to ``limit`` changes after ``since`` as a ``ChangePage``:
  the changes as Orthanc gives them (dicts with ``Seq``, ``ChangeType``, ``ID``...), the
  ``Last`` sequence of the page (None when absent) and ``Done`` (None when absent; a
  caller picks its own default); ``held`` when cut before a hole (below);
- ``settled()``: a seq a cursor may move to without passing a hole that may still fill;
- ``study_of(change)``: the Orthanc study ID a change belongs to (``NewStudy``,
  ``StableStudy``, ``NewSeries``, ``NewInstance``), one REST call for the last two;
  ``[]`` for other changes or a resource deleted meanwhile.

Gaps in the sequence (several writers of one index): Orthanc's index on PostgreSQL numbers
changes from a sequence taken *before* the change commits, so with several writers (several
nodes sharing the index, or one Orthanc's concurrent threads) seq N may become visible after
N+1 was read. A cursor that moved to N+1 would never see N. So ``page`` stops before a hole
in the numbers until the hole is *settled*: a missing seq below a seq this reader saw more
than ``GAP_GRACE`` seconds ago was allocated before then, so it has committed or never will
(a rolled-back transaction, or a change Orthanc deleted with its resource). A page cut
before a hole says ``Done`` (the caller waits its interval and reads again from where it
got to). The built-in SQLite index has one writer and no such race: the check is off there
(``/system`` ``DatabaseBackendPlugin`` is null), so holes left by deleted resources cost
nothing. With a database plugin a start that reads past old holes waits ``GAP_GRACE`` once.

Thread-safe as far as the client is; the samples of seen seqs are under a lock.
Raises what ``OrthancClient`` raises (``dicomsync.errors``: ``Unreachable`` and other
``DicomSyncError``); ``KeyError``/``ValueError`` only for an answer without ``Last``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dicomsync.errors import NotFound
from dicomsync.orthanc_client import OrthancClient

PAGE = 1000  # changes per read
GAP_GRACE = 60.0  # seconds before a hole in the seq numbers is taken as never to be filled


@dataclass(frozen=True)
class ChangePage:
    changes: list[Mapping[str, Any]]
    last: int | None
    done: bool | None
    held: bool = False  # cut before a hole that may still fill: read again from ``last``


class ChangeLog:
    def __init__(
        self,
        client: OrthancClient,
        grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``grace``: seconds a hole in the seqs is waited for; None: ``GAP_GRACE`` when
        Orthanc's index is a database plugin (asked once, from ``/system``), else 0."""
        self.client = client
        self.grace = grace
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: list[tuple[float, int]] = []  # (when, a committed seq seen then)

    def last(self) -> int:
        last = int(self.client.get_json("/changes?last")["Last"])
        self._saw(self.clock(), last)
        return last

    def page(self, since: int, limit: int = PAGE) -> ChangePage:
        now = self.clock()
        answer = self.client.get_json(f"/changes?since={since}&limit={limit}")
        changes = list(answer.get("Changes") or [])
        last = answer.get("Last")
        done = answer.get("Done")
        if changes and self._grace() > 0:
            settled = self._settled(now)
            self._saw(now, max(int(c["Seq"]) for c in changes))
            expected = since + 1
            for i, change in enumerate(changes):
                seq = int(change["Seq"])
                if seq > expected and seq - 1 >= settled:  # a hole that may still fill
                    changes = changes[:i]
                    return ChangePage(changes, expected - 1, True, held=True)
                expected = max(expected, seq + 1)
        return ChangePage(
            changes,
            int(last) if last is not None else None,
            bool(done) if "Done" in answer else None,
        )

    def settled(self, seq: int) -> int:
        """``seq``, or less: the highest position at most ``seq`` below which every missing
        seq is settled. Cursors that move to a sample of ``last()`` (not a read page) ask
        this; without the check (SQLite) it is ``seq``."""
        if not self._grace():
            return seq
        return min(seq, max(self._settled(self.clock()), 0))

    def _grace(self) -> float:
        if self.grace is None:
            try:
                plugin = self.client.get_json("/system").get("DatabaseBackendPlugin")
            except NotFound:
                plugin = None
            self.grace = GAP_GRACE if plugin else 0.0
        return self.grace

    def _saw(self, now: float, seq: int) -> None:
        if not self._grace():
            return
        with self._lock:
            self._seen.append((now, seq))
            old = [s for t, s in self._seen if t <= now - self._g()]
            if old:  # keep the newest settled sample and the younger ones
                keep = max(old)
                self._seen = [(t, s) for t, s in self._seen if t > now - self._g()]
                self._seen.insert(0, (now - self._g(), keep))

    def _g(self) -> float:
        return self.grace or 0.0

    def _settled(self, now: float) -> int:
        """Every missing seq below this one is settled (0: none known yet)."""
        with self._lock:
            return max((s for t, s in self._seen if t <= now - self._g()), default=0)

    def study_of(self, change: Mapping[str, Any]) -> list[str]:
        kind, rid = change.get("ChangeType"), str(change.get("ID", ""))
        if kind in ("NewStudy", "StableStudy"):
            return [rid]
        if kind in ("NewSeries", "NewInstance"):
            level = "series" if kind == "NewSeries" else "instances"
            try:
                return [str(self.client.get_json(f"/{level}/{rid}/study")["ID"])]
            except NotFound:
                return []
        return []

"""``Throughput``: how many instances each destination and sink finished, per minute,
for the last day: the record behind the overview's instances/s charts.

The service's metrics thread calls ``sample(queue, save_as)`` every ``MetricsInterval``
seconds. A sample reads the queue's per-destination totals (``stats()``, O(destinations):
no scan of the jobs table) and adds what grew since the last sample to the current
minute's bucket (the first sample only sets the baseline; a key that appears later, such
as a destination's first job, grew from 0): a destination's ``delivered`` instances
(study jobs), a sink's ``done`` jobs (one instance each). A total that shrinks (jobs
pruned, a queue rebuilt) counts as no progress. At most ``KEEP_MINUTES`` buckets per key
are kept.

The buckets survive a restart: once a minute (when a sample falls in a new minute) they
are written as one JSON value into the queue's meta table under ``save_as`` (the service
uses ``console:throughput:<node>``, so nodes sharing a PostgreSQL queue keep their own),
and the first sample reads them back. What finished while Orthanc was down is not
counted (the baseline is taken again); the charts say since when they count. A saved
value that cannot be read is ignored (the record starts afresh).

``series(keys, minutes, step)`` answers the chart data: labels and instances/s per
``step``-minute bucket over the last ``minutes``, per key.

Thread-safety: ``sample`` (metrics thread) and ``series`` (web threads) take one lock
for the buckets. ``sample`` raises what the queue raises (``QueueError``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dicomsync.queue import DestinationStats

log = logging.getLogger(__name__)

KEEP_MINUTES = 24 * 60
FORMAT = 1  # the saved value's "Format"


class HasStats(Protocol):
    def stats(self, kind: str | None = None) -> dict[str, DestinationStats]: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


@dataclass(frozen=True)
class Series:
    labels: list[str]  # the start of each bucket, local time ("14:05")
    rates: dict[str, list[float]]  # key -> instances/s in each bucket
    since: float | None  # when the record began (None: no sample yet)


class Throughput:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        self._buckets: dict[str, dict[int, int]] = {}
        self.since: float | None = None
        self._baseline = False  # a first sample has been taken
        self._loaded = False
        self._saved_minute: int | None = None

    def sample(self, queue: HasStats, save_as: str | None = None) -> None:
        """Add what the queue finished since the last sample; with ``save_as``, read the
        saved buckets at the first sample and save them once a minute."""
        if save_as and not self._loaded:
            self._loaded = True
            self.load(queue.get_meta(save_as))
        totals = {d: s.delivered for d, s in queue.stats(kind="study").items()}
        totals.update({f"sink:{d}": s.done for d, s in queue.stats(kind="tags").items()})
        now = self.clock()
        self.add(totals, now)
        minute = int(now // 60)
        if save_as and self._saved_minute != minute:
            if self._saved_minute is not None:
                queue.set_meta(save_as, self.dump())
            self._saved_minute = minute

    def add(self, totals: Mapping[str, int], now: float | None = None) -> None:
        """``totals``: key -> a count that only grows while work is done."""
        now = self.clock() if now is None else now
        minute = int(now // 60)
        with self._lock:
            first, self._baseline = not self._baseline, True
            if self.since is None:
                self.since = now
            for key, total in totals.items():
                # a key the queue did not know at an earlier sample started from 0
                last = self._last.get(key, None if first else 0)
                self._last[key] = total
                buckets = self._buckets.setdefault(key, {})
                if last is not None and total > last:
                    buckets[minute] = buckets.get(minute, 0) + total - last
                for old in [m for m in buckets if m <= minute - KEEP_MINUTES]:
                    del buckets[old]

    def dump(self) -> str:
        with self._lock:
            buckets = {k: {str(m): n for m, n in b.items()} for k, b in self._buckets.items()}
            return json.dumps({"Format": FORMAT, "Since": self.since, "Buckets": buckets})

    def load(self, text: str | None) -> None:
        """Buckets saved by ``dump`` (of the last day); anything unreadable is ignored."""
        if not text:
            return
        try:
            data: Any = json.loads(text)
            if data.get("Format") != FORMAT:
                raise ValueError(f"format {data.get('Format')!r}")
            oldest = int(self.clock() // 60) - KEEP_MINUTES
            buckets = {
                str(key): {int(m): int(n) for m, n in b.items() if int(m) > oldest and int(n) > 0}
                for key, b in data["Buckets"].items()
            }
            since = float(data["Since"]) if data.get("Since") is not None else None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("the saved throughput record is unreadable (%s); starting afresh", exc)
            return
        with self._lock:
            for key, b in buckets.items():
                mine = self._buckets.setdefault(key, {})
                for m, n in b.items():
                    mine[m] = mine.get(m, 0) + n
            if since is not None and (self.since is None or since < self.since):
                self.since = since

    def series(
        self, keys: Iterable[str], minutes: int, step: int = 1, now: float | None = None
    ) -> Series:
        """Instances/s per ``step``-minute bucket over the last ``minutes`` minutes."""
        now = self.clock() if now is None else now
        last = int(now // 60)
        first = last - minutes + 1
        starts = list(range(first - (first % step if step > 1 else 0), last + 1, step))
        labels = [time.strftime("%H:%M", time.localtime(m * 60)) for m in starts]
        rates: dict[str, list[float]] = {}
        with self._lock:
            for key in keys:
                buckets = self._buckets.get(key, {})
                counts = [
                    sum(buckets.get(m, 0) for m in range(start, start + step)) for start in starts
                ]
                rates[key] = [round(c / (60.0 * step), 3) for c in counts]
            since = self.since
        return Series(labels, rates, since)

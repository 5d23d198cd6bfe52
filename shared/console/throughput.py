"""``Throughput``: how many instances each destination and sink finished, per minute,
for the last day: the record behind the overview's instances/s charts.

The service's metrics thread calls ``sample(queue)`` every ``MetricsInterval`` seconds.
A sample reads the queue's per-destination totals (``stats()``, O(destinations): no scan
of the jobs table) and adds what grew since the last sample to the current minute's
bucket (the first sample only sets the baseline; a key that appears later, such as a
destination's first job, grew from 0): a destination's ``delivered`` instances (study jobs), a sink's ``done`` jobs
(one instance each). A total that shrinks (jobs pruned, a queue rebuilt) counts as no
progress. At most ``KEEP_MINUTES`` buckets per key are kept, in memory: the record
starts afresh when Orthanc restarts (the charts say since when they count).

``series(keys, minutes, step)`` answers the chart data: labels and instances/s per
``step``-minute bucket over the last ``minutes``, per key.

Thread-safety: ``sample`` (metrics thread) and ``series`` (web threads) take one lock.
``sample`` raises what the queue's ``stats`` raises (``QueueError``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from dicomsync.queue import DestinationStats

KEEP_MINUTES = 24 * 60


class HasStats(Protocol):
    def stats(self, kind: str | None = None) -> dict[str, DestinationStats]: ...


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

    def sample(self, queue: HasStats) -> None:
        """Add what the queue finished since the last sample."""
        totals = {d: s.delivered for d, s in queue.stats(kind="study").items()}
        totals.update({f"sink:{d}": s.done for d, s in queue.stats(kind="tags").items()})
        self.add(totals)

    def add(self, totals: Mapping[str, int], now: float | None = None) -> None:
        """``totals``: key -> a count that only grows while work is done."""
        now = self.clock() if now is None else now
        minute = int(now // 60)
        with self._lock:
            first = self.since is None
            if first:
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

"""``Metrics``: the plugin's Prometheus metrics, published through a ``MetricSink``.

A ``MetricSink`` is a callable ``(name, value)``; inside the plugin it is
``orthanc.SetMetricsValue`` (Orthanc serves ``/tools/metrics-prometheus``), in tests a
dict's ``__setitem__``. ``Metrics(None)`` publishes nothing.

``publish(...)`` sets, each time it is called:

- ``dicomsync_config_error`` (1 while the ``DicomSync`` section is refused);
- per destination of a route (and any destination the queue still holds):
  ``dicomsync_queue_depth``, ``dicomsync_jobs_failed``, ``dicomsync_delivered_instances``,
  ``dicomsync_oldest_queued_age_seconds`` (label ``destination``);
- per tag sink, what ``TagSinks.publish`` sets (label ``sink``).

Names carry their labels (``name{destination="zips"}``): ``label`` escapes a value as
Prometheus' text format wants, so any place or sink key is a valid label.

Thread-safety: ``publish`` runs on the metrics thread (and once at start); it reads the
queue's statistics and may raise the queue's ``DicomSyncError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dicomsync.queue import Queue
from dicomsync.routing import SyncConfig

MetricSink = Callable[[str, float], None]


class Publishes(Protocol):
    def publish(self, metric: MetricSink) -> None: ...


def label(name: str, value: str) -> str:
    """``{name="value"}`` with the value escaped as Prometheus' text format wants
    (backslash, double quote and newline), so any place or sink key is a valid label."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{{name}="{escaped}"}}'


class Metrics:
    def __init__(self, sink: MetricSink | None) -> None:
        self.sink = sink

    def publish(
        self,
        config_error: str | None,
        cfg: SyncConfig | None = None,
        queue: Queue | None = None,
        sinks: Publishes | None = None,
    ) -> None:
        metric = self.sink
        if metric is None:
            return
        metric("dicomsync_config_error", 1.0 if config_error else 0.0)
        if cfg is None or queue is None:
            return
        stats = queue.stats(kind="study")
        for dest in dict.fromkeys([*cfg.destinations(), *stats]):
            s = stats.get(dest)
            lab = label("destination", dest)
            metric(f"dicomsync_queue_depth{lab}", float(s.depth if s else 0))
            metric(f"dicomsync_jobs_failed{lab}", float(s.failed if s else 0))
            metric(f"dicomsync_delivered_instances{lab}", float(s.delivered if s else 0))
            age = s.oldest_queued_age if s and s.oldest_queued_age is not None else 0.0
            metric(f"dicomsync_oldest_queued_age_seconds{lab}", age)
        if sinks is not None:
            sinks.publish(metric)

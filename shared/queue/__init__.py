"""The durable job queue: its records (``records``), its rules (``base``, ``rules``) and
their SQLite storage (``sqlite``, ``schema``).

``open_queue(state_dir, policy)`` opens the queue the plugin uses.
"""

from __future__ import annotations

from pathlib import Path

from dicomsync.queue.base import STUDY_JOBS_KEPT, Queue, RetryPolicy
from dicomsync.queue.records import (
    SINK_OUTCOMES,
    STATES,
    Delivered,
    DestinationStats,
    Enqueued,
    Job,
    NewJob,
    SinkDelivered,
)


def open_queue(state_dir: Path, policy: RetryPolicy | None = None) -> Queue:
    """The queue under ``state_dir`` (``queue.sqlite``; PostgreSQL comes later)."""
    from dicomsync.queue.sqlite import FILENAME, SQLiteQueue

    return SQLiteQueue(Path(state_dir) / FILENAME, policy)


__all__ = [
    "SINK_OUTCOMES",
    "STATES",
    "STUDY_JOBS_KEPT",
    "Delivered",
    "DestinationStats",
    "Enqueued",
    "Job",
    "NewJob",
    "Queue",
    "RetryPolicy",
    "SinkDelivered",
    "open_queue",
]

"""The durable job queue: its records (``records``), its rules (``base``, ``rules``), the
rules compiled to SQL (``compile``) and the SQL both backends share (``sql``), their
storage in SQLite (``sqlite``, ``schema``) or PostgreSQL (``postgres``, ``pg_schema``),
and where the plugin's queue lives (``config``: the ``DicomSync.Queue`` option).

``open_queue(state_dir, policy, config)`` opens the queue the plugin uses.
"""

from __future__ import annotations

from pathlib import Path

from dicomsync.queue.base import STUDY_JOBS_KEPT, Queue, RetryPolicy
from dicomsync.queue.config import QueueConfig
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


def open_queue(
    state_dir: Path, policy: RetryPolicy | None = None, config: QueueConfig | None = None
) -> Queue:
    """The queue ``config`` names: ``state_dir/queue.sqlite`` (the default) or PostgreSQL.
    ``QueueError`` (one line) when it cannot be opened."""
    if config is not None and config.target is not None:
        from dicomsync.queue.postgres import PostgresQueue

        return PostgresQueue(config.target, policy)
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
    "QueueConfig",
    "RetryPolicy",
    "SinkDelivered",
    "open_queue",
]

"""The durable job queue: the interface (``base``) and its SQLite implementation.

``open_queue(state_dir, policy)`` opens the queue the plugin uses.
"""

from __future__ import annotations

from pathlib import Path

from dicomsync.queue.base import (
    STATES,
    DestinationStats,
    Enqueued,
    Job,
    NewJob,
    Queue,
    RetryPolicy,
)


def open_queue(state_dir: Path, policy: RetryPolicy | None = None) -> Queue:
    """The queue under ``state_dir`` (``queue.sqlite``; PostgreSQL comes later)."""
    from dicomsync.queue.sqlite import FILENAME, SQLiteQueue

    return SQLiteQueue(Path(state_dir) / FILENAME, policy)


__all__ = [
    "STATES",
    "DestinationStats",
    "Enqueued",
    "Job",
    "NewJob",
    "Queue",
    "RetryPolicy",
    "open_queue",
]

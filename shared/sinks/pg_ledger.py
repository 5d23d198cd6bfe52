"""The delivered ledger in PostgreSQL: one table that every node's sinks share.

``dicomsync.sinks.base.open_ledger`` returns a ``PgLedger`` instead of the SQLite
``Ledger`` while ``shared_ledger(target)`` is in effect; the plugin's tag lanes do that
when the queue is on PostgreSQL (``TagSinks``), so a Splunk sink of node 2 knows what
node 1's sink delivered, and a job taken over from a dead node sends only what was not
confirmed. The CLI keeps the SQLite file (``dicomsync index`` has no queue).

Table ``sink_delivered(sink, id, at)`` in the target's schema (the queue's), primary key
``(sink, id)``: the same event id delivered by two sinks is two rows. ``add`` is
``INSERT ... ON CONFLICT DO NOTHING``, so two nodes recording the same ids is harmless.
Errors: a lost connection is ``SinkRetryable``; a refused password, TLS or a bad
database ``SinkFatal`` (``dicomsync.pg.is_transient``); the connection is made again at
the next call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from dicomsync.errors import SinkFatal, SinkRetryable
from dicomsync.pg import PgTarget, is_transient, short

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sink_delivered (
    sink TEXT NOT NULL,
    id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (sink, id)
)
"""
_SCHEMA_LOCK_KEY = 0x6463_6C67  # "dclg"


class PgLedger:
    """The ids sink ``sink`` has delivered, shared by every node (thread-safe)."""

    def __init__(self, target: PgTarget, sink: str) -> None:
        self.target = target
        self.sink = sink
        self.path = f"{target.describe()}: sink_delivered, sink {sink!r}"
        self._lock = threading.Lock()
        self._closed = False
        self._conn: psycopg.Connection[Any] | None = None

    def _run(self, work: Callable[[psycopg.Connection[Any]], T], doing: str) -> T:
        import psycopg

        with self._lock:
            if self._closed:  # a stop closed it under this send: the job stays and is retried
                raise SinkRetryable(f"delivered ledger {self.path} is closed (stopping)")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self.target.connect_prepared(_SCHEMA_LOCK_KEY, SCHEMA)
                with self._conn.transaction():
                    return work(self._conn)
            except psycopg.Error as exc:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                message = f"delivered ledger {self.path}: cannot {doing}: {short(exc)}"
                raise (SinkRetryable if is_transient(exc) else SinkFatal)(message) from None

    def known(self, ids: Collection[str]) -> set[str]:
        items = list(ids)
        if not items:
            return set()
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT id FROM sink_delivered WHERE sink = %s AND id = ANY(%s)",
                (self.sink, items),
            ).fetchall(),
            "read",
        )
        return {r[0] for r in rows}

    def add(self, ids: Iterable[str]) -> None:
        items = sorted(set(ids))  # one order for every writer: no deadlock between nodes
        if not items:
            return
        now = time.time()

        def write(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO sink_delivered (sink, id, at)"
                " SELECT %s, unnest(%s::text[]), %s ON CONFLICT DO NOTHING",
                (self.sink, items, now),
            )

        self._run(write, "write")

    def count(self) -> int:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT COUNT(*) FROM sink_delivered WHERE sink = %s", (self.sink,)
            ).fetchone(),
            "read",
        )
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing must never stop a shutdown
                pass

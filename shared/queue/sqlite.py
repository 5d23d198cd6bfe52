"""The queue in one SQLite file (WAL mode), safe across threads and processes: the
storage of ``dicomsync.queue.base`` (which holds the rules; this module applies none of
its own).

- A pool of at most ``POOL_SIZE`` connections shared by all threads; writes run in
  ``BEGIN IMMEDIATE`` transactions (``_transaction``, one per state change or batch),
  and ``busy_timeout`` makes concurrent writers (threads or processes) wait their turn.
- Each connection keeps a small page cache (``CACHE_KIB``): bounded memory in a
  plugin that runs for months.
- ``synchronous=NORMAL`` in WAL mode: a committed job survives a killed process
  (``kill -9``); after a power loss the last few commits may roll back.
- Each transition is one ``UPDATE … RETURNING`` compiled from its rule
  (``dicomsync.queue.compile``, shared with PostgreSQL); a claim selects its rows from
  index ranges, never a scan, so lease, enqueue, done, retry and ``next_due`` cost the
  same at a million pending jobs as at a thousand.
- ``stats()`` reads the ``counts`` table the triggers keep, plus an index lookup per
  destination and kind: O(destinations).
- Tables, counters, pruned studies, migrations and the refusal of a newer file:
  ``dicomsync.queue.schema``.

Every method raises ``QueueError`` (with the file's path) when SQLite fails.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicomsync.errors import QueueError
from dicomsync.queue.base import RetryPolicy
from dicomsync.queue.compile import SQLITE
from dicomsync.queue.schema import SCHEMA_VERSION, prepare
from dicomsync.queue.sql import Runner, SqlQueue

__all__ = ["CACHE_KIB", "FILENAME", "POOL_SIZE", "SCHEMA_VERSION", "SQLiteQueue"]

log = logging.getLogger(__name__)

FILENAME = "queue.sqlite"
POOL_SIZE = 4  # connections; SQLite runs one writer at a time anyway
CACHE_KIB = 128
"""Page cache of each pooled connection, in KiB (SQLite's default is 2,000). In WAL mode a
connection drops its whole cache whenever another connection has committed, so with
several connections and a write per job the default cache is mostly refilled, 4 KiB
malloc at a time, from whichever thread holds the connection: inside Orthanc that churn
fragmented glibc's arenas, and A's RSS grew by 22 MB over 10,000 routed one-instance
studies (7 MB with 128 KiB, no slower: the queue's statements each touch a few pages,
and a scan such as ``stats()`` reads past any cache this size anyway)."""


class SQLiteQueue(SqlQueue):
    """``SQLiteQueue(state_dir / "queue.sqlite")``; see ``dicomsync.queue.base`` for the rules."""

    dialect = SQLITE

    def __init__(
        self,
        path: Path | str,
        policy: RetryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(policy)
        self.path = Path(path)
        self.clock = clock
        self._busy_timeout = busy_timeout
        self._all: list[sqlite3.Connection] = []
        self._idle: list[sqlite3.Connection] = []
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(
                f"cannot create the queue folder {self.path.parent}: {exc.strerror}"
            ) from None
        self._init_schema()

    # --- connections --------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open the queue {self.path}: {exc}") from None
        return db

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection from a small pool shared by all threads.

        Not one per thread: inside Orthanc every HTTP thread that answers a REST call
        would keep its own connection and page cache, and Orthanc has 50 of them
        (measured: +200 MB of RSS over 10,000 routed instances).
        """
        self._slots.acquire()
        try:
            with self._lock:
                db = self._idle.pop() if self._idle else None
            if db is None:
                db = self._open()
                with self._lock:
                    self._all.append(db)
            try:
                yield db
            finally:
                with self._lock:
                    self._idle.append(db)
        finally:
            self._slots.release()

    def _init_schema(self) -> None:
        with self._connection() as db:
            prepare(db, self.path)

    @contextmanager
    def _write(self) -> Iterator[Runner]:
        with self._connection() as db:

            def run(sql: str, params: Mapping[str, Any] = {}) -> list[Any]:
                return db.execute(sql, params).fetchall()

            try:
                db.execute("BEGIN IMMEDIATE")
                yield run
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise QueueError(f"queue {self.path}: {exc}") from None
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[Any]:
        try:
            with self._connection() as db:
                return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise QueueError(f"queue {self.path}: {exc}") from None

    def _count(self, run: Runner, destination: str, kind: str, n: int, delivered: int) -> None:
        run(
            "INSERT INTO counts VALUES (:destination, :kind, 'pruned', :n, :delivered)"
            " ON CONFLICT DO UPDATE SET n = n + excluded.n, delivered = delivered + excluded.delivered",
            {"destination": destination, "kind": kind, "n": n, "delivered": delivered},
        )

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
            self._idle.clear()

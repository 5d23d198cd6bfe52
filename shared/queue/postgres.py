"""The queue in PostgreSQL, shared by every node that names the same database and schema:
the storage of ``dicomsync.queue.base`` (the rules), through the SQL shared with SQLite
(``dicomsync.queue.sql``, the rules compiled by ``dicomsync.queue.compile``).

- Connections: a ``psycopg_pool`` pool of ``pool_size`` connections (autocommit; each
  write is one explicit transaction, READ COMMITTED). The password comes from the
  environment variable the ``PgTarget`` names, never from the URL (``dicomsync.pg``).
- Claims select their rows with ``FOR UPDATE SKIP LOCKED``: two nodes (or threads)
  claiming at once never get the same job and never wait for each other. A row changed
  by another transaction since the claim's snapshot is checked again by PostgreSQL.
- Idempotent enqueue across nodes: an insert that meets a record another node has just
  inserted (``ON CONFLICT DO NOTHING``) applies the rules to that record instead.
- Wake-ups: a transition that makes a job due sends ``NOTIFY <schema>_queue,
  '<origin>:<destination>'`` after its commit; the first ``subscribe`` starts a
  ``dicomsync-pg-listen`` thread on its own connection that calls the listeners of this
  process for every other queue object's notifications (its own were heard already).
  The workers still poll (``PollInterval``), so a lost notification or a lost listening
  connection (reconnected with a backoff) only delays a job.
- Counters: the triggers append deltas, ``stats`` and ``prune`` fold them into ``counts``
  (``dicomsync.queue.pg_schema``); ``stats()`` stays O(destinations + recent changes).
- The clock: ``now`` is this node's ``time.time()`` (lease expiry compares the times
  several nodes wrote: keep their clocks in sync, as NTP does).

Every method raises ``QueueError`` with one line naming the URL (which has no password);
psycopg's messages are cut to their first line and any copy of the password is
scrubbed from them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dicomsync.errors import QueueError
from dicomsync.pg import PgTarget, short
from dicomsync.queue.base import DestinationStats, Listener, RetryPolicy
from dicomsync.queue.compile import POSTGRES
from dicomsync.queue.pg_schema import (
    COUNTS,
    FOLD,
    MIGRATIONS,
    SCHEMA_VERSION,
    lock_key,
    stored_version,
)
from dicomsync.queue.sql import Runner, SqlQueue

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCHEMA_VERSION", "PostgresQueue"]

log = logging.getLogger(__name__)

POOL_SIZE = 4
LISTEN_BACKOFF = (1.0, 30.0)  # seconds before reconnecting the listener: first, longest


class PostgresQueue(SqlQueue):
    """``PostgresQueue(PgTarget(url, password_env, schema))``; rules: ``dicomsync.queue.base``."""

    dialect = POSTGRES
    COUNTS = COUNTS

    def __init__(
        self,
        target: PgTarget,
        policy: RetryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        pool_size: int = POOL_SIZE,
    ) -> None:
        super().__init__(policy)
        self.target = target
        self.clock = clock
        self.channel = f"{target.schema}_queue"
        self._origin = uuid.uuid4().hex  # this object's notifications: heard locally already
        self._fold_key = lock_key(target.schema, "counts")
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        self._listen_lock = threading.Lock()
        with self._errors("cannot open the queue"):
            conn = target.connect(autocommit=True)
            try:
                self._prepare(conn)
            finally:
                conn.close()
        self._pool = target.pool(min_size=1, max_size=max(1, pool_size))
        with self._errors("cannot open the queue"):
            self._pool.open(wait=True, timeout=30)

    # --- errors -------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        env = self.target.password_env
        password = os.environ.get(env) if env else None
        return text.replace(password, "***") if password else text

    @contextmanager
    def _errors(self, what: str = "queue") -> Iterator[None]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            yield
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            reason = self._scrub(short(exc))
            raise QueueError(f"{what} {self.target.describe()}: {reason}") from None

    # --- schema -------------------------------------------------------------------------
    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        self.target.ensure_schema(conn)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(self.target.schema, "ddl"),))
            version = stored_version(conn, self.target.schema)
            if version is not None and version > SCHEMA_VERSION:
                raise QueueError(
                    f"the queue {self.target.describe()} was written by a newer dicomsync"
                    f" (schema {version})"
                )
            for step in sorted(v for v in MIGRATIONS if v > (version or 0)):
                conn.execute(MIGRATIONS[step])
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))

    # --- connections --------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Runner]:
        from psycopg.rows import dict_row

        with self._errors(), self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)

            def run(sql: str, params: Mapping[str, Any] = {}) -> list[Any]:
                cur.execute(sql, params, prepare=True)
                return cur.fetchall() if cur.description else []

            yield run

    def _rows(self, sql: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[Any]:
        from psycopg.rows import dict_row

        with self._errors(), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            cur.execute(sql, params, prepare=True)
            return cur.fetchall()

    def _count(self, run: Runner, destination: str, kind: str, n: int, delivered: int) -> None:
        run(
            "INSERT INTO count_deltas VALUES (%(destination)s, %(kind)s, 'pruned', %(n)s,"
            " %(delivered)s)",
            {"destination": destination, "kind": kind, "n": n, "delivered": delivered},
        )

    def fold(self) -> None:
        """Move the counters' deltas into ``counts`` (skipped while another node does)."""
        with self._write() as run:
            if run("SELECT pg_try_advisory_xact_lock(%(k)s) AS got", {"k": self._fold_key})[0][
                "got"
            ]:
                run(FOLD)

    def stats(self, kind: str | None = None) -> dict[str, DestinationStats]:
        self.fold()
        return super().stats(kind)

    def prune(self, kind: str, before: float) -> int:
        pruned = super().prune(kind, before)
        self.fold()
        return pruned

    # --- wake-ups across nodes ------------------------------------------------------------
    def _notify(self, destinations: Iterable[str]) -> None:
        names = sorted(set(destinations))
        super()._notify(names)
        if not names:
            return
        try:
            with self._write() as run:
                for name in names:
                    payload = f"{self._origin}:{name}"
                    run("SELECT pg_notify(%(c)s, %(p)s)", {"c": self.channel, "p": payload})
        except QueueError as exc:  # the other nodes poll anyway
            log.warning("cannot wake the other nodes: %s", exc)

    def subscribe(self, listener: Listener) -> None:
        super().subscribe(listener)
        with self._listen_lock:
            if self._listener is None and not self._closed.is_set():
                self._listener = threading.Thread(
                    target=self._listen, name="dicomsync-pg-listen", daemon=True
                )
                self._listener.start()

    def _listen(self) -> None:
        wait = LISTEN_BACKOFF[0]
        while not self._closed.is_set():
            try:
                with self.target.connect(autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    wait = LISTEN_BACKOFF[0]
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=0.5):
                            origin, _, destination = note.payload.partition(":")
                            if origin == self._origin:
                                continue
                            for listener in list(self._listeners):
                                listener(destination)
            except Exception as exc:  # a lost connection: poll meanwhile, then listen again
                if self._closed.is_set():
                    return
                log.warning(
                    "queue wake-ups from other nodes paused (%s); trying again in %.0fs",
                    self._scrub(short(exc)),
                    wait,
                )
                self._closed.wait(wait)
                wait = min(LISTEN_BACKOFF[1], wait * 2)

    def close(self) -> None:
        self._closed.set()
        listener = self._listener
        if listener is not None:
            listener.join(5.0)
        self._pool.close()

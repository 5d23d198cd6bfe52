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
  '<origin>:<destination>'`` after its commit (a hashed channel name for a schema too
  long for that, ``channel_of``); the first ``subscribe`` starts a
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
from dicomsync.queue.records import Enqueued, NewJob, State
from dicomsync.queue.sql import OLD_DONE, Runner, SqlQueue, SqlTransaction

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCHEMA_VERSION", "PostgresQueue"]

log = logging.getLogger(__name__)

POOL_SIZE = 4
ANALYZE_AFTER = 5000  # created jobs before this object first analyzes the jobs table
LISTEN_BACKOFF = (1.0, 30.0)  # seconds before reconnecting the listener: first, longest


BULK = 5000  # keys per statement of a bulk lookup or insert
PEEK_FROM = 50  # enqueue_many looks up first from this many jobs on
_KEYS = (
    "unnest(%(k)s::text[], %(r)s::text[], %(d)s::text[], %(u)s::text[])"
    " WITH ORDINALITY AS t(k, r, d, u, i)"
)
# each key looked up by the unique index (LATERAL ... LIMIT 1: never a hash join that
# reads the whole table, whatever the planner's statistics say)
_PEEK = (
    f"SELECT t.i, j.id, j.state, j.fingerprint FROM {_KEYS} CROSS JOIN LATERAL"
    " (SELECT id, state, fingerprint FROM jobs WHERE kind = t.k AND resource = t.r"
    " AND destination = t.d LIMIT 1) AS j"
    f" UNION ALL SELECT t.i, s.id, 'done', s.fingerprint FROM {_KEYS} CROSS JOIN LATERAL"
    " (SELECT id, fingerprint FROM done_studies WHERE t.k = 'study' AND destination = t.d"
    " AND resource = t.r LIMIT 1) AS s"
)
_INSERT_MANY = (
    "INSERT INTO jobs (kind, resource, destination, study_uid, state, next_attempt_at,"
    " queued_at, created_at, updated_at)"
    f" SELECT k, r, d, u, 'queued', %(now)s, %(now)s, %(now)s, %(now)s FROM {_KEYS}"
    " WHERE NOT EXISTS (SELECT 1 FROM done_studies s WHERE t.k = 'study'"
    " AND s.destination = t.d AND s.resource = t.r LIMIT 1) ORDER BY t.i"
    " ON CONFLICT (kind, resource, destination) DO NOTHING"
    " RETURNING id, kind, resource, destination"
)


OLD_DONE_PG = POSTGRES.sql(OLD_DONE)


def channel_of(schema: str) -> str:
    """The NOTIFY channel of the queue in ``schema``: ``<schema>_queue``, or a name made
    from the schema's hash when that would pass PostgreSQL's 63 characters (a longer
    channel is refused by ``pg_notify`` and cut by ``LISTEN``)."""
    import hashlib

    name = f"{schema}_queue"
    if len(name) <= 63:
        return name
    return f"q_{hashlib.sha256(schema.encode()).hexdigest()[:40]}_queue"


def prune_key(schema: str, destination: str, kind: str) -> int:
    """The advisory lock of the prune of ``destination``'s ``kind`` jobs."""
    return lock_key(schema, f"prune:{kind}:{destination}")


def _keys(news: Sequence[NewJob]) -> dict[str, list[str]]:
    return {
        "k": [n.kind for n in news],
        "r": [n.resource for n in news],
        "d": [n.destination for n in news],
        "u": [n.study_uid for n in news],
    }


class _PgTransaction(SqlTransaction):
    """``insert_many`` in one statement per ``BULK`` records."""

    def insert_many(self, news: Sequence[NewJob]) -> list[int | None]:
        out: list[int | None] = [None] * len(news)
        studies = sorted({n.destination for n in news if n.kind == "study"})
        if studies:  # a study prune of these destinations waits, or is waited for
            schema = self.queue.target.schema  # type: ignore[attr-defined]
            self.run(
                "SELECT pg_advisory_xact_lock_shared(k) FROM unnest(%(k)s::bigint[]) AS k",
                {"k": [prune_key(schema, d, "study") for d in studies]},
            )
        for first in range(0, len(news), BULK):
            chunk = news[first : first + BULK]
            where: dict[tuple[str, str, str], int] = {}
            for i, n in enumerate(chunk):
                where.setdefault((n.kind, n.resource, n.destination), first + i)
            for row in self.run(_INSERT_MANY, {**_keys(chunk), "now": self.now}):
                out[where[(row["kind"], row["resource"], row["destination"])]] = int(row["id"])
        return out


class PostgresQueue(SqlQueue):
    """``PostgresQueue(PgTarget(url, password_env, schema))``; rules: ``dicomsync.queue.base``."""

    dialect = POSTGRES
    COUNTS = COUNTS
    transaction_class = _PgTransaction

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
        self.channel = channel_of(target.schema)
        self._origin = uuid.uuid4().hex  # this object's notifications: heard locally already
        self._fold_key = lock_key(target.schema, "counts")
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        self._listen_lock = threading.Lock()
        self._analyze_lock = threading.Lock()
        self._grown = 0  # jobs this object created since it last analyzed
        self._rows_analyzed = 0
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
            # the counting trigger writes into this schema's count_deltas whatever the
            # search_path of the session changing jobs (an operator's psql, a script)
            conn.execute(f"ALTER FUNCTION jobs_count() SET search_path = {self.target.schema}")
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

    def _peek_many(self, jobs: Sequence[NewJob]) -> list[tuple[int, State, str] | None]:
        """One lookup per ``BULK`` jobs (jobs, then pruned studies), not one per job; none
        for a few jobs: the transaction's ``INSERT … ON CONFLICT`` finds them as cheaply
        (no write lock to avoid here, unlike SQLite)."""
        out: list[tuple[int, State, str] | None] = [None] * len(jobs)
        if len(jobs) < PEEK_FROM:
            return out
        for first in range(0, len(jobs), BULK):
            chunk = jobs[first : first + BULK]
            for row in self._bulk_read(_PEEK, _keys(chunk)):
                i = first + int(row["i"]) - 1
                if out[i] is None:  # a record in jobs wins over a pruned one
                    out[i] = (int(row["id"]), row["state"], row["fingerprint"])
        return out

    def enqueue_many(
        self,
        jobs: Sequence[NewJob],
        *,
        meta: Mapping[str, str] | None = None,
        meta_max: Mapping[str, int] | None = None,
    ) -> list[Enqueued]:
        """As the base's; then ``ANALYZE jobs`` once the table has grown by half since its
        statistics were taken (a backlog filled faster than autovacuum analyzes would be
        planned as the empty table it was: key lookups through the wrong index)."""
        results = super().enqueue_many(jobs, meta=meta, meta_max=meta_max)
        with self._analyze_lock:
            self._grown += sum(r.action == "created" for r in results)
            due = self._grown > max(ANALYZE_AFTER, self._rows_analyzed // 2)
            if due:
                self._grown = 0
        if due:
            with self._write() as run:
                run("ANALYZE jobs")
                rows = run("SELECT reltuples FROM pg_class WHERE oid = 'jobs'::regclass")
            self._rows_analyzed = max(0, int(rows[0]["reltuples"])) if rows else 0
        return results

    def _bulk_read(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        """A lookup of many keys, planned for this call with the table's statistics of now
        (no cached plan) and no sequential scan: a table filled since autovacuum last
        analyzed it looks empty to the planner, which would read all of it once per key."""
        from psycopg.rows import dict_row

        with self._errors(), self._pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL enable_seqscan = off")
            cur = conn.cursor(row_factory=dict_row)
            cur.execute(sql, params, prepare=False)
            return cur.fetchall()

    def _lock_prune(self, run: Runner, destination: str, kind: str) -> None:
        """One prune of a destination and kind at a time; a study prune also waits for (and
        holds off) the enqueues of that destination's studies (``_PgTransaction``), which
        would otherwise miss the record between ``jobs`` and ``done_studies``."""
        run(
            "SELECT pg_advisory_xact_lock(%(k)s)",
            {"k": prune_key(self.target.schema, destination, kind)},
        )

    def _delete_done(self, run: Runner, params: Mapping[str, Any]) -> tuple[int, int]:
        """Counted from the rows this very DELETE removed (a row another node deleted first
        is not counted twice)."""
        rows = run(
            f"WITH gone AS (DELETE FROM jobs WHERE {OLD_DONE_PG} RETURNING delivered_count)"
            " SELECT COUNT(*) AS n, COALESCE(SUM(delivered_count), 0) AS delivered FROM gone",
            params,
        )
        return int(rows[0]["n"]), int(rows[0]["delivered"])

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
            payloads = [f"{self._origin}:{name}" for name in names]
            self._rows(  # one statement in autocommit: delivered at once
                "SELECT pg_notify(%(c)s, p) FROM unnest(%(p)s::text[]) AS p",
                {"c": self.channel, "p": payloads},
            )
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

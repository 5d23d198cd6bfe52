"""``postgresql_index``: the index of ``sqlite_index``, in a PostgreSQL database several nodes share.

Config::

    "index": {"Kind": "postgresql_index", "Url": "postgresql://dicomsync@db:5432/orthanc",
              "PasswordEnv": "DICOMSYNC_DB_PASSWORD"}

``Url`` names the user, never a password (``dicomsync.pg``); the password is read from
the environment variable ``PasswordEnv`` at each connection. The tables live in the
schema ``Schema`` (default ``dicomsync_index``, created on first use), beside the
Orthanc index's ``public`` tables and the queue's schema.

The schema is ``sqlite_index``'s: ``events(rowid, id UNIQUE, sourcetype, time,
time_source, study_uid, source, body)`` and ``fields(event, path, text, num)``, and the
query language is the same (``IndexQuery.to_sql("postgresql")``: ``LIKE`` for globs,
text compared ``COLLATE "C"`` as SQLite compares it). PostgreSQL text cannot hold a NUL
character: a NUL in a field value is stored as U+FFFD in ``fields`` (the ``body`` JSON
keeps it escaped).

Several writers (one per node) may send the same events at once: ``send`` locks the
rows of the ids it writes (in id order, so two writers cannot deadlock on each other's
order), inserts with ``ON CONFLICT (id) DO NOTHING`` and counts an id another writer
stored meanwhile with the same body as delivered. An event stored with a different
body (the instance changed) is replaced, as in ``sqlite_index``. The index is its own
delivered ledger.

Errors: a lost connection, a deadlock or a serialization failure is ``SinkRetryable``;
a refused password, a TLS failure, a missing database is ``SinkFatal``
(``dicomsync.pg.is_transient``). The connection (and the schema, under an advisory lock)
is made at the first call, not when the sink is built, so a database that is down at
start only delays the sink's jobs; a broken connection is made again at the next call.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomsync.errors import SinkFatal, SinkRetryable
from dicomsync.index_query import (
    EVENT_COLUMNS,
    IndexQuery,
    event_row,
    flatten_fields,
    to_number,
    value_text,
)
from dicomsync.options import option, parse
from dicomsync.pg import PgTarget, is_transient, short
from dicomsync.sinks.base import SendResult, Sink, StudyHit, with_delivered
from dicomsync.tags import Event

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    rowid BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sourcetype TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    time_source TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid);
CREATE TABLE IF NOT EXISTS fields (
    event BIGINT NOT NULL REFERENCES events(rowid) ON DELETE CASCADE,
    path TEXT NOT NULL,
    text TEXT,
    num DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS fields_event ON fields(event);
CREATE INDEX IF NOT EXISTS fields_path_text ON fields(path, text COLLATE "C");
CREATE INDEX IF NOT EXISTS fields_path_num ON fields(path, num);
"""
# one creator at a time: CREATE ... IF NOT EXISTS is not safe against a concurrent one
_SCHEMA_LOCK_KEY = 0x6463_6D69  # "dcmi"


@dataclass(frozen=True)
class PostgresIndexOptions:
    """The options of a ``postgresql_index`` sink section."""

    url: str = option(
        "Url",
        "str",
        "libpq URL `postgresql://USER@HOST:PORT/DB` (a user, never a password)",
        required=True,
    )
    password_env: str | None = option(
        "PasswordEnv", "envvar", "environment variable with the database password", shown="none"
    )
    schema: str = option(
        "Schema",
        "str",
        "the schema of the index's tables (created if missing)",
        default="dicomsync_index",
    )


def _text(value: Any) -> str:
    return value_text(value).replace("\x00", "\ufffd")


class PostgresIndex(Sink):
    kind = "postgresql_index"
    label = "PostgreSQL index (shared by several nodes)"
    Options = PostgresIndexOptions

    def __init__(self, key: str, target: PgTarget, section: Mapping[str, Any] | None = None):
        super().__init__(key)
        self.target = target
        self._section = dict(section or {"Kind": self.kind, "Url": target.url})
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None  # made at the first call

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> PostgresIndex:
        where = f"{cls.kind} sink {key!r}"
        opts = parse(PostgresIndexOptions, section, where)
        return cls(key, PgTarget.checked(opts.url, opts.password_env, opts.schema, where), section)

    def to_config(self) -> dict[str, Any]:
        return dict(self._section)

    def describe(self) -> str:
        return f"postgresql_index {self.target.describe()}"

    # --- the connection ------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self.target.connect_prepared(_SCHEMA_LOCK_KEY, SCHEMA)
        return self._conn

    def _run(self, work: Any, doing: str) -> Any:
        """``work(conn)`` in one transaction (the caller holds the lock); psycopg's
        errors become ``SinkRetryable``/``SinkFatal``."""
        import psycopg

        try:
            conn = self._connection()
        except psycopg.Error as exc:
            raise self._error(exc, doing) from None
        try:
            with conn.transaction():
                return work(conn)
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                self._conn = None
            raise self._error(exc, doing) from None

    def _error(self, exc: BaseException, doing: str) -> SinkRetryable | SinkFatal:
        message = f"postgresql_index {self.key!r}: cannot {doing} ({self.target.describe()}): {short(exc)}"
        return SinkRetryable(message) if is_transient(exc) else SinkFatal(message)

    # --- writing ---------------------------------------------------------------------------
    def send(self, events: Sequence[Event]) -> SendResult:
        """Store the events in one transaction (see ``Sink.send``); the index refuses none."""
        latest = {event.id: event for event in events}  # the last of repeated ids wins
        bodies = {
            i: json.dumps(e.fields, ensure_ascii=False, sort_keys=True) for i, e in latest.items()
        }
        ids = sorted(latest)

        def write(conn: psycopg.Connection[Any]) -> set[str]:
            delivered: set[str] = set()
            stored = dict(
                conn.execute(
                    "SELECT id, body FROM events WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                    (ids,),
                ).fetchall()
            )
            changed = [i for i, body in stored.items() if body != bodies[i]]
            if changed:
                conn.execute("DELETE FROM events WHERE id = ANY(%s)", (changed,))
            rows: list[tuple[int, str, str, float | None]] = []
            for event_id in ids:
                if stored.get(event_id) == bodies[event_id]:
                    delivered.add(event_id)
                    continue
                event = latest[event_id]
                row = conn.execute(
                    "INSERT INTO events (id, sourcetype, time, time_source, study_uid, source,"
                    " body) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING RETURNING rowid",
                    (
                        event.id,
                        event.sourcetype,
                        event.time,
                        event.time_source,
                        event.study_uid,
                        event.source,
                        bodies[event_id],
                    ),
                ).fetchone()
                if row is None:  # another writer stored it after our SELECT
                    delivered.add(event_id)
                    continue
                rows += [
                    (row[0], path, _text(value), to_number(value))
                    for path, value in flatten_fields(event.fields)
                ]
                delivered.add(event_id)
            if rows:
                with conn.cursor().copy("COPY fields (event, path, text, num) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
            return delivered

        with self._lock:
            try:
                delivered = self._run(write, "write")
            except (SinkRetryable, SinkFatal) as exc:
                raise with_delivered(exc, ()) from None
        return SendResult(frozenset(delivered))

    # --- reading ---------------------------------------------------------------------------
    def has(self, ids: Collection[str]) -> set[str]:
        items = list(ids)
        with self._lock:
            rows = self._run(
                lambda conn: conn.execute(
                    "SELECT id FROM events WHERE id = ANY(%s)", (items,)
                ).fetchall(),
                "read",
            )
        return {r[0] for r in rows}

    def query(self, where: IndexQuery) -> Iterator[StudyHit]:
        expr, params = where.to_sql("postgresql")
        sql = (
            "SELECT e.study_uid, COUNT(*) FROM events e"
            f" WHERE e.study_uid != '' AND {expr}"
            ' GROUP BY e.study_uid ORDER BY e.study_uid COLLATE "C"'
        )
        with self._lock:
            rows = self._run(lambda conn: conn.execute(sql, params).fetchall(), "query")
        for study_uid, count in rows:
            yield StudyHit(study_uid, int(count))

    def event(self, event_id: str) -> dict[str, Any] | None:
        """One stored event as ``Event.to_json()`` would print it (for tests and tools)."""
        with self._lock:
            row = self._run(
                lambda conn: conn.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE id = %s", (event_id,)
                ).fetchone(),
                "read",
            )
        return event_row(row)

    def stats(self) -> dict[str, Any]:
        def read(conn: psycopg.Connection[Any]) -> tuple[list[Any], int]:
            rows = conn.execute(
                "SELECT sourcetype, COUNT(*) FROM events GROUP BY sourcetype"
            ).fetchall()
            studies = conn.execute("SELECT COUNT(DISTINCT study_uid) FROM events").fetchone()
            return rows, int(studies[0]) if studies else 0

        with self._lock:
            rows, studies = self._run(read, "read")
        return {"events": {st: int(n) for st, n in rows}, "studies": studies}

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing must never stop a shutdown
                log.debug("postgresql_index %r: close: %s", self.key, exc)

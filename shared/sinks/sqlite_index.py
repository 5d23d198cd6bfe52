"""``sqlite_index``: the embedded index, one SQLite file.

Config::

    "local": {"Kind": "sqlite_index", "Path": "dicomsync-index.sqlite"}

``Path`` is relative to the config file's folder (the plugin's ``StateDirectory``
inside Orthanc). The file holds the same events a Splunk sink would get:

- ``events(rowid, id UNIQUE, sourcetype, time, time_source, study_uid, source, body)``
  with ``body`` the event's fields as JSON;
- ``fields(event, path, text, num)``: one row per scalar value, ``path`` named like
  Splunk's JSON fields (``CT Dose.Mean CTDIvol``, ``Sources{}.KVP``), ``num`` set
  when the value is a number or numeric text. Nulls are not stored.

The index is its own delivered ledger: an event whose id is already stored with the
same body is not written again; with a different body (the instance changed) it is
replaced. It answers ``dicomsync.index_query`` queries with SQL (``IndexQuery.to_sql``).
WAL mode: the CLI can query while the plugin writes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomsync.config import resolve_path
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
from dicomsync.sinks.base import (
    SendResult,
    Sink,
    StudyHit,
    connect,
    existing_ids,
    with_delivered,
)
from dicomsync.tags import Event

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sourcetype TEXT NOT NULL,
    time REAL NOT NULL,
    time_source TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid);
CREATE TABLE IF NOT EXISTS fields (
    event INTEGER NOT NULL,
    path TEXT NOT NULL,
    text TEXT,
    num REAL
);
CREATE INDEX IF NOT EXISTS fields_event ON fields(event);
CREATE INDEX IF NOT EXISTS fields_path_text ON fields(path, text);
CREATE INDEX IF NOT EXISTS fields_path_num ON fields(path, num);
"""


@dataclass(frozen=True)
class SqliteOptions:
    """The options of a ``sqlite_index`` sink section."""

    path: str = option("Path", "path", "the index file", required=True)


class SqliteIndex(Sink):
    kind = "sqlite_index"
    label = "embedded SQLite index"
    Options = SqliteOptions

    def __init__(self, key: str, path: Path) -> None:
        super().__init__(key)
        self.path = path
        self._lock = threading.Lock()
        self._conn = connect(path, f"sqlite_index {key!r}")
        try:
            with self._lock:
                self._conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise SinkFatal(f"sqlite_index {key!r}: {path} is not a usable index: {exc}") from None
        self._config_path: str = str(path)

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> SqliteIndex:
        value = parse(SqliteOptions, section, f"{cls.kind} sink {key!r}").path
        sink = cls(key, resolve_path(value, base_dir))
        sink._config_path = value
        return sink

    def to_config(self) -> dict[str, Any]:
        return {"Kind": self.kind, "Path": self._config_path}

    def describe(self) -> str:
        return f"sqlite_index {self.path}"

    # --- writing ---------------------------------------------------------------------------
    def send(self, events: Sequence[Event]) -> SendResult:
        """Store the events in one transaction (see ``Sink.send``); the index refuses none."""
        delivered: set[str] = set()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for event in events:
                    body = json.dumps(event.fields, ensure_ascii=False, sort_keys=True)
                    row = self._conn.execute(
                        "SELECT rowid, body FROM events WHERE id = ?", (event.id,)
                    ).fetchone()
                    if row is not None:
                        if row[1] == body:
                            delivered.add(event.id)
                            continue
                        self._conn.execute("DELETE FROM fields WHERE event = ?", (row[0],))
                        self._conn.execute("DELETE FROM events WHERE rowid = ?", (row[0],))
                    cur = self._conn.execute(
                        "INSERT INTO events (id, sourcetype, time, time_source, study_uid, source, body)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            event.id,
                            event.sourcetype,
                            event.time,
                            event.time_source,
                            event.study_uid,
                            event.source,
                            body,
                        ),
                    )
                    rowid = cur.lastrowid
                    self._conn.executemany(
                        "INSERT INTO fields (event, path, text, num) VALUES (?, ?, ?, ?)",
                        [
                            (rowid, path, value_text(value), to_number(value))
                            for path, value in flatten_fields(event.fields)
                        ],
                    )
                    delivered.add(event.id)
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:  # locked, disk full: may pass later
                self._rollback()
                raise with_delivered(
                    SinkRetryable(f"sqlite_index {self.key!r}: cannot write {self.path}: {exc}"), ()
                ) from None
            except sqlite3.Error as exc:
                self._rollback()
                raise with_delivered(
                    SinkFatal(f"sqlite_index {self.key!r}: cannot write {self.path}: {exc}"), ()
                ) from None
        return SendResult(frozenset(delivered))

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # --- reading ---------------------------------------------------------------------------
    def has(self, ids: Collection[str]) -> set[str]:
        with self._lock:
            return existing_ids(self._conn, "events", ids)

    def query(self, where: IndexQuery) -> Iterator[StudyHit]:
        expr, params = where.to_sql()
        sql = (
            "SELECT e.study_uid, COUNT(*) FROM events e"
            f" WHERE e.study_uid != '' AND {expr} GROUP BY e.study_uid ORDER BY e.study_uid"
        )
        with self._lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise SinkFatal(f"sqlite_index {self.key!r}: query failed: {exc}") from None
        for study_uid, count in rows:
            yield StudyHit(study_uid, int(count))

    def event(self, event_id: str) -> dict[str, Any] | None:
        """One stored event as ``Event.to_json()`` would print it (for tests and tools)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,)
            ).fetchone()
        return event_row(row)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT sourcetype, COUNT(*) FROM events GROUP BY sourcetype"
            ).fetchall()
            studies = self._conn.execute("SELECT COUNT(DISTINCT study_uid) FROM events").fetchone()[
                0
            ]
        return {"events": {st: int(n) for st, n in rows}, "studies": int(studies)}

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

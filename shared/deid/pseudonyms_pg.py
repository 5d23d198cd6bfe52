"""The pseudonym map in the plugin's PostgreSQL queue database (``DicomSync.Queue`` of
kind ``postgresql``): the same table and contract as ``PseudonymMap``, shared by every
node of the queue, so two nodes give a returning patient the same pseudonym.

One autocommit connection per map, behind a lock (a map belongs to one place object, so
to one worker thread). psycopg's errors become ``QueueError`` (retryable when they may
pass, ``dicomsync.pg.is_transient``); a taken pseudonym is a ``ConfigError``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import IO, Any

from dicomsync.deid.pseudonyms import EntryCache, read_csv, write_csv
from dicomsync.errors import ConfigError, QueueError
from dicomsync.pg import PgTarget, is_transient, short


class PgPseudonymMap:
    def __init__(self, target: PgTarget, table: str) -> None:
        self.path = target.describe()
        self.table = f"deid_{table}"  # the name was checked to be an identifier
        self._target = target
        self._lock = threading.Lock()
        self._cache = EntryCache()
        self._db: Any = None
        with self._lock:
            self._run(self._create)

    def _create(self, db: Any) -> None:
        self._target.ensure_schema(db)
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            "original_id TEXT PRIMARY KEY, pseudonym_id TEXT NOT NULL UNIQUE, "
            "pseudonym_name TEXT NOT NULL)"
        )

    def _run(self, fn: Any) -> Any:
        """``fn(connection)`` with the lock held; psycopg errors become ``QueueError``."""
        import psycopg

        try:
            if self._db is None or self._db.closed:
                self._db = self._target.connect(autocommit=True)
            return fn(self._db)
        except psycopg.Error as exc:
            if self._db is not None and not self._db.closed and self._db.info.transaction_status:
                self._db.rollback()
            raise QueueError(
                f"pseudonym map {self.table} at {self.path}: {short(exc)}",
                retryable=is_transient(exc),
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()

    def _lookup(self, db: Any, original: str) -> tuple[str, str] | None:
        row = db.execute(
            f"SELECT pseudonym_id, pseudonym_name FROM {self.table} WHERE original_id = %s",
            (original,),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def get(self, original: str) -> tuple[str, str] | None:
        with self._lock:
            found = self._cache.get(original)
            if found is None:
                found = self._run(lambda db: self._lookup(db, original))
                if found is not None:
                    self._cache.put(original, found)
            return found

    def put(self, original: str, pseudonym: str, name: str = "") -> tuple[str, str]:
        """Store ``original -> pseudonym`` unless it has one (another node may have just
        stored it); returns the one it has."""

        def insert(db: Any) -> tuple[str, str] | None:
            db.execute(
                f"INSERT INTO {self.table} VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (original, pseudonym, name or pseudonym),
            )
            return self._lookup(db, original)

        with self._lock:
            found = self._cache.get(original)
            if found is None:
                found = self._run(insert)
                if found is not None:
                    self._cache.put(original, found)
        if found is None:  # the pseudonym is another patient's
            raise ConfigError(
                f"pseudonym map {self.table}: pseudonym {pseudonym!r} is already taken"
            )
        return found

    def rows(self) -> Iterator[tuple[str, str, str]]:
        sql = (
            f"SELECT original_id, pseudonym_id, pseudonym_name FROM {self.table} "
            "ORDER BY original_id"
        )
        with self._lock:
            found = self._run(lambda db: db.execute(sql).fetchall())
        for row in found:
            yield (row[0], row[1], row[2])

    def import_csv(self, stream: IO[str]) -> int:
        """As ``PseudonymMap.import_csv``: all rows in one transaction, or none."""
        import psycopg

        rows = read_csv(stream)

        def insert(db: Any) -> int:
            added = 0
            try:
                with db.transaction():
                    for row in rows:
                        cur = db.execute(
                            f"INSERT INTO {self.table} VALUES (%s, %s, %s) "
                            "ON CONFLICT (original_id) DO NOTHING",
                            row,
                        )
                        added += cur.rowcount
            except psycopg.errors.UniqueViolation:  # rolled back: nothing of the file
                return -1
            return added

        with self._lock:
            added = int(self._run(insert))
        if added < 0:
            raise ConfigError(
                "a pseudonym in the file is already another patient's; nothing imported"
            )
        return added

    def export_csv(self, stream: IO[str]) -> int:
        return write_csv(self.rows(), stream)

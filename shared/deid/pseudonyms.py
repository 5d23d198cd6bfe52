"""The pseudonym map: original PatientID -> pseudonym ID (and name), a durable table.

The map is the only place where the link between a patient and its pseudonym lives, so
it is as sensitive as the originals (``docs/deid.md``: who may read it, backups,
permissions). A profile's ``PatientIds`` names its table: in the plugin, inside the
queue's database (``StateDirectory/queue.sqlite``); for the CLI, in
``dicomsync-state/deid.sqlite`` beside ``dicomsync.json``. The file is created with
mode 0600.

With the plugin's queue on PostgreSQL (``DicomSync.Queue``), the table lives in that
database and schema instead (``dicomsync.deid.pseudonyms_pg``), shared by every node.

A patient seen for the first time gets the keyed-derived pseudonym
(``Keys.pseudonym``), stored, so the map lists every patient ever sent. Users can
pre-load it from a CSV (``original_id,pseudonym_id[,pseudonym_name]``) and export it
(``dicomsync deid map import|export``). Thread-safe (one connection, one lock);
errors are ``ConfigError`` (a bad CSV) or ``QueueError`` (the database).
"""

from __future__ import annotations

import csv
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from dicomsync.errors import ConfigError, QueueError

HEADER = ("original_id", "pseudonym_id", "pseudonym_name")
MAX_ID_CHARS = 64  # LO


class PseudonymMap:
    def __init__(self, path: Path, table: str) -> None:
        self.path = Path(path)
        self.table = f"deid_{table}"  # the name was checked to be an identifier
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[str, str]] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                "original_id TEXT PRIMARY KEY, pseudonym_id TEXT NOT NULL UNIQUE, "
                "pseudonym_name TEXT NOT NULL)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise QueueError(f"pseudonym map {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, original: str) -> tuple[str, str] | None:
        with self._lock:
            if original in self._cache:
                return self._cache[original]
            try:
                row = self._db.execute(
                    f"SELECT pseudonym_id, pseudonym_name FROM {self.table} WHERE original_id=?",
                    (original,),
                ).fetchone()
            except sqlite3.Error as exc:
                raise QueueError(f"pseudonym map {self.path}: {exc}") from None
            if row is not None:
                self._cache[original] = (row[0], row[1])
            return None if row is None else (row[0], row[1])

    def put(self, original: str, pseudonym: str, name: str = "") -> tuple[str, str]:
        """Store ``original -> pseudonym`` unless it has one; returns the one it has."""
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT OR IGNORE INTO {self.table} VALUES (?, ?, ?)",
                    (original, pseudonym, name or pseudonym),
                )
                self._db.commit()
                row = self._db.execute(
                    f"SELECT pseudonym_id, pseudonym_name FROM {self.table} WHERE original_id=?",
                    (original,),
                ).fetchone()
            except sqlite3.Error as exc:
                raise QueueError(f"pseudonym map {self.path}: {exc}") from None
        if row is None:  # the pseudonym is another patient's
            raise ConfigError(
                f"pseudonym map {self.table}: pseudonym {pseudonym!r} is already taken"
            )
        return (row[0], row[1])

    def rows(self) -> Iterator[tuple[str, str, str]]:
        with self._lock:
            found = self._db.execute(
                f"SELECT original_id, pseudonym_id, pseudonym_name FROM {self.table} "
                "ORDER BY original_id"
            ).fetchall()
        yield from found

    def import_csv(self, stream: IO[str]) -> int:
        """Add the rows of a CSV (header optional); existing entries are kept. Returns
        the number of rows added. A bad row (empty, too long, a taken pseudonym) is a
        ``ConfigError`` naming its line, and nothing of the file is added."""
        rows = read_csv(stream)
        with self._lock:
            try:
                before = self._db.total_changes
                self._db.executemany(
                    f"INSERT INTO {self.table} VALUES (?, ?, ?) "
                    "ON CONFLICT(original_id) DO NOTHING",
                    rows,
                )
                self._db.commit()
                return self._db.total_changes - before
            except sqlite3.IntegrityError:
                self._db.rollback()
                raise ConfigError(
                    "a pseudonym in the file is already another patient's; nothing imported"
                ) from None
            except sqlite3.Error as exc:
                self._db.rollback()
                raise QueueError(f"pseudonym map {self.path}: {exc}") from None

    def export_csv(self, stream: IO[str]) -> int:
        return write_csv(self.rows(), stream)


def read_csv(stream: IO[str]) -> list[tuple[str, str, str]]:
    """``original_id,pseudonym_id[,pseudonym_name]`` rows (header optional); a bad row is
    a ``ConfigError`` naming its line."""
    rows = []
    for n, row in enumerate(csv.reader(stream), 1):
        if not row or (n == 1 and tuple(c.strip() for c in row[:2]) == HEADER[:2]):
            continue
        cells = [c.strip() for c in row]
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise ConfigError(f"line {n}: expected original_id,pseudonym_id[,pseudonym_name]")
        if any(len(c) > MAX_ID_CHARS for c in cells):
            raise ConfigError(f"line {n}: a value is longer than {MAX_ID_CHARS} characters")
        rows.append((cells[0], cells[1], cells[2] if len(cells) == 3 and cells[2] else cells[1]))
    return rows


def write_csv(rows: Iterable[tuple[str, str, str]], stream: IO[str]) -> int:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(HEADER)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count

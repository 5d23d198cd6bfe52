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

The file is in WAL mode with ``synchronous=NORMAL``, as the queue is: a commit is not
an ``fsync`` (inside a busy Orthanc, an ``fsync`` waits for the storage's own writes:
measured, a tenth of a de-identifying route's time per study went to it). A killed
process loses no entry; after a power loss the last few entries may roll back, and a
lost derived pseudonym is derived again, the same. Entries once read or stored are
cached: a returning patient costs no query.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from dicomsync.errors import ConfigError, QueueError

HEADER = ("original_id", "pseudonym_id", "pseudonym_name")
MAX_ID_CHARS = 64  # LO
CACHE_ENTRIES = 4096  # patients remembered in memory (a plugin runs for months)
BUSY_SECONDS = 30  # how long a write waits for another writer (the queue, another node)


class EntryCache:
    """The entries a map has read or stored: original -> (pseudonym ID, name), the least
    recently used forgotten past ``size``. Entries never change once stored (an import
    keeps existing ones), so a cached one is never stale. The caller holds its lock."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, original: str) -> tuple[str, str] | None:
        found = self._entries.get(original)
        if found is not None:
            self._entries.move_to_end(original)
        return found

    def put(self, original: str, entry: tuple[str, str]) -> None:
        self._entries[original] = entry
        self._entries.move_to_end(original)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class PseudonymMap:
    def __init__(self, path: Path, table: str) -> None:
        self.path = Path(path)
        self.table = f"deid_{table}"  # the name was checked to be an identifier
        self._lock = threading.Lock()
        self._cache = EntryCache()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_SECONDS)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_SECONDS * 1000}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
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
            found = self._cache.get(original)
            if found is not None:
                return found
            try:
                row = self._db.execute(
                    f"SELECT pseudonym_id, pseudonym_name FROM {self.table} WHERE original_id=?",
                    (original,),
                ).fetchone()
            except sqlite3.Error as exc:
                raise QueueError(f"pseudonym map {self.path}: {exc}") from None
            if row is not None:
                self._cache.put(original, (row[0], row[1]))
            return None if row is None else (row[0], row[1])

    def put(self, original: str, pseudonym: str, name: str = "") -> tuple[str, str]:
        """Store ``original -> pseudonym`` unless it has one; returns the one it has."""
        with self._lock:
            found = self._cache.get(original)
            if found is not None:
                return found
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
            if row is not None:
                self._cache.put(original, (row[0], row[1]))
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

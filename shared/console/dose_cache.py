"""The dose reader's summary, kept on disk: what ``DoseReader`` extracted from an index,
so a restart reads a few MB instead of the index's fields again.

One SQLite file per index (``DoseReader(..., cache=path)``): ``meta`` (the index's
fingerprint, the last event rowid read), ``events`` (one row per CT dose event: its dedup
key and its ``DoseEvent``), ``others`` (the rowids of the other dose events, which only
count), ``reports`` (``StudyTotal`` per CT dose
report) and ``modalities`` (distinct date, modality, study). Written in one transaction
per refresh, after the reader's own state; a file that cannot be read, or that belongs
to another index (the fingerprint: the index's first event id), is started again. The
file is a cache: deleting it only costs one full read of the index.

Used under the reader's lock only (one thread at a time). Errors of the cache file are
logged once and the cache is switched off; they never fail a page.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomsync.console.dose_query import DoseEvent, StudyTotal

log = logging.getLogger(__name__)
VERSION = "2"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    rowid INTEGER PRIMARY KEY, key_study TEXT NOT NULL, key_uid TEXT NOT NULL, ct INTEGER NOT NULL,
    study_uid TEXT, date TEXT, accession TEXT, scanner TEXT, protocol TEXT, region TEXT,
    ctdivol REAL, dlp REAL
);
CREATE TABLE IF NOT EXISTS others (rowid INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS reports (
    rowid INTEGER PRIMARY KEY, ok INTEGER NOT NULL,
    study_uid TEXT, date TEXT, accession TEXT, description TEXT, scanner TEXT, total_dlp REAL
);
CREATE TABLE IF NOT EXISTS modalities (
    date TEXT NOT NULL, modality TEXT NOT NULL, study TEXT NOT NULL,
    PRIMARY KEY (date, modality, study)
) WITHOUT ROWID;
"""


@dataclass
class Loaded:
    last: int
    events: dict[int, tuple[tuple[str, str], DoseEvent | None]] = field(default_factory=dict)
    reports: dict[int, StudyTotal | None] = field(default_factory=dict)
    modalities: set[tuple[str, str, str]] = field(default_factory=set)


class SummaryCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self.broken = False

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False)
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    def _off(self, exc: BaseException) -> None:
        if not self.broken:
            log.warning("dose: summary cache %s switched off: %s", self.path, exc)
        self.broken = True
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def load(self, fingerprint: str) -> Loaded | None:
        """The summary stored for the index ``fingerprint``, or None (start again)."""
        from dicomsync.console.dose_query import DoseEvent, StudyTotal

        if self.broken or not self.path.exists():
            return None
        try:
            db = self._db()
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("version") != VERSION or meta.get("fingerprint") != fingerprint:
                return None
            out = Loaded(int(meta.get("last", "0")))
            out.events = {
                row[0]: ((row[1], row[2]), DoseEvent(*row[4:]))
                for row in db.execute("SELECT * FROM events").fetchall()
            }
            none = (("", ""), None)  # a dose event that is not a CT event: only counted
            out.events.update((r[0], none) for r in db.execute("SELECT rowid FROM others"))
            for row in db.execute("SELECT * FROM reports"):
                out.reports[row[0]] = StudyTotal(*row[2:]) if row[1] else None
            out.modalities = {(r[0], r[1], r[2]) for r in db.execute("SELECT * FROM modalities")}
            return out
        except (sqlite3.Error, ValueError, TypeError) as exc:
            self._off(exc)
            return None

    def save(
        self,
        fingerprint: str,
        last: int,
        events: Iterable[tuple[int, tuple[tuple[str, str], DoseEvent | None]]],
        reports: Iterable[tuple[int, StudyTotal | None]],
        modalities: Iterable[tuple[str, str, str]],
        gone_events: Iterable[int] = (),
        gone_reports: Iterable[int] = (),
        *,
        reset: bool = False,
    ) -> None:
        """Add what a refresh read (and drop what it found deleted), in one transaction."""
        if self.broken:
            return
        try:
            db = self._db()
            with db:
                if reset:
                    for table in ("meta", "events", "others", "reports", "modalities"):
                        db.execute(f"DELETE FROM {table}")
                ct, others = [], []
                for rowid, (key, ev) in events:
                    if ev is None:
                        others.append((rowid,))
                    else:
                        ct.append((rowid, key[0], key[1], 1, *astuple(ev)))
                db.executemany("INSERT OR REPLACE INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", ct)
                db.executemany("INSERT OR REPLACE INTO others VALUES (?)", others)
                db.executemany(
                    "INSERT OR REPLACE INTO reports VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (rowid, 1 if t else 0, *(astuple(t) if t else (None,) * 6))
                        for rowid, t in reports
                    ],
                )
                db.executemany("INSERT OR IGNORE INTO modalities VALUES (?,?,?)", list(modalities))
                db.executemany("DELETE FROM events WHERE rowid = ?", [(r,) for r in gone_events])
                db.executemany("DELETE FROM others WHERE rowid = ?", [(r,) for r in gone_events])
                db.executemany("DELETE FROM reports WHERE rowid = ?", [(r,) for r in gone_reports])
                db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("version", VERSION), ("fingerprint", fingerprint), ("last", str(last))],
                )
        except sqlite3.Error as exc:
            self._off(exc)

"""A persistent cache of instance headers, so repeat duplicate checks read no DICOM.

Each entry is keyed by a container (a study folder or a zip file), a member name
(a relative path, or a zip member) and a signature (size and mtime in ns). A file
whose signature is unchanged is not parsed again. Unreadable files are cached too,
with their error, so they are not re-parsed; the places still name each of them once
on every run, from the cached reason (``places.local.scan_members``).

Names are stored as text, or, when they hold lone surrogates (the ``os.fsdecode`` of
a name that is not UTF-8), as the BLOB of their ``surrogatepass`` encoding: SQLite
refuses such text, and a BLOB never equals a TEXT, so no two names share an entry.

The cache lives in ``$DICOMSYNC_CACHE_DIR`` or ``$XDG_CACHE_HOME/dicomsync`` (default
``~/.cache/dicomsync``) as ``headers.sqlite``. Deleting it is always safe.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS headers (
    container TEXT NOT NULL,
    member    TEXT NOT NULL,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    sop_uid   TEXT,
    study_uid TEXT,
    patient_id TEXT,
    error     TEXT,
    PRIMARY KEY (container, member)
);
"""


@dataclass(frozen=True)
class CachedHeader:
    member: str
    size: int
    mtime_ns: int
    sop_uid: str | None
    study_uid: str | None
    patient_id: str | None
    error: str | None


def _db_name(name: str) -> str | bytes:
    """``name`` as SQLite can store it (see the module docstring)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")
    return name


def _py_name(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def _db_text(text: str | None) -> str | None:
    """An error message, storable (it is shown, never matched)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def default_cache_dir() -> Path:
    explicit = os.environ.get("DICOMSYNC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dicomsync"


class HeaderCache:
    """Thread-safe; one SQLite connection per thread. Failures degrade to no caching."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_dir() / "headers.sqlite"
        self._local = threading.local()
        self._disabled = False

    def _conn(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                log.warning("header cache disabled (%s): %s", self.path, exc)
                self._disabled = True
                return None
            self._local.conn = conn
        return conn

    def load(self, container: str) -> dict[str, CachedHeader]:
        conn = self._conn()
        if conn is None:
            return {}
        try:
            rows = conn.execute(
                "SELECT member, size, mtime_ns, sop_uid, study_uid, patient_id, error "
                "FROM headers WHERE container = ?",
                (_db_name(container),),
            ).fetchall()
        except sqlite3.Error as exc:
            log.warning("header cache read failed: %s", exc)
            return {}
        return {_py_name(r[0]): CachedHeader(_py_name(r[0]), *r[1:]) for r in rows}

    def store(
        self, container: str, entries: Iterable[CachedHeader], *, replace_all: bool = False
    ) -> None:
        conn = self._conn()
        if conn is None:
            return
        try:
            with conn:
                conn.execute("BEGIN")
                if replace_all:
                    conn.execute("DELETE FROM headers WHERE container = ?", (_db_name(container),))
                conn.executemany(
                    "INSERT OR REPLACE INTO headers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            _db_name(container),
                            _db_name(e.member),
                            e.size,
                            e.mtime_ns,
                            _db_text(e.sop_uid),
                            _db_text(e.study_uid),
                            _db_text(e.patient_id),
                            _db_text(e.error),
                        )
                        for e in entries
                    ],
                )
        except sqlite3.Error as exc:
            log.warning("header cache write failed: %s", exc)

    def forget(self, container: str, members: Iterable[str]) -> None:
        conn = self._conn()
        if conn is None:
            return
        try:
            with conn:
                conn.executemany(
                    "DELETE FROM headers WHERE container = ? AND member = ?",
                    [(_db_name(container), _db_name(m)) for m in members],
                )
        except sqlite3.Error as exc:
            log.warning("header cache write failed: %s", exc)


_shared: HeaderCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> HeaderCache:
    """The process-wide cache at the default location (re-read if the env var changes)."""
    global _shared
    with _shared_lock:
        wanted = default_cache_dir() / "headers.sqlite"
        if _shared is None or _shared.path != wanted:
            _shared = HeaderCache(wanted)
        return _shared

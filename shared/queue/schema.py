"""The SQLite queue's tables, indexes, counters and migrations.

``prepare(db, path)`` creates the tables of a new ``queue.sqlite``, migrates an older one
to ``SCHEMA_VERSION`` (``PRAGMA user_version``) in the same ``BEGIN IMMEDIATE``
transaction (all or nothing), and refuses one written by a newer dicomsync with one
``QueueError`` line. Versions:

1. the first ``jobs`` and ``meta`` tables;
2. ``jobs.outcome``: what a done job's last success recorded. A tags job used to fake a
   study fingerprint (``"events"``, or ``"gone"`` for a deleted instance); these move to
   ``outcome`` (``delivered`` / ``gone``) and the fingerprint is emptied. Done study jobs
   get ``delivered``. Study fingerprints (the duplicate avoidance) are untouched;
3. the queue at scale: indexes for the claim's ranges (``dicomsync.queue.compile``),
   ``counts`` kept by triggers, ``done_studies`` for pruned study jobs. The migration
   counts the records once, and moves the pruned totals from ``meta`` into ``counts``.

``counts`` holds, per destination, kind and state, the number of records and the sum of
their ``delivered_count``; the triggers on ``jobs`` keep it in the same transaction as
every insert, state change and delete, whatever rule made it (the rules stay written
once, in ``dicomsync.queue.rules``). The state ``pruned`` counts the done records that
``prune`` removed. ``stats()`` reads ``counts`` and a few index lookups: O(destinations).

``done_studies`` keeps what duplicate avoidance needs of a pruned done study job (its id,
fingerprint, outcome, delivered count): ``enqueue`` finds it there, and a study that
changed is restored as the same record (``dicomsync.queue.sql.RESTORE``), as if it had
never left.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dicomsync.errors import QueueError
from dicomsync.queue.compile import COLUMNS, FIELDS

__all__ = ["COLUMNS", "FIELDS", "SCHEMA_VERSION", "prepare"]

SCHEMA_VERSION = 3

TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL,
    resource         TEXT    NOT NULL,
    destination      TEXT    NOT NULL,
    study_uid        TEXT    NOT NULL DEFAULT '',
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL    NOT NULL,
    last_error       TEXT    NOT NULL DEFAULT '',
    fingerprint      TEXT    NOT NULL DEFAULT '',
    outcome          TEXT    NOT NULL DEFAULT '',
    delivered_count  INTEGER NOT NULL DEFAULT 0,
    rerun            INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT    NOT NULL DEFAULT '',
    lease_token      TEXT    NOT NULL DEFAULT '',
    lease_expires_at REAL,
    queued_at        REAL    NOT NULL,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    UNIQUE (kind, resource, destination)
);
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (destination, kind, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (destination, kind, lease_expires_at)
    WHERE state = 'sending';
CREATE INDEX IF NOT EXISTS jobs_age ON jobs (destination, kind, state, queued_at);
CREATE INDEX IF NOT EXISTS jobs_errors ON jobs (destination, kind, updated_at)
    WHERE last_error != '';
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counts (
    destination TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    n           INTEGER NOT NULL DEFAULT 0,
    delivered   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, kind, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS done_studies (
    destination     TEXT    NOT NULL,
    resource        TEXT    NOT NULL,
    id              INTEGER NOT NULL,
    study_uid       TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    outcome         TEXT    NOT NULL,
    delivered_count INTEGER NOT NULL,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    PRIMARY KEY (destination, resource)
) WITHOUT ROWID
"""

_ADD = (
    "INSERT INTO counts (destination, kind, state, n, delivered)"
    " VALUES (NEW.destination, NEW.kind, NEW.state, 1, NEW.delivered_count)"
    " ON CONFLICT (destination, kind, state)"
    " DO UPDATE SET n = n + 1, delivered = delivered + excluded.delivered;"
)
_REMOVE = (
    "UPDATE counts SET n = n - 1, delivered = delivered - OLD.delivered_count"
    " WHERE destination = OLD.destination AND kind = OLD.kind AND state = OLD.state;"
)
TRIGGERS = (
    f"CREATE TRIGGER IF NOT EXISTS jobs_counted AFTER INSERT ON jobs BEGIN {_ADD} END",
    "CREATE TRIGGER IF NOT EXISTS jobs_recounted AFTER UPDATE OF state, delivered_count"
    " ON jobs WHEN OLD.state != NEW.state OR OLD.delivered_count != NEW.delivered_count"
    f" BEGIN {_REMOVE} {_ADD} END",
    f"CREATE TRIGGER IF NOT EXISTS jobs_uncounted AFTER DELETE ON jobs BEGIN {_REMOVE} END",
)

# Version 1 -> 2: the outcome column; tags jobs' fake fingerprints become outcomes.
TO_2 = """
ALTER TABLE jobs ADD COLUMN outcome TEXT NOT NULL DEFAULT '';
UPDATE jobs SET outcome = CASE fingerprint WHEN 'gone' THEN 'gone' ELSE 'delivered' END,
    fingerprint = '' WHERE kind = 'tags' AND fingerprint IN ('events', 'gone');
UPDATE jobs SET outcome = 'delivered' WHERE kind = 'study' AND state = 'done'
"""

# Version 2 -> 3 (after TABLES): count the records once; pruned totals from meta.
PRUNED_META = "pruned:"  # schema 2: "pruned:<kind>:<destination>" -> "<done> <delivered>"
TO_3 = """
UPDATE jobs SET next_attempt_at = updated_at WHERE state = 'done';
DELETE FROM counts;
INSERT INTO counts (destination, kind, state, n, delivered)
    SELECT destination, kind, state, COUNT(*), SUM(delivered_count) FROM jobs
    GROUP BY destination, kind, state;
INSERT INTO counts (destination, kind, state, n, delivered)
    SELECT substr(rest, instr(rest, ':') + 1), substr(rest, 1, instr(rest, ':') - 1), 'pruned',
        CAST(substr(value, 1, instr(value, ' ') - 1) AS INTEGER),
        CAST(substr(value, instr(value, ' ') + 1) AS INTEGER)
    FROM (SELECT substr(key, 8) AS rest, value FROM meta WHERE key LIKE 'pruned:%');
DELETE FROM meta WHERE key LIKE 'pruned:%'
"""


def prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create or migrate the tables (one transaction); ``QueueError`` when it cannot."""
    try:
        db.execute("BEGIN IMMEDIATE")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.execute("ROLLBACK")
            raise QueueError(f"{path} was written by a newer dicomsync (schema {version})")
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)").fetchall()}
        if columns and "outcome" not in columns:
            _script(db, TO_2)
        _script(db, TABLES)
        if version < 3:
            _script(db, TO_3)
        for trigger in TRIGGERS:
            db.execute(trigger)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise QueueError(f"cannot initialise the queue {path}: {exc}") from None


def _script(db: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)

"""The PostgreSQL queue's tables, counters and versioned migrations.

The tables are those of the SQLite queue (``dicomsync.queue.schema``: ``jobs``, ``meta``,
``counts``, ``done_studies``, the same columns and the same indexes, so the compiled rules
and the shared readers of ``dicomsync.queue.sql`` run on both), in the queue's own schema
of the database (``PgTarget.schema``, ``dicomsync`` unless configured). Two more:

- ``schema_version``: one row, the version this schema was written by. ``prepare`` runs
  each migration of ``MIGRATIONS`` above the stored version in one transaction, under an
  advisory lock (several nodes starting at once migrate once), and refuses a schema
  written by a newer dicomsync with one ``QueueError`` line;
- ``count_deltas``: the counters' changes. Several nodes change jobs at once, so the
  triggers do not update shared counter rows (two transactions taking the same rows in
  opposite orders deadlock); each statement that inserts, deletes or changes the state
  of jobs appends its deltas instead (one row per destination, kind and state it
  touched: a statement-level trigger over its transition tables), in the same
  transaction, and ``fold`` moves the deltas into ``counts`` (one node at a time, under
  an advisory lock). ``COUNTS`` reads both.

Version 1: the first PostgreSQL schema (the SQLite queue's schema 3).
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1

_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id               BIGSERIAL PRIMARY KEY,
    kind             TEXT    NOT NULL,
    resource         TEXT    NOT NULL,
    destination      TEXT    NOT NULL,
    study_uid        TEXT    NOT NULL DEFAULT '',
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  DOUBLE PRECISION NOT NULL,
    last_error       TEXT    NOT NULL DEFAULT '',
    fingerprint      TEXT    NOT NULL DEFAULT '',
    outcome          TEXT    NOT NULL DEFAULT '',
    delivered_count  BIGINT  NOT NULL DEFAULT 0,
    rerun            INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT    NOT NULL DEFAULT '',
    lease_token      TEXT    NOT NULL DEFAULT '',
    lease_expires_at DOUBLE PRECISION,
    queued_at        DOUBLE PRECISION NOT NULL,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    UNIQUE (destination, kind, resource)  -- the prefix of the other indexes, and more
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (destination, kind, state, next_attempt_at, id);
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (destination, kind, lease_expires_at, id)
    WHERE state = 'sending';
CREATE INDEX IF NOT EXISTS jobs_age ON jobs (destination, kind, state, queued_at);
CREATE INDEX IF NOT EXISTS jobs_errors ON jobs (destination, kind, updated_at)
    WHERE last_error != '';
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counts (
    destination TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    state       TEXT   NOT NULL,
    n           BIGINT NOT NULL DEFAULT 0,
    delivered   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, kind, state)
);
CREATE TABLE IF NOT EXISTS count_deltas (
    destination TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    state       TEXT   NOT NULL,
    n           BIGINT NOT NULL,
    delivered   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS done_studies (
    destination     TEXT   NOT NULL,
    resource        TEXT   NOT NULL,
    id              BIGINT NOT NULL,
    study_uid       TEXT   NOT NULL,
    fingerprint     TEXT   NOT NULL,
    outcome         TEXT   NOT NULL,
    delivered_count BIGINT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (destination, resource)
);
CREATE OR REPLACE FUNCTION jobs_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO count_deltas SELECT destination, kind, state, COUNT(*),
            SUM(delivered_count) FROM new_rows GROUP BY destination, kind, state;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO count_deltas SELECT destination, kind, state, -COUNT(*),
            -SUM(delivered_count) FROM old_rows GROUP BY destination, kind, state;
    ELSE
        INSERT INTO count_deltas SELECT destination, kind, state, SUM(n), SUM(delivered)
        FROM (SELECT o.destination, o.kind, o.state, -1 AS n, -o.delivered_count AS delivered
              FROM old_rows o JOIN new_rows w ON w.id = o.id
              WHERE o.state <> w.state OR o.delivered_count <> w.delivered_count
              UNION ALL
              SELECT w.destination, w.kind, w.state, 1, w.delivered_count
              FROM old_rows o JOIN new_rows w ON w.id = o.id
              WHERE o.state <> w.state OR o.delivered_count <> w.delivered_count) AS moved
        GROUP BY destination, kind, state;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER jobs_counted AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count();
CREATE OR REPLACE TRIGGER jobs_uncounted AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count();
CREATE OR REPLACE TRIGGER jobs_recounted AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count();
"""

MIGRATIONS: dict[int, str] = {1: _V1}  # version -> the script that reaches it

COUNTS = (
    "(SELECT destination, kind, state, SUM(n) AS n, SUM(delivered) AS delivered FROM"
    " (SELECT destination, kind, state, n, delivered FROM counts UNION ALL"
    " SELECT destination, kind, state, n, delivered FROM count_deltas) AS parts"
    " GROUP BY destination, kind, state)"
)

FOLD = """
WITH moved AS (DELETE FROM count_deltas RETURNING destination, kind, state, n, delivered)
INSERT INTO counts (destination, kind, state, n, delivered)
SELECT destination, kind, state, SUM(n), SUM(delivered) FROM moved
GROUP BY destination, kind, state
ON CONFLICT (destination, kind, state)
DO UPDATE SET n = counts.n + excluded.n, delivered = counts.delivered + excluded.delivered
"""


def lock_key(schema: str, what: str) -> int:
    """A stable 63-bit advisory lock key for ``what`` in ``schema``."""
    import hashlib

    digest = hashlib.sha256(f"dicomsync:{schema}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def stored_version(conn: Any, schema: str) -> int | None:
    """The version in ``<schema>.schema_version`` (None: no queue there yet)."""
    row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.schema_version",)).fetchone()
    if row is None or row[0] is None:
        return None
    found = conn.execute(f"SELECT version FROM {schema}.schema_version").fetchone()
    return int(found[0]) if found else None

"""The SQLite queue's tables, their migrations, and the rules compiled to SQL.

``prepare(db, path)`` creates the tables of a new ``queue.sqlite``, migrates an older one
to ``SCHEMA_VERSION`` in the same ``BEGIN IMMEDIATE`` transaction (all or nothing), and
refuses one written by a newer dicomsync with one ``QueueError`` line. Versions:

1. the first ``jobs`` and ``meta`` tables;
2. ``jobs.outcome``: what a done job's last success recorded. A tags job used to fake a
   study fingerprint (``"events"``, or ``"gone"`` for a deleted instance); these move to
   ``outcome`` (``delivered`` / ``gone``) and the fingerprint is emptied. Done study jobs
   get ``delivered``. Study fingerprints (the duplicate avoidance) are untouched.

``update_one(rule)`` and ``update_where(rule, where)`` turn a ``dicomsync.queue.rules.Rule``
into one ``UPDATE … RETURNING`` statement with named parameters (``:_now``, ``:_id``,
``:_token`` and the rule's arguments); the statements are built once per rule and shape,
then cached (a benign race at worst builds one twice). Thread-safe; nothing but ``prepare``
raises.
"""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Any

from dicomsync.errors import QueueError
from dicomsync.queue.records import Job
from dicomsync.queue.rules import Effect, Rule, Where

SCHEMA_VERSION = 2

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
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Version 1 -> 2: the outcome column; tags jobs' fake fingerprints become outcomes.
TO_2 = """
ALTER TABLE jobs ADD COLUMN outcome TEXT NOT NULL DEFAULT '';
UPDATE jobs SET outcome = CASE fingerprint WHEN 'gone' THEN 'gone' ELSE 'delivered' END,
    fingerprint = '' WHERE kind = 'tags' AND fingerprint IN ('events', 'gone');
UPDATE jobs SET outcome = 'delivered' WHERE kind = 'study' AND state = 'done'
"""

FIELDS = tuple(f.name for f in fields(Job))  # the jobs table has a column per field
COLUMNS = ", ".join(FIELDS)
DUE = (
    "((state = 'queued' AND next_attempt_at <= :_now)"
    " OR (state = 'sending' AND lease_expires_at < :_now))"
)


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


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(int(value))
    return "'" + str(value).replace("'", "''") + "'"


def _expression(column: str, effect: Effect) -> str:
    op, value = effect.op, effect.value
    if op == "const":
        return _literal(value)
    if op == "now":
        return ":_now"
    if op == "arg":
        return f":{value}"
    if op == "arg_or_keep":
        return f"CASE WHEN :{value} = '' THEN {column} ELSE :{value} END"
    if op == "add":
        return f"{column} + :{value}"
    if op == "after":
        return f":_now + :{value}"
    if op == "inc":
        return f"{column} + 1"
    if op == "dec":
        return f"MAX(0, {column} - 1)"
    raise ValueError(f"unknown effect {op!r}")


def assignments(rule: Rule) -> str:
    """The ``SET`` list of a rule; ``on_rerun`` effects as ``CASE WHEN rerun = 1`` (the old
    row's flag: SQL evaluates every right-hand side before it assigns)."""
    plain, rerun = dict(rule.sets), dict(rule.on_rerun)
    parts = []
    for column in dict.fromkeys([*plain, *rerun]):
        normal = _expression(column, plain[column]) if column in plain else column
        if column in rerun:
            normal = (
                f"CASE WHEN rerun = 1 THEN {_expression(column, rerun[column])} ELSE {normal} END"
            )
        parts.append(f"{column} = {normal}")
    if rule.touch:
        parts.append("updated_at = :_now")
    return ", ".join(parts)


def _states(states: tuple[str, ...]) -> str:
    return f"state IN ({', '.join(_literal(s) for s in states)})"


_ONE: dict[int, tuple[Rule, str]] = {}  # id(rule) -> (rule, statement): no hashing per call


def update_one(rule: Rule) -> str:
    """``rule`` on the record ``:_id`` (held: only with lease token ``:_token``)."""
    cached = _ONE.get(id(rule))
    if cached is not None and cached[0] is rule:
        return cached[1]
    held = " AND lease_token = :_token" if rule.held else ""
    sql = (
        f"UPDATE jobs SET {assignments(rule)} WHERE id = :_id AND {_states(rule.sources)}{held}"
        " RETURNING state, destination"
    )
    _ONE[id(rule)] = (rule, sql)
    return sql


def update_where(rule: Rule, where: Where) -> str:
    """``rule`` on the records ``where`` selects (its values bound as ``:_destination``,
    ``:_kind``, ``:_owner``, ``:_limit``), returning every column."""
    return _update_where(
        rule,
        where.states or rule.sources,
        where.due,
        where.destination is not None,
        where.kind is not None,
        where.owner is not None,
        where.limit is not None,
    )


@functools.cache
def _update_where(
    rule: Rule,
    states: tuple[str, ...],
    due: bool,
    destination: bool,
    kind: bool,
    owner: bool,
    limit: bool,
) -> str:
    if not set(states) <= set(rule.sources):
        raise ValueError(f"{rule.name}: {states} are not among its sources {rule.sources}")
    conditions = ["destination = :_destination"] if destination else []
    conditions += ["kind = :_kind"] if kind else []
    conditions.append(DUE if due else _states(states))
    if owner:
        conditions.append("(:_owner = '' OR lease_owner = :_owner OR lease_expires_at < :_now)")
    condition = " AND ".join(conditions)
    if limit:
        condition = (
            f"id IN (SELECT id FROM jobs WHERE {condition}"
            " ORDER BY next_attempt_at, id LIMIT :_limit)"
        )
    return f"UPDATE jobs SET {assignments(rule)} WHERE {condition} RETURNING {COLUMNS}"


def where_values(where: Where) -> dict[str, Any]:
    return {
        "_destination": where.destination,
        "_kind": where.kind,
        "_owner": where.owner,
        "_limit": where.limit,
    }

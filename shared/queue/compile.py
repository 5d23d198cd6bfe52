"""The queue's rules (``dicomsync.queue.rules``) compiled to SQL, once, for every SQL backend.

``update_one(rule, dialect)`` and ``update_where(rule, where, dialect)`` turn a ``Rule`` into
one ``UPDATE … RETURNING`` statement with named parameters (``_now``, ``_id``, ``_token``
and the rule's arguments; ``where_values(where)`` gives the ``Where``'s own). A
``Dialect`` says how the backends differ: how a named parameter is written (SQLite
``:name``, psycopg ``%(name)s``), the larger of two numbers (``MAX`` / ``GREATEST``) and
what a claim adds to its row selection (PostgreSQL: ``FOR UPDATE SKIP LOCKED``).

A claim (``Where.due`` with a destination and a limit) selects its rows as the
``UNION ALL`` of index ranges, never the ``OR`` of them (an ``OR`` defeats the index and
scans every record of the destination): per kind, ``queued`` records with
``next_attempt_at <= now`` in ``(next_attempt_at, id)`` order, and ``sending`` records
with ``lease_expires_at < now`` (an expired lease) in ``(lease_expires_at, id)`` order,
each limited to ``n``; then the first ``n`` of those by ``(next_attempt_at, id)``.
The backends' indexes (``dicomsync.queue.schema``, ``dicomsync.queue.pg_schema``) are made
for these ranges. A ``Where`` without a kind claims over every kind of ``KINDS``.

The statements are built once per rule, shape and dialect, then cached. Thread-safe;
raises nothing but ``ValueError`` for a ``Where`` its rule cannot take.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields
from typing import Any

from dicomsync.queue.records import KINDS, Job
from dicomsync.queue.rules import Effect, Rule, Where

FIELDS = tuple(f.name for f in fields(Job))  # the jobs table has a column per field
COLUMNS = ", ".join(FIELDS)


@dataclass(frozen=True)
class Dialect:
    name: str
    greatest: str  # the function that returns the larger of its arguments
    claim_lock: str = ""  # appended to a claim's row selection

    def sql(self, text: str) -> str:
        """``text`` written with ``:name`` parameters, in this dialect's style."""
        if self.name == "sqlite":
            return text
        return re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", text)


SQLITE = Dialect("sqlite", "MAX")
POSTGRES = Dialect("postgresql", "GREATEST", " FOR UPDATE SKIP LOCKED")


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(int(value))
    return "'" + str(value).replace("'", "''") + "'"


def _expression(column: str, effect: Effect, dialect: Dialect) -> str:
    op, value = effect.op, effect.value
    if op == "const":
        return literal(value)
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
        return f"{dialect.greatest}(0, {column} - 1)"
    raise ValueError(f"unknown effect {op!r}")


def assignments(rule: Rule, dialect: Dialect = SQLITE) -> str:
    """The ``SET`` list of a rule; ``on_rerun`` effects as ``CASE WHEN rerun = 1`` (the old
    row's flag: SQL evaluates every right-hand side before it assigns)."""
    plain, rerun = dict(rule.sets), dict(rule.on_rerun)
    parts = []
    for column in dict.fromkeys([*plain, *rerun]):
        normal = _expression(column, plain[column], dialect) if column in plain else column
        if column in rerun:
            again = _expression(column, rerun[column], dialect)
            normal = f"CASE WHEN rerun = 1 THEN {again} ELSE {normal} END"
        parts.append(f"{column} = {normal}")
    if rule.touch:
        parts.append("updated_at = :_now")
    return ", ".join(parts)


def states(names: tuple[str, ...]) -> str:
    return f"state IN ({', '.join(literal(s) for s in names)})"


@functools.cache
def update_one(rule: Rule, dialect: Dialect = SQLITE) -> str:
    """``rule`` on the record ``:_id`` (held: only with lease token ``:_token``)."""
    held = " AND lease_token = :_token" if rule.held else ""
    return dialect.sql(
        f"UPDATE jobs SET {assignments(rule, dialect)} WHERE id = :_id AND"
        f" {states(rule.sources)}{held} RETURNING state, destination"
    )


def update_where(rule: Rule, where: Where, dialect: Dialect = SQLITE) -> str:
    """``rule`` on the records ``where`` selects (its values bound as ``_destination``,
    ``_kind``, ``_owner``, ``_limit``), returning every column."""
    return _update_where(
        rule,
        where.states or rule.sources,
        where.due,
        where.destination is not None,
        where.kind is not None,
        where.owner is not None,
        where.limit is not None,
        dialect,
    )


def claim(kind: bool, dialect: Dialect) -> str:
    """The ids a claim takes: see the module docstring."""
    kinds = [":_kind"] if kind else [literal(k) for k in KINDS]
    branches = []
    for i, k in enumerate(kinds):
        mine = f"destination = :_destination AND kind = {k}"
        for j, (due, order) in enumerate(
            (
                ("state = 'queued' AND next_attempt_at <= :_now", "next_attempt_at"),
                ("state = 'sending' AND lease_expires_at < :_now", "lease_expires_at"),
            )
        ):
            branches.append(
                f"SELECT id, next_attempt_at FROM (SELECT id, next_attempt_at FROM jobs"
                f" WHERE {mine} AND {due} ORDER BY {order}, id LIMIT :_limit"
                f"{dialect.claim_lock}) AS due{i}{j}"
            )
    union = " UNION ALL ".join(branches)
    return f"SELECT id FROM ({union}) AS due ORDER BY next_attempt_at, id LIMIT :_limit"


@functools.cache
def _update_where(
    rule: Rule,
    names: tuple[str, ...],
    due: bool,
    destination: bool,
    kind: bool,
    owner: bool,
    limit: bool,
    dialect: Dialect,
) -> str:
    if not set(names) <= set(rule.sources):
        raise ValueError(f"{rule.name}: {names} are not among its sources {rule.sources}")
    set_list = assignments(rule, dialect)
    if due:
        if not (destination and limit) or owner:
            raise ValueError(f"{rule.name}: a claim takes a destination and a limit")
        # the state is checked again: another claim may have changed the row meanwhile
        condition = f"id IN ({claim(kind, dialect)}) AND {states(names)}"
        return dialect.sql(f"UPDATE jobs SET {set_list} WHERE {condition} RETURNING {COLUMNS}")
    conditions = ["destination = :_destination"] if destination else []
    conditions += ["kind = :_kind"] if kind else []
    conditions.append(states(names))
    if owner:
        conditions.append("(:_owner = '' OR lease_owner = :_owner OR lease_expires_at < :_now)")
    condition = " AND ".join(conditions)
    if limit:
        condition = (
            f"id IN (SELECT id FROM jobs WHERE {condition}"
            f" ORDER BY next_attempt_at, id LIMIT :_limit{dialect.claim_lock})"
        )
    return dialect.sql(f"UPDATE jobs SET {set_list} WHERE {condition} RETURNING {COLUMNS}")


def where_values(where: Where) -> dict[str, Any]:
    return {
        "_destination": where.destination,
        "_kind": where.kind,
        "_owner": where.owner,
        "_limit": where.limit,
    }

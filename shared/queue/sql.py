"""What the SQL backends share: the ``Transaction`` over one connection, the readers, and
the pruning, written once with ``:name`` parameters (``compile.Dialect.sql`` writes them
in each driver's style).

A backend (``sqlite.SQLiteQueue``, ``postgres.PostgresQueue``) gives ``SqlQueue`` its
connections (``_write``: a write transaction; ``_rows``: one read), its ``Dialect``, where
``stats`` reads the counters (``COUNTS``: a table or a query with the columns
``destination, kind, state, n, delivered``) and how a pruned total is counted
(``_count``). Both backends hold the same tables (``jobs``, ``meta``, ``counts``,
``done_studies``; see ``dicomsync.queue.schema``), kept the same by their own DDL.
Thread-safe as the backend's connections are; raises ``QueueError`` from the backend.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from dicomsync.queue.base import DestinationStats, Job, NewJob, Queue, check_state
from dicomsync.queue.compile import COLUMNS, FIELDS, Dialect, update_one, update_where, where_values
from dicomsync.queue.records import KINDS, State
from dicomsync.queue.rules import Rule, Transaction, Where


class Runner(Protocol):
    """Runs one statement on the transaction's connection; its rows (mappings)."""

    def __call__(self, sql: str, params: Mapping[str, Any] = ...) -> list[Any]: ...


def job_of(row: Mapping[str, Any]) -> Job:
    values = {name: row[name] for name in FIELDS}
    values["rerun"] = bool(values["rerun"])
    return Job(**values)


FIND = "SELECT id, state, fingerprint FROM jobs WHERE kind = :kind AND resource = :resource" + (
    " AND destination = :destination"
)
PRUNED = (
    "SELECT id, fingerprint, delivered_count FROM done_studies"
    " WHERE destination = :destination AND resource = :resource"
)
# A pruned study job back in ``jobs`` as it was (its insert is counted by the triggers).
RESTORE = (
    "INSERT INTO jobs (id, kind, resource, destination, study_uid, state, next_attempt_at,"
    " fingerprint, outcome, delivered_count, queued_at, created_at, updated_at)"
    " SELECT id, 'study', resource, destination, study_uid, 'done', updated_at, fingerprint,"
    " outcome, delivered_count, updated_at, created_at, updated_at FROM done_studies"
    " WHERE destination = :destination AND resource = :resource"
)
SET_META = (
    "INSERT INTO meta (key, value) VALUES (:key, :value)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
# a number that only grows, whichever writer commits last
RAISE_META = (
    "INSERT INTO meta (key, value) VALUES (:key, :value) ON CONFLICT (key) DO UPDATE"
    " SET value = CASE WHEN CAST(excluded.value AS BIGINT) > CAST(meta.value AS BIGINT)"
    " THEN excluded.value ELSE meta.value END"
)
# done records of one destination and kind, done before :before: an index range (a done
# record's next_attempt_at is its done time, ``rules.DONE``)
OLD_DONE = (
    "destination = :destination AND kind = :kind AND state = 'done' AND next_attempt_at < :before"
)
ARCHIVE = (
    "INSERT INTO done_studies (destination, resource, id, study_uid, fingerprint, outcome,"
    " delivered_count, created_at, updated_at) SELECT destination, resource, id, study_uid,"
    " fingerprint, outcome, delivered_count, created_at, updated_at FROM jobs"
    f" WHERE {OLD_DONE} ON CONFLICT (destination, resource) DO UPDATE SET id = excluded.id,"
    " study_uid = excluded.study_uid, fingerprint = excluded.fingerprint,"
    " outcome = excluded.outcome, delivered_count = excluded.delivered_count,"
    " created_at = excluded.created_at, updated_at = excluded.updated_at"
)


def _found(rows: list[Any]) -> tuple[int, State, str] | None:
    return (rows[0]["id"], rows[0]["state"], rows[0]["fingerprint"]) if rows else None


class SqlTransaction(Transaction):
    """``Transaction`` through one connection's ``run``, inside the backend's transaction."""

    def __init__(self, queue: SqlQueue, run: Runner, now: float) -> None:
        self.queue = queue
        self.run = run
        self.now = now
        self.sql = queue.dialect.sql

    def find(self, kind: str, resource: str, destination: str) -> tuple[int, State, str] | None:
        key = {"kind": kind, "resource": resource, "destination": destination}
        found = _found(self.run(self.sql(FIND), key))
        if found is None and kind == "study":
            pruned = self.run(self.sql(PRUNED), key)
            if pruned:  # back into ``jobs`` as it was, so every rule applies to it
                # (another node restoring it at the same moment: its record, counted once)
                self.run(self.sql(RESTORE + " ON CONFLICT DO NOTHING"), key)
                gone = self.run(
                    self.sql(
                        "DELETE FROM done_studies WHERE destination = :destination"
                        " AND resource = :resource RETURNING delivered_count"
                    ),
                    key,
                )
                if gone:
                    self.queue._count(
                        self.run, destination, "study", -1, -int(gone[0]["delivered_count"])
                    )
                found = _found(self.run(self.sql(FIND), key))
        return found

    def state_of(self, job_id: int) -> tuple[State, str] | None:
        rows = self.run(
            self.sql("SELECT state, destination FROM jobs WHERE id = :id"), {"id": job_id}
        )
        return (rows[0]["state"], rows[0]["destination"]) if rows else None

    def insert(self, new: NewJob) -> int | None:
        rows = self.run(
            self.sql(
                "INSERT INTO jobs (kind, resource, destination, study_uid, state,"
                " next_attempt_at, queued_at, created_at, updated_at) VALUES (:kind, :resource,"
                " :destination, :study_uid, 'queued', :now, :now, :now, :now)"
                " ON CONFLICT (kind, resource, destination) DO NOTHING RETURNING id"
            ),
            {
                "kind": new.kind,
                "resource": new.resource,
                "destination": new.destination,
                "study_uid": new.study_uid,
                "now": self.now,
            },
        )
        return int(rows[0]["id"]) if rows else None

    def apply(
        self, rule: Rule, job_id: int, args: Mapping[str, Any], token: str = ""
    ) -> tuple[State, str] | None:
        params = {**args, "_now": self.now, "_id": job_id, "_token": token}
        rows = self.run(update_one(rule, self.queue.dialect), params)
        return (rows[0]["state"], rows[0]["destination"]) if rows else None

    def apply_where(self, rule: Rule, where: Where, args: Mapping[str, Any]) -> list[Job]:
        params = {**args, **where_values(where), "_now": self.now}
        return [job_of(r) for r in self.run(update_where(rule, where, self.queue.dialect), params)]

    def set_meta(self, key: str, value: str) -> None:
        self.run(self.sql(SET_META), {"key": key, "value": value})

    def raise_meta(self, key: str, value: int) -> None:
        self.run(self.sql(RAISE_META), {"key": key, "value": str(int(value))})


class SqlQueue(Queue):
    """The readers, ``_transaction``, ``_peek`` and ``prune`` over a backend's connections."""

    dialect: Dialect
    COUNTS = "counts"
    clock: Any

    @abstractmethod
    def _write(self) -> AbstractContextManager[Runner]:
        """A write transaction on one connection: its ``Runner``."""

    @abstractmethod
    def _rows(self, sql: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[Any]:
        """One read (``sql`` already in the dialect)."""

    @abstractmethod
    def _count(self, run: Runner, destination: str, kind: str, n: int, delivered: int) -> None:
        """Add to the pruned totals of a destination and kind, in ``run``'s transaction."""

    transaction_class: type[SqlTransaction] = SqlTransaction

    def _read(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        return self._rows(self.dialect.sql(sql), params or {})

    @contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        with self._write() as run:
            yield self.transaction_class(self, run, self.clock())

    def _peek(self, new: NewJob) -> tuple[int, State, str] | None:
        key = {"kind": new.kind, "resource": new.resource, "destination": new.destination}
        found = _found(self._read(FIND, key))
        if found is None and new.kind == "study":
            rows = self._read(PRUNED, key)
            if rows:
                return (rows[0]["id"], "done", rows[0]["fingerprint"])
        return found

    # --- storage-wide ------------------------------------------------------------------
    def prune(self, kind: str, before: float) -> int:
        """``study`` jobs leave what duplicate avoidance needs in ``done_studies``. The
        pruned totals count the rows this transaction deleted (``_delete_done``), so two
        nodes pruning at once count each record once."""
        pruned = 0
        for destination in self._destinations(kind, "done"):
            params = {"destination": destination, "kind": kind, "before": before}
            with self._write() as run:
                self._lock_prune(run, destination, kind)
                if kind == "study":
                    run(self.dialect.sql(ARCHIVE), params)
                n, delivered = self._delete_done(run, params)
                if n:
                    self._count(run, destination, kind, n, delivered)
                pruned += n
        return pruned

    def _lock_prune(self, run: Runner, destination: str, kind: str) -> None:
        """Hold off, until this transaction ends, the writers that must not meet a prune of
        ``destination`` and ``kind`` half done (none here: SQLite has one writer)."""

    def _delete_done(self, run: Runner, params: Mapping[str, Any]) -> tuple[int, int]:
        """Delete the old done records; (how many, their delivered instances). Counted
        before the delete: right where writers wait for each other (SQLite)."""
        rows = run(
            self.dialect.sql(
                "SELECT COUNT(*) AS n, COALESCE(SUM(delivered_count), 0) AS delivered"
                f" FROM jobs WHERE {OLD_DONE}"
            ),
            params,
        )
        n, delivered = int(rows[0]["n"]), int(rows[0]["delivered"])
        if n:
            run(self.dialect.sql(f"DELETE FROM jobs WHERE {OLD_DONE}"), params)
        return n, delivered

    def _destinations(self, kind: str | None, state: str) -> list[str]:
        kind_sql = " AND kind = :kind" if kind else ""
        rows = self._read(
            f"SELECT DISTINCT destination FROM {self.COUNTS} AS c"
            f" WHERE n > 0 AND state = :state{kind_sql}",
            {"kind": kind, "state": state},
        )
        return [r["destination"] for r in rows]

    # --- readers ------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        rows = self._read(f"SELECT {COLUMNS} FROM jobs WHERE id = :id", {"id": int(job_id)})
        return job_of(rows[0]) if rows else None

    def find(self, kind: str, resource: str, destination: str) -> Job | None:
        rows = self._read(
            f"SELECT {COLUMNS} FROM jobs WHERE kind = :kind AND resource = :resource"
            " AND destination = :destination",
            {"kind": kind, "resource": resource, "destination": destination},
        )
        return job_of(rows[0]) if rows else None

    def fingerprints(self, destination: str, kind: str = "study") -> dict[str, str]:
        key = {"destination": destination, "kind": kind}
        rows = self._read(
            "SELECT resource, fingerprint FROM jobs WHERE destination = :destination"
            " AND kind = :kind AND state = 'done'",
            key,
        )
        found = {r["resource"]: r["fingerprint"] for r in rows}
        if kind == "study":
            for r in self._read(
                "SELECT resource, fingerprint FROM done_studies WHERE destination = :destination",
                key,
            ):
                found.setdefault(r["resource"], r["fingerprint"])
        return found

    def jobs(
        self,
        state: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        *,
        kind: str | None = None,
    ) -> list[Job]:
        check_state(state)
        values = {"state": state, "destination": destination, "kind": kind}
        where = [f"{column} = :{column}" for column, value in values.items() if value is not None]
        sql = f"SELECT {COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, id DESC LIMIT :limit"
        return [job_of(r) for r in self._read(sql, {**values, "limit": max(0, int(limit))})]

    def stats(self, kind: str | None = None) -> dict[str, DestinationStats]:
        """From the counters, plus an index lookup per destination and kind for the oldest
        waiting job and the last error: O(destinations), whatever the backlog."""
        now = self.clock()
        out: dict[str, DestinationStats] = {}
        kind_sql = " AND c.kind = :kind" if kind else ""
        for r in self._read(
            "SELECT c.destination, c.kind, c.state, c.n, c.delivered, CASE WHEN c.state IN"
            " ('queued', 'sending') THEN (SELECT MIN(queued_at) FROM jobs j WHERE"
            " j.destination = c.destination AND j.kind = c.kind AND j.state = c.state) END"
            f" AS oldest FROM {self.COUNTS} AS c WHERE c.n > 0{kind_sql}"
            " ORDER BY c.destination, c.kind",
            {"kind": kind},
        ):
            s = out.setdefault(r["destination"], DestinationStats(r["destination"]))
            state = "done" if r["state"] == "pruned" else r["state"]
            setattr(s, state, getattr(s, state) + int(r["n"]))
            s.delivered += int(r["delivered"])
            if r["kind"] not in s.kinds:
                s.kinds.append(r["kind"])
            if r["oldest"] is not None:
                age = max(0.0, now - r["oldest"])
                s.oldest_queued_age = max(s.oldest_queued_age or 0.0, age)
        for s in out.values():
            for k in s.kinds:
                rows = self._read(
                    "SELECT last_error, updated_at FROM jobs WHERE destination = :destination"
                    " AND kind = :kind AND last_error != '' ORDER BY updated_at DESC LIMIT 1",
                    {"destination": s.destination, "kind": k},
                )
                if rows and (s.last_error_at is None or rows[0]["updated_at"] > s.last_error_at):
                    s.last_error, s.last_error_at = rows[0]["last_error"], rows[0]["updated_at"]
        return out

    def next_due(self, destination: str, kind: str | None = None) -> float | None:
        """The earliest of two index lookups per kind (queued: next_attempt_at; sending:
        lease_expires_at), never a scan."""
        branches = []
        params: dict[str, Any] = {"destination": destination}
        for i, k in enumerate([kind] if kind else KINDS):
            params[f"k{i}"] = k
            mine = f"destination = :destination AND kind = :k{i}"
            branches += [
                f"SELECT MIN(next_attempt_at) AS due FROM jobs WHERE {mine} AND state = 'queued'",
                f"SELECT MIN(lease_expires_at) AS due FROM jobs WHERE {mine} AND state = 'sending'",
            ]
        rows = self._read(
            f"SELECT MIN(due) AS due FROM ({' UNION ALL '.join(branches)}) AS d", params
        )
        due = rows[0]["due"] if rows else None
        return float(due) if due is not None else None

    # --- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = :key", {"key": key})
        return str(rows[0]["value"]) if rows else None

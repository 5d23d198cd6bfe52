"""The Sink contract, the registry of sink kinds, and the delivered-events ledger.

A sink receives ``dicomsync.tags.Event`` objects (instance tags, dose summaries,
per-irradiation-event records) and can answer index queries for conditional
replication. Kinds: ``splunk_hec`` (Splunk HTTP Event Collector + search API),
``sqlite_index`` (the embedded index) and ``postgresql_index`` (the same index in a
PostgreSQL database several nodes share).

Contract
--------
``send(events) -> SendResult``
    Deliver the events; return ``SendResult(delivered, rejected)``. ``delivered``: the
    ids that the sink now holds: the ones sent now and the ones it already had (a
    repeat is free: nothing goes over the wire). ``rejected``: id -> reason for the
    events the sink refuses for good (malformed for Splunk); they are not in
    ``delivered``, and logged. The result belongs to this call alone, so concurrent
    callers need no lock to read it. Any other failure raises:

    - ``SinkRetryable``: busy, 5xx, network; try the same events again later;
    - ``SinkFatal``: bad token, wrong index, bad TLS; stop this sink (keep its events)
      until the configuration or the environment is fixed.

    Events delivered before the failure are recorded, and available on the exception
    as ``delivered_before(exc)``; those refused before it as ``rejected_before(exc)``.
    A sink never drops events silently.
``submit(events) -> SendResult`` and ``flush() -> SendResult``
    The pipelined form of ``send``, for long backfills (``dicomsync index``):
    ``submit`` starts delivering and may return before the sink has confirmed the
    events (Splunk with indexer acknowledgement keeps batches in flight); ``flush``
    waits for everything submitted. Each returns the ids confirmed during that call
    (by it or by earlier submits) and the events refused during it, and raises as
    ``send`` does. By default ``submit``
    is ``send`` and ``flush`` has nothing to wait for.
``has(ids) -> set[str]``
    Which of ``ids`` the sink already holds (the ledger), without sending anything.
``query(where) -> Iterator[StudyHit]``
    The studies with at least one event matching ``where`` (an ``IndexQuery``).
``stats() -> dict``
    Counters for status pages (never secrets).
``close()``
    Release connections and files.

Delivered ledger
----------------
``dicomsync index`` and the plugin must not send an event twice. ``sqlite_index``
is its own ledger (its ``events`` table). ``splunk_hec`` keeps a small SQLite file
(``Ledger``) of the ids Splunk accepted (or acknowledged, with ``Ack``): option
``StateFile``, default ``<base_dir>/.dicomsync/sinks/<key>.ledger.sqlite``, where
``base_dir`` is the config file's folder for the CLI and the plugin's
``StateDirectory`` inside Orthanc. When the plugin's queue is on PostgreSQL, every node's
sinks share one ledger table there instead (``open_ledger``, ``shared_ledger``,
``dicomsync.sinks.pg_ledger``). Ids are stable (``<SOP UID>:instance``,
``…:dose_report``, ``…:event:<Irradiation Event UID>``), so the same instance read
from a folder or from Orthanc is recognised.

For the plugin (how to use this API)
------------------------------------
::

    sink = config.sink(key)                  # or build_sink(key, section, state_dir)
    events = events_from_bytes(data, source=f"orthanc:{instance_id}")
    try:
        result = sink.send(events)
    except SinkRetryable:  -> queue.retry_later(job)     (delivered_before(exc) are done)
    except SinkFatal:      -> pause the sink's lane, keep its jobs, report the message
    done when every event id is in result.delivered or in result.rejected

A sink never retries by itself: ``SinkRetryable`` goes straight to the caller, which
retries in one layer with ``dicomsync.queue.base.RetryPolicy`` (the plugin's queue,
or ``dicomsync index``).

``send`` is thread-safe per sink object. Build one sink per key and reuse it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dicomsync.errors import SinkError, SinkFatal, SinkRetryable
from dicomsync.identity import safe_component
from dicomsync.index_query import IndexQuery
from dicomsync.registry import Registry
from dicomsync.tags import Event

if TYPE_CHECKING:
    from dicomsync.pg import PgTarget
    from dicomsync.sinks.pg_ledger import PgLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class StudyHit:
    """A study an index query matched, with how many of its events matched."""

    study_uid: str
    events: int = 0


@dataclass(frozen=True)
class SendResult:
    """What one ``send``/``submit``/``flush`` call did: ``delivered``, the ids the sink now
    holds; ``rejected``, id -> reason of the events it refused for good (never delivered).
    ``a | b`` adds two calls' results up (a retry loop's attempts)."""

    delivered: frozenset[str] = frozenset()
    rejected: Mapping[str, str] = field(default_factory=dict)

    def __or__(self, other: SendResult) -> SendResult:
        return SendResult(self.delivered | other.delivered, {**self.rejected, **other.rejected})


def delivered_before(exc: BaseException) -> set[str]:
    """The ids a failed ``send`` delivered (and recorded) before it raised."""
    value = getattr(exc, "delivered", None)
    return set(value) if value else set()


def rejected_before(exc: BaseException) -> dict[str, str]:
    """The events a failed ``send`` saw refused for good before it raised (id -> reason)."""
    value = getattr(exc, "rejected", None)
    return dict(value) if isinstance(value, Mapping) else {}


def with_delivered(
    exc: SinkError, delivered: Iterable[str], rejected: Mapping[str, str] | None = None
) -> SinkError:
    """``exc`` carrying what its call still did (``delivered_before``/``rejected_before``)."""
    exc.delivered = set(delivered)
    exc.rejected = dict(rejected or {})
    return exc


class Sink(ABC):
    """A destination for events; see the module docstring for the contract."""

    kind: ClassVar[str]
    label: ClassVar[str]
    Options: ClassVar[type]  # the dataclass declaring its section's options (dicomsync.options)

    def __init__(self, key: str) -> None:
        self.key = key

    @classmethod
    @abstractmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Sink:
        """Build from a config section; ConfigError when invalid."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The section that rebuilds this sink (never a secret)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for ``sink list``."""

    @abstractmethod
    def send(self, events: Sequence[Event]) -> SendResult: ...

    def submit(self, events: Sequence[Event]) -> SendResult:
        """Start delivering; may return before the events are confirmed (see above)."""
        return self.send(events)

    def flush(self) -> SendResult:
        """Wait for every submitted event; the ids confirmed by this wait."""
        return SendResult()

    @abstractmethod
    def has(self, ids: Collection[str]) -> set[str]: ...

    @abstractmethod
    def query(self, where: IndexQuery) -> Iterator[StudyHit]: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027
        """Release connections and files."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key!r}: {self.describe()}>"


SINKS: Registry[Sink] = Registry("sink")
SINKS.register("splunk_hec", "dicomsync.sinks.splunk_hec:SplunkHec")
SINKS.register("sqlite_index", "dicomsync.sinks.sqlite_index:SqliteIndex")
SINKS.register("postgresql_index", "dicomsync.sinks.postgresql_index:PostgresIndex")


def build_sink(key: str, section: Mapping[str, Any], base_dir: Path) -> Sink:
    """Instantiate a sink from its config section through the registry."""
    return SINKS.build(key, section, base_dir)


def default_state_file(base_dir: Path, key: str) -> Path:
    return base_dir / ".dicomsync" / "sinks" / f"{safe_component(key)}.ledger.sqlite"


def existing_ids(conn: sqlite3.Connection, table: str, ids: Collection[str]) -> set[str]:
    """Which of ``ids`` are in ``table``'s ``id`` column (queried in chunks of 500)."""
    found: set[str] = set()
    items = list(ids)
    for start in range(0, len(items), 500):
        chunk = items[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(f"SELECT id FROM {table} WHERE id IN ({marks})", chunk).fetchall()
        found.update(r[0] for r in rows)
    return found


def connect(path: Path, what: str) -> sqlite3.Connection:
    """An SQLite connection in WAL mode, shared by threads behind the caller's lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
    except (OSError, sqlite3.Error) as exc:
        raise SinkFatal(f"{what}: cannot open {path}: {exc}") from None


_SHARED_LEDGER: ContextVar[PgTarget | None] = ContextVar("shared_ledger", default=None)


@contextmanager
def shared_ledger(target: PgTarget | None) -> Iterator[None]:
    """Sinks built inside this block keep their delivered ledger in ``target`` (PostgreSQL,
    shared by every node), not in their SQLite file; ``None`` changes nothing."""
    token = _SHARED_LEDGER.set(target)
    try:
        yield
    finally:
        _SHARED_LEDGER.reset(token)


def open_ledger(path: Path, sink: str) -> Ledger | PgLedger:
    """The delivered ledger of sink ``sink``: the SQLite file ``path``, or the shared
    PostgreSQL table inside ``shared_ledger`` (``dicomsync.sinks.pg_ledger``)."""
    target = _SHARED_LEDGER.get()
    if target is None:
        return Ledger(path)
    from dicomsync.sinks.pg_ledger import PgLedger

    return PgLedger(target, sink)


class Ledger:
    """The ids a sink has delivered, in a small SQLite file (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        self._conn = connect(path, "delivered ledger")
        with self._lock:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS delivered (id TEXT PRIMARY KEY, at REAL NOT NULL)"
            )

    def known(self, ids: Collection[str]) -> set[str]:
        with self._lock:
            return existing_ids(self._conn, "delivered", ids)

    def add(self, ids: Iterable[str]) -> None:
        now = time.time()
        rows = [(i, now) for i in ids]
        if not rows:
            return
        with self._lock:
            if self._closed:  # a stop closed it under this send: the job stays and is retried
                raise SinkRetryable(f"delivered ledger {self.path} is closed (stopping)")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT OR IGNORE INTO delivered (id, at) VALUES (?, ?)", rows
                )
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:  # no transaction began, or the connection is gone
                    pass
                raise SinkFatal(f"delivered ledger {self.path}: cannot write: {exc}") from None

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM delivered").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

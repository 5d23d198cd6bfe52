"""The dose page's data, read from an index's tables: CT dose events, dose report totals
and the studies by modality, for ``dicomsync.console.dose`` (the page and the report).

Contract
--------
``DoseReader(connect, dialect, cache=None)`` reads the ``fields(event, path, text, num)``
table every index holds (and ``MAX(rowid)``/the first id of ``events``; see
``dicomsync.sinks.sqlite_index``): ``DoseReader.sqlite(path)`` opens a ``sqlite_index``
file read-only; ``DoseReader(connect, "postgresql")`` reads the PostgreSQL index (the
same tables and SQL, ``%s`` for ``?``). ``snapshot()`` returns an immutable ``Snapshot``
of every CT dose event, dose report total and study modality in the index.

The numbers are the flattened events' own (``dicomsync.tags``), nothing recomputed:

- a dose event (it has ``EventType``) with ``CT Dose.Mean CTDIvol`` or ``CT Dose.DLP`` is
  a ``DoseEvent``; its protocol is its ``Acquisition Protocol``, else the study's
  ``StudyDescription``; its scanner the ``StationName``, else ``ManufacturerModelName``,
  else the ``Device Observer UID``; its date the ``StudyDate`` ("" without one).
  Cumulative reports (Siemens writes one after each exposure) repeat their events: a
  study's ``Irradiation Event UID`` counts once. Other dose events (fluoroscopy,
  radiography, mammography) are not CT events and are left out;
- a dose report with ``X-Ray Radiation Dose Report.CT Accumulated Dose Data.CT Dose
  Length Product Total`` gives its study's total DLP; of several reports of one study the
  largest counts (a cumulative total only grows);
- any other event with ``Modality`` (the instances) gives (date, modality, study).

Speed: values are read from ``fields`` by ranges of event rowid (``CHUNK_ROWS``), never
from the JSON bodies; what was extracted is kept in memory and, with ``cache``, in a
summary file (``dose_cache``), so a restart reads a few MB. Each ``snapshot()`` reads only
the events added since the last one (rowids only grow: a replaced event is deleted and
stored again as a new row; deleted rows are then found by counting and forgotten). The
first read of a big index is slow (minutes for 8 GB): the page runs it on a thread
(``read_in_background``, ``ready``, ``progress``) and ``snapshot_now`` never waits for it.
``bench/bench_dose.py`` measures it. Thread-safe. Database errors are ``SinkFatal``
(one line).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dicomsync.console.dose_cache import Loaded, SummaryCache
from dicomsync.errors import SinkFatal

log = logging.getLogger(__name__)

TOTAL_DLP = "X-Ray Radiation Dose Report.CT Accumulated Dose Data.CT Dose Length Product Total"
CTDIVOL = "CT Dose.Mean CTDIvol"
DLP = "CT Dose.DLP"
EVENT_MARK = "EventType"  # every dose event has it, no other event does
CHUNK_ROWS = 50_000  # event rowids read per query (bounded memory, progress, the cache)
SCANNER = ("StationName", "ManufacturerModelName", "Device Observer UID")

CONTEXT = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "StationName",
    "ManufacturerModelName",
    "Device Observer UID",
)
PATHS = (
    *CONTEXT,
    "Modality",
    "EventType",
    "Irradiation Event UID",
    "Acquisition Protocol",
    "Target Region",
    CTDIVOL,
    DLP,
    TOTAL_DLP,
)


@dataclass(frozen=True, slots=True)
class DoseEvent:
    """One CT irradiation event, as the page shows and counts it."""

    study_uid: str
    date: str  # YYYYMMDD, "" when the event has no StudyDate
    accession: str
    scanner: str
    protocol: str
    region: str
    ctdivol: float | None
    dlp: float | None


@dataclass(frozen=True, slots=True)
class StudyTotal:
    """A study's dose report total (``CT Dose Length Product Total``, mGy·cm)."""

    study_uid: str
    date: str
    accession: str
    description: str
    scanner: str
    total_dlp: float


@dataclass(frozen=True)
class Snapshot:
    events: tuple[DoseEvent, ...]
    totals: tuple[StudyTotal, ...]  # one per study, the largest report total
    modalities: tuple[tuple[str, str, str], ...]  # (date, modality, study_uid), distinct


Values = dict[str, tuple[Any, Any]]  # path -> (text, num), the first value of a list


def _text(values: Values, *keys: str) -> str:
    for key in keys:
        value = values.get(key)
        if value is not None and value[0] not in (None, ""):
            return str(value[0])
    return ""


def _num(values: Values, key: str) -> float | None:
    value = values.get(key)
    return None if value is None or value[1] is None else float(value[1])


def _date(values: Values) -> str:
    date = _text(values, "StudyDate").replace("-", "")
    return date[:8] if len(date) >= 8 and date[:8].isdigit() else ""


class DoseReader:
    """Reads the dose data of one index; see the module docstring."""

    def __init__(
        self, connect: Callable[[], Any], dialect: str = "sqlite", *, cache: Path | None = None
    ) -> None:
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self._connect = connect
        self._dialect = dialect
        self._lock = threading.Lock()
        self._conn: Any = None
        self._cache = SummaryCache(cache) if cache is not None else None
        self._fingerprint: str | None = None
        self._last = 0  # highest event rowid read
        # every dose event by event rowid: (dedup key, the CT event or None for others)
        self._events: dict[int, tuple[tuple[str, str], DoseEvent | None]] = {}
        self._reports: dict[int, StudyTotal | None] = {}  # CT dose reports (a total DLP)
        self._modalities: set[tuple[str, str, str]] = set()
        self._snapshot: Snapshot | None = None
        self.progress: tuple[int, int] = (0, 0)  # (rowid read, highest rowid) while reading
        self.error = ""  # why the last background read failed
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    @classmethod
    def sqlite(cls, path: Path, *, cache: Path | None = None) -> DoseReader:
        """A reader of the ``sqlite_index`` file ``path`` (opened read-only)."""

        def connect() -> sqlite3.Connection:
            if not Path(path).exists():
                raise SinkFatal(f"dose: no index at {path}")
            uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
            return conn

        return cls(connect, "sqlite", cache=cache)

    def close(self) -> None:
        with self._lock:
            self._close()
            if self._cache is not None:
                self._cache.close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    # --- SQL --------------------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._dialect == "postgresql":
            sql = sql.replace("?", "%s").replace("+f.path", "f.path")
        try:
            if self._conn is None:
                self._conn = self._connect()
            cur = self._conn.cursor()
            cur.execute(sql, tuple(params))
            rows = [tuple(r) for r in cur.fetchall()]
            if self._dialect == "postgresql":
                self._conn.rollback()  # a reader keeps no transaction open
            return rows
        except sqlite3.Error as exc:
            self._close()
            raise SinkFatal(f"dose: cannot read the index: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                self._close()
                raise SinkFatal(f"dose: cannot read the index: {exc}") from None
            raise

    def _read(self, after: int, upto: int) -> Loaded:
        """The wanted fields of the events with ``after < rowid <= upto``. ``+f.path``
        keeps SQLite on the ``fields(event)`` index: one pass over the new rows (the rows
        of an event are together) instead of a lookup per value in the path index."""
        marks = ", ".join("?" for _ in PATHS)
        rows = self._query(
            "SELECT f.event, f.path, f.text, f.num FROM fields f"
            f" WHERE f.event > ? AND f.event <= ? AND +f.path IN ({marks})",
            (after, upto, *PATHS),
        )
        values: dict[int, Values] = {}
        for event, path, text, num in rows:
            v = values.setdefault(event, {})
            if path not in v:
                v[path] = (text, num)
        out = Loaded(upto)
        for event, v in values.items():
            if "EventType" in v:
                out.events[event] = _event(event, v)
            elif TOTAL_DLP in v:
                out.reports[event] = _total(v)
            elif "Modality" in v and "StudyInstanceUID" in v:  # instances (and other reports)
                out.modalities.add((_date(v), _text(v, "Modality"), _text(v, "StudyInstanceUID")))
        return out

    def _deleted(self) -> tuple[list[int], list[int]]:
        """A replaced event is deleted (and stored again with a higher rowid): the
        deleted ones we hold, found by counting (cheap: the path index)."""
        gone: list[list[int]] = []
        for path, kept in ((EVENT_MARK, self._events), (TOTAL_DLP, self._reports)):
            count = int(self._query("SELECT COUNT(*) FROM fields WHERE path = ?", (path,))[0][0])
            # fewer rows than we hold: some were deleted. More: rows written after our
            # MAX(rowid) (the plugin keeps writing); a deletion they hide is found at the
            # next refresh, which reads them, so no scan of the path is made for them.
            if count >= len(kept):
                gone.append([])
                continue
            live = {r[0] for r in self._query("SELECT event FROM fields WHERE path = ?", (path,))}
            gone.append([r for r in kept if r not in live])
            for rowid in gone[-1]:
                del kept[rowid]
        return gone[0], gone[1]

    def _reset(self) -> None:
        self._events.clear()
        self._reports.clear()
        self._modalities.clear()
        self._last = 0
        self._snapshot = None

    def _refresh(self) -> bool:
        first = self._query("SELECT id FROM events ORDER BY rowid LIMIT 1", ())
        fingerprint = str(first[0][0]) if first else ""
        top = int(self._query("SELECT MAX(rowid) FROM events", ())[0][0] or 0)
        reset = False
        if fingerprint != self._fingerprint:  # first call, or another index at this place
            self._reset()
            self._fingerprint = fingerprint
            loaded = self._cache.load(fingerprint) if self._cache and fingerprint else None
            if loaded is not None and loaded.last <= top:
                self._events, self._reports = loaded.events, loaded.reports
                self._modalities, self._last = loaded.modalities, loaded.last
            else:
                reset = True
        if top < self._last:  # rowids went back: the index was made again
            self._reset()
            reset = True
        if top == self._last and self._snapshot is not None:
            return False
        before = self._last
        while self._last < top or reset:
            upto = min(self._last + CHUNK_ROWS, top)
            self.progress = (self._last, top)
            part = self._read(self._last, upto)
            self._events.update(part.events)
            self._reports.update(part.reports)
            self._modalities |= part.modalities
            self._last = upto
            if self._cache is not None:
                self._cache.save(fingerprint, upto, part.events.items(), part.reports.items(),
                                 part.modalities, reset=reset)  # fmt: skip
            reset = False
        if self._last == before:  # nothing new: nothing replaced (a replaced event is new)
            self.progress = (top, top)
            return True
        gone_events, gone_reports = self._deleted()
        if self._cache is not None and (gone_events or gone_reports):
            self._cache.save(fingerprint, self._last, (), (), (), gone_events, gone_reports)
        self.progress = (top, top)
        return True

    def _fresh(self) -> Snapshot:
        if self._refresh() or self._snapshot is None:
            self._snapshot = _build(self._events, self._reports, self._modalities)
        return self._snapshot

    def snapshot(self) -> Snapshot:
        """Every CT dose event, study total and modality in the index now."""
        with self._lock:
            return self._fresh()

    @property
    def ready(self) -> bool:
        """Has the index been read once (so a refresh reads only what is new)?"""
        return self._snapshot is not None

    def snapshot_now(self) -> Snapshot | None:
        """``snapshot()``, or at once the last one (None before the first) while another
        thread is reading the index."""
        if not self._lock.acquire(blocking=False):
            return self._snapshot
        try:
            return self._fresh()
        finally:
            self._lock.release()

    def read_in_background(self, wait: float = 0.0) -> bool:
        """Start the first read of the index on a thread (once), wait up to ``wait``
        seconds for it; True when the index has been read."""
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._background, name="dicomsync-dose-read", daemon=True
                )
                self._thread.start()
            thread = self._thread
        thread.join(wait)
        return self.ready

    def _background(self) -> None:
        self.error = ""
        try:
            self.snapshot()
        except Exception as exc:
            self.error = str(exc)
            log.warning("dose: reading the index failed: %s", exc)


def _event(rowid: int, v: Values) -> tuple[tuple[str, str], DoseEvent | None]:
    study = _text(v, "StudyInstanceUID")
    key = (study, _text(v, "Irradiation Event UID") or f"#{rowid}")
    ctdivol, dlp = _num(v, CTDIVOL), _num(v, DLP)
    if ctdivol is None and dlp is None:
        return key, None  # not a CT event (fluoroscopy, radiography, mammography)
    return key, DoseEvent(
        study,
        _date(v),
        _text(v, "AccessionNumber"),
        _text(v, *SCANNER),
        _text(v, "Acquisition Protocol", "StudyDescription") or "(none)",
        _text(v, "Target Region"),
        ctdivol,
        dlp,
    )


def _total(v: Values) -> StudyTotal | None:
    study, total = _text(v, "StudyInstanceUID"), _num(v, TOTAL_DLP)
    if not study or total is None:
        return None
    return StudyTotal(
        study,
        _date(v),
        _text(v, "AccessionNumber"),
        _text(v, "StudyDescription"),
        _text(v, *SCANNER),
        total,
    )


def _build(
    events: dict[int, tuple[tuple[str, str], DoseEvent | None]],
    reports: dict[int, StudyTotal | None],
    modalities: set[tuple[str, str, str]],
) -> Snapshot:
    out: list[DoseEvent] = []
    seen: set[tuple[str, str]] = set()
    for rowid in sorted(events):
        key, event = events[rowid]
        if event is None or key in seen:  # a cumulative report repeats the earlier events
            continue
        seen.add(key)
        out.append(event)
    totals: dict[str, StudyTotal] = {}
    for total in reports.values():
        if total is not None:
            best = totals.get(total.study_uid)
            if best is None or total.total_dlp > best.total_dlp:
                totals[total.study_uid] = total
    return Snapshot(tuple(out), tuple(totals.values()), tuple(sorted(modalities)))

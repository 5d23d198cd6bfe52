"""The dose page ``/dicomsync/ui/dose`` and ``dicomsync dose report``: one code for both.

``render(reader, flt, levels, ...)`` is the whole page as HTML: the served page
(``page(ctx)``, stylesheet and scripts from ``/dicomsync/ui/static/``, a date-range form,
CSV links to ``dose?csv=<table>``) or, with ``standalone=True``, the report: one file with
the stylesheet, Debian's Chart.js and our script inlined and the CSV exports as
``data:`` links, so it opens offline (``dicomsync dose report``). What it shows is
``dose_view`` over ``dose_query``'s snapshot of an index; see those modules.

Query string of the page: ``since``/``until`` (``YYYY-MM-DD``), ``index`` (a sink key,
when several indexes are configured), ``csv`` (``protocols``, ``scanners``, ``outliers``,
``studies``, ``days``: that table, every row, as ``text/csv``).

The index is the ``Dose.Index`` sink, else the first ``sqlite_index`` or
``postgresql_index`` of ``DicomSync.Sinks``; reference levels are ``Dose.ReferenceLevels``
(``dose_levels``). One ``DoseReader`` per index is kept for the life of the process, with
its summary cache in ``StateDirectory/dose/``, so the page reads only what was added since
its last request; the first read of an index runs on a thread and the page answers 503
("reading the dose events for the first time") until it is done.

CSV cells are the table's text; a text cell starting with ``=``, ``+``, ``-`` or ``@`` gets a
leading ``'`` so a spreadsheet shows it instead of running it (values come from DICOM).
Errors: a bad date is ``HttpError`` 400; a bad ``Dose`` section or an unreadable index is
shown on the page (500/503).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from dicomsync.config import resolve_path
from dicomsync.console import dose_view
from dicomsync.console.dose_levels import Levels
from dicomsync.console.dose_query import DoseReader
from dicomsync.console.dose_view import DoseFilter, Summary, parse_date, show_date, summarize
from dicomsync.console.html import Html, document, esc, notice, tag
from dicomsync.console.pages import PageContext, View
from dicomsync.errors import ConfigError, DicomSyncError, SinkFatal
from dicomsync.options import parse
from dicomsync.service.rest_common import HttpError, Reply

if TYPE_CHECKING:
    from dicomsync.routing import SyncConfig

log = logging.getLogger(__name__)

INDEX_KINDS = ("sqlite_index", "postgresql_index")
FIRST_READ_WAIT = 2.0  # seconds a request waits for the first read of an index
TITLE = "Dose"

_readers: dict[tuple[str, str], DoseReader] = {}
_readers_lock = threading.Lock()


def reader_for(
    kind: str,
    section: Mapping[str, Any],
    base: Path,
    *,
    cache: Path | None = None,
    shared: bool = True,
) -> DoseReader:
    """A reader of one index sink section; ``shared``: the process's one reader of it
    (built on first use and kept, so each page reads only what is new)."""
    if kind == "sqlite_index":
        ident = str(resolve_path(str(section.get("Path") or ""), base))
    elif kind == "postgresql_index":
        ident = repr(sorted((k, str(v)) for k, v in section.items()))
    else:
        raise ConfigError(f"dose: a {kind} sink is not an index (use {' or '.join(INDEX_KINDS)})")
    with _readers_lock:
        reader = _readers.get((kind, ident)) if shared else None
        if reader is None:
            if kind == "sqlite_index":
                reader = DoseReader.sqlite(Path(ident), cache=cache)
            else:
                reader = postgresql_reader(section, cache)
            if shared:
                _readers[(kind, ident)] = reader
        return reader


def postgresql_reader(section: Mapping[str, Any], cache: Path | None) -> DoseReader:
    """A reader of a ``postgresql_index`` sink: its own connection, made as the sink
    makes its own (``Url``, ``PasswordEnv`` read at each connection, ``Schema``)."""
    from dicomsync.pg import PgTarget
    from dicomsync.sinks.postgresql_index import PostgresIndexOptions

    where = "postgresql_index sink"
    opts = parse(PostgresIndexOptions, section, where)
    target = PgTarget.checked(opts.url, opts.password_env, opts.schema, where)
    return DoseReader(lambda: target.connect(autocommit=False), "postgresql", cache=cache)


def filter_from(get: Mapping[str, str]) -> DoseFilter:
    try:
        return DoseFilter(
            parse_date(get.get("since"), "since"), parse_date(get.get("until"), "until")
        )
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None


def csv_text(summary: Summary, name: str) -> str:
    """The table ``name`` (every row) as CSV."""
    if name not in dose_view.TABLES:
        raise HttpError(400, f"csv must be one of {', '.join(dose_view.TABLES)}")
    header, rows = dose_view.rows(summary, name)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return out.getvalue()


def _cell(value: str) -> str:
    """A text cell that a spreadsheet would run as a formula gets a leading quote
    (values come from DICOM files: ``=HYPERLINK(…)`` in an accession number is input)."""
    if value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def render(
    reader: DoseReader,
    flt: DoseFilter,
    levels: Levels,
    *,
    standalone: bool = False,
    root: str = "",
    index: str = "",
    indexes: tuple[str, ...] = (),
    problem: str = "",
) -> str:
    """The dose page (or, ``standalone``, the report file) as HTML."""
    summary = summarize(reader.snapshot(), flt, levels)
    return document(TITLE, body(summary, standalone=standalone, index=index, indexes=indexes,
                                problem=problem, root=root), root=root, active="dose",
                    standalone=standalone)  # fmt: skip


def body(
    summary: Summary,
    *,
    standalone: bool,
    index: str = "",
    indexes: tuple[str, ...] = (),
    problem: str = "",
    root: str = "",
) -> Html:
    """The page's body; links are ``root`` + ``dose?…`` (``root`` ends with a slash)."""
    flt = summary.flt
    if standalone:

        def link(name: str) -> str:
            return "data:text/csv;charset=utf-8," + quote(csv_text(summary, name))

        head = tag("p", f"Dose report of index {index or '?'}, {flt.text()}.", class_="muted")
    else:

        def link(name: str) -> str:
            query = {"csv": name, "since": flt.since, "until": flt.until, "index": index}
            return f"{root}dose?" + urlencode({k: v for k, v in query.items() if v})

        form = _form(flt, index, indexes, root)
        head = Html((notice(problem, "warning") if problem else "") + form)
    return dose_view.body(summary, head=head, csv_link=link)


def _form(flt: DoseFilter, index: str, indexes: tuple[str, ...], root: str) -> Html:
    fields = [
        f'<label>From <input type="date" name="since" value="{esc(show_date(flt.since))}"></label>',
        f'<label>To <input type="date" name="until" value="{esc(show_date(flt.until))}"></label>',
    ]
    if len(indexes) > 1:
        options = "".join(tag("option", k, value=k, selected=k == index) for k in indexes)
        fields.append(f'<label>Index <select name="index">{options}</select></label>')
    elif index:
        fields.append(f'<input type="hidden" name="index" value="{esc(index)}">')
    fields.append('<button type="submit">Show</button>')
    action = esc(f"{root}dose")
    return Html(f'<form class="filters" method="get" action="{action}">{"".join(fields)}</form>')


def page(ctx: PageContext) -> View | Reply:
    """``GET /dicomsync/ui/dose``: see the module docstring."""
    cfg = ctx.service.config
    if cfg is None:
        return View(TITLE, notice("dicomsync is not configured: no index to read"), "dose", 503)
    flt = filter_from(ctx.get)
    try:
        levels = Levels.from_section(cfg.dose or None)
    except ConfigError as exc:
        return View(TITLE, notice(str(exc)), "dose", 500)
    indexes = index_keys(cfg)
    key = ctx.get.get("index") or default_index(cfg)
    if key not in cfg.sinks:
        text = (f"no index sink {key!r}" if key else "no index sink is configured") + (
            f" (index sinks: {', '.join(indexes)})" if indexes else
            ": add a sqlite_index to DicomSync.Sinks to see doses"
        )  # fmt: skip
        return View(TITLE, notice(text), "dose", 404 if key else 200)
    try:
        reader = _reader(cfg, key)
        # the first read of a big index takes a while: on a thread, a small one is waited for
        if not reader.ready and not reader.read_in_background(wait=FIRST_READ_WAIT):
            if reader.error:
                raise SinkFatal(reader.error)
            done, top = reader.progress
            return View(TITLE, notice(
                f"index {key!r}: reading the dose events for the first time"
                f" ({done:,} of {top:,} rows); reload this page in a moment", "info"),
                "dose", 503)  # fmt: skip
        snap = reader.snapshot_now()
        assert snap is not None
        summary = summarize(snap, flt, levels)
        if ctx.get.get("csv"):
            return Reply(
                200,
                csv_text(summary, ctx.get["csv"]),
                content_type="text/csv; charset=utf-8",
                headers={
                    "Content-Disposition": f'attachment; filename="dose-{ctx.get["csv"]}.csv"',
                    "Cache-Control": "no-store",
                },
            )
    except DicomSyncError as exc:
        return View(TITLE, notice(f"index {key!r}: {exc}"), "dose", 503)
    page_body = body(summary, standalone=False, index=key, indexes=indexes, root=ctx.root)
    return View(TITLE, page_body, "dose")


def index_keys(cfg: SyncConfig) -> tuple[str, ...]:
    """The keys of the index sinks the page can read."""
    return tuple(k for k, s in cfg.sinks.items() if s.get("Kind") in INDEX_KINDS)


def default_index(cfg: SyncConfig) -> str:
    """``Dose.Index``, else the first index sink ("" when there is none)."""
    chosen = cfg.dose.get("Index") if isinstance(cfg.dose, dict) else None
    indexes = index_keys(cfg)
    return str(chosen or (indexes[0] if indexes else ""))


def _reader(cfg: SyncConfig, key: str) -> DoseReader:
    section = cfg.sinks[key]
    cache = cfg.state_dir / "dose" / f"{_safe(key)}.sqlite"
    return reader_for(str(section.get("Kind")), section, cfg.sinks_base, cache=cache)


def warm(cfg: SyncConfig) -> None:
    """Start reading the default index on a thread at the service's start, so that the
    first request after a restart finds the summary loaded (its cache file and the rows
    added since) instead of reading it itself. Never raises: a page request reports the
    same problem."""
    key = default_index(cfg)
    if key not in cfg.sinks:
        return
    try:
        _reader(cfg, key).read_in_background(wait=0)
    except Exception as exc:  # the page shows it
        log.info("dose: the index %r is not read ahead: %s", key, exc)


def _safe(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def report(reader: DoseReader, flt: DoseFilter, levels: Levels, *, index: str) -> str:
    """``dicomsync dose report``: the page as one self-contained HTML file."""
    return render(reader, flt, levels, standalone=True, index=index)

"""The Splunk app in splunk/dicomsync/ (issue 14): its SPL uses only fields our events carry.

Splunk cannot run here. What can be checked without it is checked: every field name the
dashboards' SPL reads is extracted from the Simple XML (a small SPL reader: names in
single quotes, ``name=value`` of the base search, ``by``/``over`` clauses, function
arguments, ``table``/``dedup``/``fields``/``sort`` lists, bare names in ``eval``/``where``),
minus the names the SPL itself makes (``eval x=``, ``AS x``), and each must be a field of
the events our own flattening code (``dicomsync.tags.events_from_bytes``) makes from the
18 vendor RDSRs, the PET/CT study and the images, under the sourcetype the query names,
with Splunk's JSON field naming (``index_query.flatten_fields``: ``a.b``, ``list{}.c``).
Post-process searches (``<search base=…>``) may use only what their base search makes.
props.conf must cover the three sourcetypes with the settings the issue asks for.
"""

from __future__ import annotations

import configparser
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from dicomsync.index_query import flatten_fields
from dicomsync.tags import SOURCETYPES, events_from_bytes

from dicomdata import data_dir

APP = Path(__file__).resolve().parent.parent / "splunk" / "dicomsync"
VIEWS = APP / "default" / "data" / "ui" / "views"
META = {"index", "sourcetype", "source", "host", "_time", "earliest", "latest"}
KEYWORDS = {"AND", "OR", "NOT", "AS", "BY", "OVER", "as", "by", "over", "null", "true", "false"}
# fields Splunk itself adds to results: the count of stats/chart, _time of timechart
MADE_BY_SPLUNK = {"_time", "count"}


@cache
def event_fields() -> dict[str, frozenset[str]]:
    """Field names (Splunk's JSON naming) per sourcetype, from the real test files."""
    base = data_dir()
    files = [
        *sorted((base / "rdsr").glob("*.dcm")),
        *sorted((base / "study_petct_siemens").glob("*.dcm")),
        *sorted((base / "images").glob("*.dcm")),
    ]
    assert len([f for f in files if f.parent.name == "rdsr"]) == 18
    names: dict[str, set[str]] = {st: set() for st in SOURCETYPES}
    for path in files:
        for event in events_from_bytes(path.read_bytes(), source=str(path)):
            names[event.sourcetype].update(p for p, _ in flatten_fields(event.fields))
    return {st: frozenset(v) for st, v in names.items()}


# --- a small SPL reader ---------------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_QUOTED_NAME = re.compile(r"'([^']+)'")
_IDENT = re.compile(r"(?<![\w.$'\"])([A-Za-z_](?:[\w.]*\w)?)(?![\w.'\"])(\s*\()?")


def _split(query: str, sep: str) -> list[str]:
    """``query`` split at ``sep`` outside quotes and parentheses."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in query:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _names(expr: str) -> Iterator[str]:
    """Field names read by an expression: 'quoted' names and bare identifiers that are
    not functions, keywords, string literals or numbers."""
    expr = re.sub(r"\$\w+(?:\.\w+)?\$", "0", expr)  # dashboard tokens
    yield from _QUOTED_NAME.findall(expr)
    bare = _QUOTED_NAME.sub(" ", _STRING.sub(" ", expr))
    for name, call in _IDENT.findall(bare):
        if not call and name not in KEYWORDS and not name[0].isdigit():
            yield name


def spl_fields(query: str) -> tuple[str | None, set[str], set[str]]:
    """(sourcetype, fields read from events, names the query makes)."""
    query = re.sub(r"`[^`]*`", " ", query)  # macros (the index)
    segments = _split(query, "|")
    used: set[str] = set()
    made: set[str] = set()
    sourcetype = None

    def read(names: Iterator[str]) -> None:
        used.update(n for n in names if n not in made)

    first = segments[0]
    m = re.search(r'sourcetype="([^"]+)"', first)
    if m:
        sourcetype = m.group(1)
    for name in re.findall(r"('[^']+'|\"[^\"]+\"|[A-Za-z_][\w.]*)\s*!?=", first):
        name = name.strip("'\"")
        if name not in META:
            used.add(name)
    for seg in segments[1:]:
        command, _, rest = seg.partition(" ")
        if command == "eval":
            for assignment in _split(rest, ","):
                target, _, expr = assignment.partition("=")
                read(_names(expr))
                made.add(target.strip().strip("'"))
        elif command in ("stats", "timechart", "chart"):
            rest = re.sub(r"\bspan=\S+", " ", rest)
            parts = re.split(r"\bby\b", rest, maxsplit=1)
            body, by = parts[0], parts[1] if len(parts) > 1 else ""
            over = ""
            if " over " in f" {body} ":
                body, over = re.split(r"\bover\b", body, maxsplit=1)
            aliases = set(re.findall(r"\bAS\s+([\w.]+)", body))
            for arg in re.findall(r"\w+\(([^)]*)\)", body):
                read(_names(arg))
            read(_names(over + " " + by))
            made.update(aliases | {"count"})
        elif command in ("where",):
            read(_names(rest))
        elif command in ("table", "dedup", "fields", "sort"):
            read(n for n in _names(rest.replace("-", " ").replace("+", " ")))
        elif command in ("rename",):
            for old, new in re.findall(r"(\S+)\s+AS\s+(\S+)", rest):
                read(_names(old))
                made.add(new)
        else:
            raise AssertionError(f"the SPL reader does not know the command {command!r}: {seg}")
    return sourcetype, used - MADE_BY_SPLUNK, made


def dashboards() -> list[Path]:
    views = sorted(VIEWS.glob("*.xml"))
    assert {v.stem for v in views} >= {
        "studies_by_modality",
        "dose_by_protocol",
        "high_dose_events",
    }
    return views


def searches(view: Path) -> Iterator[tuple[str, str | None, str]]:
    """(search id or "", base id or None, query) of every search of a dashboard."""
    root = ET.parse(view).getroot()
    assert root.tag in ("form", "dashboard")
    for search in root.iter("search"):
        query = search.findtext("query")
        assert query and query.strip(), f"{view.name}: a search without a query"
        yield search.get("id", ""), search.get("base"), query.strip()


# --- the tests ------------------------------------------------------------------------------
def test_the_reader_finds_the_fields_of_a_query() -> None:
    st, used, made = spl_fields(
        '`dicomsync_index` sourcetype="dicomsync:dose_event" EventType="CT Acquisition"'
        " | eval p=coalesce('Acquisition Protocol', StudyDescription, \"(none)\"), c='CT Dose.DLP'"
        " | dedup StudyInstanceUID p | where c > $ref$ AND isnotnull(Modality)"
        " | stats median(c) AS m perc75(KVP) AS k by p StationName | table _time m k p"
    )
    assert st == "dicomsync:dose_event"
    assert used == {
        "EventType",
        "Acquisition Protocol",
        "StudyDescription",
        "CT Dose.DLP",
        "StudyInstanceUID",
        "Modality",
        "KVP",
        "StationName",
    }
    assert made >= {"p", "c", "m", "k"}


def test_event_fields_come_from_the_real_files() -> None:
    fields = event_fields()
    assert "CT Dose.Mean CTDIvol" in fields["dicomsync:dose_event"]
    assert (
        "X-Ray Radiation Dose Report.CT Accumulated Dose Data.CT Dose Length Product Total"
        in fields["dicomsync:dose_report"]
    )
    assert {"Modality", "StudyInstanceUID", "StudyDate"} <= fields["dicomsync:instance"]
    assert "CT Dose.Mean CTDIvol" not in fields["dicomsync:instance"]


@pytest.mark.parametrize("view", dashboards(), ids=lambda p: p.stem)
def test_dashboard_spl_uses_only_fields_our_events_carry(view: Path) -> None:
    fields = event_fields()
    made_by: dict[str, set[str]] = {}
    checked = 0
    for search_id, base, query in searches(view):
        sourcetype, used, made = spl_fields(query)
        if base is not None:
            assert base in made_by, f"{view.name}: base search {base!r} is not defined first"
            missing = used - made_by[base]
            assert not missing, f"{view.name}: post-process of {base!r} reads {sorted(missing)}"
            continue
        assert sourcetype in SOURCETYPES, f"{view.name}: every search names one of our sourcetypes"
        missing = {n for n in used if n not in fields[sourcetype]}
        assert not missing, f"{view.name}: {sourcetype} events have no {sorted(missing)}: {query}"
        checked += len(used)
        if search_id:
            made_by[search_id] = made
    assert checked > 0


def test_dashboards_are_the_three_the_issue_names() -> None:
    labels = {ET.parse(v).getroot().findtext("label") for v in dashboards()}
    assert {"Count of Studies by Modality by Day", "Dose by Protocol", "High-dose events"} <= labels
    dose = (VIEWS / "dose_by_protocol.xml").read_text()
    for part in ("median(ctdivol)", "perc75(ctdivol)", "median(dlp)", "perc75(dlp)", "scanner"):
        assert part in dose


def _conf(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def test_props_conf_covers_the_three_sourcetypes() -> None:
    props = _conf(APP / "default" / "props.conf")
    assert set(SOURCETYPES) <= set(props.sections())
    for st in SOURCETYPES:
        stanza = props[st]
        assert stanza["KV_MODE"] == "json"
        assert stanza["SHOULD_LINEMERGE"] == "false"
        assert stanza["LINE_BREAKER"] == r"([\r\n]+)"
        assert int(stanza["TRUNCATE"]) == 0 or int(stanza["TRUNCATE"]) >= 100_000
        assert "INDEXED_EXTRACTIONS" not in stanza  # HEC /event: KV_MODE at search time
    assert props["dicomsync:dose_report"]["TRUNCATE"] == "0"


def test_events_fit_the_truncate_limits() -> None:
    """No real event is cut by its sourcetype's TRUNCATE (0 = no limit)."""
    import json

    props = _conf(APP / "default" / "props.conf")
    base = data_dir()
    biggest: dict[str, int] = {}
    for path in [
        *base.glob("rdsr/*.dcm"),
        *base.glob("study_petct_siemens/*.dcm"),
        *base.glob("images/*.dcm"),
    ]:
        for e in events_from_bytes(path.read_bytes()):
            size = len(json.dumps(e.fields, ensure_ascii=False).encode())
            biggest[e.sourcetype] = max(biggest.get(e.sourcetype, 0), size)
    assert biggest["dicomsync:dose_report"] > 10_000  # why the default TRUNCATE is not enough
    for st, size in biggest.items():
        limit = int(props[st]["TRUNCATE"])
        assert limit == 0 or size * 10 < limit, (st, size, limit)


def test_app_conf_and_metadata() -> None:
    app = _conf(APP / "default" / "app.conf")
    assert app["package"]["id"] == "dicomsync"
    assert app["ui"]["label"] and app["launcher"]["version"]
    meta = (APP / "metadata" / "default.meta").read_text(encoding="utf-8")
    assert re.search(r"^\[\]\naccess = read : \[ \* \], write : \[ admin \]$", meta, re.M)
    assert (APP / "README").is_file() or (APP / "README.md").is_file()

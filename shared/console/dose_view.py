"""The dose page's content: the figures of a date range, and their HTML (charts, tables).

``summarize(snapshot, flt, levels)`` -> ``Summary``: over the CT dose events whose date
is in ``flt`` (``dose_query.Snapshot``):

- ``days``: studies by modality by day (distinct StudyInstanceUIDs of the instances);
- ``protocols``: per protocol (acquisition protocol, else study description) the count,
  median and 75th percentile of CTDIvol (mGy) and DLP (mGy·cm), and its reference level;
- ``scanners``: the same per scanner and protocol;
- ``outliers``: events above their reference level (study, date, scanner, value);
- ``studies``: each study's total DLP from its dose report (TAP-SS: 724.52 mGy·cm).

Percentiles interpolate linearly between the closest ranks (numpy's default, and
``statistics.quantiles(method="inclusive")``); the median of an even count is the mean
of the middle two. ``body(summary, links)`` is the markup of the page and of the report
(one code for both): every value escaped by ``html``; charts are Chart.js configs
(``html.chart``) with the reference and alert levels as line datasets.

Pure functions over immutable data; thread-safe.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomsync.console.dose_levels import Level, Levels
from dicomsync.console.dose_query import DoseEvent, Snapshot, StudyTotal
from dicomsync.console.html import Html, chart, esc, table, tag

MAX_ROWS = 500  # rows of a table on the page (the CSV has them all)
MAX_BARS = 30  # protocols on a chart (the most frequent)
PALETTE = ("#2f6fb0", "#d9822b", "#3a9a5b", "#b3261e", "#7b5ea7", "#8c6d46", "#c05a9b", "#5b6678")
REFERENCE_COLOR, ALERT_COLOR = "#d9822b", "#b3261e"


@dataclass(frozen=True)
class DoseFilter:
    """A date range, ``YYYYMMDD`` inclusive; empty = open."""

    since: str = ""
    until: str = ""

    def has(self, date: str) -> bool:
        return (not self.since or date >= self.since) and (not self.until or date <= self.until)

    def text(self) -> str:
        if not self.since and not self.until:
            return "all dates"
        return f"{show_date(self.since) or '…'} to {show_date(self.until) or '…'}"


def parse_date(text: str | None, what: str) -> str:
    """``2025-04-01`` or ``20250401`` as ``20250401``; ValueError otherwise."""
    value = (text or "").strip().replace("-", "")
    if not value:
        return ""
    try:
        if len(value) != 8 or not value.isdigit():
            raise ValueError
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise ValueError(f"{what} must be a date, YYYY-MM-DD (got {str(text)[:40]!r})") from None
    return value


def show_date(date: str) -> str:
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values``, linear between closest ranks."""
    if not values:
        return None
    pos = (len(values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


@dataclass(frozen=True)
class Stats:
    n: int
    ctdivol: tuple[float | None, float | None]  # median, p75
    dlp: tuple[float | None, float | None]

    @classmethod
    def of(cls, events: Sequence[DoseEvent]) -> Stats:
        return cls.of_values(
            len(events),
            [e.ctdivol for e in events if e.ctdivol is not None],
            [e.dlp for e in events if e.dlp is not None],
        )

    @classmethod
    def of_values(cls, n: int, ctdivol: list[float], dlp: list[float]) -> Stats:
        """From the values themselves (sorted here, in place)."""
        ctdivol.sort()
        dlp.sort()
        return cls(
            n,
            (quantile(ctdivol, 0.5), quantile(ctdivol, 0.75)),
            (quantile(dlp, 0.5), quantile(dlp, 0.75)),
        )


class _Group:
    """The values of one protocol (or scanner and protocol), gathered in one pass."""

    __slots__ = ("ctdivol", "dlp", "n", "regions")

    def __init__(self) -> None:
        self.n = 0
        self.ctdivol: list[float] = []
        self.dlp: list[float] = []
        self.regions: Counter[str] = Counter()

    def add(self, e: DoseEvent) -> None:
        self.n += 1
        if e.ctdivol is not None:
            self.ctdivol.append(e.ctdivol)
        if e.dlp is not None:
            self.dlp.append(e.dlp)

    def stats(self) -> Stats:
        return Stats.of_values(self.n, self.ctdivol, self.dlp)


@dataclass(frozen=True)
class Outlier:
    event: DoseEvent
    quantity: str  # "CTDIvol" / "DLP"
    value: float
    level: Level
    reference: float
    alert: float

    @property
    def above_alert(self) -> bool:
        return self.value > self.alert


@dataclass
class Summary:
    flt: DoseFilter
    levels: Levels
    events: int = 0
    days: dict[tuple[str, str], int] = field(default_factory=dict)  # (date, modality)
    protocols: list[tuple[str, Stats, Level | None]] = field(default_factory=list)
    scanners: list[tuple[str, str, Stats]] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    studies: list[StudyTotal] = field(default_factory=list)


def summarize(snap: Snapshot, flt: DoseFilter, levels: Levels) -> Summary:
    out = Summary(flt, levels)
    events = [e for e in snap.events if flt.has(e.date)]
    out.events = len(events)
    out.days = dict(Counter((d, m) for d, m, _ in snap.modalities if flt.has(d)))
    by_protocol: dict[str, _Group] = defaultdict(_Group)
    by_scanner: dict[tuple[str, str], _Group] = defaultdict(_Group)
    match = levels.match
    for e in events:
        group = by_protocol[e.protocol]
        group.add(e)
        group.regions[e.region] += 1
        by_scanner[(e.scanner, e.protocol)].add(e)
        level = match(e.protocol, e.region)
        if level is None:
            continue
        for quantity, value, pair in (
            ("CTDIvol", e.ctdivol, level.ctdivol),
            ("DLP", e.dlp, level.dlp),
        ):
            if value is not None and pair is not None and value > pair[0]:
                out.outliers.append(Outlier(e, quantity, value, level, pair[0], pair[1]))
    for protocol, group in sorted(by_protocol.items(), key=lambda kv: (-kv[1].n, kv[0])):
        regions = group.regions.most_common(1)
        level = match(protocol, regions[0][0] if regions else "")
        out.protocols.append((protocol, group.stats(), level))
    out.scanners = [(sc, p, g.stats()) for (sc, p), g in sorted(by_scanner.items())]
    out.outliers.sort(key=lambda o: (-o.value / (o.reference or 1), o.event.date))
    out.studies = sorted(
        (t for t in snap.totals if flt.has(t.date)), key=lambda t: (-t.total_dlp, t.study_uid)
    )
    return out


# --- tables, as rows (the page and the CSV share them) ------------------------------------------
def num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _level_text(level: Level | None, quantity: str) -> str:
    pair = level.of(quantity) if level else None
    return f"{num(pair[0])} / {num(pair[1])}" if pair else ""


def rows(
    summary: Summary, name: str, limit: int | None = None
) -> tuple[list[str], list[list[str]]]:
    """The header and the first ``limit`` rows (default all) of the table ``name``."""
    cut = slice(0, limit)
    if name == "protocols":
        return (
            ["Protocol", "Events", "CTDIvol median (mGy)", "CTDIvol p75 (mGy)",
             "DLP median (mGy·cm)", "DLP p75 (mGy·cm)", "Level", "CTDIvol reference / alert (mGy)"],
            [
                [p, str(s.n), num(s.ctdivol[0]), num(s.ctdivol[1]), num(s.dlp[0]), num(s.dlp[1]),
                 lv.name if lv else "", _level_text(lv, "ctdivol")]
                for p, s, lv in summary.protocols[cut]
            ],
        )  # fmt: skip
    if name == "scanners":
        return (
            ["Scanner", "Protocol", "Events", "CTDIvol median (mGy)", "CTDIvol p75 (mGy)",
             "DLP median (mGy·cm)", "DLP p75 (mGy·cm)"],
            [
                [sc, p, str(s.n), num(s.ctdivol[0]), num(s.ctdivol[1]), num(s.dlp[0]), num(s.dlp[1])]
                for sc, p, s in summary.scanners[cut]
            ],
        )  # fmt: skip
    if name == "outliers":
        return (
            ["Study", "Accession", "Date", "Scanner", "Protocol", "Quantity", "Value",
             "Reference", "Alert", "Level"],
            [
                [o.event.study_uid, o.event.accession, show_date(o.event.date), o.event.scanner,
                 o.event.protocol, o.quantity, num(o.value), num(o.reference), num(o.alert),
                 o.level.name + (" (above alert)" if o.above_alert else "")]
                for o in summary.outliers[cut]
            ],
        )  # fmt: skip
    if name == "studies":
        return (
            ["Study", "Accession", "Date", "Description", "Scanner", "Total DLP (mGy·cm)"],
            [
                [t.study_uid, t.accession, show_date(t.date), t.description, t.scanner,
                 num(t.total_dlp)]
                for t in summary.studies[cut]
            ],
        )  # fmt: skip
    if name == "days":
        return (
            ["Date", "Modality", "Studies"],
            [[show_date(d), m, str(n)] for (d, m), n in sorted(summary.days.items())[cut]],
        )
    raise KeyError(name)


TABLES = ("protocols", "scanners", "outliers", "studies", "days")
NUMERIC = {
    "protocols": (1, 2, 3, 4, 5),
    "scanners": (2, 3, 4, 5, 6),
    "outliers": (6, 7, 8),
    "studies": (5,),
    "days": (2,),
}


# --- charts ----------------------------------------------------------------------------------
def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _level_lines(levels: Iterable[Level | None], quantity: str) -> list[dict[str, Any]]:
    pairs = [lv.of(quantity) if lv else None for lv in levels]
    if not any(pairs):
        return []
    return [
        {
            "type": "line",
            "label": label,
            "data": [p[i] if p else None for p in pairs],
            "borderColor": color,
            "backgroundColor": color,
            "borderWidth": 2,
            "borderDash": [6, 4] if i else [],
            "pointStyle": "line",
            "pointRadius": 14,
            "pointBorderWidth": 3,
            "stepped": "middle",
            "spanGaps": False,
            "fill": False,
        }
        for i, (label, color) in enumerate(
            (("reference level", REFERENCE_COLOR), ("alert level", ALERT_COLOR))
        )
    ]


def _bars(labels: list[str], sets: list[tuple[str, list[float | None], str]], y: str,
          lines: list[dict[str, Any]], stacked: bool = False) -> dict[str, Any]:  # fmt: skip
    datasets: list[dict[str, Any]] = [
        {"type": "bar", "label": name, "data": data, "backgroundColor": color}
        for name, data, color in sets
    ]
    return {
        "type": "bar",
        "data": {"labels": labels, "datasets": datasets + lines},
        "options": {
            "responsive": True,
            "scales": {
                "x": {"stacked": stacked, "ticks": {"autoSkip": True, "maxRotation": 60}},
                "y": {
                    "stacked": stacked,
                    "beginAtZero": True,
                    "title": {"display": True, "text": y},
                },
            },
            "plugins": {"legend": {"position": "bottom"}},
        },
    }


def charts(summary: Summary) -> Html:
    top = summary.protocols[:MAX_BARS]
    labels = [p for p, _, _ in top]
    lv = [level for _, _, level in top]
    parts = []
    dates = sorted({d for d, _ in summary.days})
    modalities = sorted({m for _, m in summary.days})
    parts.append(chart("dose-days", _bars(
        [show_date(d) for d in dates],
        [(m, [summary.days.get((d, m), 0) for d in dates], _color(i)) for i, m in enumerate(modalities)],
        "studies", [], stacked=True), caption="Studies by modality by day"))  # fmt: skip
    for quantity, name, unit in (("ctdivol", "CTDIvol", "mGy"), ("dlp", "DLP", "mGy·cm")):
        sets = [
            (f"median {name}", [getattr(s, quantity)[0] for _, s, _ in top], _color(0)),
            (f"75th percentile {name}", [getattr(s, quantity)[1] for _, s, _ in top], _color(1)),
        ]
        parts.append(chart(f"dose-{quantity}", _bars(labels, sets, f"{name} ({unit})",
                                                      _level_lines(lv, quantity)),
                           caption=f"{name} by protocol (median, 75th percentile)"))  # fmt: skip
    scanners = sorted({sc for sc, _, _ in summary.scanners})
    per = {(sc, p): s for sc, p, s in summary.scanners}
    sets = [
        (sc, [per[(sc, p)].ctdivol[0] if (sc, p) in per else None for p in labels], _color(i))
        for i, sc in enumerate(scanners)
    ]
    parts.append(chart("dose-scanners", _bars(labels, sets, "median CTDIvol (mGy)",
                                              _level_lines(lv, "ctdivol")),
                       caption="Median CTDIvol by protocol, per scanner"))  # fmt: skip
    return Html(f'<div class="charts">{"".join(parts)}</div>')


# --- the body --------------------------------------------------------------------------------
EMPTY = {
    "outliers": "no event above its reference level in this range",
    "studies": "no CT dose report in this range",
    "days": "no studies in this range",
}
TITLES = {
    "protocols": "CTDIvol and DLP by protocol",
    "scanners": "Per scanner",
    "outliers": "Outliers: events above their reference level",
    "studies": "Studies: total DLP of the dose report",
    "days": "Studies by modality by day",
}


def count(summary: Summary, name: str) -> int:
    if name == "days":
        return len(summary.days)
    return len(getattr(summary, name))


def section(summary: Summary, name: str, csv_link: Callable[[str], str] | None) -> Html:
    header, shown = rows(summary, name, MAX_ROWS)
    total = count(summary, name)
    more = (
        tag("p", f"{len(shown)} of {total} rows shown; the CSV has them all.", class_="muted")
        if total > len(shown)
        else ""
    )
    link = (
        tag("a", "CSV", href=csv_link(name), download=f"dose-{name}.csv", class_="csv")
        if csv_link
        else ""
    )
    empty = EMPTY.get(name, "no CT dose events in this range")
    return Html(
        f'<section id="dose-{esc(name)}"><h2>{esc(TITLES[name])} {link}</h2>'
        f"{table(header, shown, numeric=NUMERIC[name], empty=empty)}{more}</section>"
    )


def body(summary: Summary, *, head: Any = "", csv_link: Callable[[str], str] | None = None) -> Html:
    names = ", ".join(
        f"{lv.name} {_level_text(lv, 'ctdivol')} mGy" for lv in summary.levels.levels if lv.ctdivol
    )
    facts = tag(
        "p",
        f"{summary.flt.text()}: {summary.events} CT dose events, {len(summary.studies)} "
        f"studies with a dose report. Reference / alert levels (CTDIvol): {names or 'none'}.",
        class_="muted",
        id="dose-facts",
    )
    parts = [esc(head), facts, charts(summary)]
    parts += [section(summary, name, csv_link) for name in TABLES]
    return Html("".join(parts))

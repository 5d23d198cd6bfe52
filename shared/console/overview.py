"""The overview page, ``/dicomsync/ui/``, and the JSON it shows (``GET
/dicomsync/ui/api/overview``, the same numbers).

``data(service)``: the version and node, and per destination (every route destination and destination place, and
any the queue still holds) the queue's ``Queued``, ``Sending``, ``Done``, ``Failed``,
``Delivered`` (instances), ``OldestQueuedAge``, ``LastError`` and the place's startup
error; per sink the same from ``TagSinks.all_status`` (its ``Done`` jobs are instances,
``DeliveredEvents`` what the sink holds); the configuration's errors and warnings; and
the throughput series (``throughput.Throughput``) of the last hour (per minute) and day
(per 15 minutes). Everything comes from ``Queue.stats()`` (one call per job kind) and the
in-memory throughput record: no scan of the jobs table, so the page stays fast with a
million jobs (``bench/bench_console.py``).

``page(ctx)`` renders it: errors first and plainly, then the two tables (a failed count
links to those jobs, where the Retry buttons are) and the charts.
Every value is escaped (``html``). Raises the queue's ``QueueError`` (the API's 503).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import dicomsync
from dicomsync.console.html import Html, chart, esc, notice, table, tag
from dicomsync.console.pages import PageContext, View
from dicomsync.queue import DestinationStats

if TYPE_CHECKING:
    from dicomsync.service.app import Service

HOUR = (60, 1)  # minutes shown, minutes per bucket
DAY = (24 * 60, 15)
PALETTE = ("#2f6fb0", "#d9822b", "#3a9a5b", "#b3261e", "#7b5ea7", "#8c6d46", "#c05a9b", "#5b6678")


def data(service: Service, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    cfg, queue = service.config, service.queue
    out: dict[str, Any] = {
        "Version": dicomsync.__version__,
        "Node": cfg.node_id if cfg else None,
        "Configured": service.active,
        "ConfigError": service.config_error,
        "StartBlocked": service.start_blocked,
        "Warnings": list(cfg.warnings) if cfg else [],
        "PlaceErrors": dict(service.place_errors),
        "Unrouted": service.unrouted(),
        "Destinations": {},
        "Sinks": {},
        "Throughput": None,
    }
    if cfg is None or queue is None:
        return out
    stats = queue.stats(kind="study")
    for key in dict.fromkeys([*cfg.destinations(), *stats]):
        s = stats.get(key) or DestinationStats(key)
        out["Destinations"][key] = {
            "Queued": s.queued,
            "Sending": s.sending,
            "Done": s.done,
            "Failed": s.failed,
            "Delivered": s.delivered,
            "OldestQueuedAge": s.oldest_queued_age,
            "LastError": s.last_error,
            "LastErrorAt": s.last_error_at,
            "Error": service.place_errors.get(key),
        }
    if service.sinks is not None:
        out["Sinks"] = service.sinks.all_status()
    keys = [*out["Destinations"], *(f"sink:{k}" for k in out["Sinks"])]
    throughput = service.throughput
    out["Throughput"] = {
        name: {"Labels": s.labels, "Rates": s.rates, "Since": s.since}
        for name, (minutes, step) in (("Hour", HOUR), ("Day", DAY))
        for s in [throughput.series(keys, minutes, step, now)]
    }
    return out


def age(seconds: float | None) -> str:
    """``95`` -> ``1.6 min``; None -> a dash."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def jobs_link(root: str, **query: str) -> str:
    return f"{root}jobs?{urlencode(query)}"


def _failed(root: str, key: str, n: int, kind: str) -> Any:
    """A failed count; above 0, a link to those jobs (where the Retry buttons are)."""
    if not n:
        return n
    return tag("a", n, href=jobs_link(root, state="failed", destination=key, kind=kind))


def _error(text: Any) -> Html:
    return tag("span", text, class_="error") if text else Html("")


def _charts(throughput: dict[str, Any] | None) -> Html:
    if not throughput:
        return Html("")
    figures = []
    for name, title in (("Hour", "last hour, per minute"), ("Day", "last day, per 15 minutes")):
        series = throughput[name]
        datasets = [
            {
                "label": key.removeprefix("sink:") + (" (sink)" if key.startswith("sink:") else ""),
                "data": rates,
                "borderColor": PALETTE[i % len(PALETTE)],
                "backgroundColor": PALETTE[i % len(PALETTE)],
                "pointRadius": 0,
                "borderWidth": 2,
                "tension": 0.2,
                "borderDash": [6, 4] if key.startswith("sink:") else [],  # sinks dashed
            }
            for i, (key, rates) in enumerate(series["Rates"].items())
        ]
        config = {
            "type": "line",
            "data": {"labels": series["Labels"], "datasets": datasets},
            "options": {
                "scales": {
                    "y": {"beginAtZero": True, "title": {"display": True, "text": "instances/s"}}
                },
                "plugins": {"legend": {"position": "bottom"}},
            },
        }
        figures.append(chart(f"throughput-{name.lower()}", config, caption=f"Instances/s, {title}"))
    since = throughput["Hour"]["Since"]
    note = (
        f"Counted since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))}"
        " (what finished while Orthanc was stopped is not counted)."
        if since
        else "No sample yet: the first arrives within MetricsInterval seconds of the start."
    )
    return Html(f'<div class="charts">{"".join(figures)}</div><p class="muted">{esc(note)}</p>')


def page(ctx: PageContext) -> View:
    d = data(ctx.service, ctx.now)
    parts: list[str] = []
    if d["ConfigError"]:
        parts.append(notice(f"Configuration error, routing is OFF: {d['ConfigError']}"))
    elif not d["Configured"]:
        parts.append(notice("dicomsync is not configured: no DicomSync section.", "warning"))
    if d["StartBlocked"]:
        parts.append(notice(f"Start blocked: {d['StartBlocked']}", "warning"))
    for key, error in d["PlaceErrors"].items():
        parts.append(notice(f"Destination {key!s}: {error}"))
    for warning in d["Warnings"]:
        parts.append(notice(warning, "warning"))
    if d["Unrouted"]:
        held = ", ".join(f"{k}: {v}" for k, v in list(d["Unrouted"].items())[:5])
        parts.append(notice(f"{len(d['Unrouted'])} studies are held (not routed yet): {held}"))
    if not d["Configured"]:
        return View("Overview", Html("".join(parts)), "")
    num = range(1, 6)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ctx.now))
    line = f"dicomsync {d['Version']} · node {d['Node']} · as of {when}"
    parts.append(tag("p", line, class_="muted"))
    parts.append("<h2>Destinations</h2>")
    parts.append(
        table(
            [
                "Destination",
                "Queued",
                "Sending",
                "Done",
                "Failed",
                "Delivered instances",
                "Oldest queued",
                "Last error",
            ],
            [
                [
                    tag("a", key, href=jobs_link(ctx.root, destination=key)),
                    s["Queued"],
                    s["Sending"],
                    s["Done"],
                    _failed(ctx.root, key, s["Failed"], "study"),
                    s["Delivered"],
                    age(s["OldestQueuedAge"]),
                    _error(s["Error"] or s["LastError"]),
                ]
                for key, s in d["Destinations"].items()
            ],
            numeric=[*num, 6],
            empty="no destinations",
        )
    )
    parts.append("<h2>Sinks</h2>")
    parts.append(
        table(
            [
                "Sink",
                "Queued",
                "Sending",
                "Done (instances)",
                "Failed",
                "Delivered events",
                "Oldest queued",
                "State",
                "Last error",
            ],
            [
                [
                    tag("a", key, href=jobs_link(ctx.root, destination=key, kind="tags")),
                    s["Queued"],
                    s["Sending"],
                    s["Done"],
                    _failed(ctx.root, key, s["Failed"], "tags"),
                    s["DeliveredEvents"],
                    age(s["OldestQueuedAge"]),
                    s["State"],
                    _error(s["Error"] or s["LastError"]),
                ]
                for key, s in d["Sinks"].items()
            ],
            numeric=[*num, 6],
            empty="no sinks",
        )
    )
    parts.append("<h2>Throughput</h2>")
    parts.append(_charts(d["Throughput"]))
    return View("Overview", Html("".join(parts)), "")

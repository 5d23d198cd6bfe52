"""The jobs page, ``/dicomsync/ui/jobs?state=&destination=&kind=&limit=``.

The newest ``limit`` jobs (100 by default, at most ``rest_common.MAX_LIMIT``) matching
the filters, as ``GET /dicomsync/jobs`` answers them (``Queue.jobs``): a failed job
shows its error and attempts and a Retry button; "Retry all failed" requeues every
failed job of the chosen destination (or of all). The buttons POST, through
``static/console.js`` with the console's header, to ``ui/api/jobs/{id}/retry`` and
``ui/api/retry-failed`` (the REST API's own retry endpoints; ``pages.guard``).

An unknown state or destination in the query string is shown as an error on the page,
not a failure. Every value is escaped. Raises the queue's ``QueueError`` (503).
"""

from __future__ import annotations

import json
import time
from typing import Any

from dicomsync.console.html import Html, esc, notice, table, tag
from dicomsync.console.overview import age
from dicomsync.console.pages import PageContext, View
from dicomsync.queue import STATES
from dicomsync.service.rest_common import MAX_LIMIT

DEFAULT_LIMIT = 100


def _select(name: str, label: str, options: list[tuple[str, str]], chosen: str) -> Html:
    opts = "".join(
        tag("option", text, value=value, selected=value == chosen) for value, text in options
    )
    return Html(f'<label>{esc(label)}<select name="{esc(name)}">{opts}</select></label>')


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def page(ctx: PageContext) -> View:
    service, get = ctx.service, ctx.get
    cfg, queue = service.config, service.queue
    if cfg is None or queue is None:
        why = service.config_error or "no DicomSync section in Orthanc's configuration"
        return View("Jobs", notice(f"dicomsync is not configured: {why}"), "jobs", 503)
    problems: list[str] = []
    state = get.get("state") or ""
    if state and state not in STATES:
        problems.append(f"unknown state {state[:64]!r} (one of: {', '.join(STATES)})")
        state = ""
    sinks = list(cfg.sinks)
    known = list(dict.fromkeys([*cfg.destinations(), *sinks]))
    destination = get.get("destination") or ""
    if destination and destination not in known:
        problems.append(f"unknown destination {destination[:64]!r}")
    kind = get.get("kind") or ""
    if kind not in ("", "study", "tags"):
        problems.append(f"unknown kind {kind[:16]!r} (study or tags)")
        kind = ""
    try:
        limit = max(1, min(MAX_LIMIT, int(get.get("limit") or DEFAULT_LIMIT)))
    except ValueError:
        problems.append("limit must be an integer")
        limit = DEFAULT_LIMIT
    jobs = queue.jobs(state or None, destination or None, limit, kind=kind or None)
    now = ctx.now
    form = (
        '<form class="filters" method="get" action="">'
        + _select("state", "State", [("", "any"), *((s, s) for s in STATES)], state)
        + _select(
            "destination", "Destination", [("", "any"), *((d, d) for d in known)], destination
        )
        + _select("kind", "Kind", [("", "any"), ("study", "study"), ("tags", "tags")], kind)
        + f'<label>Limit<input name="limit" type="number" min="1" max="{MAX_LIMIT}"'
        f' value="{limit}"></label><button type="submit">Show</button></form>'
    )
    body: dict[str, Any] = {"Destination": destination} if destination in known else {}
    scope = f"of {destination}" if body else "of every destination"
    toolbar = (
        '<div class="toolbar">'
        + tag(
            "button",
            f"Retry all failed {scope}",
            type="button",
            id="retry-failed",
            data_post=f"{ctx.root}api/retry-failed",
            data_body=json.dumps(body),
            data_confirm=f"Requeue every failed job {scope}?",
        )
        + tag("span", f"{len(jobs)} job(s) shown, newest first", class_="muted")
        + "</div>"
    )
    rows = []
    for job in jobs:
        retry = (
            tag(
                "button",
                "Retry",
                type="button",
                class_="retry",
                data_post=f"{ctx.root}api/jobs/{job.id}/retry",
                data_job=job.id,
            )
            if job.state == "failed"
            else ""
        )
        due = (
            f"due in {age(max(0.0, job.next_attempt_at - now))}"
            if job.state == "queued" and job.next_attempt_at > now
            else ""
        )
        rows.append(
            [
                job.id,
                job.kind,
                job.destination,
                job.resource,
                tag("span", job.state, class_=f"state-{job.state}"),
                job.attempts,
                tag("span", job.last_error, class_="error") if job.last_error else due,
                _when(job.updated_at),
                retry,
            ]
        )
    grid = table(
        ["ID", "Kind", "Destination", "Resource", "State", "Attempts", "Error", "Updated", ""],
        rows,
        class_="grid jobs",
        numeric=[0, 5],
        empty="no jobs match",
    )
    message = '<div id="console-message"></div>'
    errors = "".join(notice(p) for p in problems)
    return View("Jobs", Html(errors + form + toolbar + message + grid), "jobs")

"""``RestApi``: the ``/dicomsync/`` endpoints, behind Orthanc's HTTP server and its
authentication. ``handle(method, path, get, body) -> Reply`` never raises.

Endpoints (``path`` is what follows ``/dicomsync/``; answers are JSON objects):

- ``GET status``: ``{"Version", "Configured", "ConfigError", "Workers"}`` and, when
  configured, ``"Node", "StateDirectory", "Warnings", "Routes", "PlaceErrors",
  "Destinations"`` (per destination: the queue's counts, CamelCase), ``"Sinks"`` (as
  ``GET sinks/{key}`` without ``Details``) and ``"Unrouted"`` (study -> error).
- ``GET jobs?state=&destination=&kind=&limit=``: ``{"Jobs": [job...]}``, ``limit`` 1 to
  ``MAX_LIMIT`` (100 by default), ``state`` one of the queue's ``STATES``.
- ``GET jobs/{id}``: the job (CamelCase); 404 for an unknown ID or one beyond int64.
- ``POST jobs/{id}/retry``: requeues the job, answers it.
- ``POST retry-failed``: body ``{"Destination"?}`` (a place or sink key):
  ``{"Requeued": n}``.
- ``POST send``, ``POST backfill``: see ``rest_studies.StudyJobs``.
- ``GET places``: ``{"Places": {key: section + "Destination", "Routed"}}``.
- ``GET sinks``: ``{"Sinks": {key: status + "Details"}, "Reads": {...}}``.
- ``GET sinks/{key}``: ``{"Kind", "State", "Error", "Queued", "Sending", "Done",
  "Failed", "DeliveredEvents", "RejectedEvents", "LastRejected", "OldestQueuedAge",
  "LastError", "Cursor", "Details"}``.
- ``POST sinks/{key}/restart``: builds and resumes the sink, answers its status; 503
  before the workers run.
- ``GET ui[/page]``, ``GET ui/static/{file}``, ``GET ui/api/overview``: the console
  (``dicomsync.console.pages``: HTML pages, their files, the overview's JSON);
  ``POST ui/api/jobs/{id}/retry`` and ``POST ui/api/retry-failed`` are the two retry
  endpoints above for the console's buttons: refused (403) without the header
  ``X-DicomSync-Console: 1`` (``pages.guard``: no cross-site POST).
- Every other POST that a browser marks as cross-site (``Sec-Fetch-Site``, else an
  ``Origin`` that is not the ``Host``) is refused with 403 (``rest_common.cross_site``);
  curl and scripts send neither header and are unaffected.

Errors are ``{"Message": …}`` with one bounded line (``short_message``): 400 for a bad
request (``HttpError``, ``ConfigError``, ``QueryError``, ``UnknownPlaceError``), 404
(unknown endpoint, job, sink; ``NotFound``), 413 for a body over ``MAX_BODY``, 503 while
not configured or for a retryable error or the queue's, 500 otherwise (logged). 405 (a
known path, another method) carries ``Allow`` and no body: Orthanc's SDK sends it and
refuses a body for it. POST bodies go through ``rest_common.parse_body`` (size and depth
before parsing). The route table is built once, in ``__init__``.

Thread-safety: Orthanc calls ``handle`` from its web-server threads at once; the API
holds no state of its own beyond the table and reads the service's units, which are
thread-safe.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, unquote_plus

import dicomsync
from dicomsync import routing
from dicomsync.console import overview
from dicomsync.console.pages import Console, guard
from dicomsync.errors import (
    ConfigError,
    DicomSyncError,
    NotFound,
    QueryError,
    QueueError,
    UnknownPlaceError,
)
from dicomsync.queue import STATES, DestinationStats, Queue
from dicomsync.service.rest_common import (
    MAX_LIMIT,
    HttpError,
    Reply,
    camel,
    cross_site,
    job_id,
    parse_body,
    quote,
    short_message,
)
from dicomsync.service.rest_studies import StudyJobs
from dicomsync.service.tag_lanes import TagSinks

if TYPE_CHECKING:
    from dicomsync.service.app import Service

log = logging.getLogger(__name__)

Route = tuple[str, re.Pattern[str], Callable[..., Any]]


class RestApi:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.studies = StudyJobs(service.client, service.fingerprint)
        self.console = Console(service)
        self.routes: list[Route] = [
            (verb, re.compile(pattern), fn)
            for verb, pattern, fn in (
                ("GET", r"status", self.rest_status),
                ("GET", r"jobs", self.rest_jobs),
                ("GET", r"jobs/(\d+)", self.rest_job),
                ("POST", r"jobs/(\d+)/retry", self.rest_retry),
                ("POST", r"retry-failed", self.rest_retry_failed),
                ("POST", r"send", self.rest_send),
                ("POST", r"backfill", self.rest_backfill),
                ("GET", r"places", self.rest_places),
                ("GET", r"sinks", self.rest_sinks),
                ("GET", r"sinks/([^/]+)", self.rest_sink),
                ("POST", r"sinks/([^/]+)/restart", self.rest_sink_restart),
                ("GET", r"ui(?:/([a-z-]+))?", self.console.page),
                ("GET", r"ui/static/([^/]+)", self.console.static),
                ("GET", r"ui/api/overview", lambda get: overview.data(service)),
                ("POST", r"ui/api/jobs/(\d+)/retry", self.rest_retry),
                ("POST", r"ui/api/retry-failed", self.rest_retry_failed),
            )
        ]

    def handle(
        self,
        method: str,
        path: str,
        get: Mapping[str, str],
        body: bytes | None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Dispatch ``/dicomsync/<path>``; never raises. ``get`` is the query string as
        Orthanc's plugin SDK hands it: still percent-encoded (Orthanc 1.10 does not decode
        a plugin's GET arguments), decoded here once; ``headers`` has lower-case names."""
        get = {unquote_plus(k): unquote_plus(v) for k, v in get.items()}
        reply = (
            guard(method, path, headers)
            or cross_site(method, headers)
            or self._dispatch(method, path, get, body)
        )
        if reply.status != 200 and isinstance(reply.body, dict) and "Message" in reply.body:
            reply.body["Message"] = short_message(str(reply.body["Message"]))
        return reply

    def _dispatch(
        self, method: str, path: str, get: Mapping[str, str], body: bytes | None
    ) -> Reply:
        allowed = []
        for verb, pattern, fn in self.routes:
            m = pattern.fullmatch(path.strip("/"))
            if m is None:
                continue
            if verb != method:
                allowed.append(verb)
                continue
            try:
                if verb == "GET":
                    result = fn(*m.groups(), get=get)
                else:
                    result = fn(*m.groups(), body=parse_body(body))
                return result if isinstance(result, Reply) else Reply(200, result)
            except HttpError as exc:
                return Reply(exc.status, {"Message": exc.message})
            except (ConfigError, QueryError, UnknownPlaceError) as exc:
                return Reply(400, {"Message": str(exc)})
            except NotFound as exc:
                return Reply(404, {"Message": str(exc)})
            except DicomSyncError as exc:
                return Reply(
                    503 if exc.retryable or isinstance(exc, QueueError) else 500,
                    {"Message": str(exc)},
                )
            except Exception as exc:
                log.exception("REST %s /dicomsync/%s failed", method, quote(path))
                return Reply(500, {"Message": f"internal error: {type(exc).__name__}: {exc}"})
        if allowed:
            return Reply(405, {"Message": f"use {' or '.join(allowed)}"}, allow=",".join(allowed))
        return Reply(404, {"Message": f"no such endpoint: /dicomsync/{quote(path)}"})

    # --- helpers ---------------------------------------------------------------------------
    def _need(self) -> tuple[routing.SyncConfig, Queue]:
        service = self.service
        if service.config is None or service.queue is None:
            why = service.config_error or f"no {routing.SECTION} section in Orthanc's configuration"
            raise HttpError(503, f"dicomsync is not configured: {why}")
        return service.config, service.queue

    def _destination(self, value: Any, *, sinks: bool = False) -> str:
        """A destination place key (or, with ``sinks``, also a sink key)."""
        cfg, _ = self._need()
        if not isinstance(value, str) or not value:
            raise HttpError(400, '"Destination" (a place key) is required')
        destinations = cfg.destinations() + (list(cfg.sinks) if sinks else [])
        if value not in destinations:
            known = ", ".join(destinations) or "none"
            raise HttpError(400, f"unknown destination {quote(value)} (destinations: {known})")
        return value

    def _sink(self, key: str) -> TagSinks:
        key = unquote(key)
        sinks = self.service.sinks
        if sinks is None or key not in sinks.states:
            known = ", ".join(sinks.keys) if sinks else "none"
            raise HttpError(404, f"no sink {quote(key)} (sinks: {known})")
        return sinks

    # --- endpoints ---------------------------------------------------------------------------
    def rest_status(self, get: Mapping[str, str]) -> dict[str, Any]:
        service = self.service
        out: dict[str, Any] = {
            "Version": dicomsync.__version__,
            "Configured": service.active,
            "ConfigError": service.config_error,
            "Workers": service.pool.state() if service.pool else {"running": False, "lanes": {}},
            "StartBlocked": service.start_blocked,  # why a start waits for the last run
        }
        if not service.active:
            return out
        cfg, queue = self._need()
        stats = queue.stats(kind="study")
        out.update(
            Node=cfg.node_id,
            StateDirectory=str(cfg.state_dir),
            Warnings=cfg.warnings,
            Routes=[r.to_dict() for r in cfg.routes],
            PlaceErrors=service.place_errors,
            Destinations={
                d: camel(stats[d].to_dict()) if d in stats else camel(DestinationStats(d).to_dict())
                for d in dict.fromkeys([*cfg.destinations(), *stats])
            },
            Sinks=service.sinks.all_status() if service.sinks else {},
            Unrouted=service.unrouted(),
        )
        return out

    def rest_jobs(self, get: Mapping[str, str]) -> dict[str, Any]:
        _, queue = self._need()
        state = get.get("state") or None
        if state is not None and state not in STATES:
            raise HttpError(400, f"unknown state {quote(state)} (one of: {', '.join(STATES)})")
        try:
            limit = int(get.get("limit") or 100)
        except ValueError:
            raise HttpError(400, "limit must be an integer") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise HttpError(400, f"limit must be from 1 to {MAX_LIMIT}")
        now = time.time()
        jobs = queue.jobs(
            state, get.get("destination") or None, limit, kind=get.get("kind") or None
        )
        return {"Jobs": [camel(j.to_dict(now)) for j in jobs]}

    def rest_job(self, number: str, get: Mapping[str, str]) -> dict[str, Any]:
        _, queue = self._need()
        job = queue.get(job_id(number))
        if job is None:
            raise HttpError(404, f"no job {number}")
        return camel(job.to_dict())

    def rest_retry(self, number: str, body: dict[str, Any]) -> dict[str, Any]:
        _, queue = self._need()
        n = job_id(number)
        if queue.get(n) is None:
            raise HttpError(404, f"no job {number}")
        queue.requeue([n])
        job = queue.get(n)
        assert job is not None
        return camel(job.to_dict())

    def rest_retry_failed(self, body: dict[str, Any]) -> dict[str, Any]:
        _, queue = self._need()
        dest = (
            self._destination(body["Destination"], sinks=True) if body.get("Destination") else None
        )
        return {"Requeued": queue.requeue_failed(dest)}

    def rest_send(self, body: dict[str, Any]) -> dict[str, Any]:
        _, queue = self._need()
        return self.studies.send(queue, self._destination(body.get("Destination")), body)

    def rest_backfill(self, body: dict[str, Any]) -> dict[str, Any]:
        _, queue = self._need()
        return self.studies.backfill(queue, self._destination(body.get("Destination")), body)

    def rest_places(self, get: Mapping[str, str]) -> dict[str, Any]:
        cfg, _ = self._need()
        routed = {r.destination for r in cfg.routes}
        destinations = set(cfg.destinations())
        return {
            "Places": {
                key: {**section, "Destination": key in destinations, "Routed": key in routed}
                for key, section in cfg.places.items()
            }
        }

    def rest_sinks(self, get: Mapping[str, str]) -> dict[str, Any]:
        self._need()
        sinks = self.service.sinks
        if sinks is None:
            return {"Sinks": {}}
        return {
            "Sinks": {
                key: {**st, "Details": sinks.details(key)} for key, st in sinks.all_status().items()
            },
            "Reads": sinks.reads(),
        }

    def rest_sink(self, key: str, get: Mapping[str, str]) -> dict[str, Any]:
        self._need()
        sinks = self._sink(key)
        key = unquote(key)
        return {**sinks.status(key), "Details": sinks.details(key)}

    def rest_sink_restart(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        self._need()
        sinks = self._sink(key)
        if self.service.pool is None:
            raise HttpError(503, "the workers are not running yet")
        return sinks.restart(unquote(key))

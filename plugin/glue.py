"""The plugin's glue: Orthanc callbacks -> queue records, workers, REST endpoints, metrics.

Callbacks stay cheap, because Orthanc runs every OnChange callback on one thread
and OnStoredInstance on the upload's HTTP thread:

- STABLE_STUDY: put the study ID on an in-memory hand-over queue. Nothing else: no
  REST call, since the SDK warns those can deadlock inside change callbacks. The
  intake thread reads the few index values the route filters need (in-process, no
  DICOM parsing) and enqueues one job per matching route.
- ORTHANC_STARTED: take back jobs a crash left ``sending``, start the workers,
  the metrics thread and the catch-up of changes missed while Orthanc was down.
- ORTHANC_STOPPED: stop all of that; jobs still in flight stay ``sending`` for
  this node and are taken back at the next start.
- OnStoredInstance: runs the cheap per-instance hooks in ``App.instance_hooks``.
  Orthanc accepts callbacks only while the plugin loads, so an extension adds its
  hook in ``register()`` before the callbacks are registered (see ``INSTANCE_HOOKS``);
  with no hook, no OnStoredInstance callback is registered at all. The tag sinks
  need none: they read Orthanc's change log from a durable cursor (``plugin/sinks.py``).

REST (behind Orthanc's HTTP server and its authentication), answers are JSON:
``GET /dicomsync/status``, ``GET /dicomsync/jobs?state=&destination=&limit=``,
``GET /dicomsync/jobs/{id}``, ``POST /dicomsync/jobs/{id}/retry``,
``POST /dicomsync/retry-failed``, ``POST /dicomsync/send``,
``POST /dicomsync/backfill``, ``GET /dicomsync/places``, ``GET /dicomsync/sinks[/{key}]``,
``POST /dicomsync/sinks/{key}/restart``. Errors are
``{"Message": …}`` with a 4xx/5xx code; no exception ever reaches Orthanc. 405 is the one
answer without a body: Orthanc's SDK sends it (with ``Allow``) and refuses a body for it.

Request data is hostile until checked, and REST callbacks run on Orthanc's web-server
threads, whose C stack is far smaller than Python's recursion limit assumes: a body is
refused above ``MAX_BODY`` bytes (413) or ``MAX_BODY_DEPTH`` levels of nesting (400)
before it is parsed (``dicomsync.jsonsafe``, no recursion), and no code recurses over
request data. Values quoted back in an error are cut to ``QUOTE_LIMIT`` characters
(``quote``), so an error never echoes a large request.

A bad ``DicomSync`` section is logged once (one line), routing stays off,
Orthanc keeps serving and ``/dicomsync/status`` shows the error.
"""

from __future__ import annotations

import json
import logging
import queue as queue_module
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orthanc

import dicomsync
from dicomsync import jsonsafe, routing
from dicomsync.errors import (
    ConfigError,
    DicomSyncError,
    NotFound,
    QueryError,
    QueueError,
    RemoteRejected,
    SinkFatal,
    UnknownPlaceError,
)
from dicomsync.identity import StudyIdentity
from dicomsync.orthanc_client import OrthancClient, Transport
from dicomsync.places.orthanc import OrthancPlace
from dicomsync.queue import STATES, DestinationStats, Enqueued, NewJob, Queue, open_queue
from dicomsync.service.metrics import label as prom_label
from dicomsync.service.storage import storage_folder
from dicomsync.service.tag_lanes import TAGS, TagSinks
from dicomsync.worker import Handler, Lane, WorkerPool, lower_thread_priority

log = logging.getLogger(__name__)

ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
PAGE = 1000
MAX_LIMIT = 10000
CURSOR_SLACK = 30.0  # seconds after StableAge before a change counts as routed
WORKER_NICE = 10  # workers (and their upload threads) yield the CPU to ingest
MAX_BODY = 1 << 20  # bytes of a REST body; ours are a few hundred
MAX_BODY_DEPTH = 16  # nesting of a REST body; ours need 3
MAX_JOB_ID = (1 << 63) - 1  # SQLite's INTEGER
QUOTE_LIMIT = 64  # characters of a request value quoted back in an error
MAX_MESSAGE = 500  # characters of any error message we answer
MAX_RESOURCES = 10000  # studies in one POST /dicomsync/send
MAX_UID = 64  # characters of a DICOM UID
CONFIG_DEPTH = 256  # nesting of Orthanc's whole configuration (other plugins' sections too)

InstanceHook = Callable[[Any, str], None]
MetricSink = Callable[[str, float], None]


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Reply:
    status: int
    body: Any
    allow: str = ""


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a request value for an error message, cut to ``limit`` characters."""
    if isinstance(value, str):
        if len(value) > limit:
            return repr(value[:limit]) + f"… ({len(value)} characters)"
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "…"
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def short_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """The last guard on any error message: one bounded piece of text."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def camel(data: Mapping[str, Any]) -> dict[str, Any]:
    """``next_attempt_at`` -> ``NextAttemptAt``: answers look like Orthanc's own."""
    return {"".join(p.capitalize() for p in k.split("_")): v for k, v in data.items()}


class App:
    """Everything the plugin holds. Built from Orthanc's configuration; no ``orthanc`` calls
    except through the injected transport and metric sink."""

    def __init__(
        self,
        orthanc_config: Mapping[str, Any],
        config_path: str | None,
        transport: Transport,
        metric: MetricSink | None = None,
    ) -> None:
        self.transport = transport
        self.client = OrthancClient(transport)
        self.metric = metric
        self.stable_age = routing.stable_age(orthanc_config)
        self.config: routing.SyncConfig | None = None
        self.config_error: str | None = None
        self.queue: Queue | None = None
        self.pool: WorkerPool | None = None
        self.handler: routing.RouteHandler | None = None
        self.sinks: TagSinks | None = None
        self.instance_hooks: list[InstanceHook] = []
        self.extra_lanes: list[Lane] = []  # lanes of an extension (the tag sinks have their own)
        self.extra_handlers: dict[str, Handler] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cursor_samples: list[tuple[float, int]] = []
        # studies whose STABLE_STUDY (or catch-up) routing failed -> the error; retried by
        # the metrics loop, and the change-log cursor does not move while any is left
        self._unrouted: dict[str, str] = {}
        self._intake: queue_module.Queue[str] = queue_module.Queue()  # STABLE_STUDY hand-over
        self._unrouted_lock = threading.Lock()
        self._caught_up = False
        self._started = False  # between start() and stop()
        self.place_errors: dict[str, str] = {}
        self._setup(orthanc_config, config_path)

    # --- configuration ----------------------------------------------------------------
    def _setup(self, orthanc_config: Mapping[str, Any], config_path: str | None) -> None:
        try:
            cfg = routing.load(orthanc_config, config_path)
        except ConfigError as exc:
            self.config_error = str(exc)
            log.error("configuration error, routing is OFF: %s", exc)
            return
        if cfg is None:
            log.info("no %s section in the configuration: nothing to route", routing.SECTION)
            return
        if cfg.raw.get("Enabled") is False:
            log.warning("%s.Enabled is false: routing is OFF", routing.SECTION)
            return
        for warning in cfg.warnings:
            log.warning("%s", warning)
        try:
            self.queue = open_queue(cfg.state_dir, cfg.retry)
        except QueueError as exc:
            self.config_error = str(exc)
            log.error("cannot open the queue, routing is OFF: %s", exc)
            return
        if not cfg.raw.get("NodeId"):
            # the per-node cursors survive a new hostname (a recreated container)
            cfg.node_id = routing.stored_node_id(cfg.state_dir, cfg.node_id)
        self.config = cfg
        if cfg.sinks:
            storage = routing.storage_dir(orthanc_config, routing.config_base_dir(config_path))
            self.sinks = TagSinks(
                cfg, self.queue, self.client, storage_folder(orthanc_config, storage)
            )
        log.info(
            "%d route(s) to %s; state in %s",
            len(cfg.routes),
            ", ".join(r.destination for r in cfg.routes) or "nowhere",
            cfg.state_dir,
        )

    @property
    def active(self) -> bool:
        return self.config is not None and self.queue is not None

    def _need(self) -> tuple[routing.SyncConfig, Queue]:
        if self.config is None or self.queue is None:
            why = self.config_error or f"no {routing.SECTION} section in Orthanc's configuration"
            raise HttpError(503, f"dicomsync is not configured: {why}")
        return self.config, self.queue

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if not self.active or self._started:
            return
        self._started = True
        cfg, queue = self._need()
        self._stop.clear()
        reopen = getattr(self.transport, "reopen", None)
        if reopen is not None:
            reopen()  # a stop closed it; Orthanc started again in this process
        self._cursor_samples = []
        self._caught_up = False
        queue.recover(cfg.node_id)
        self.handler = routing.RouteHandler(
            lambda: OrthancPlace("local", OrthancClient(self.transport)), cfg.build_place
        )
        sinks = self.sinks
        if sinks is not None:
            sinks.build()
        self.pool = WorkerPool(
            queue,
            [*cfg.lanes(), *(sinks.lanes() if sinks else []), *self.extra_lanes],
            {"study": self.handler, **self.extra_handlers},
            batch_handlers={TAGS: sinks.handle} if sinks else {},
            owner=cfg.node_id,
            lease_seconds=cfg.lease_seconds,
            poll_interval=cfg.poll_interval,
            hold_on=(SinkFatal,),
            on_pause=sinks.on_pause if sinks else None,
            nice=WORKER_NICE,
        )
        self.pool.start()
        if sinks is not None:
            sinks.start(self.pool)
        for target, name in (
            (self._intake_loop, "intake"),
            (self._metrics_loop, "metrics"),
            (self._check_places, "places"),
            (self._catch_up, "catch-up"),
        ):
            t = threading.Thread(target=self._guard(target), name=f"dicomsync-{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        if self.pool is not None:
            self.pool.request_stop()
        self.transport.close()  # in-flight reads of this Orthanc now fail fast
        if self.pool is not None:
            self.pool.stop(timeout=10)
        if self.sinks is not None:
            self.sinks.stop()
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        if self.handler is not None:
            self.handler.close()
        # back to the state before start(), so a later ORTHANC_STARTED starts again with a
        # new pool (the stopped one stays for the status); the queue reconnects on its next use
        self._started = False
        self.handler = None
        self._cursor_samples = []
        self._caught_up = False
        if self.queue is not None:
            self.queue.close()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s stopped on an unexpected error", fn.__name__)

        return run

    # --- callbacks ----------------------------------------------------------------------
    def on_stable_study(self, study_id: str) -> None:
        """The STABLE_STUDY callback: hand the study to the intake thread, nothing else.

        Orthanc's SDK warns that REST calls inside a change callback can deadlock (with
        other plugins or Lua), and reading the index for the route filters is such a
        call. So the callback only puts the ID on an in-memory queue; the change-log
        cursor does not pass a study until the intake has routed it, so a crash before
        that loses nothing (the next start's catch-up routes it).
        """
        if self.active:
            self._intake.put(study_id)

    def _intake_loop(self) -> None:
        """Route the studies the STABLE_STUDY callback handed over, one at a time."""
        while not self._stop.is_set():
            try:
                study_id = self._intake.get(timeout=0.5)
            except queue_module.Empty:
                continue
            try:
                self.route_study(study_id)
            except Exception as exc:  # busy or full queue, Orthanc's index not answering, a bug
                self._hold(study_id, exc)
            finally:
                self._intake.task_done()

    def _hold(self, study_id: str, exc: BaseException) -> None:
        """Remember a study whose routing failed: retried by the metrics loop, and until it
        succeeds the change-log cursor stays below it (a restart's catch-up routes it)."""
        with self._unrouted_lock:
            self._unrouted[study_id] = str(exc) or type(exc).__name__
        log.warning(
            "routing study %s failed: %s; retried every few seconds (the change-log cursor "
            "waits for it)",
            study_id,
            exc,
            exc_info=not isinstance(exc, DicomSyncError),
        )

    def retry_unrouted(self) -> int:
        """Route the studies whose routing failed; returns how many are still unrouted."""
        with self._unrouted_lock:
            pending = list(self._unrouted)
        for study_id in pending:
            if self._stop.is_set():
                break
            try:
                self.route_study(study_id)
            except Exception as exc:
                with self._unrouted_lock:
                    self._unrouted[study_id] = str(exc) or type(exc).__name__
                log.debug("routing study %s failed again: %s", study_id, exc)
                continue
            with self._unrouted_lock:
                self._unrouted.pop(study_id, None)
            log.warning("study %s routed after an earlier failure", study_id)
        with self._unrouted_lock:
            return len(self._unrouted)

    def unrouted(self) -> dict[str, str]:
        with self._unrouted_lock:
            return dict(self._unrouted)

    def route_study(self, study_id: str, fingerprint: str | None = None) -> list[Enqueued]:
        """Enqueue ``study_id`` for every route whose filter it matches. A known
        ``fingerprint`` lets a study delivered unchanged stay done."""
        cfg, queue = self._need()
        try:
            facts = routing.study_facts(
                self.client, study_id, cfg.filter_keys | {"StudyInstanceUID"}
            )
        except NotFound:
            log.info("study %s vanished before routing", study_id)
            return []
        uid = next(iter(facts.get("StudyInstanceUID", ())), "")
        destinations = dict.fromkeys(r.destination for r in cfg.matching_routes(facts))
        return queue.enqueue_many(
            [
                NewJob("study", study_id, d, study_uid=uid, fingerprint=fingerprint)
                for d in destinations
            ]
        )

    def on_stored_instance(self, dicom: Any, instance_id: str) -> None:
        for hook in self.instance_hooks:
            hook(dicom, instance_id)

    # --- metrics ------------------------------------------------------------------------
    def publish_metrics(self) -> None:
        if self.metric is None:
            return
        self.metric("dicomsync_config_error", 1.0 if self.config_error else 0.0)
        if not self.active:
            return
        cfg, queue = self._need()
        stats = queue.stats(kind="study")
        for dest in dict.fromkeys([*cfg.destinations(), *stats]):
            s = stats.get(dest)
            label = prom_label("destination", dest)
            self.metric(f"dicomsync_queue_depth{label}", float(s.depth if s else 0))
            self.metric(f"dicomsync_jobs_failed{label}", float(s.failed if s else 0))
            self.metric(f"dicomsync_delivered_instances{label}", float(s.delivered if s else 0))
            age = s.oldest_queued_age if s and s.oldest_queued_age is not None else 0.0
            self.metric(f"dicomsync_oldest_queued_age_seconds{label}", age)
        if self.sinks is not None:
            self.sinks.publish(self.metric)

    def _metrics_loop(self) -> None:
        cfg, _ = self._need()
        while True:
            try:
                self.publish_metrics()
                self.retry_unrouted()
                self._advance_cursor()
            except DicomSyncError as exc:
                log.warning("metrics: %s", exc)
            if self._stop.wait(cfg.metrics_interval):
                return

    def _check_places(self) -> None:
        """Build every destination once, off the callback thread, to report bad settings
        (a missing folder, an unset password variable) at startup, not at the first send."""
        cfg, _ = self._need()
        for key in cfg.destinations():
            try:
                with cfg.build_place(key) as place:
                    place.check_environment()
            except DicomSyncError as exc:
                self.place_errors[key] = str(exc)
                log.error("destination %r is unusable: %s", key, exc)

    # --- changes missed while Orthanc was down -----------------------------------------------
    def _cursor_key(self) -> str:
        cfg, _ = self._need()
        return f"changes_cursor:{cfg.node_id}"

    def _catch_up(self) -> None:
        """Run ``catch_up_once`` until it succeeds (Orthanc or the queue may be busy at start);
        the cursor does not move on its timer before that."""
        cfg, _ = self._need()
        while not self._stop.is_set():
            try:
                self.catch_up_once()
                self._caught_up = True
                return
            except DicomSyncError as exc:
                log.warning("catch-up of changes missed while down: %s; trying again", exc)
            self._stop.wait(cfg.metrics_interval)

    def catch_up_once(self) -> None:
        """Route studies changed since the stored cursor whose STABLE_STUDY a crash or a stop
        swallowed (Orthanc keeps its "not yet stable" list in memory only). The first run
        only sets the cursor: studies already stored are for backfill. A study that fails to
        route is held (``retry_unrouted``) and the cursor stays where it was."""
        _, queue = self._need()
        last = int(self.client.get_json("/changes?last")["Last"])
        cursor = queue.get_meta(self._cursor_key())
        if cursor is None or int(cursor) > last:
            queue.set_meta(self._cursor_key(), str(last))
            return
        seq, studies = int(cursor), set()
        while seq < last and not self._stop.is_set():
            page = self.client.get_json(f"/changes?since={seq}&limit={PAGE}")
            for change in page.get("Changes", []):
                if change.get("Seq", 0) > last:
                    break
                studies.update(self._study_of(change))
            seq = max(seq + 1, int(page.get("Last", seq + 1)))
            if page.get("Done"):
                break
        routed = failed = 0
        for study_id in studies:
            if self._stop.is_set():
                return
            try:
                fingerprint = self._fingerprint(study_id)
                if fingerprint is not None:
                    results = self.route_study(study_id, fingerprint)
                    routed += sum(r.action != "unchanged" for r in results)
            except Exception as exc:
                self._hold(study_id, exc)
                failed += 1
        if not failed:
            queue.set_meta(self._cursor_key(), str(last))
        if routed:
            log.warning(
                "caught up %d route job(s) for studies changed while Orthanc was down", routed
            )

    def _study_of(self, change: Mapping[str, Any]) -> list[str]:
        kind, rid = change.get("ChangeType"), str(change.get("ID", ""))
        if kind in ("NewStudy", "StableStudy"):
            return [rid]
        if kind in ("NewSeries", "NewInstance"):
            level = "series" if kind == "NewSeries" else "instances"
            try:
                return [str(self.client.get_json(f"/{level}/{rid}/study")["ID"])]
            except NotFound:
                return []
        return []

    def _advance_cursor(self) -> None:
        """Every change older than StableAge + slack has had its STABLE_STUDY enqueued, unless
        its routing failed: while a study is unrouted (or the catch-up has not run) the
        cursor stays put, so a restart's catch-up still sees that study's changes."""
        _, queue = self._need()
        now = time.monotonic()
        last = int(self.client.get_json("/changes?last")["Last"])
        self._cursor_samples.append((now, last))
        ripe = [s for s in self._cursor_samples if s[0] <= now - self.stable_age - CURSOR_SLACK]
        idle = self._intake.unfinished_tasks == 0  # every handed-over study is routed
        if ripe and self._caught_up and idle and not self.unrouted():
            stored = int(queue.get_meta(self._cursor_key()) or 0)
            if ripe[-1][1] > stored:
                queue.set_meta(self._cursor_key(), str(ripe[-1][1]))
            self._cursor_samples = [s for s in self._cursor_samples if s not in ripe[:-1]]

    # --- shared helpers -------------------------------------------------------------------
    def _fingerprint(self, study_id: str) -> str | None:
        """The SOP UID set digest of a local study (None: the study is gone)."""
        try:
            instances = self.client.study_instances(study_id)
        except NotFound:
            return None
        return StudyIdentity(
            "", frozenset(i["MainDicomTags"]["SOPInstanceUID"] for i in instances)
        ).fingerprint()

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
        if self.sinks is None or key not in self.sinks.states:
            known = ", ".join(self.sinks.keys) if self.sinks else "none"
            raise HttpError(404, f"no sink {quote(key)} (sinks: {known})")
        return self.sinks

    # --- REST -----------------------------------------------------------------------------
    def handle(self, method: str, path: str, get: Mapping[str, str], body: bytes | None) -> Reply:
        """Dispatch ``/dicomsync/<path>``; never raises. Every error answer is
        ``{"Message"}`` with one bounded line (``short_message``)."""
        reply = self._dispatch(method, path, get, body)
        if reply.status != 200 and isinstance(reply.body, dict) and "Message" in reply.body:
            reply.body["Message"] = short_message(str(reply.body["Message"]))
        return reply

    def _dispatch(
        self, method: str, path: str, get: Mapping[str, str], body: bytes | None
    ) -> Reply:
        routes: list[tuple[str, str, Callable[..., Any]]] = [
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
        ]
        allowed = []
        for verb, pattern, fn in routes:
            m = re.fullmatch(pattern, path.strip("/"))
            if m is None:
                continue
            if verb != method:
                allowed.append(verb)
                continue
            try:
                if verb == "GET":
                    return Reply(200, fn(*m.groups(), get=get))
                return Reply(200, fn(*m.groups(), body=self._body(body)))
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

    @staticmethod
    def _body(body: bytes | None) -> dict[str, Any]:
        """The JSON object of a POST body: size and depth are checked before parsing, because
        ``json.loads`` recurses per level on a thread with a small C stack."""
        if not body or not body.strip():
            return {}
        if len(body) > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        try:
            data = jsonsafe.loads(body, max_bytes=MAX_BODY, max_depth=MAX_BODY_DEPTH)
        except ValueError as exc:  # JsonRejected; also an integer of more than 4300 digits
            reason = str(exc) if isinstance(exc, jsonsafe.JsonRejected) else "number too long"
            raise HttpError(400, f"bad JSON body: {reason}") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object")
        return data

    @staticmethod
    def _job_id(text: str) -> int:
        """A job ID from the path; one SQLite cannot hold is simply unknown (404)."""
        job_id = int(text) if len(text) <= 19 else MAX_JOB_ID + 1
        if job_id > MAX_JOB_ID:
            raise HttpError(404, f"no job {quote(text)}")
        return job_id

    def rest_status(self, get: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Version": dicomsync.__version__,
            "Configured": self.active,
            "ConfigError": self.config_error,
            "Workers": self.pool.state() if self.pool else {"running": False, "lanes": {}},
        }
        if not self.active:
            return out
        cfg, queue = self._need()
        stats = queue.stats(kind="study")
        out.update(
            Node=cfg.node_id,
            StateDirectory=str(cfg.state_dir),
            Warnings=cfg.warnings,
            Routes=[r.to_dict() for r in cfg.routes],
            PlaceErrors=self.place_errors,
            Destinations={
                d: camel(stats[d].to_dict()) if d in stats else camel(DestinationStats(d).to_dict())
                for d in dict.fromkeys([*cfg.destinations(), *stats])
            },
            Sinks=self.sinks.all_status() if self.sinks else {},
            Unrouted=self.unrouted(),
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

    def rest_job(self, job_id: str, get: Mapping[str, str]) -> dict[str, Any]:
        _, queue = self._need()
        job = queue.get(self._job_id(job_id))
        if job is None:
            raise HttpError(404, f"no job {job_id}")
        return camel(job.to_dict())

    def rest_retry(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        _, queue = self._need()
        number = self._job_id(job_id)
        if queue.get(number) is None:
            raise HttpError(404, f"no job {job_id}")
        queue.requeue([number])
        job = queue.get(number)
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
        dest = self._destination(body.get("Destination"))
        resources = body.get("Resources")
        if (
            not isinstance(resources, list)
            or not resources
            or len(resources) > MAX_RESOURCES
            or not all(isinstance(r, str) and r for r in resources)
        ):
            raise HttpError(
                400,
                f'"Resources" must be a list of 1 to {MAX_RESOURCES} study IDs or '
                "StudyInstanceUIDs",
            )
        studies: dict[str, str] = {}
        unknown: list[str] = []
        for resource in resources:
            found = self._resolve_study(resource)
            if not found:
                unknown.append(resource)
            for study_id in found:
                studies.setdefault(study_id, resource)
        if unknown:
            listed = ", ".join(quote(u) for u in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise HttpError(
                400, f"unknown study (no such Orthanc ID or StudyInstanceUID): {listed}{more}"
            )
        results = queue.enqueue_many(
            [
                NewJob("study", s, dest, study_uid="" if ORTHANC_ID.match(r) else r)
                for s, r in studies.items()
            ]
        )
        return {
            "Destination": dest,
            "Jobs": [
                {"Resource": res, "Study": sid, "JobId": r.job_id, "Action": r.action}
                for (sid, res), r in zip(studies.items(), results, strict=True)
            ],
        }

    def _resolve_study(self, resource: str) -> list[str]:
        if len(resource) > MAX_UID:  # neither an Orthanc ID nor a UID (64 characters)
            return []
        if ORTHANC_ID.match(resource):
            try:
                self.client.study(resource)
                return [resource]
            except NotFound:
                pass
        try:
            return self.client.lookup_studies(resource)
        except NotFound:
            return []

    def rest_backfill(self, body: dict[str, Any]) -> dict[str, Any]:
        _, queue = self._need()
        dest = self._destination(body.get("Destination"))
        since = parse_since(body.get("Since"))
        query = check_query(body.get("Query"))
        started = time.monotonic()
        delivered = queue.fingerprints(dest)
        jobs: list[NewJob] = []
        already = considered = 0
        for study in self._studies(query):
            if since and str(study.get("LastUpdate", "")) < since:
                continue
            considered += 1
            study_id = str(study["ID"])
            uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
            fingerprint = None
            if study_id in delivered:
                fingerprint = self._fingerprint(study_id)
                if fingerprint == delivered[study_id]:
                    already += 1
                    continue
            jobs.append(NewJob("study", study_id, dest, study_uid=uid, fingerprint=fingerprint))
        results = queue.enqueue_many(jobs)
        actions = [r.action for r in results]
        return {
            "Destination": dest,
            "Studies": considered,
            "Enqueued": sum(a in ("created", "requeued", "rerun") for a in actions),
            "AlreadyQueued": actions.count("unchanged"),
            "AlreadyDelivered": already,
            "Seconds": round(time.monotonic() - started, 3),
        }

    def _studies(self, query: Mapping[str, Any] | None) -> Any:
        """Studies of this Orthanc (expanded), page by page."""
        offset = 0
        while True:
            if query:
                try:
                    page = self.client.post_json(
                        "/tools/find",
                        {
                            "Level": "Study",
                            "Query": dict(query),
                            "Expand": True,
                            "Since": offset,
                            "Limit": PAGE,
                        },
                    )
                except (RemoteRejected, NotFound) as exc:  # an unknown tag, a bad value
                    raise HttpError(400, f'Orthanc refused the "Query": {exc}') from None
            else:
                page = self.client.get_json(f"/studies?expand&since={offset}&limit={PAGE}")
            if not isinstance(page, list):
                raise HttpError(502, "Orthanc answered a study listing with something else")
            yield from page
            if len(page) < PAGE:
                return
            offset += PAGE

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
        if self.sinks is None:
            return {"Sinks": {}}
        return {
            "Sinks": {
                key: {**st, "Details": self.sinks.details(key)}
                for key, st in self.sinks.all_status().items()
            },
            "Reads": self.sinks.reads(),
        }

    def rest_sink(self, key: str, get: Mapping[str, str]) -> dict[str, Any]:
        self._need()
        sinks = self._sink(key)
        key = unquote(key)
        return {**sinks.status(key), "Details": sinks.details(key)}

    def rest_sink_restart(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        self._need()
        sinks = self._sink(key)
        if self.pool is None:
            raise HttpError(503, "the workers are not running yet")
        return sinks.restart(unquote(key))


MAX_QUERY_KEYS = 64


def check_query(query: Any) -> dict[str, str | list[str]] | None:
    """A backfill ``Query``: an object of DICOM tag -> string (or list of strings), as
    Orthanc's ``/tools/find`` takes it; anything else is our 400, not Orthanc's 500."""
    if query is None:
        return None
    shape = '"Query" must be an object of DICOM tag -> string (as /tools/find)'
    if not isinstance(query, dict) or len(query) > MAX_QUERY_KEYS:
        raise HttpError(400, shape)
    for key, value in query.items():
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
        if not key or not ok:
            raise HttpError(400, f"{shape}; {quote(key)} is {quote(value)}")
    return query


def parse_since(value: Any) -> str | None:
    """``2024-05-01``, ``20240501`` or ``2024-05-01T12:00:00`` -> Orthanc's ``20240501T120000``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise HttpError(400, '"Since" must be a date such as 2024-05-01 or 20240501T120000')
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y%m%dT%H%M%S"):
        try:
            return datetime.strptime(value, fmt).strftime("%Y%m%dT%H%M%S")
        except ValueError:
            continue
    raise HttpError(400, f'"Since": cannot read {quote(value)} as a date (e.g. 2024-05-01)')


# --- registration (the only code that talks to the orthanc module directly) ---------------

APP: App | None = None
# Factories of per-instance hooks, called with the App during register(): the extension
# point for per-instance work (the tags code appends here at import time).
INSTANCE_HOOKS: list[Callable[[App], InstanceHook | None]] = []


def _set_metric(name: str, value: float) -> None:
    orthanc.SetMetricsValue(name, float(value), orthanc.MetricsType.DEFAULT)


_settled_threads: set[int] = set()


def settle_callback_thread() -> None:
    """Make the thread that orthanc-python runs change callbacks on cheap, once per thread.

    orthanc-python calls the change callback from a thread of its own, about once per
    stored instance, and enters Python each time through ``PyGILState_Ensure/Release``:
    each call creates and destroys a Python thread state, and that thread wakes for
    every change. Measured on a 1,000-instance upload, a no-op callback alone took
    0.2 s of CPU and slowed ingest by a few percent. Two changes make it nearly free:

    - one ``PyGILState_Ensure`` that is never released keeps this thread's state
      alive, so later calls only take the GIL;
    - the nice value the workers have: the thread then drains the changes in batches
      instead of waking per instance, and never preempts an upload. The callback only
      hands STABLE_STUDY to the intake thread, so waiting for the CPU costs nothing.

    (0.2 s of CPU went to 0.03 s.) ``_on_change`` calls this after handling the change,
    so the threads the first one (ORTHANC_STARTED) starts keep Orthanc's priority.
    Outside CPython or Linux it changes nothing.
    """
    ident = threading.get_ident()  # not a threading.local: it dies with the thread state
    if ident in _settled_threads:
        return
    _settled_threads.add(ident)
    try:
        import ctypes

        ctypes.pythonapi.PyGILState_Ensure()  # never released: the state outlives calls
    except (ImportError, AttributeError, OSError):
        log.debug("cannot keep the change-callback thread's Python state")
    lower_thread_priority(WORKER_NICE)


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    try:
        app = APP
        if app is not None:
            if change_type == orthanc.ChangeType.STABLE_STUDY:
                app.on_stable_study(resource_id)
            elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
                app.start()
                app.publish_metrics()
            elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
                app.stop()
    except Exception:
        log.exception("OnChange(%s, %s) failed", change_type, resource_id)
    # After the first change (ORTHANC_STARTED) is handled: the threads app.start() began
    # keep Orthanc's priority (the workers nice themselves), only this one is niced.
    try:
        settle_callback_thread()
    except Exception:
        log.exception("cannot settle the change-callback thread")


def _on_stored_instance(dicom: Any, instance_id: str) -> None:
    try:
        if APP is not None and APP.instance_hooks:
            APP.on_stored_instance(dicom, instance_id)
    except Exception:
        log.exception("OnStoredInstance(%s) failed", instance_id)


def _rest(output: Any, uri: str, **request: Any) -> None:
    try:
        if APP is None:
            reply = Reply(503, {"Message": "dicomsync failed to start; see Orthanc's log"})
        else:
            groups = request.get("groups") or ("",)
            reply = APP.handle(
                str(request.get("method", "GET")),
                groups[0],
                request.get("get") or {},
                request.get("body"),
            )
        if reply.status == 405:
            # Orthanc's SDK refuses a body with 405 (SendHttpStatus raises "use the dedicated
            # method"), and SendMethodNotAllowed clears other headers: Allow is the answer.
            output.SendMethodNotAllowed(reply.allow)
            return
        text = json.dumps(reply.body, indent=2, default=str)
        if reply.status == 200:
            output.AnswerBuffer(text, "application/json")
        else:
            output.SetHttpHeader("Content-Type", "application/json")
            output.SendHttpStatus(reply.status, text, len(text.encode()))
    except Exception:
        log.exception("REST %s failed", uri[:200])
        try:
            text = json.dumps({"Message": "internal error; see Orthanc's log"})
            output.SetHttpHeader("Content-Type", "application/json")
            output.SendHttpStatus(500, text, len(text))
        except Exception:
            pass


def register() -> None:
    """Called once by entry.py: logging, configuration, callbacks."""
    global APP
    from dicomsync.plugin import log as plugin_log
    from dicomsync.plugin.inprocess import InProcessTransport

    plugin_log.install()
    try:
        # bounded: Orthanc's configuration is an operator's file, but never worth a crash
        config = jsonsafe.loads(orthanc.GetConfiguration(), max_depth=CONFIG_DEPTH)
        path = orthanc.GetConfigurationPath()
        APP = App(config, str(path) if path else None, InProcessTransport(), _set_metric)
        for factory in INSTANCE_HOOKS:
            hook = factory(APP)
            if hook is not None:
                APP.instance_hooks.append(hook)
    except jsonsafe.JsonRejected as exc:
        log.error("cannot read Orthanc's configuration (%s); routing is OFF", exc)
        APP = None
    except Exception:
        log.exception("cannot set up dicomsync; routing is OFF")
        APP = None
    orthanc.RegisterOnChangeCallback(_on_change)
    if APP is not None and APP.instance_hooks:
        # Only then: each call takes the GIL on the upload's HTTP thread.
        orthanc.RegisterOnStoredInstanceCallback(_on_stored_instance)
    orthanc.RegisterRestCallback("/dicomsync/(.*)", _rest)
    log.info("dicomsync %s plugin loaded from %s", dicomsync.__version__, Path(__file__).parent)

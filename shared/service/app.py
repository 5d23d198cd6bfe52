"""``Service``: the composition root of what the plugin runs, without Orthanc.

Built once from Orthanc's configuration (``routing.load``: the ``DicomSync`` section),
a ``Transport`` to this Orthanc (in-process inside the plugin) and a ``MetricSink``. A
bad section is logged once (one line), routing stays off (``active`` is False), Orthanc
keeps serving and ``GET /dicomsync/status`` shows the error. When active it holds the
queue, the ``Intake``, the ``RouteCursor``, the ``TagSinks`` (if any sink is
configured) and the ``RestApi``; ``start`` builds the route handler and the worker pool.

Life cycle (the plugin's callbacks only hand over to these):

- ``on_stable_study(id)``: ``Intake.hand_over``; works before ``start`` too (the
  hand-over queue exists from construction), so a STABLE_STUDY that arrives while the
  service is still starting waits there, and the catch-up cursor covers whatever a
  crash swallows.
- ``start_in_background()`` (ORTHANC_STARTED): ``start`` on a ``dicomsync-start``
  thread, so the change-callback thread returns at once. ``start``: wait for threads an
  earlier stop left running (below); take back this node's jobs a crash or a stop left
  ``sending`` (``Queue.recover``), build the sinks, start the workers, the feed, and the
  threads ``dicomsync-intake``, ``-metrics`` (metrics, held studies, cursor), ``-places``
  (each destination built once to report bad settings) and ``-catch-up``; then (the
  background start only) publish the metrics once. Each run has its own stop Event.
- ``stop(timeout)`` (ORTHANC_STOPPED): first, under a short lock (``_gate``), mark the
  start unwanted, signal every thread and close the transport (reads in flight fail
  fast); then wait for a start still running, and join the workers, the feed and the
  threads. All within ONE deadline of ``timeout`` seconds (``STOP_TIMEOUT``), closing
  the sinks and places included. A job still in flight stays ``sending`` for this node
  (the pool records nothing after a stop request) and is taken back at the next start.
  If a start outlasts the stop, it starts nothing more: it checks after the recovery,
  after building the sinks and before the pool and each thread (every thread starts
  under ``_gate``), stops what it started, and publishes nothing. After a stop the
  service is as before ``start`` (the stopped pool stays for the status), so a later
  ORTHANC_STARTED in the same process starts again.
- Threads a stop did not see end (a send past the deadline) are kept (``_leftovers``);
  the next start waits for them (``start``: ``LEFTOVER_WAIT`` seconds, then it raises;
  the background start: as long as it is wanted), says so in one log line and in the
  status (``StartBlocked``), so no job is sent twice at once and no job of a live
  sender is recovered. Sinks and places such a thread still uses are closed when it
  is done with them (``TagSinks.stop``, ``RouteHandler.close``).

Thread-safety: ``start``/``stop`` are serialised by a lock (``_life``); ``handle`` and
``on_stable_study`` may be called from any thread at any time. Nothing here raises into
the caller except ``start`` (``DicomSyncError`` of the queue or the pool, or threads of
the last run still busy; the background starter logs it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dicomsync import routing
from dicomsync.console import dose
from dicomsync.console.throughput import Throughput
from dicomsync.errors import ConfigError, DicomSyncError, QueueError, SinkFatal
from dicomsync.orthanc_client import OrthancClient, Transport
from dicomsync.places.orthanc import OrthancPlace
from dicomsync.queue import STUDY_JOBS_KEPT, Queue, open_queue
from dicomsync.service.callback_thread import WORKER_NICE
from dicomsync.service.catch_up import RouteCursor
from dicomsync.service.changelog import ChangeLog
from dicomsync.service.intake import Intake, local_fingerprint
from dicomsync.service.metrics import Metrics, MetricSink
from dicomsync.service.rest_api import RestApi
from dicomsync.service.rest_common import Reply
from dicomsync.service.storage import storage_folder
from dicomsync.service.tag_lanes import TAGS, TagSinks
from dicomsync.worker import WorkerPool

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # seconds ORTHANC_STOPPED waits for every thread, in all
LEFTOVER_WAIT = 10.0  # seconds ``start()`` waits for threads an earlier stop left running


class Service:
    def __init__(
        self,
        orthanc_config: Mapping[str, Any],
        config_path: str | None,
        transport: Transport,
        metric: MetricSink | None = None,
    ) -> None:
        self.transport = transport
        self.client = OrthancClient(transport)
        self.changes = ChangeLog(self.client)
        self.metrics = Metrics(metric)
        self.throughput = Throughput()  # the console's instances/s record
        self.stable_age = routing.stable_age(orthanc_config)
        self.config: routing.SyncConfig | None = None
        self.config_error: str | None = None
        self.queue: Queue | None = None
        self.pool: WorkerPool | None = None
        self.handler: routing.RouteHandler | None = None
        self.sinks: TagSinks | None = None
        self.intake: Intake | None = None
        self.cursor: RouteCursor | None = None
        self.place_errors: dict[str, str] = {}
        self._stop = threading.Event()  # the current run's; each start makes its own
        self._threads: list[threading.Thread] = []
        self._leftovers: list[threading.Thread] = []  # threads a stop did not see end
        self.start_blocked: str | None = None  # why a start waits (for the status)
        self._life = threading.Lock()  # start and stop, one at a time
        # held briefly: ``_wanted``, the transport's opening/closing, every thread start
        self._gate = threading.Lock()
        self._wanted = False  # between start_in_background()/start() and stop()
        self._started = False  # between a completed start and stop
        self._starter: threading.Thread | None = None
        self._setup(orthanc_config, config_path)
        self.api = RestApi(self)

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
        if not cfg.enabled:
            log.warning("%s.Enabled is false: routing is OFF", routing.SECTION)
            return
        for warning in cfg.warnings:
            log.warning("%s", warning)
        try:
            queue = self.queue = open_queue(cfg.state_dir, cfg.retry, cfg.queue)
        except QueueError as exc:
            self.config_error = str(exc)
            log.error("cannot open the queue, routing is OFF: %s", exc)
            return
        if not cfg.node_id_given:
            # the per-node cursors survive a new hostname (a recreated container)
            cfg.node_id = routing.stored_node_id(cfg.state_dir, cfg.node_id)
        self.config = cfg
        self.intake = Intake(cfg, queue, self.client, self._stop)
        self.cursor = RouteCursor(
            cfg.node_id,
            queue,
            self.changes,
            self.intake,
            self.stable_age,
            self._stop,
            self.fingerprint,
            cfg.metrics_interval,
        )
        if cfg.sinks:
            storage = routing.storage_dir(orthanc_config, routing.config_base_dir(config_path))
            self.sinks = TagSinks(
                cfg, queue, self.client, storage_folder(orthanc_config, storage), self.changes
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

    # --- what the callbacks hand over --------------------------------------------------
    def on_stable_study(self, study_id: str) -> None:
        if self.intake is not None and self.active:
            self.intake.hand_over(study_id)

    def handle(
        self,
        method: str,
        path: str,
        get: Mapping[str, str],
        body: bytes | None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return self.api.handle(method, path, get, body, headers)

    def unrouted(self) -> dict[str, str]:
        return self.intake.unrouted() if self.intake is not None else {}

    def fingerprint(self, study_id: str) -> str | None:
        return local_fingerprint(self.client, study_id)

    # --- life cycle ---------------------------------------------------------------------
    def start_in_background(self) -> None:
        with self._gate:
            self._wanted = True
        self._starter = threading.Thread(
            target=self._guard(self._start_then_publish), name="dicomsync-start", daemon=True
        )
        self._starter.start()

    def _start_then_publish(self) -> None:
        self._start(wait=None, publish=True)

    def start(self) -> None:
        with self._gate:
            self._wanted = True
        self._start(wait=LEFTOVER_WAIT)

    def _start(self, wait: float | None, publish: bool = False) -> bool:
        """Start unless a stop came in; True when the start completed and is still wanted.
        Threads an earlier stop left running are waited for first (``wait`` seconds, None:
        as long as the start is wanted); ``start`` raises if they outlast it."""
        with self._life:
            if not self.active and publish and self._wanted:
                self.publish_metrics()  # dicomsync_config_error 1: routing is off
            if not self._wanted or not self.active or self._started:
                return False
            if not self._await_leftovers(wait):
                if self._wanted and wait is not None:
                    raise DicomSyncError(self.start_blocked or "still stopping", retryable=True)
                return False
            run = threading.Event()  # this run's own stop signal
            with self._gate:
                if not self._wanted:
                    return False
                self._stop = run
                self._started = True
                reopen = getattr(self.transport, "reopen", None)
                if reopen is not None:
                    reopen()  # a stop closed it; Orthanc started again in this process
            try:
                if not self._run(run, publish):  # a stop came in: stop what was started
                    self._shutdown(time.monotonic() + STOP_TIMEOUT)
                    return False
            except BaseException:
                self._shutdown(time.monotonic() + STOP_TIMEOUT)
                raise
            return True

    def _cut(self, run: threading.Event) -> bool:
        """A stop came in since this run began (call under ``_gate`` to act on the answer)."""
        return run.is_set() or not self._wanted

    def _run(self, run: threading.Event, publish: bool) -> bool:
        """The body of ``_start`` under ``_life``; False as soon as a stop came in. Every
        thread starts under ``_gate``, after a last check, so none starts after a stop."""
        cfg, queue, intake, cursor = self.config, self.queue, self.intake, self.cursor
        assert cfg is not None and queue is not None and intake and cursor
        intake.stop = cursor.stop = run
        cursor.reset()
        queue.recover(cfg.node_id)  # no sender of this process is alive (_await_leftovers)
        if self._cut(run):
            return False
        self.handler = routing.RouteHandler(
            lambda: OrthancPlace("local", OrthancClient(self.transport)), cfg.build_place
        )
        sinks = self.sinks
        if sinks is not None:
            sinks.build()
        pool = WorkerPool(
            queue,
            [*cfg.lanes(), *(sinks.lanes() if sinks else [])],
            {"study": self.handler},
            batch_handlers={TAGS: sinks.handle} if sinks else {},
            owner=cfg.node_id,
            lease_seconds=cfg.lease_seconds,
            poll_interval=cfg.poll_interval,
            hold_on=(SinkFatal,),
            on_pause=sinks.on_pause if sinks else None,
            nice=WORKER_NICE,
        )
        with self._gate:
            if self._cut(run):
                return False
            self.pool = pool
            pool.start()
            if sinks is not None:
                sinks.start(pool)
        for target, name in (
            (intake.run, "intake"),
            (lambda: self._metrics_loop(run), "metrics"),
            (self._check_places, "places"),
            (cursor.run_catch_up, "catch-up"),
            (lambda: dose.warm(cfg), "dose"),  # the dose page's index, read ahead
        ):
            t = threading.Thread(target=self._guard(target), name=f"dicomsync-{name}", daemon=True)
            with self._gate:
                if self._cut(run):
                    return False
                self._threads.append(t)
                t.start()
        with self._gate:
            if self._cut(run):
                return False
            if publish:
                self.publish_metrics()
        return True

    def _await_leftovers(self, wait: float | None) -> bool:
        """Wait for the threads an earlier stop did not see end (a send in progress): a new
        run beside them would send their jobs a second time. One log line; the status shows
        ``StartBlocked`` meanwhile. False if they outlast ``wait`` or the start is dropped."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            self._leftovers = [t for t in self._leftovers if t.is_alive()]
            if not self._leftovers:
                self.start_blocked = None
                return True
            if self.start_blocked is None:
                names = ", ".join(sorted({t.name for t in self._leftovers}))
                self.start_blocked = (
                    f"{len(self._leftovers)} thread(s) of the last run are still busy "
                    f"({names}); the start waits for them"
                )
                log.warning("not starting yet: %s", self.start_blocked)
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if not self._wanted or left <= 0:
                return False
            self._leftovers[0].join(left)

    def stop(self, timeout: float | None = None) -> bool:
        """Signal every thread and join them within ``timeout`` seconds in all (by default
        ``STOP_TIMEOUT``); True when everything ended in time. The transport is closed at
        once, before waiting for a start still running."""
        timeout = STOP_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._gate:  # from here on a start still running starts nothing more
            self._wanted = False
            self._stop.set()
            if self.pool is not None:
                self.pool.request_stop()
            self.transport.close()  # in-flight reads of this Orthanc now fail fast
        if not self._life.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("still starting after %.0fs; it stops when it is done", timeout)
            return False
        try:
            return self._shutdown(deadline)
        finally:
            self._life.release()

    def _shutdown(self, deadline: float) -> bool:
        """Stop what ``_start`` started, joining within ``deadline``; under ``_life``. What
        did not end in time is kept in ``_leftovers`` for the next start to wait for; sinks
        and places still in use by such threads are closed when those are done with them."""

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        with self._gate:
            self._stop.set()
            pool = self.pool
            if pool is not None:
                pool.request_stop()
            self.transport.close()
        clean = True
        if pool is not None:
            clean = pool.stop(timeout=left())
            self._leftovers += pool.lingering
        if self.sinks is not None:
            feed = self.sinks.stop(left())
            if feed is not None:
                self._leftovers.append(feed)
        for t in self._threads:
            t.join(left())
            if t.is_alive():
                clean = False
                self._leftovers.append(t)
        self._threads.clear()
        if self.handler is not None:
            self.handler.close(left())
        # back to the state before start(), so a later ORTHANC_STARTED starts again with a
        # new pool (the stopped one stays for the status); the queue reconnects on its next use
        self._started = False
        self.handler = None
        if self.cursor is not None:
            self.cursor.reset()
        if self.queue is not None:
            self.queue.close()
        self._leftovers = list(dict.fromkeys(t for t in self._leftovers if t.is_alive()))
        return clean and not self._leftovers

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s stopped on an unexpected error", getattr(fn, "__name__", fn))

        return run

    # --- the periodic threads ------------------------------------------------------------
    def publish_metrics(self) -> None:
        self.metrics.publish(self.config_error, self.config, self.queue, self.sinks)
        if self.queue is not None and self.config is not None:  # saved per node, once a minute
            self.throughput.sample(self.queue, f"console:throughput:{self.config.node_id}")

    def _metrics_loop(self, stop: threading.Event) -> None:
        assert self.config is not None and self.intake is not None and self.cursor is not None
        while True:
            try:
                self.publish_metrics()
                self.intake.retry_unrouted()
                self.cursor.advance()
            except DicomSyncError as exc:
                log.warning("metrics: %s", exc)
            try:  # done study jobs leave their fingerprint only (an unreachable Orthanc or not)
                if self.queue is not None:
                    self.queue.prune("study", time.time() - STUDY_JOBS_KEPT)
            except DicomSyncError as exc:
                log.warning("queue: %s", exc)
            if stop.wait(self.config.metrics_interval):
                return

    def _check_places(self) -> None:
        """Build every destination once, off the callback thread, to report bad settings
        (a missing folder, an unset password variable) at startup, not at the first send."""
        assert self.config is not None
        for key in self.config.destinations():
            try:
                with self.config.build_place(key) as place:
                    place.check_environment()
                    probed = place.probe()  # C-ECHO for a DICOM node
                    if probed:
                        log.info("destination %r: %s", key, probed)
            except DicomSyncError as exc:
                if exc.retryable:  # down for now: its jobs wait and retry, nothing is wrong
                    log.warning("destination %r does not answer yet: %s", key, exc)
                    continue
                self.place_errors[key] = str(exc)
                log.error("destination %r is unusable: %s", key, exc)

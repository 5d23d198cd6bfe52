"""``Intake``: studies Orthanc calls stable -> one ``study`` job per matching route.

**Hand-over.** ``hand_over(study_id)`` is all the STABLE_STUDY callback does: it puts
the ID on an in-memory queue and returns. Orthanc's SDK warns that REST calls inside a
change callback can deadlock (with other plugins or Lua), and reading the index for
the route filters is such a call. The queue exists from the moment the service is
built, so a STABLE_STUDY that arrives before the intake thread runs (the service starts
in the background) waits there. ``run()`` (the ``dicomsync-intake`` thread) takes the
IDs one at a time and calls ``route_study``.

**Routing.** ``route_study(study_id, fingerprint)`` reads the few index values the
route filters need (``routing.study_facts``: in-process, no DICOM parsing) and enqueues
one job per distinct destination of the matching routes, in one transaction. A known
``fingerprint`` lets a study delivered unchanged stay done. A study deleted meanwhile is
logged and routes nowhere.

**Held studies.** A study whose routing fails (busy or full queue, Orthanc's index not
answering, a bug) is *held* (``hold``): ``unrouted()`` lists it with the error, and
``retry_unrouted()`` (the metrics loop, every ``MetricsInterval``) routes it again.
While any study is held, or any handed-over study is not routed yet (``idle`` is
False), the routes' change-log cursor does not move (``catch_up.RouteCursor``), so a
crash or a stop before that loses nothing: the next start's catch-up routes it.

Thread-safety: ``hand_over`` from any thread (a ``queue.Queue``); ``run`` on one thread;
``route_study``, ``hold``, ``retry_unrouted`` and ``unrouted`` from any thread (the held
studies are under a lock). ``route_study`` raises ``DicomSyncError`` (Orthanc, the
queue); ``run`` and ``retry_unrouted`` never raise, they hold.
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading

from dicomsync import routing
from dicomsync.errors import DicomSyncError, NotFound
from dicomsync.identity import StudyIdentity
from dicomsync.orthanc_client import OrthancClient
from dicomsync.queue import Enqueued, NewJob, Queue

log = logging.getLogger(__name__)


def local_fingerprint(client: OrthancClient, study_id: str) -> str | None:
    """The SOP UID set digest of a study of this Orthanc (None: the study is gone)."""
    try:
        instances = client.study_instances(study_id)
    except NotFound:
        return None
    return StudyIdentity(
        "", frozenset(i["MainDicomTags"]["SOPInstanceUID"] for i in instances)
    ).fingerprint()


class Intake:
    def __init__(
        self,
        cfg: routing.SyncConfig,
        queue: Queue,
        client: OrthancClient,
        stop: threading.Event,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.client = client
        self.stop = stop  # set while the service is stopping or stopped
        # studies whose STABLE_STUDY (or catch-up) routing failed -> the error
        self._unrouted: dict[str, str] = {}
        self._lock = threading.Lock()
        self._handed: queue_module.Queue[str] = queue_module.Queue()

    def hand_over(self, study_id: str) -> None:
        """The STABLE_STUDY callback: hand the study to the intake thread, nothing else."""
        self._handed.put(study_id)

    @property
    def idle(self) -> bool:
        """Every handed-over study is routed (or held)."""
        return self._handed.unfinished_tasks == 0

    def run(self) -> None:
        """Route the studies the STABLE_STUDY callback handed over, one at a time."""
        while not self.stop.is_set():
            try:
                study_id = self._handed.get(timeout=0.5)
            except queue_module.Empty:
                continue
            try:
                self.route_study(study_id)
            except Exception as exc:  # busy or full queue, Orthanc's index not answering, a bug
                self.hold(study_id, exc)
            finally:
                self._handed.task_done()

    def route_study(self, study_id: str, fingerprint: str | None = None) -> list[Enqueued]:
        """Enqueue ``study_id`` for every route whose filter it matches. A known
        ``fingerprint`` lets a study delivered unchanged stay done."""
        cfg = self.cfg
        try:
            facts = routing.study_facts(
                self.client, study_id, cfg.filter_keys | {"StudyInstanceUID"}
            )
        except NotFound:
            log.info("study %s vanished before routing", study_id)
            return []
        uid = next(iter(facts.get("StudyInstanceUID", ())), "")
        destinations = dict.fromkeys(r.destination for r in cfg.matching_routes(facts))
        return self.queue.enqueue_many(
            [
                NewJob("study", study_id, d, study_uid=uid, fingerprint=fingerprint)
                for d in destinations
            ]
        )

    def hold(self, study_id: str, exc: BaseException) -> None:
        """Remember a study whose routing failed: retried by the metrics loop, and until it
        succeeds the change-log cursor stays below it (a restart's catch-up routes it)."""
        with self._lock:
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
        with self._lock:
            pending = list(self._unrouted)
        for study_id in pending:
            if self.stop.is_set():
                break
            try:
                self.route_study(study_id)
            except Exception as exc:
                with self._lock:
                    self._unrouted[study_id] = str(exc) or type(exc).__name__
                log.debug("routing study %s failed again: %s", study_id, exc)
                continue
            with self._lock:
                self._unrouted.pop(study_id, None)
            log.warning("study %s routed after an earlier failure", study_id)
        with self._lock:
            return len(self._unrouted)

    def unrouted(self) -> dict[str, str]:
        with self._lock:
            return dict(self._unrouted)

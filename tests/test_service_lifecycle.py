"""The plugin service's start/stop (``dicomsync.service.app.Service``), without Orthanc.

ORTHANC_STARTED starts the service on a background thread and ORTHANC_STOPPED stops it
within one deadline; Orthanc's ``/tools/reset`` does both again in the same process.
These tests hold a start or a send on purpose to check what a stop that runs out of
time leaves behind: nothing may call Orthanc after the stop returned, a job is never
sent twice at once, a sink or place in use is not closed under its user, and the stop
keeps its deadline. (Built from the reviewer's reproductions, /tmp/rev/*.py.)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dicomsync import routing
from dicomsync.errors import DicomSyncError, SinkRetryable, Unreachable
from dicomsync.orthanc_client import Transport
from dicomsync.queue import NewJob, open_queue
from dicomsync.route_handler import RouteHandler
from dicomsync.service import app, tag_lanes
from dicomsync.service.app import Service
from dicomsync.service.tag_feed import TAGS
from dicomsync.sinks.base import Ledger, SendResult
from dicomsync.worker import Lane, WorkerPool


class Stub(Transport):
    """This Orthanc, empty; records every call with whether the transport was open."""

    description = "stub"

    def __init__(self) -> None:
        self.closed = False
        self.calls: list[tuple[float, bool, str]] = []

    def get(self, path: str) -> bytes:
        self.calls.append((time.monotonic(), self.closed, path))
        if path == "/changes?last":
            return json.dumps({"Last": 0}).encode()
        return b"[]"

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        self.calls.append((time.monotonic(), self.closed, path))
        return b"[]"

    def delete(self, path: str) -> None:
        self.calls.append((time.monotonic(), self.closed, path))

    def close(self) -> None:
        self.closed = True

    def reopen(self) -> None:
        self.closed = False


def orthanc_config(tmp_path: Path, **section: Any) -> dict[str, Any]:
    return {
        "StorageDirectory": str(tmp_path / "storage"),
        "DicomSync": {
            "StateDirectory": str(tmp_path / "state"),
            "NodeId": "n",
            "Places": {"zips": {"Kind": "zipped_root", "Path": str(tmp_path / "z")}},
            "Routes": [{"Destination": "zips"}],
            "MetricsInterval": 0.2,
            "PollInterval": 0.2,
            **section,
        },
    }


def our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("dicomsync-")}


def wait_for(check: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test built; stopped at the end whatever happened."""
    built: list[Service] = []
    yield built
    for service in built:
        service.stop(timeout=5)
        if service._starter is not None:
            service._starter.join(5)


# --- 1. a stop that times out waiting for the start --------------------------------------
def test_a_stop_that_outlasts_the_start_closes_the_transport_and_nothing_starts_after_it(
    tmp_path: Path, services: list[Service]
) -> None:
    transport = Stub()
    metrics: list[float] = []
    service = Service(
        orthanc_config(tmp_path), None, transport, lambda name, v: metrics.append(time.monotonic())
    )
    services.append(service)
    assert service.queue is not None
    real_recover = service.queue.recover
    entered, release = threading.Event(), threading.Event()

    def slow_recover(owner: str = "") -> int:
        entered.set()
        release.wait(10)
        return real_recover(owner)

    service.queue.recover = slow_recover  # type: ignore[method-assign]
    before = our_threads()
    service.start_in_background()
    assert entered.wait(5)
    t0 = time.monotonic()
    assert service.stop(timeout=0.2) is False  # the start holds the lock
    stopped = time.monotonic()
    assert stopped - t0 < 1.0
    assert transport.closed, "the transport must be closed when stop returns"
    release.set()
    assert service._starter is not None
    service._starter.join(5)
    assert not service._starter.is_alive()
    time.sleep(0.5)  # a metrics or intake loop started anyway would have run by now
    assert transport.closed
    assert [c for c in transport.calls if c[0] > stopped] == []
    assert [m for m in metrics if m > stopped] == []
    started = {t.name for t in our_threads() - before if t.is_alive()}
    assert started == set(), started
    assert service.pool is None or not service.pool.running


@pytest.mark.parametrize("run", range(10))
def test_no_metric_is_published_after_a_stop_right_after_the_start(
    tmp_path: Path, run: int, services: list[Service]
) -> None:
    metrics: list[float] = []
    service = Service(
        orthanc_config(tmp_path), None, Stub(), lambda name, v: metrics.append(time.monotonic())
    )
    services.append(service)
    service.start_in_background()
    service.stop()
    stopped = time.monotonic()
    assert service._starter is not None
    service._starter.join(5)
    assert [m for m in metrics if m > stopped] == []


# --- 2. a restart while a send of the last run is still going ---------------------------
def test_a_restart_waits_for_the_send_a_timed_out_stop_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, services: list[Service]
) -> None:
    calls: list[int] = []
    inside: dict[int, int] = {}
    overlap: list[int] = []
    lock = threading.Lock()
    release = threading.Event()

    class StuckHandler:
        def __init__(self, *args: Any) -> None:
            pass

        def __call__(self, job: Any) -> Any:
            with lock:
                calls.append(job.id)
                inside[job.id] = inside.get(job.id, 0) + 1
                if inside[job.id] > 1:
                    overlap.append(job.id)
            try:
                release.wait(10)
                raise Unreachable("released")
            finally:
                with lock:
                    inside[job.id] -= 1

        def close(self, timeout: float | None = None) -> None:
            pass

    monkeypatch.setattr(routing, "RouteHandler", StuckHandler)
    service = Service(orthanc_config(tmp_path), None, Stub())
    services.append(service)
    assert service.queue is not None
    service.start()
    service.queue.enqueue(NewJob("study", "st1", "zips"))
    wait_for(lambda: calls)
    assert service.stop(timeout=0.5) is False
    service.start_in_background()  # /tools/reset: ORTHANC_STARTED again
    wait_for(lambda: service.start_blocked)
    assert "still busy" in str(service.handle("GET", "status", {}, None).body["StartBlocked"])
    time.sleep(1.0)  # the new run would have leased the job again by now
    assert calls == [calls[0]] and not overlap
    release.set()
    wait_for(lambda: service.pool is not None and service.pool.running)
    assert service.start_blocked is None
    wait_for(lambda: len(calls) >= 2)  # the job, taken back, is sent by the new run
    assert not overlap


def test_a_start_waits_for_a_service_thread_a_stop_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, services: list[Service]
) -> None:
    loops: list[str] = []
    hold = threading.Event()

    def metric(name: str, value: float) -> None:
        me = threading.current_thread()
        if me.name == "dicomsync-metrics" and me not in [t for t, _ in running]:
            running.append((me, time.monotonic()))
            loops.append(me.name)
        hold.wait(10)

    running: list[tuple[threading.Thread, float]] = []
    service = Service(orthanc_config(tmp_path), None, Stub(), metric)
    services.append(service)
    service.start()
    wait_for(lambda: running)
    assert service.stop(timeout=0.3) is False  # the metrics loop is stuck in a publish
    monkeypatch.setattr(app, "LEFTOVER_WAIT", 0.3)
    with pytest.raises(DicomSyncError, match="still busy"):
        service.start()
    assert [t for t, _ in running if t.is_alive()] == [running[0][0]]
    hold.set()
    monkeypatch.setattr(app, "LEFTOVER_WAIT", 5.0)
    service.start()
    wait_for(lambda: len(running) == 2)
    assert not running[0][0].is_alive()


# --- 3. the stop's deadline, and what it closes ----------------------------------------------
class BlockingSink:
    """A sink whose send blocks until released; records whether close came during a send."""

    key = "idx"

    def __init__(self) -> None:
        self.sending = threading.Event()
        self.release = threading.Event()
        self.in_send = False
        self.closed_during_send = False
        self.closed = False

    def send(self, events: Sequence[Any]) -> SendResult:
        self.in_send = True
        self.sending.set()
        try:
            self.release.wait(10)
            return SendResult(delivered=frozenset(e.id for e in events))
        finally:
            self.in_send = False

    def close(self) -> None:
        self.closed_during_send = self.closed_during_send or self.in_send
        self.closed = True


class FakeEvent:
    def __init__(self, event_id: str) -> None:
        self.id = event_id


def test_a_stop_does_not_close_a_sink_under_a_send_and_keeps_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, services: list[Service]
) -> None:
    sink = BlockingSink()
    monkeypatch.setattr(tag_lanes, "build_sink", lambda key, section, base: sink)
    cfg = orthanc_config(tmp_path, Sinks={"idx": {"Kind": "sqlite_index", "Path": "i.sqlite"}})
    service = Service(cfg, None, Stub())
    services.append(service)
    assert service.sinks is not None and service.queue is not None
    service.sinks.read_events = lambda instance: [FakeEvent(f"{instance}-e")]  # type: ignore[assignment]
    service.start()
    service.queue.enqueue(NewJob(TAGS, "i1", "idx"))
    assert sink.sending.wait(5)
    t0 = time.monotonic()
    assert service.stop(timeout=0.5) is False
    assert time.monotonic() - t0 < 1.0
    assert not sink.closed  # the send still runs: closing now would lose what it delivered
    sink.release.set()
    wait_for(lambda: sink.closed)  # the last send out closes it
    assert not sink.closed_during_send


class SlowClosePlace:
    def __init__(self) -> None:
        self.closing = threading.Event()

    def close(self) -> None:
        self.closing.set()
        time.sleep(3)


def test_a_place_slow_to_close_does_not_stretch_the_stop(
    tmp_path: Path, services: list[Service]
) -> None:
    service = Service(orthanc_config(tmp_path), None, Stub())
    services.append(service)
    service.start()
    assert service.handler is not None
    place = SlowClosePlace()
    service.handler._place("xnat", lambda: place)  # type: ignore[arg-type,return-value]
    t0 = time.monotonic()
    service.stop(timeout=1)
    took = time.monotonic() - t0
    assert place.closing.is_set()
    assert 0.5 < took < 1.6, took


def test_the_route_handler_closes_the_places_of_a_sending_thread_when_its_send_ends() -> None:
    closed: list[str] = []
    sending, release = threading.Event(), threading.Event()

    class Place:
        def __init__(self, name: str) -> None:
            self.name = name

        def ref_by_id(self, rid: str) -> Any:
            sending.set()
            release.wait(10)
            raise Unreachable("released")

        def close(self) -> None:
            closed.append(self.name)

    handler = RouteHandler(lambda: Place("source"), lambda key: Place(key))  # type: ignore[arg-type,return-value]
    job = NewJob("study", "s", "dest")
    errors: list[BaseException] = []

    def send() -> None:
        try:
            handler(job)  # type: ignore[arg-type]
        except Unreachable as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    assert sending.wait(5)
    handler.close(1.0)
    assert closed == []  # in use by the send
    release.set()
    t.join(5)
    assert errors and sorted(closed) == ["dest", "source"]
    assert handler.held() == 0


def test_a_ledger_closed_under_a_send_asks_for_a_retry(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.add(["a"])
    ledger.close()
    with pytest.raises(SinkRetryable):
        ledger.add(["b"])


def test_a_ledger_write_that_fails_before_its_transaction_still_raises_a_sink_error(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")

    class Broken:
        def execute(self, sql: str, *args: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

    ledger._conn = Broken()  # type: ignore[assignment]
    with pytest.raises(Exception) as info:
        ledger.add(["a"])
    assert type(info.value).__name__ == "SinkFatal"


def test_a_stop_wakes_every_thread_of_a_lane_at_once(tmp_path: Path) -> None:
    """The threads of a lane share one wake-up event: the first one to wake must not
    swallow the stop signal of the others (they slept on for ``poll_interval``)."""
    queue = open_queue(tmp_path / "state")
    try:
        for _ in range(15):
            pool = WorkerPool(queue, [Lane("d", 4)], {}, poll_interval=30)
            pool.start()
            t0 = time.monotonic()
            assert pool.stop(timeout=3), "a lane thread slept through the stop"
            assert time.monotonic() - t0 < 1.0
    finally:
        queue.close()

"""The plugin's service units (``dicomsync.service``) over a REAL Orthanc through HTTP, without
the ``orthanc`` module: routing failures hold the change-log cursor, the node id survives a new
hostname, a stop followed by a start routes again, a stop is bounded and leaves jobs in flight
``sending``, concurrent sink sends keep their own rejections, error codes and metric labels.
The callbacks themselves run under the ``orthanc`` stand-in (tests/fake_orthanc.py): they only
hand over (no REST call on the change thread, ORTHANC_STARTED starts in the background)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomsync import routing
from dicomsync.errors import NotFound, RemoteRejected, Unreachable
from dicomsync.http_errors import orthanc_error
from dicomsync.identity import orthanc_study_id
from dicomsync.orthanc_client import HttpTransport, OrthancClient, Transport
from dicomsync.queue import Job, open_queue
from dicomsync.service import callback_thread, catch_up
from dicomsync.service.app import Service
from dicomsync.service.callback_thread import WORKER_NICE

import fake_orthanc
from dicomdata import make_instance
from orthanc_server import OrthancProcess
from plugin_helpers import wait_for

pytestmark = pytest.mark.orthanc


def upload_study(orthanc: OrthancProcess, patient: str) -> tuple[str, str]:
    """One instance in a new study; returns (Orthanc study ID, Orthanc instance ID)."""
    study_uid = generate_uid()
    buf = BytesIO()
    make_instance(None, patient_id=patient, study_uid=study_uid, modality="OT").save_as(
        buf, enforce_file_format=True
    )
    answer = orthanc.upload(buf.getvalue())
    return orthanc_study_id(patient, study_uid), str(answer["ID"])


def glue_config(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "zips").mkdir(exist_ok=True)
    return {
        "StorageDirectory": str(tmp_path / "db"),
        "StableAge": 0,
        routing.SECTION: {
            "Places": {"zips": {"Kind": "zipped_root", "Path": "zips"}},
            "Routes": [{"Destination": "zips", "Filter": {"PatientID": "GLUE*"}}],
            "StateDirectory": str(tmp_path / "state"),
            "PollInterval": 0.2,
            "MetricsInterval": 0.2,
        },
    }


class Flaky(Transport):
    """HTTP to a real Orthanc; a GET of a path in ``failing`` raises what the in-process
    transport raises for Orthanc error ``code`` (``orthanc_error``), and is listed in ``calls``."""

    description = "the test Orthanc (HTTP)"

    def __init__(self, url: str) -> None:
        self.http = HttpTransport(url)
        self.failing: set[str] = set()
        self.calls: list[str] = []
        self.code = 4

    def get(self, path: str) -> bytes:
        if path in self.failing:
            self.calls.append(path)
            raise orthanc_error(self.code, f"GET {path}", "Not enough memory")
        return self.http.get(path)

    def get_stream(self, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self.http.get_stream(path, chunk_size)

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        return self.http.post(path, body, content_type)

    def delete(self, path: str) -> None:
        self.http.delete(path)

    def close(self) -> None:
        self.http.close()


class Glue:
    """Drives ``Service`` as the callbacks do: ``register`` builds a new one (as when Orthanc
    loads the plugin), ``started``/``stopped``/``stable`` are the changes."""

    def __init__(self, orthanc: OrthancProcess, config: dict[str, Any], path: str) -> None:
        self.transport = Flaky(orthanc.url)
        self.config = config
        self.path = path
        self.metrics: dict[str, float] = {}
        self.service: Service | None = None

    def register(self) -> Service:
        self.service = Service(self.config, self.path, self.transport, self.metrics.__setitem__)
        return self.service

    @property
    def app(self) -> Service:
        assert self.service is not None
        return self.service

    def started(self) -> None:
        self.app.start()

    def stopped(self) -> None:
        self.app.stop()

    def stable(self, study_id: str) -> None:
        self.app.on_stable_study(study_id)

    def get(self, path: str, **get: str) -> Any:
        reply = self.app.handle("GET", path, get, None)
        assert reply.status == 200, reply.body
        return reply.body

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("status")
        return result

    def job_state(self, study_id: str) -> str | None:
        jobs = self.get("jobs", limit="1000")["Jobs"]
        return next((j["State"] for j in jobs if j["Resource"] == study_id), None)

    def cursor(self) -> int | None:
        assert self.app.queue is not None
        value = self.app.queue.get_meta(f"changes_cursor:{self.status()['Node']}")
        return int(value) if value is not None else None

    def fail_gets(self, paths: set[str], code: int = 4) -> list[str]:
        """Orthanc answers GET ``paths`` with error ``code`` (4: NotEnoughMemory) while they
        are in the set; returns the list of failed calls."""
        self.transport.failing = paths
        self.transport.code = code
        return self.transport.calls


@pytest.fixture
def glue(orthanc: OrthancProcess, tmp_path: Path) -> Iterator[Glue]:
    g = Glue(orthanc, glue_config(tmp_path), str(tmp_path / "orthanc.json"))
    yield g
    if g.service is not None:
        g.stopped()


def test_a_failed_routing_is_retried_and_holds_the_changes_cursor(
    glue: Glue, orthanc: OrthancProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    glue.register()
    monkeypatch.setattr(catch_up, "CURSOR_SLACK", 0.0)  # with StableAge 0: ripe at once
    glue.started()
    wait_for(lambda: glue.cursor() is not None, timeout=15, what="the first cursor")
    first = glue.cursor()

    # 1. Orthanc fails while the STABLE_STUDY callback reads the study: retried, then routed
    x, _ = upload_study(orthanc, "GLUEX")
    failing = {f"/studies/{x}"}
    calls = glue.fail_gets(failing)
    glue.stable(x)
    wait_for(lambda: x in glue.status()["Unrouted"], timeout=10, what="the study to be held")
    assert "Orthanc error 4" in glue.status()["Unrouted"][x]
    y, _ = upload_study(orthanc, "GLUEY")  # a study routed fine meanwhile
    glue.stable(y)
    wait_for(lambda: glue.job_state(y) == "done", timeout=30, what="the other study")
    wait_for(lambda: len(calls) >= 4, timeout=15, what="retries from the metrics loop")
    assert glue.cursor() == first, "the cursor passed a study whose routing failed"
    failing.clear()
    wait_for(lambda: glue.job_state(x) == "done", timeout=30, what="the failed study, retried")
    assert glue.status()["Unrouted"] == {}
    last = int(orthanc.get("/changes?last")["Last"])
    wait_for(lambda: (glue.cursor() or 0) >= last, timeout=15, what="the cursor to move on")

    # 2. still failing when Orthanc stops: the next start's catch-up routes it
    z, _ = upload_study(orthanc, "GLUEZ")
    failing.add(f"/studies/{z}")
    glue.stable(z)
    held = glue.cursor()
    wait_for(lambda: len(calls) >= 8, timeout=15, what="retries of the second study")
    assert (
        glue.cursor() == held
        and held is not None
        and held < int(orthanc.get("/changes?last")["Last"])
    )
    glue.stopped()
    failing.clear()
    glue.register()
    glue.started()
    wait_for(lambda: glue.job_state(z) == "done", timeout=30, what="the catch-up of the held study")


def test_the_node_id_and_its_cursor_survive_a_new_hostname(
    glue: Glue, orthanc: OrthancProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    glue.register()
    glue.started()
    node = glue.status()["Node"]
    wait_for(lambda: glue.cursor() is not None, timeout=15, what="the first cursor")
    glue.stopped()

    # the container is recreated: a new hostname; a study arrives while it is down
    monkeypatch.setattr(socket, "gethostname", lambda: "recreated-container-4f2a")
    missed, _ = upload_study(orthanc, "GLUEDOWN")
    glue.register()
    glue.started()
    assert glue.status()["Node"] == node
    assert (tmp_path / "state" / routing.NODE_ID_FILE).read_text().strip() == node
    wait_for(lambda: glue.job_state(missed) == "done", timeout=30, what="the catch-up")


def test_started_again_after_a_stop_routes_again(glue: Glue, orthanc: OrthancProcess) -> None:
    app = glue.register()
    glue.started()
    glue.stopped()
    assert app.pool is not None and not app.pool.running and app.handler is None
    assert not glue.status()["Workers"]["running"]
    glue.started()  # the same App, the same process
    assert glue.service is app and glue.status()["Workers"]["running"]
    study, _ = upload_study(orthanc, "GLUEAGAIN")
    glue.stable(study)
    wait_for(lambda: glue.job_state(study) == "done", timeout=30, what="a job after the restart")


def test_a_stop_is_bounded_and_leaves_the_job_in_flight_sending(
    glue: Glue, orthanc: OrthancProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORTHANC_STOPPED waits for the threads within one short deadline (it could block
    about 40 s of joins); a job still in flight stays ``sending`` for the next start."""
    from dicomsync.service import app as service_app

    monkeypatch.setattr(service_app, "STOP_TIMEOUT", 1.0)
    app = glue.register()
    glue.started()
    assert app.pool is not None
    inside, release = threading.Event(), threading.Event()

    def stuck(job: Job) -> Any:
        inside.set()
        release.wait(30)
        raise Unreachable("released")

    app.pool.handlers["study"] = stuck
    study, _ = upload_study(orthanc, "GLUESTUCK")
    glue.stable(study)
    try:
        assert inside.wait(30)
        started = time.monotonic()
        glue.stopped()
        took = time.monotonic() - started
        assert took < 3.0, f"ORTHANC_STOPPED took {took:.1f}s"
        assert glue.job_state(study) == "sending"
    finally:
        release.set()


def test_prometheus_labels_are_escaped_once_for_all() -> None:
    from dicomsync.service.metrics import label

    assert label("destination", "zips") == '{destination="zips"}'
    assert label("sink", 'a"b\\c\nd') == '{sink="a\\"b\\\\c\\nd"}'


def test_concurrent_sends_to_one_sink_keep_their_own_rejections(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    from dicomsync.service.tag_lanes import TagSinks
    from dicomsync.sinks.base import SendResult
    from dicomsync.sinks.sqlite_index import SqliteIndex
    from dicomsync.worker import SinkDelivered

    first_in, second_in = threading.Event(), threading.Event()

    class RejectsEverything(SqliteIndex):
        """A sink that refuses every event (each send returns its own in ``rejected``)."""

        def send(self, events: Any) -> SendResult:
            rejected = {e.id: "refused" for e in events}
            if not first_in.is_set():
                first_in.set()
                second_in.wait(1.0)  # a second send may run now, unless sends are serialised
            else:
                second_in.set()
            return SendResult(frozenset(), rejected)

    cfg = routing.load(
        {
            routing.SECTION: {
                "StateDirectory": str(tmp_path / "state"),
                "Sinks": {"idx": {"Kind": "sqlite_index", "Path": "index.sqlite"}},
            }
        },
        tmp_path / "orthanc.json",
    )
    assert cfg is not None
    queue = open_queue(cfg.state_dir)
    sinks = TagSinks(cfg, queue, OrthancClient(HttpTransport(orthanc.url)))
    state = sinks.states["idx"]
    state.sink = RejectsEverything.from_config("idx", cfg.sinks["idx"], base_dir=cfg.sinks_base)
    _, a = upload_study(orthanc, "SINKA")
    _, b = upload_study(orthanc, "SINKB")
    results: dict[str, list[Any]] = {}

    def run(resource: str, job_id: int) -> Callable[[], None]:
        def handle() -> None:
            results[resource] = list(sinks.handle([Job(job_id, "tags", resource, "idx")]))

        return handle

    ta = threading.Thread(target=run(a, 1))
    ta.start()
    assert first_in.wait(30)
    tb = threading.Thread(target=run(b, 2))
    tb.start()
    ta.join(30)
    tb.join(30)
    try:
        for resource in (a, b):
            (result,) = results[resource]
            assert isinstance(result, SinkDelivered) and result.outcome == "rejected", result
            assert result.sent == 0
        assert state.rejected > 0
    finally:
        sinks.stop()
        queue.close()


def test_docker_compose_pins_hostnames_and_node_a_indexes_into_its_state_volume() -> None:
    import json

    import yaml

    repo = Path(__file__).resolve().parent.parent
    services = yaml.safe_load((repo / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        assert service.get("hostname") == name, f"{name}: hostname must not change on re-create"
    cfg = json.loads((repo / "docker" / "orthanc-a.json").read_text())
    assert routing.validate(cfg, "/etc/orthanc/orthanc-a.json") == []
    sync = routing.load(cfg, "/etc/orthanc/orthanc-a.json")
    assert sync is not None and sync.sinks["index"]["Kind"] == "sqlite_index"
    state_volume = next(
        v for v in services["orthanc-a"]["volumes"] if v.split(":")[1] == str(sync.state_dir)
    )
    assert state_volume.startswith("a-state:")
    assert sync.sinks_base == sync.state_dir  # index.sqlite lives in the state volume


@pytest.mark.parametrize(
    "section",
    [
        {"Kind": "orthanc", "Url": "http://127.0.0.1:9", "User": "u", "PasswordEnv": "DS_UNSET_1"},
        {
            "Kind": "xnat_pre_archive",
            "Server": "http://127.0.0.1:9",
            "Project": "P",
            "User": "u",
            "PasswordEnv": "DS_UNSET_1",
        },
    ],
)
def test_an_unset_password_variable_of_a_route_is_reported_at_startup(
    orthanc: OrthancProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: dict[str, Any],
) -> None:
    """``place add`` needs no secret, but a route whose password variable is unset is named
    in PlaceErrors (and Orthanc's log) when Orthanc starts, before its first job."""
    monkeypatch.delenv("DS_UNSET_1", raising=False)
    config = glue_config(tmp_path)
    config[routing.SECTION]["Places"]["remote"] = section
    config[routing.SECTION]["Routes"].append({"Destination": "remote"})
    g = Glue(orthanc, config, str(tmp_path / "orthanc.json"))
    g.register()
    try:
        g.started()
        wait_for(
            lambda: "remote" in g.status().get("PlaceErrors", {}),
            timeout=20,
            what="the startup check of the destinations",
        )
        assert "DS_UNSET_1" in g.status()["PlaceErrors"]["remote"]
        assert "zips" not in g.status()["PlaceErrors"]
    finally:
        g.stopped()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (12.5, 12.5),
        (float("nan"), 60.0),
        (float("inf"), 60.0),
        (-1, 60.0),
        (True, 60.0),
        ("nan", 60.0),
        ("abc", 60.0),
        (None, 60.0),
        ([1], 60.0),
    ],
)
def test_stable_age_that_is_not_finite_seconds_falls_back_to_orthancs_default(
    value: Any, seconds: float
) -> None:
    assert routing.stable_age({"StableAge": value}) == seconds


# --- the callbacks, under the orthanc stand-in ------------------------------------------------


class FakeGlue:
    def __init__(self, fake: fake_orthanc.FakeOrthanc, module: ModuleType) -> None:
        self.fake = fake
        self.module = module

    def register(self) -> Any:
        """A new Service, as when Orthanc loads the plugin (only it gets the callbacks)."""
        self.fake.on_change.clear()
        self.module.register()
        return self.module.APP

    def job_state(self, study_id: str) -> str | None:
        jobs = self.fake.request("GET", "/dicomsync/jobs", get={"limit": "1000"}).json()["Jobs"]
        return next((j["State"] for j in jobs if j["Resource"] == study_id), None)


@pytest.fixture
def fake_glue(orthanc: OrthancProcess, tmp_path: Path) -> Iterator[FakeGlue]:
    fake = fake_orthanc.install(orthanc.url, glue_config(tmp_path), str(tmp_path / "orthanc.json"))
    try:
        from dicomsync.plugin import glue as module

        g = FakeGlue(fake, module)
        yield g
        fake.change(fake.ChangeType.ORTHANC_STOPPED)
    finally:
        fake_orthanc.uninstall()


def test_the_stable_study_callback_makes_no_rest_call(
    fake_glue: FakeGlue, orthanc: OrthancProcess
) -> None:
    """Orthanc's SDK: REST calls inside a change callback can deadlock. The callback only
    hands the study over; the intake thread reads the index and enqueues."""
    fake = fake_glue.fake
    fake_glue.register()
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    study, _ = upload_study(orthanc, "GLUECB")
    callers: list[str] = []
    real_get, real_post = fake.RestApiGet, fake.RestApiPost

    def get(path: str) -> bytes:
        callers.append(threading.current_thread().name)
        return real_get(path)

    def post(path: str, body: bytes | str) -> bytes:
        callers.append(threading.current_thread().name)
        return real_post(path, body)

    fake.RestApiGet, fake.RestApiPost = get, post  # type: ignore[method-assign]
    here = threading.current_thread().name
    fake.change(fake.ChangeType.STABLE_STUDY, study)
    assert here not in callers  # nothing during the callback itself
    wait_for(lambda: fake_glue.job_state(study) == "done", timeout=15, what="the routed job")
    assert "dicomsync-intake" in callers


def test_started_returns_at_once_and_a_study_handed_over_meanwhile_is_routed(
    fake_glue: FakeGlue, orthanc: OrthancProcess
) -> None:
    """ORTHANC_STARTED only starts the service in the background: the change thread is
    back at once even while the start is slow (the queue's recovery here), and a
    STABLE_STUDY that arrives before the service is up waits in the hand-over queue."""
    fake = fake_glue.fake
    app = fake_glue.register()
    release = threading.Event()
    recover = app.queue.recover

    def slow_recover(node: str) -> Any:
        release.wait(10)
        return recover(node)

    app.queue.recover = slow_recover
    study, _ = upload_study(orthanc, "GLUEEARLY")
    try:
        started = time.monotonic()
        fake.change(fake.ChangeType.ORTHANC_STARTED)
        took = time.monotonic() - started
        fake.change(fake.ChangeType.STABLE_STUDY, study)
        assert app.pool is None  # not started yet
    finally:
        release.set()
    assert took < 2.0, f"ORTHANC_STARTED held the change thread {took:.1f}s"
    wait_for(lambda: fake_glue.job_state(study) == "done", timeout=30, what="the early study")


def test_the_change_callback_thread_is_settled_once_after_started(
    fake_glue: FakeGlue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orthanc-python's change thread: its Python state is kept (one PyGILState_Ensure,
    never released) and it is niced, once, after ORTHANC_STARTED was handled, so the
    threads the service's start began keep Orthanc's priority."""
    import ctypes
    import os

    ensured: list[int] = []

    def ensure() -> int:
        ensured.append(1)
        return 1

    monkeypatch.setattr(ctypes.pythonapi, "PyGILState_Ensure", ensure)
    # a new change thread may reuse the ident of an earlier test's (settled) one
    monkeypatch.setattr(callback_thread, "_settled_threads", set())
    fake = fake_glue.fake
    fake_glue.register()
    process = os.getpriority(os.PRIO_PROCESS, os.getpid())
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    for _ in range(3):
        fake.change(fake.ChangeType.NEW_INSTANCE, "i")
    assert ensured == [1]
    assert fake.change_thread is not None
    niced = min(19, process + WORKER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, fake.change_thread) == niced
    # the service starts in the background (a thread begun by the change thread before it
    # was niced): wait for its intake thread
    intake = wait_for(
        lambda: next((t for t in threading.enumerate() if t.name == "dicomsync-intake"), None),
        timeout=15,
        what="the intake thread",
    )
    assert intake.native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, intake.native_id) == process
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == process
    fake.change(fake.ChangeType.ORTHANC_STOPPED)


def test_orthanc_error_codes_map_to_retryable_or_final(fake_glue: FakeGlue) -> None:
    from dicomsync.plugin.inprocess import translate

    def err(code: int) -> Exception:
        return translate(fake_orthanc.OrthancException(code, "x"), "GET /x")

    for code in (4, 9, 11, 14, 16, 19, 36, 42, -1):  # memory, database, disk, timeouts
        e = err(code)
        assert isinstance(e, Unreachable) and e.retryable, code
    for code in (3, 5, 8, 12, 15, 20, 28, 33):  # the request or the file is wrong
        assert isinstance(err(code), RemoteRejected), code
    for code in (7, 13, 17):
        assert isinstance(err(code), NotFound), code

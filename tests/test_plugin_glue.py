"""The plugin's glue under the ``orthanc`` stand-in (tests/fake_orthanc.py) over a REAL Orthanc:
routing failures hold the change-log cursor, the node id survives a new hostname, a stop
followed by a start routes again, concurrent sink sends keep their own rejections, error
codes and metric labels."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomsync import routing
from dicomsync.errors import NotFound, RemoteRejected, Unreachable
from dicomsync.identity import orthanc_study_id
from dicomsync.orthanc_client import HttpTransport, OrthancClient
from dicomsync.queue import Job, open_queue

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


class Glue:
    def __init__(self, fake: fake_orthanc.FakeOrthanc, module: ModuleType) -> None:
        self.fake = fake
        self.module = module

    def register(self) -> Any:
        """A new App, as when Orthanc loads the plugin (only that App gets the callbacks)."""
        self.fake.on_change.clear()
        self.module.register()
        return self.module.APP

    def status(self) -> dict[str, Any]:
        out = self.fake.request("GET", "/dicomsync/status")
        assert out.status == 200, out.body
        result: dict[str, Any] = out.json()
        return result

    def job_state(self, study_id: str) -> str | None:
        jobs = self.fake.request("GET", "/dicomsync/jobs", get={"limit": "1000"}).json()["Jobs"]
        return next((j["State"] for j in jobs if j["Resource"] == study_id), None)

    def cursor(self) -> int | None:
        app = self.module.APP
        value = app.queue.get_meta(f"changes_cursor:{self.status()['Node']}")
        return int(value) if value is not None else None

    def fail_gets(self, paths: set[str], code: int = 4) -> list[str]:
        """Orthanc answers GET ``paths`` with error ``code`` (4: NotEnoughMemory) while they
        are in the set; returns the list of failed calls."""
        calls: list[str] = []
        real = fake_orthanc.FakeOrthanc.RestApiGet

        def get(path: str) -> bytes:
            if path in paths:
                calls.append(path)
                raise fake_orthanc.OrthancException(code, "Not enough memory")
            return real(self.fake, path)

        self.fake.RestApiGet = get  # type: ignore[method-assign]
        return calls


def test_the_stable_study_callback_makes_no_rest_call(glue: Glue, orthanc: OrthancProcess) -> None:
    """Orthanc's SDK: REST calls inside a change callback can deadlock. The callback only
    hands the study over; the intake thread reads the index and enqueues."""
    fake = glue.fake
    glue.register()
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
    wait_for(lambda: glue.job_state(study) == "done", timeout=15, what="the routed job")
    assert "dicomsync-intake" in callers


@pytest.fixture
def glue(orthanc: OrthancProcess, tmp_path: Path) -> Iterator[Glue]:
    fake = fake_orthanc.install(orthanc.url, glue_config(tmp_path), str(tmp_path / "orthanc.json"))
    try:
        from dicomsync.plugin import glue as module

        g = Glue(fake, module)
        yield g
        fake.change(fake.ChangeType.ORTHANC_STOPPED)
    finally:
        fake_orthanc.uninstall()


def test_a_failed_routing_is_retried_and_holds_the_changes_cursor(
    glue: Glue, orthanc: OrthancProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = glue.fake
    glue.register()
    monkeypatch.setattr(glue.module, "CURSOR_SLACK", 0.0)  # with StableAge 0: ripe at once
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    wait_for(lambda: glue.cursor() is not None, timeout=15, what="the first cursor")
    first = glue.cursor()

    # 1. Orthanc fails while the STABLE_STUDY callback reads the study: retried, then routed
    x, _ = upload_study(orthanc, "GLUEX")
    failing = {f"/studies/{x}"}
    calls = glue.fail_gets(failing)
    fake.change(fake.ChangeType.STABLE_STUDY, x)
    wait_for(lambda: x in glue.status()["Unrouted"], timeout=10, what="the study to be held")
    assert "Orthanc error 4" in glue.status()["Unrouted"][x]
    y, _ = upload_study(orthanc, "GLUEY")  # a study routed fine meanwhile
    fake.change(fake.ChangeType.STABLE_STUDY, y)
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
    fake.change(fake.ChangeType.STABLE_STUDY, z)
    held = glue.cursor()
    wait_for(lambda: len(calls) >= 8, timeout=15, what="retries of the second study")
    assert (
        glue.cursor() == held
        and held is not None
        and held < int(orthanc.get("/changes?last")["Last"])
    )
    fake.change(fake.ChangeType.ORTHANC_STOPPED)
    failing.clear()
    glue.register()
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    wait_for(lambda: glue.job_state(z) == "done", timeout=30, what="the catch-up of the held study")


def test_the_node_id_and_its_cursor_survive_a_new_hostname(
    glue: Glue, orthanc: OrthancProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = glue.fake
    glue.register()
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    node = glue.status()["Node"]
    wait_for(lambda: glue.cursor() is not None, timeout=15, what="the first cursor")
    fake.change(fake.ChangeType.ORTHANC_STOPPED)

    # the container is recreated: a new hostname; a study arrives while it is down
    monkeypatch.setattr(socket, "gethostname", lambda: "recreated-container-4f2a")
    missed, _ = upload_study(orthanc, "GLUEDOWN")
    glue.register()
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    assert glue.status()["Node"] == node
    assert (tmp_path / "state" / routing.NODE_ID_FILE).read_text().strip() == node
    wait_for(lambda: glue.job_state(missed) == "done", timeout=30, what="the catch-up")


def test_started_again_after_a_stop_routes_again(glue: Glue, orthanc: OrthancProcess) -> None:
    fake = glue.fake
    app = glue.register()
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    fake.change(fake.ChangeType.ORTHANC_STOPPED)
    assert app.pool is not None and not app.pool.running and app.handler is None
    assert not glue.status()["Workers"]["running"]
    fake.change(fake.ChangeType.ORTHANC_STARTED)  # the same App, the same process
    assert glue.module.APP is app and glue.status()["Workers"]["running"]
    study, _ = upload_study(orthanc, "GLUEAGAIN")
    fake.change(fake.ChangeType.STABLE_STUDY, study)
    wait_for(lambda: glue.job_state(study) == "done", timeout=30, what="a job after the restart")


def test_the_change_callback_thread_is_settled_once_after_started(
    glue: Glue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orthanc-python's change thread: its Python state is kept (one PyGILState_Ensure,
    never released) and it is niced, once, after ORTHANC_STARTED was handled, so the
    threads App.start() began keep Orthanc's priority."""
    import ctypes
    import os

    ensured: list[int] = []
    monkeypatch.setattr(ctypes.pythonapi, "PyGILState_Ensure", lambda: ensured.append(1) or 1)
    fake = glue.fake
    glue.register()
    process = os.getpriority(os.PRIO_PROCESS, os.getpid())
    fake.change(fake.ChangeType.ORTHANC_STARTED)
    for _ in range(3):
        fake.change(fake.ChangeType.NEW_INSTANCE, "i")
    assert ensured == [1]
    assert fake.change_thread is not None
    niced = min(19, process + glue.module.WORKER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, fake.change_thread) == niced
    by_name = {t.name: t for t in threading.enumerate()}
    intake = by_name["dicomsync-intake"]
    assert intake.native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, intake.native_id) == process
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == process
    fake.change(fake.ChangeType.ORTHANC_STOPPED)


def test_orthanc_error_codes_map_to_retryable_or_final(glue: Glue) -> None:
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


def test_prometheus_labels_are_escaped_once_for_all() -> None:
    from dicomsync.service.metrics import label

    assert label("destination", "zips") == '{destination="zips"}'
    assert label("sink", 'a"b\\c\nd') == '{sink="a\\"b\\\\c\\nd"}'


def test_concurrent_sends_to_one_sink_keep_their_own_rejections(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    from dicomsync.service.tag_lanes import FINGERPRINT, TagSinks
    from dicomsync.sinks.sqlite_index import SqliteIndex
    from dicomsync.worker import Delivered

    first_in, second_in = threading.Event(), threading.Event()

    class RejectsEverything(SqliteIndex):
        """A sink that refuses every event (each send lists its own in ``rejected``)."""

        def send(self, events: Any) -> set[str]:
            self.rejected = {e.id: "refused" for e in events}
            if not first_in.is_set():
                first_in.set()
                second_in.wait(1.0)  # a second send may run now, unless sends are serialised
            else:
                second_in.set()
            return set()

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
            assert isinstance(result, Delivered) and result.fingerprint == FINGERPRINT, result
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
    fake = fake_orthanc.install(orthanc.url, config, str(tmp_path / "orthanc.json"))
    try:
        from dicomsync.plugin import glue as module

        g = Glue(fake, module)
        g.register()
        fake.change(fake.ChangeType.ORTHANC_STARTED)
        wait_for(
            lambda: "remote" in g.status().get("PlaceErrors", {}),
            timeout=20,
            what="the startup check of the destinations",
        )
        assert "DS_UNSET_1" in g.status()["PlaceErrors"]["remote"]
        assert "zips" not in g.status()["PlaceErrors"]
        fake.change(fake.ChangeType.ORTHANC_STOPPED)
    finally:
        fake_orthanc.uninstall()


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

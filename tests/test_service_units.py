"""The service units of ``dicomsync.service`` on their own, without Orthanc and without the
``orthanc`` module: a tiny in-memory transport stands in for Orthanc's REST API.

``ChangeLog`` reads pages and the study of each change; ``TagFeed`` feeds from it with its
cursors saved in the jobs' transaction; ``RouteCursor``'s first run only sets the cursor
and a held study keeps it; ``Metrics`` publishes through a plain callable; ``RestApi``
builds its route table once and answers 404/405/503 in the one error shape."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from dicomsync import routing
from dicomsync.errors import NotFound, Unreachable
from dicomsync.orthanc_client import OrthancClient, Transport
from dicomsync.queue import open_queue
from dicomsync.service import rest_api
from dicomsync.service.app import Service
from dicomsync.service.catch_up import RouteCursor
from dicomsync.service.changelog import ChangeLog
from dicomsync.service.event_cache import EventCache
from dicomsync.service.metrics import Metrics
from dicomsync.service.tag_feed import TAGS, TagFeed, cursor_key


class Memory(Transport):
    """GET answers from a dict of path -> JSON value (a missing path is a 404)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def get(self, path: str) -> bytes:
        self.asked.append(path)
        if path not in self.answers:
            raise NotFound(f"GET {path}: 404")
        value = self.answers[path]
        if isinstance(value, Exception):
            raise value
        return json.dumps(value).encode()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        raise AssertionError(path)

    def delete(self, path: str) -> None:
        raise AssertionError(path)


def change(seq: int, kind: str, rid: str) -> dict[str, Any]:
    return {"Seq": seq, "ChangeType": kind, "ID": rid}


def test_the_change_log_reads_pages_and_the_study_of_each_change() -> None:
    log = ChangeLog(
        OrthancClient(
            Memory(
                {
                    "/changes?last": {"Last": 7},
                    "/changes?since=0&limit=3": {
                        "Changes": [change(1, "NewInstance", "i1"), change(2, "NewSeries", "s1")],
                        "Last": 2,
                        "Done": False,
                    },
                    "/changes?since=2&limit=3": {"Changes": None},
                    "/instances/i1/study": {"ID": "st1"},
                    "/series/s1/study": {"ID": "st1"},
                }
            )
        )
    )
    assert log.last() == 7
    page = log.page(0, 3)
    assert (page.last, page.done) == (2, False) and len(page.changes) == 2
    empty = log.page(2, 3)
    assert (empty.changes, empty.last, empty.done) == ([], None, None)
    assert [log.study_of(c) for c in page.changes] == [["st1"], ["st1"]]
    assert log.study_of(change(3, "StableStudy", "st2")) == ["st2"]
    assert log.study_of(change(4, "NewInstance", "gone")) == []  # deleted meanwhile
    assert log.study_of(change(5, "StablePatient", "p")) == []


def sync_config(tmp_path: Path, **section: Any) -> routing.SyncConfig:
    (tmp_path / "zips").mkdir(exist_ok=True)
    cfg = routing.load(
        {
            routing.SECTION: {
                "Places": {"zips": {"Kind": "zipped_root", "Path": "zips"}},
                "Routes": [{"Destination": "zips"}],
                "StateDirectory": str(tmp_path / "state"),
                **section,
            }
        },
        tmp_path / "orthanc.json",
    )
    assert cfg is not None
    return cfg


def test_the_tag_feed_enqueues_new_instances_with_its_cursor_in_one_transaction(
    tmp_path: Path,
) -> None:
    cfg = sync_config(tmp_path, Sinks={"idx": {"Kind": "sqlite_index", "Path": "i.sqlite"}})
    queue = open_queue(cfg.state_dir)
    answers: dict[str, Any] = {
        "/changes?last": {"Last": 3},
        "/changes?since=0&limit=1000": {
            "Changes": [
                change(1, "NewInstance", "i1"),
                change(2, "NewStudy", "st"),
                change(3, "NewInstance", "i2"),
            ],
            "Last": 3,
            "Done": True,
        },
    }
    try:
        feed = TagFeed(
            cfg, queue, ChangeLog(OrthancClient(Memory(answers))), ["idx"], EventCache(0)
        )
        feed._load_cursors()  # first run: from the start of the log (SinksBackfill by default)
        assert feed.cursors == {"idx": 0}
        assert queue.get_meta(cursor_key(cfg.node_id, "idx")) == "0"
        assert feed.feed_once() is False  # Done: nothing more waiting
        assert sorted(j.resource for j in queue.jobs(None, "idx", 10, kind=TAGS)) == ["i1", "i2"]
        assert feed.cursors == {"idx": 3}
        assert queue.get_meta(cursor_key(cfg.node_id, "idx")) == "3"
    finally:
        queue.close()


class Holds:
    """An intake stand-in for the cursor: routes nothing, holds what it is told to."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}
        self.idle = True

    def route_study(self, study_id: str, fingerprint: str | None = None) -> list[Any]:
        raise Unreachable("the queue is busy")

    def hold(self, study_id: str, exc: BaseException) -> None:
        self.held[study_id] = str(exc)

    def unrouted(self) -> dict[str, str]:
        return dict(self.held)


def test_the_route_cursor_is_set_on_its_first_run_and_held_by_a_failed_study(
    tmp_path: Path,
) -> None:
    cfg = sync_config(tmp_path)
    queue = open_queue(cfg.state_dir)
    answers: dict[str, Any] = {"/changes?last": {"Last": 5}}
    intake = Holds()
    cursor = RouteCursor(
        cfg.node_id,
        queue,
        ChangeLog(OrthancClient(Memory(answers))),
        intake,  # type: ignore[arg-type]
        0.0,
        threading.Event(),
        lambda study: "fingerprint",
        0.1,
    )
    try:
        cursor.catch_up_once()
        assert queue.get_meta(cursor.key) == "5"  # first run: only set
        answers["/changes?last"] = {"Last": 6}
        answers["/changes?since=5&limit=1000"] = {
            "Changes": [change(6, "StableStudy", "st")],
            "Last": 6,
            "Done": True,
        }
        cursor.catch_up_once()
        assert "st" in intake.held and queue.get_meta(cursor.key) == "5"
    finally:
        queue.close()


def test_metrics_go_through_a_plain_callable(tmp_path: Path) -> None:
    cfg = sync_config(tmp_path)
    queue = open_queue(cfg.state_dir)
    seen: dict[str, float] = {}
    try:
        Metrics(seen.__setitem__).publish(None, cfg, queue, None)
        assert seen["dicomsync_config_error"] == 0.0
        assert seen['dicomsync_queue_depth{destination="zips"}'] == 0.0
        Metrics(None).publish("broken")  # no sink: nothing, no error
        only: dict[str, float] = {}
        Metrics(only.__setitem__).publish("broken")
        assert only == {"dicomsync_config_error": 1.0}
    finally:
        queue.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "status", 200),
        ("GET", "jobs", 503),
        ("POST", "send", 503),
        ("GET", "send", 405),
        ("DELETE", "jobs/1", 405),
        ("GET", "nothing-here", 404),
    ],
)
def test_the_rest_api_answers_without_orthanc(
    method: str, path: str, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service({}, None, Memory({}))  # no DicomSync section: not configured

    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the route table is built again for a request")

    # built once, with the API: a request compiles nothing (re's own cache does not count)
    monkeypatch.setattr(rest_api.re, "compile", no_compiling)
    reply = service.handle(method, path, {}, None)
    assert reply.status == status, reply.body
    if status == 405:
        assert reply.allow
    elif status != 200:
        assert set(reply.body) == {"Message"}
    else:
        assert reply.body["Configured"] is False


def test_every_core_package_is_listed_for_the_wheel() -> None:
    """pyproject lists its packages by name: a folder with an ``__init__.py`` under shared/
    that is not listed works in the editable install and is missing from a wheel."""
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    listed = set(
        tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(("dicomsync", *init.parent.relative_to(repo / "shared").parts))
        for init in (repo / "shared").rglob("__init__.py")
    }
    assert folders - listed == set()

"""A change committed after a higher seq was read (Orthanc's index on PostgreSQL numbers
changes from a sequence taken before commit): the tag feed and the routes' catch-up still
see it, because ``ChangeLog`` never lets a cursor pass a hole younger than its grace; with
the built-in SQLite index (``DatabaseBackendPlugin`` null) holes cost nothing."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from test_service_units import Holds, sync_config

from dicomsync.errors import NotFound
from dicomsync.orthanc_client import OrthancClient, Transport
from dicomsync.queue import open_queue
from dicomsync.service.catch_up import RouteCursor
from dicomsync.service.changelog import GAP_GRACE, ChangeLog
from dicomsync.service.event_cache import EventCache
from dicomsync.service.tag_feed import TAGS, TagFeed


class Log(Transport):
    """``/changes`` over the committed changes: WHERE seq > since ORDER BY seq LIMIT n."""

    def __init__(self, plugin: str | None) -> None:
        self.committed: dict[int, str] = {}
        self.plugin = plugin

    def get(self, path: str) -> bytes:
        if path == "/system":
            return json.dumps({"DatabaseBackendPlugin": self.plugin}).encode()
        if path == "/changes?last":
            return json.dumps({"Last": max(self.committed, default=0)}).encode()
        m = re.fullmatch(r"/changes\?since=(\d+)&limit=(\d+)", path)
        if not m:
            raise NotFound(path)
        since, limit = int(m[1]), int(m[2])
        seqs = sorted(s for s in self.committed if s > since)[:limit]
        changes = [{"Seq": s, "ChangeType": "NewInstance", "ID": self.committed[s]} for s in seqs]
        last = seqs[-1] if seqs else since
        return json.dumps({"Changes": changes, "Last": last, "Done": True}).encode()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        raise AssertionError(path)

    def delete(self, path: str) -> None:
        raise AssertionError(path)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_tag_feed_feeds_a_change_committed_after_a_higher_one_was_read(
    tmp_path: Path,
) -> None:
    cfg = sync_config(tmp_path, Sinks={"idx": {"Kind": "sqlite_index", "Path": "i.sqlite"}})
    queue = open_queue(cfg.state_dir)
    log, clock = Log("/usr/lib/libOrthancPostgreSQLIndex.so"), Clock()
    try:
        feed = TagFeed(
            cfg, queue, ChangeLog(OrthancClient(log), clock=clock), ["idx"], EventCache(0)
        )
        feed._load_cursors()
        log.committed[1] = "i1"
        log.committed[3] = "i3"  # seq 2 is taken, not committed yet
        feed.feed_once()
        clock.now += 1
        feed.feed_once()
        log.committed[2] = "i2"  # commits after 3 was read
        clock.now += 1
        feed.feed_once()
        feed.feed_once()
        jobs = sorted(j.resource for j in queue.jobs(None, "idx", 10, kind=TAGS))
        assert jobs == ["i1", "i2", "i3"]
        assert feed.cursors == {"idx": 3}
        # a hole never filled (a rolled-back store, a deleted change) is passed after the grace
        log.committed[5] = "i5"
        feed.feed_once()
        assert feed.cursors == {"idx": 3}
        clock.now += GAP_GRACE + 1
        feed.feed_once()
        feed.feed_once()
        assert feed.cursors == {"idx": 5}
        assert "i5" in {j.resource for j in queue.jobs(None, "idx", 10, kind=TAGS)}
    finally:
        queue.close()


def test_the_catch_up_does_not_move_the_route_cursor_past_a_young_hole(tmp_path: Path) -> None:
    cfg = sync_config(tmp_path)
    queue = open_queue(cfg.state_dir)
    log, clock = Log("/usr/lib/libOrthancPostgreSQLIndex.so"), Clock()
    log.committed[1] = "i1"
    routed: list[str] = []

    class Routes(Holds):
        def route_study(self, study_id: str, fingerprint: str | None = None) -> list[Any]:
            routed.append(study_id)
            return []

    intake = Routes()
    changes = ChangeLog(OrthancClient(log), clock=clock)
    changes.study_of = lambda change: [f"study-of-{change['ID']}"]  # type: ignore[method-assign]
    cursor = RouteCursor(
        cfg.node_id,
        queue,
        changes,
        intake,  # type: ignore[arg-type]
        0.0,
        threading.Event(),
        lambda s: "f",
        0.1,
    )
    try:
        cursor.catch_up_once()  # first run: the cursor at 1
        log.committed[3] = "i3"  # 2 not committed yet
        cursor.catch_up_once()
        assert queue.get_meta(cursor.key) == "1"
        log.committed[2] = "i2"
        cursor.catch_up_once()
        assert "study-of-i2" in routed and queue.get_meta(cursor.key) == "3"
    finally:
        queue.close()


def test_holes_cost_nothing_with_the_built_in_sqlite_index(tmp_path: Path) -> None:
    cfg = sync_config(tmp_path, Sinks={"idx": {"Kind": "sqlite_index", "Path": "i.sqlite"}})
    queue = open_queue(cfg.state_dir)
    log = Log(None)
    log.committed.update({1: "i1", 4: "i4"})  # 2, 3: changes deleted with their resource
    try:
        feed = TagFeed(cfg, queue, ChangeLog(OrthancClient(log)), ["idx"], EventCache(0))
        feed._load_cursors()
        feed.feed_once()
        assert feed.cursors == {"idx": 4}
    finally:
        queue.close()

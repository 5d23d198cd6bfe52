"""A cursor several nodes move only grows: ``enqueue_many(meta_max=)`` raises a key, never
lowers it (both backends), and the tag feed's shared cursor uses it, so a node slower to
commit a page never moves the shared cursor back (the others would feed again)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from test_fix_queue_gaps import Log

from dicomsync.orthanc_client import OrthancClient
from dicomsync.queue import NewJob, Queue, open_queue
from dicomsync.service.changelog import ChangeLog
from dicomsync.service.event_cache import EventCache
from dicomsync.service.tag_feed import TagFeed, shared_cursor_key


def test_a_raised_meta_key_never_goes_down(q: Queue) -> None:
    q.enqueue_many([], meta_max={"c": 5})
    q.enqueue_many([NewJob("tags", "i1", "d")], meta_max={"c": 3})
    assert q.get_meta("c") == "5"
    q.enqueue_many([], meta_max={"c": 12})
    assert q.get_meta("c") == "12"
    q.enqueue_many([], meta={"c": "2"})  # a plain set still sets
    assert q.get_meta("c") == "2"


class Racing:
    """The queue as node B sees it: another node feeds right after B read the shared cursor."""

    def __init__(self, queue: Queue, meanwhile: Any) -> None:
        self.queue, self.meanwhile = queue, meanwhile

    def get_meta(self, key: str) -> str | None:
        value = self.queue.get_meta(key)
        if key.startswith("tags_cursor:*:") and self.meanwhile:
            self.meanwhile, run = None, self.meanwhile
            run()
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


def test_the_shared_tags_cursor_never_moves_back(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    log = Log(None)
    log.committed.update({s: f"i{s}" for s in range(1, 6)})

    def cfg(node: str) -> Any:
        return SimpleNamespace(
            sinks_backfill=True,
            queue=SimpleNamespace(target="shared"),
            node_id=node,
            poll_interval=1.0,
        )

    changes = ChangeLog(OrthancClient(log))
    a = TagFeed(cfg("a"), queue, changes, ["idx"], EventCache(0))

    def node_a_feeds_more() -> None:
        log.committed.update({s: f"i{s}" for s in range(6, 11)})
        a.feed_once()

    b = TagFeed(cfg("b"), Racing(queue, None), changes, ["idx"], EventCache(0))  # type: ignore[arg-type]
    try:
        a._load_cursors()
        b._load_cursors()
        b.queue.meanwhile = node_a_feeds_more  # type: ignore[attr-defined]
        b.feed_once()  # read 1..5; a fed 1..10 before b committed
        assert queue.get_meta(shared_cursor_key("idx")) == "10"
    finally:
        queue.close()

"""``EventCache``: the events of recently read instances, shared by the tag-sink lanes.

``get(instance, compute)`` returns the cached events or ``compute(instance)`` once: a lane
asking for an instance another lane is computing waits for that result instead of
reading the file again. Errors are not cached (each lane sees its own: ``get`` raises
what ``compute`` raised). ``forget`` drops instances the feed sees stored again
(Orthanc's ``OverwriteInstances``), also while they are being computed, so new content
never gets old events. Bounded: the oldest entries go first; a lane that falls further
behind simply computes again. ``size <= 0`` caches nothing (one sink).

Thread-safe: every method may be called from any lane at once (one lock; ``compute``
runs outside it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from dicomsync.tags import Event


class EventCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[str, list[Event]] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._stale: set[str] = set()  # forgotten while being computed

    def get(self, instance: str, compute: Callable[[str], list[Event]]) -> list[Event]:
        if self.size <= 0:
            return compute(instance)
        while True:
            with self._lock:
                events = self._items.get(instance)
                if events is not None:
                    self._items.move_to_end(instance)
                    self.hits += 1
                    return events
                waiting = self._pending.get(instance)
                if waiting is None:
                    mine = self._pending[instance] = threading.Event()
                    self.misses += 1
                    break
            waiting.wait(60)  # then look again: cached, or computed by us after an error
        events = None
        try:
            events = compute(instance)
            return events
        finally:
            with self._lock:
                del self._pending[instance]
                if events is not None and instance not in self._stale:
                    self._items[instance] = events
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
                self._stale.discard(instance)
            mine.set()

    def forget(self, instances: Iterable[str]) -> None:
        with self._lock:
            for instance in instances:
                self._items.pop(instance, None)
                if instance in self._pending:
                    self._stale.add(instance)

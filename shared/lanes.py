"""A worker lane: the threads of one destination (and, if set, one kind of job).

``Lane`` is what a caller configures (immutable); ``LaneState`` is the pool's live record
of one lane (its wake-up event, threads and counters; ``WorkerPool`` guards the counters
with its lock, the event is thread-safe itself). ``lower_thread_priority`` nices the
calling thread. Nothing here raises.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lane:
    """Threads for one destination (and, if set, one kind of job)."""

    destination: str
    concurrency: int = 1
    kind: str | None = None
    batch: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.destination}" if self.kind else self.destination


class LaneState:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.busy = 0
        self.handled = 0
        self.errors = 0
        self.last_error = ""
        self.paused: str | None = None  # why the lane is on hold (None: running)


def lower_thread_priority(increment: int) -> None:
    """Give the calling thread the process's nice value plus ``increment`` (Linux schedules
    threads on their own), so its work, and the threads it starts, yield the CPU to others.

    Inside Orthanc the workers share the machine with ingest; niced, they use the CPU
    that ingest leaves. The value is relative to the process, not to the calling thread,
    so a thread started by an already niced thread ends at the same value. A thread
    already lower than that is left alone. Where the platform has no per-thread
    priority, nothing changes.
    """
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + increment)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except (OSError, AttributeError):
        log.debug("cannot lower the priority of %s", threading.current_thread().name)

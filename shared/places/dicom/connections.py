"""The associations a place keeps with one DICOM node: ``Connections``.

At most ``Associations`` established associations per node and process, reused across
studies and shared by C-STORE and C-FIND (an association costs round trips and, with
TLS, a handshake); see ``Connections`` for why the bound and the short idle time.
The pooled associations are ``link.Link`` objects: no thread of their own, so an idle
one costs nothing but its socket. C-GET and C-MOVE open pynetdicom associations of
their own inside ``slot()``, counted in the same bound.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from pynetdicom import build_context

from dicomsync.errors import Unreachable
from dicomsync.places.dicom.association import (
    MAX_CONTEXTS,
    STUDY_FIND,
    UNCOMPRESSED,
    VERIFICATION,
    Pair,
    Peer,
    contexts_for,
)
from dicomsync.places.dicom.link import Link

IDLE_SECONDS = 2.0
RECENT_PAIRS = 512


@dataclass
class Pooled:
    """An association, the pairs it proposed and when it was last given back."""

    link: Link
    pairs: frozenset[Pair] = frozenset()
    idle_since: float = field(default_factory=time.monotonic)
    uses: int = 0  # times given back: 0 for one just opened

    @property
    def usable(self) -> bool:
        return time.monotonic() - self.idle_since < IDLE_SECONDS and self.link.alive()


class Connections:
    """At most ``size`` associations with the peer, open at once, reused (thread-safe).

    Every association proposes Study Root FIND and Verification beside the storage
    contexts of the (SOP class, transfer syntax) pairs seen recently, so one association
    serves C-STORE and the C-FIND duplicate check. The bound matters: a peer serves a
    few associations at a time (Orthanc: ``DicomThreadsCount``, 4) and makes the others
    wait, so the place never opens more than ``Associations``, whatever the number of
    threads sending through it. An association idle for ``IDLE_SECONDS`` is released.
    """

    _shared: ClassVar[dict[Hashable, tuple[Connections, int]]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def shared(cls, key: Hashable, peer: Peer, size: int) -> Connections:
        """The process's one ``Connections`` for ``key`` (the section's connection
        options), made on first use: the plugin builds one place object per worker
        thread, and they must share the bound. Give it back with ``unshare``."""
        with cls._shared_lock:
            conns, users = cls._shared.get(key, (None, 0))
            if conns is None or conns._closed:
                conns, users = cls(peer, size), 0
                conns._key = key
            cls._shared[key] = (conns, users + 1)
            return conns

    def unshare(self) -> None:
        """One user fewer; the last one closes the associations."""
        with self._shared_lock:
            conns, users = self._shared.get(self._key, (None, 0))
            if conns is not self:
                last = True
            else:
                last = users <= 1
                if last:
                    del self._shared[self._key]
                else:
                    self._shared[self._key] = (self, users - 1)
        if last:
            self.close()

    def __init__(self, peer: Peer, size: int) -> None:
        self.peer = peer
        self.size = max(1, size)
        self._key: Hashable = id(self)
        self._idle: list[Pooled] = []
        self._open = 0  # idle + in use
        self._pairs: OrderedDict[Pair, None] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._reaper: threading.Thread | None = None

    def _remember(self, pair: Pair | None) -> list[Pair]:
        """Note ``pair`` as just wanted; the pairs to propose, ``pair`` first."""
        with self._cond:
            if pair is not None:
                self._pairs[pair] = None
                self._pairs.move_to_end(pair)
                while len(self._pairs) > RECENT_PAIRS:
                    self._pairs.popitem(last=False)
            return [*([pair] if pair else []), *(p for p in reversed(self._pairs) if p != pair)]

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Room for an association of the caller's own (C-GET, C-MOVE), counted in
        ``size``: idle ones are released to make it."""
        self._reserve(None, reuse=False)
        try:
            yield
        finally:
            self._forget()

    def acquire(self, pair: Pair | None = None) -> Pooled:
        """An association proposing ``pair`` (any, for None): idle, or newly opened."""
        wanted = self._remember(pair)
        found = self._reserve(pair)
        if found is not None:
            return found
        try:
            contexts, covered = contexts_for(wanted, MAX_CONTEXTS - 2)
            contexts += [build_context(s, list(UNCOMPRESSED)) for s in (STUDY_FIND, VERIFICATION)]
            return Pooled(Link.open(self.peer, contexts), frozenset(covered))
        except BaseException:
            self._forget()
            raise

    def _reserve(self, pair: Pair | None, reuse: bool = True) -> Pooled | None:
        """An idle association proposing ``pair`` (any for None; none without ``reuse``),
        or None with room reserved to open one. Waits while all are in use."""
        stale: list[Pooled] = []
        found: Pooled | None = None
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise Unreachable(f"{self.peer.label}: the place is closing")
                    for p in list(self._idle):
                        if not p.usable:
                            self._idle.remove(p)
                            stale.append(p)
                            self._open -= 1
                    for p in reversed(self._idle if reuse else []):
                        if pair is None or pair in p.pairs:
                            found = p
                            break
                    if found is not None:
                        self._idle.remove(found)
                        return found
                    if self._open >= self.size and self._idle:
                        stale.append(self._idle.pop(0))  # one that lacks the pair
                        self._open -= 1
                    if self._open < self.size:
                        self._open += 1
                        break
                    self._cond.wait(1.0)
        finally:
            for p in stale:
                p.link.release()
        return None

    def _forget(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def give(self, pooled: Pooled) -> None:
        """Back for reuse (a dead association is dropped)."""
        if not pooled.link.is_established:
            self.discard(pooled)
            return
        pooled.idle_since = time.monotonic()
        pooled.uses += 1
        with self._cond:
            if not self._closed:
                self._idle.append(pooled)
                self._cond.notify()
                if self._reaper is None:
                    self._reaper = threading.Thread(
                        target=self._reap, name="dicom-idle", daemon=True
                    )
                    self._reaper.start()
                return
        self.discard(pooled)

    def discard(self, pooled: Pooled, *, abort: bool = False) -> None:
        """Closed, never reused; ``abort`` for one whose last use failed part-way (it may
        be mid-message: an A-RELEASE would be read as part of it)."""
        if abort:
            pooled.link.abort()
        pooled.link.release()
        self._forget()

    def _reap(self) -> None:
        """Release idle associations after ``IDLE_SECONDS``; ends when none is left."""
        while True:
            time.sleep(IDLE_SECONDS / 4)
            with self._cond:
                stale = [p for p in self._idle if not p.usable]
                for p in stale:
                    self._idle.remove(p)
                self._open -= len(stale)
                self._cond.notify_all()
                if not self._idle or self._closed:
                    self._reaper = None
            for p in stale:
                p.link.release()
            if self._reaper is None:
                return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for p in idle:
            p.link.release()

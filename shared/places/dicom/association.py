"""Associations with one DICOM node: presentation contexts, TCP_NODELAY, TLS, C-ECHO.

``Peer`` holds what every association needs (address, AE titles, timeouts, max PDU,
TLS context) and opens associations with ``associate(contexts)``; its failures are
mapped by ``dicom.failures``. Every socket we open (ours to the peer, and the peers'
to our C-MOVE Storage SCP) gets ``TCP_NODELAY``: a DIMSE exchange is small requests
and answers, which Nagle's algorithm and delayed ACKs would hold back 40 ms each.

``contexts_for(pairs)`` proposes, for each (SOP class, transfer syntax) pair, a
context with exactly that syntax, and per SOP class the Explicit and Implicit VR
Little Endian fallbacks, within the standard's 128 contexts per association.

``Connections`` keeps at most ``Associations`` established associations, reused across
studies and shared by C-STORE and C-FIND (an association costs round trips and, with
TLS, a handshake); see its docstring for why the bound and the short idle time.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicomsync.errors import RemoteRejected, Unreachable
from dicomsync.places.dicom import failures

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
STUDY_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R Information Model - FIND
MAX_CONTEXTS = 128
IDLE_SECONDS = 2.0
RECENT_PAIRS = 512
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)

# Files are sent from disk in PDU-sized chunks, not decoded and encoded again.
_config.STORE_SEND_CHUNKED_DATASET = True
# pynetdicom logs each failure as several ERROR lines; our own error is the one line.
_pynetdicom_log = logging.getLogger("pynetdicom")
if _pynetdicom_log.level == logging.NOTSET:
    _pynetdicom_log.setLevel(logging.CRITICAL)


class _QuickAckSocket(socket.socket):
    """A plain TCP socket that asks Linux to acknowledge at once before each read: a peer
    that leaves Nagle on (DCMTK, Orthanc, unless ``TCP_NODELAY=1`` is in its environment)
    holds the second part of every answer until our ACK, which Linux delays by 40 ms."""

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass
        return super().recv(bufsize, flags)


_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)


def nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: Nagle off on the association's socket, and quick ACKs."""
    holder = getattr(event.assoc.dul, "socket", None)
    sock = getattr(holder, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # already closed: nothing to speed up
        return
    if _QUICKACK and type(sock) is socket.socket:  # not a TLS socket
        sock.__class__ = _QuickAckSocket


def contexts_for(
    pairs: Sequence[Pair], limit: int = MAX_CONTEXTS
) -> tuple[list[PresentationContext], list[Pair]]:
    """Contexts for ``pairs`` (most wanted first): one per pair with its own syntax, and
    the uncompressed fallbacks per SOP class; pairs that do not fit in ``limit`` are left
    for another association. Returns the contexts and the pairs they cover."""
    out: list[PresentationContext] = []
    covered: list[Pair] = []
    seen: set[Pair] = set()
    for sop, ts in pairs:
        wanted = [(sop, ts)] + [(sop, str(u)) for u in UNCOMPRESSED]
        new = [p for p in dict.fromkeys(wanted) if p not in seen]
        if len(out) + len(new) > limit:
            break
        covered.append((sop, ts))
        for p in new:
            seen.add(p)
            out.append(build_context(p[0], [p[1]]))
    return out, covered


@dataclass
class Peer:
    """One DICOM node as we reach it."""

    key: str
    host: str
    port: int
    called_aet: str
    calling_aet: str
    timeout: float
    max_pdu: int
    tls: Callable[[], ssl.SSLContext] | None = None
    _tls_context: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        if self._tls_context is None:
            self._tls_context = self.tls()
        return self._tls_context

    def ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.maximum_pdu_size = self.max_pdu
        return ae

    def associate(
        self,
        contexts: list[PresentationContext],
        *,
        ext_neg: list[Any] | None = None,
        handlers: Iterable[tuple[Any, Callable[..., Any]]] = (),
    ) -> Association:
        """An established association proposing ``contexts``; raises the mapped error."""
        answer: dict[str, Any] = {}

        def on_acse_recv(event: Any) -> None:
            primitive = getattr(event, "primitive", None)
            if getattr(primitive, "result", None) in (1, 2):
                answer["rj"] = primitive

        tls = self.tls_context()
        ae = self.ae()
        assoc = ae.associate(
            self.host,
            self.port,
            contexts=contexts,
            ae_title=self.called_aet,
            max_pdu=self.max_pdu,
            ext_neg=ext_neg,
            tls_args=(tls, self.host) if tls is not None else None,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, nodelay),
                (evt.EVT_ACSE_RECV, on_acse_recv),
                *handlers,
            ],
        )
        if assoc.is_established:
            return assoc
        if assoc.is_rejected and "rj" in answer:
            rj = answer["rj"]
            raise failures.rejected(
                self.label, rj.result, rj.result_str, rj.source_str, rj.reason_str
            )
        if assoc.is_rejected:
            raise RemoteRejected(f"{self.label}: association rejected")
        refused = assoc.rejected_contexts
        if refused:  # the peer accepted none of the contexts: it aborted
            first = refused[0]
            raise failures.refused_context(
                self.label, UID(str(first.abstract_syntax)).name, first.status
            )
        # no connection, or one the peer closed at once: pynetdicom only logs which
        raise failures.no_connection(self.label, self.host, self.port, self.timeout, tls)

    def echo(self, assoc: Association | None = None) -> float:
        """C-ECHO on ``assoc`` (else on a new association); the round trip in seconds.
        Raises the mapped error."""
        start = time.monotonic()
        own = assoc is None
        if assoc is None:
            assoc = self.associate([build_context(VERIFICATION)])
        try:
            if not accepted_sop(assoc, VERIFICATION):
                raise failures.refused_context(
                    self.label, "Verification", refusal(assoc, VERIFICATION)
                )
            status = assoc.send_c_echo()
            code = answer_code(status, self.label, "C-ECHO")
            if not failures.status_ok(code):
                raise failures.status_error(code, f"{self.label}: C-ECHO")
        finally:
            if own:
                release(assoc)
        return time.monotonic() - start


def release(assoc: Association) -> None:
    """Release (or, when that is no longer possible, abort) without raising."""
    try:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    except Exception:  # a dead socket: nothing more to close
        log.debug("closing an association failed", exc_info=True)


def accepted(assoc: Association, sop: str, ts: str) -> bool:
    return any(
        c.abstract_syntax == sop and c.transfer_syntax and c.transfer_syntax[0] == ts
        for c in assoc.accepted_contexts
    )


def accepted_sop(assoc: Association, sop: str) -> bool:
    return any(c.abstract_syntax == sop for c in assoc.accepted_contexts)


def refusal(assoc: Association, sop: str) -> str:
    """The peer's reason for refusing ``sop``'s contexts (``Abstract Syntax Not Supported``)."""
    reasons = [c.status for c in assoc.rejected_contexts if c.abstract_syntax == sop]
    return reasons[0] if reasons else "not proposed"


@dataclass
class Pooled:
    """An association, the pairs it proposed and when it was last given back."""

    assoc: Association
    pairs: frozenset[Pair] = frozenset()
    idle_since: float = field(default_factory=time.monotonic)
    uses: int = 0  # times given back: 0 for one just opened

    @property
    def usable(self) -> bool:
        return self.assoc.is_established and time.monotonic() - self.idle_since < IDLE_SECONDS


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
            contexts += [build_context(STUDY_FIND), build_context(VERIFICATION)]
            return Pooled(self.peer.associate(contexts), frozenset(covered))
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
                release(p.assoc)
        return None

    def _forget(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def give(self, pooled: Pooled) -> None:
        """Back for reuse (a dead association is dropped)."""
        if not pooled.assoc.is_established:
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

    def discard(self, pooled: Pooled) -> None:
        release(pooled.assoc)
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
                release(p.assoc)
            if self._reaper is None:
                return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for p in idle:
            release(p.assoc)


def answer_code(status: Any, peer: str, what: str) -> int:
    """The Status of a DIMSE answer; an empty answer (abort, timeout) raises."""
    code = getattr(status, "Status", None)
    if code is None:
        raise failures.aborted(peer, what)
    return int(code)

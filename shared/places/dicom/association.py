"""Associations with one DICOM node: presentation contexts, TCP_NODELAY, TLS, C-ECHO.

``Peer`` holds what every association needs (address, AE titles, timeouts, max PDU,
TLS context) and opens pynetdicom associations with ``associate(contexts)`` (C-GET and
C-MOVE, which need SCP roles); C-STORE, C-FIND and C-ECHO go over ``link.Link``, our
own thread-free association. Failures are mapped by ``dicom.failures``. Every socket we
open (ours to the peer, and the peers' to our C-MOVE Storage SCP) gets ``TCP_NODELAY``: a DIMSE exchange is small requests
and answers, which Nagle's algorithm and delayed ACKs would hold back 40 ms each, and
the place's ``Timeout`` as its timeout (pynetdicom leaves none after connecting).

``contexts_for(pairs)`` proposes, for each (SOP class, transfer syntax) pair, a
context with exactly that syntax, and per SOP class the Explicit and Implicit VR
Little Endian fallbacks, within the standard's 128 contexts per association.

``dicom.connections.Connections`` keeps the associations themselves, reused.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicomsync.errors import RemoteRejected
from dicomsync.places.dicom import failures

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
STUDY_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R Information Model - FIND
MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)

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
    """EVT_CONN_OPEN: Nagle off on the association's socket, quick ACKs, a timeout."""
    holder = getattr(event.assoc.dul, "socket", None)
    sock = getattr(holder, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom clears the timeout after connecting: a peer that stops reading would
        # block a send for ever; with it, a write that makes no progress within Timeout
        # fails, and the association is lost (retryable)
        timeout = getattr(event.assoc, "network_timeout", None)
        if timeout:
            sock.settimeout(float(timeout))
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

    def echo(self) -> float:
        """C-ECHO on an association of its own; the round trip in seconds. Raises the
        mapped error."""
        from dicomsync.places.dicom.link import Link, Lost

        start = time.monotonic()
        link = Link.open(self, [build_context(VERIFICATION, list(UNCOMPRESSED))])
        try:
            cx = link.context_id(VERIFICATION)
            if cx is None:
                raise failures.refused_context(
                    self.label, "Verification", refusal(link, VERIFICATION)
                )
            try:
                status = link.echo(cx)
            except Lost as exc:
                raise failures.aborted(self.label, "C-ECHO", exc.reason) from None
            code = answer_code(status, self.label, "C-ECHO")
            if not failures.status_ok(code):
                raise failures.status_error(code, f"{self.label}: C-ECHO")
        finally:
            link.release()
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


def accepted(assoc: Any, sop: str, ts: str) -> bool:
    return any(
        c.abstract_syntax == sop and c.transfer_syntax and c.transfer_syntax[0] == ts
        for c in assoc.accepted_contexts
    )


def accepted_sop(assoc: Any, sop: str) -> bool:
    return any(c.abstract_syntax == sop for c in assoc.accepted_contexts)


def refusal(assoc: Any, sop: str) -> str:
    """The peer's reason for refusing ``sop``'s contexts (``Abstract Syntax Not Supported``),
    on an ``Association`` or a ``Link``."""
    reasons = [c.status for c in assoc.rejected_contexts if c.abstract_syntax == sop]
    return reasons[0] if reasons else "not proposed"


def answer_code(status: Any, peer: str, what: str) -> int:
    """The Status of a DIMSE answer; an empty answer (abort, timeout) raises."""
    code = getattr(status, "Status", None)
    if code is None:
        raise failures.aborted(peer, what)
    return int(code)

"""A synchronous association: ``Link``, one blocking socket driven by the calling thread.

pynetdicom runs two polling threads per association (its DUL reactor and the
association's), each waking every millisecond: 4 idle associations cost a fifth of a
core, and every wake-up takes the GIL from the threads that send. A ``Link`` has no
thread: the thread that calls ``store``, ``find`` or ``echo`` writes the request and
reads the answer itself; nothing runs between two calls (idle costs nothing).

Contract:

- ``Link.open(peer, contexts)`` connects (``Timeout``), wraps TLS when the peer has a
  context (a blocking ``ssl`` socket: only one thread uses a link at a time), sets
  ``TCP_NODELAY``, sends pynetdicom's A-ASSOCIATE-RQ (same user information as
  pynetdicom's AE: our maximum length, its implementation class UID and version name)
  and returns an established link, or raises the mapped error (``dicom.failures``):
  rejected, refused contexts (none accepted), unreachable / TLS failure, or closed.
- One operation at a time, from one thread (the pool hands a link to one user). Every
  write has the socket's ``Timeout``; every answer must arrive within ``Timeout`` (one
  that trickles in: ``Timeout`` + 1 s). Answers may share P-DATA-TF PDUs: PDVs left
  over from one message's last PDU begin the next.
- C-STORE: the command and the dataset parts are framed as P-DATA-TF PDUs no longer
  than the peer's maximum length and written with ``sendmsg`` of header / memoryview
  pairs (a TLS socket: joined per megabyte), never copying a plain socket's data.
- Anything that leaves the association unusable raises ``Lost`` (its ``reason`` says
  what) after the link was aborted and closed: a socket failure, no answer within
  ``Timeout``, an A-ABORT, an A-RELEASE-RQ mid-operation, an unknown PDU type, a PDU
  longer than ``limit`` (our maximum plus slack; never allocated), an answer on another
  context, to another message ID, or of another command. Callers map it to
  ``failures.aborted`` (retryable). A failure of the caller's data parts (an exception
  raised by the iterator) aborts the link once a byte was written and is re-raised.
- ``release()`` and ``abort()`` never raise; ``alive()`` says whether an idle link may
  be reused (established, and the peer has sent nothing since: a release, an abort or
  a closed connection all make the socket readable).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Any, NoReturn

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RQ
from pynetdicom.pdu_primitives import A_ABORT
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor

from dicomsync.errors import RemoteRejected
from dicomsync.http_errors import transport_error
from dicomsync.places.dicom import failures
from dicomsync.places.dicom.wire import (
    C_ECHO_RSP,
    C_FIND_RSP,
    C_STORE_RSP,
    HEAD,
    NO_DATASET,
    Lost,
    associate_rq,
    echo_command,
    find_command,
    frames,
    parse_command,
    sendv,
    split_pdvs,
    status_of,
    store_command,
    us_value,
)

if TYPE_CHECKING:
    from dicomsync.places.dicom.association import Peer

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes handed to one sendmsg at most
UNLIMITED = 1 << 20  # our PDV size when the peer sets no maximum length
SLACK = 1 << 16  # a peer's PDU may exceed our maximum by this much (associate answers)
NO_MAX_LIMIT = 16 << 20  # the largest PDU we read when we set no maximum length
MAX_COMMAND = 64 << 10  # the largest command set of an answer we accept
MAX_DATASET = 16 << 20  # the largest dataset of one answer we accept (a C-FIND identifier)
MAX_ANSWERS = 100_000  # C-FIND answers to one query at most
FIND_SECONDS = 600.0  # one C-FIND's answers take at most this (or Timeout, if longer)
_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)


class Link:
    """One established association (see the module docstring); ``open`` makes one."""

    def __init__(self, peer: Peer, sock: socket.socket, contexts: list[PresentationContext]):
        self.peer = peer
        self.sock = sock
        self.contexts = contexts  # every proposed context, with its result
        self._sort(contexts)
        self.peer_max = 0
        self._room = UNLIMITED  # bytes of data per PDV: the peer's maximum less 6
        self.limit = (peer.max_pdu or NO_MAX_LIMIT) + SLACK
        self.is_established = True
        self._plain = type(sock) is socket.socket
        self._buf = bytearray()
        self._pdvs: deque[tuple[int, int, bytes]] = deque()  # read, not yet consumed
        self._msg_id = 0

    # --- opening --------------------------------------------------------------------
    @classmethod
    def open(cls, peer: Peer, contexts: Sequence[PresentationContext]) -> Link:
        proposed = []
        for i, cx in enumerate(contexts):
            cx.context_id = 2 * i + 1
            proposed.append(cx)
        tls = peer.tls_context()
        try:
            sock = socket.create_connection((peer.host, peer.port), timeout=peer.timeout)
        except OSError as exc:
            raise transport_error(exc, f"cannot reach DICOM node {peer.label}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=peer.host)
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            raise transport_error(exc, f"cannot reach DICOM node {peer.label}") from None
        link = cls(peer, sock, proposed)
        try:
            link._associate(proposed)
        except BaseException:
            link._close()
            raise
        return link

    def _associate(self, proposed: list[PresentationContext]) -> None:
        label = self.peer.label
        try:
            self.sock.sendall(associate_rq(self.peer, proposed))
            kind, body = self._read_pdu(time.monotonic() + self.peer.timeout)
        except Lost as exc:
            if "closed" in exc.reason:
                raise failures.no_connection_closed(label) from None
            raise failures.aborted(label, "A-ASSOCIATE", exc.reason) from None
        except OSError as exc:
            raise transport_error(exc, f"cannot reach DICOM node {label}") from None
        if kind not in (0x02, 0x03):
            if kind == 0x07:
                raise failures.no_connection_closed(label)
            raise RemoteRejected(f"{label}: association rejected (PDU type 0x{kind:02X})")
        try:  # a malformed answer: struct.error, KeyError, ... from pynetdicom
            answer = A_ASSOCIATE_RJ() if kind == 0x03 else A_ASSOCIATE_AC()
            answer.decode(body)
            p = answer.to_primitive()
            if kind == 0x03:
                why = (int(p.result or 1), p.result_str, p.source_str, p.reason_str)
            else:
                answered = p.presentation_context_definition_results_list
                results = negotiate_as_requestor(proposed, answered)
        except Exception as exc:
            self.abort()
            what = f"a malformed answer ({type(exc).__name__})"
            raise failures.aborted(label, "A-ASSOCIATE", what) from None
        if kind == 0x03:
            raise failures.rejected(label, *why)
        self.peer_max = int(p.maximum_length_received or 0)
        if 0 < self.peer_max < 64:  # no room for a command: a broken or hostile peer
            self.abort()
            raise RemoteRejected(f"{label}: its maximum PDU length {self.peer_max} is too small")
        self._room = (self.peer_max - 6) if self.peer_max else UNLIMITED
        self.contexts = results
        self._sort(results)
        if not self.accepted_contexts:
            self.abort()
            first = self.rejected_contexts[0]
            raise failures.refused_context(
                label, UID(str(first.abstract_syntax)).name, str(first.status)
            )

    def _sort(self, contexts: list[PresentationContext]) -> None:
        """Accepted: result 0 with a transfer syntax (a peer may leave it out)."""
        ok = [c.result == 0 and bool(c.transfer_syntax) for c in contexts]
        self.accepted_contexts = [c for c, yes in zip(contexts, ok, strict=True) if yes]
        self.rejected_contexts = [c for c, yes in zip(contexts, ok, strict=True) if not yes]

    def context_id(self, sop: str, ts: str | None = None) -> int | None:
        """The accepted context for ``sop`` (with syntax ``ts``, when given)."""
        for c in self.accepted_contexts:
            if c.abstract_syntax == sop and (ts is None or c.transfer_syntax[0] == ts):
                return int(c.context_id or 0)
        return None

    # --- writing --------------------------------------------------------------------
    def _request(
        self, cx: int, command: bytes, parts: Iterable[bytes | memoryview], size: int
    ) -> None:
        """Write the command and ``size`` bytes of dataset from ``parts``."""
        written = False
        try:
            bufs = list(frames(cx, 0x01, memoryview(command), True, self._room))
            queued, left = 0, size
            for part in parts:
                view = memoryview(part).cast("B")
                left -= len(view)
                bufs.extend(frames(cx, 0x00, view, left <= 0, self._room))
                queued += len(view)
                if queued >= CHUNK:
                    written = True
                    sendv(self.sock, bufs, self._plain)
                    bufs, queued = [], 0
            written = True
            sendv(self.sock, bufs, self._plain)
        except OSError as exc:
            self._lose(f"the connection failed: {str(exc) or 'timeout'}", abort=False)
        except BaseException:
            if written:  # the peer holds part of a message: unusable
                self.abort()
            raise

    # --- reading --------------------------------------------------------------------
    def _fill(self, n: int, deadline: float) -> None:
        """Read until ``n`` bytes are buffered, by ``deadline``; past a second's wait each
        read waits only for what is left (the socket's own timeout is set back after)."""
        shortened = False
        try:
            while len(self._buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Lost(f"no answer within {self.peer.timeout:g} s")
                if left < self.peer.timeout - 1.0:
                    self.sock.settimeout(left)  # a system call: only on a slow answer
                    shortened = True
                if _QUICKACK:  # acknowledge at once: a peer with Nagle on waits for our ACK
                    try:
                        self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                    except OSError:
                        pass
                try:
                    data = self.sock.recv(max(65536, n - len(self._buf)))
                except TimeoutError:
                    raise Lost(f"no answer within {self.peer.timeout:g} s") from None
                except OSError as exc:
                    raise Lost(f"the connection failed: {exc}") from None
                if not data:
                    raise Lost("the peer closed the connection")
                self._buf += data
        finally:
            if shortened:
                try:
                    self.sock.settimeout(self.peer.timeout)
                except OSError:
                    pass

    def _read_pdu(self, deadline: float) -> tuple[int, bytes]:
        """The next PDU: its type and its whole bytes (header included)."""
        self._fill(6, deadline)
        kind, _, length = HEAD.unpack_from(self._buf)
        if kind not in range(1, 8):
            raise Lost(f"an unknown PDU type 0x{kind:02X}")
        if length > self.limit:
            raise Lost(f"a PDU of {length} bytes, over our limit of {self.limit}")
        self._fill(6 + length, deadline)
        pdu = bytes(self._buf[: 6 + length])
        del self._buf[: 6 + length]
        return kind, pdu

    def _next_pdv(self, deadline: float) -> tuple[int, int, bytes]:
        """The next PDV (context, control header, fragment): a P-DATA-TF may carry several,
        and the rest of one message's last PDU may begin the next message."""
        while not self._pdvs:
            kind, pdu = self._read_pdu(deadline)
            if kind != 0x04:
                what = {0x05: "asked to release mid-operation", 0x07: "aborted"}
                raise Lost(f"the peer {what.get(kind, f'sent PDU type 0x{kind:02X}')}")
            self._pdvs.extend(split_pdvs(pdu))
        return self._pdvs.popleft()

    def _answer(self, cx: int, msg_id: int, field: int) -> tuple[dict[int, bytes], bytes | None]:
        """The next DIMSE message on ``cx``: the answer ``field`` to ``msg_id``; its
        command and its dataset's bytes (None without one)."""
        deadline = time.monotonic() + self.peer.timeout
        command, data = bytearray(), bytearray()
        parsed: dict[int, bytes] | None = None
        while True:
            their_cx, control, fragment = self._next_pdv(deadline)
            if their_cx != cx:
                raise Lost(f"an answer on context {their_cx}, not {cx}")
            if control & 1:
                if parsed is not None:
                    raise Lost("a second command set")
                command += fragment
                if len(command) > MAX_COMMAND:
                    raise Lost(f"a command set over {MAX_COMMAND} bytes")
                if control & 2:
                    parsed = parse_command(command)
                    if us_value(parsed, 0x0100) != field:
                        raise Lost(f"an unexpected command 0x{us_value(parsed, 0x0100) or 0:04X}")
                    if us_value(parsed, 0x0120) != msg_id:
                        raise Lost(f"an answer to message {us_value(parsed, 0x0120)}, not {msg_id}")
                    if us_value(parsed, 0x0900) is None:
                        raise Lost("an answer without a status")
                    if us_value(parsed, 0x0800) == NO_DATASET:
                        return parsed, None
            elif parsed is None:
                raise Lost("a dataset before its command")
            else:
                data += fragment
                if len(data) > MAX_DATASET:
                    raise Lost(f"an answer's data set over {MAX_DATASET} bytes")
                if control & 2:
                    return parsed, bytes(data)

    def _guard(self, op: Any) -> Any:
        try:
            return op()
        except Lost as exc:
            self._lose(exc.reason)
        except OSError as exc:
            self._lose(f"the connection failed: {str(exc) or 'timeout'}", abort=False)

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    # --- operations -----------------------------------------------------------------
    def store(
        self, cx: int, sop_class: str, sop_uid: str, parts: Iterable[bytes | memoryview], size: int
    ) -> Dataset:
        """C-STORE ``size`` bytes of dataset (from ``parts``); the status dataset."""
        if not self.is_established:
            raise Lost("the association is closed")
        msg_id = self._next_id()
        self._request(cx, store_command(msg_id, sop_class, sop_uid), parts, size)
        command, _ = self._guard(lambda: self._answer(cx, msg_id, C_STORE_RSP))
        return status_of(command)

    def find(self, cx: int, sop_class: str, query: Dataset) -> Iterator[tuple[Dataset, Dataset]]:
        """C-FIND ``query``: (status, identifier) per pending answer, then the final one
        (with an empty identifier)."""
        if not self.is_established:
            raise Lost("the association is closed")
        ts = UID(self._syntax(cx))
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        ident = encode(query, implicit, little, ts.is_deflated)
        if not ident:
            raise ValueError("pydicom could not encode the C-FIND query")
        msg_id = self._next_id()
        self._request(cx, find_command(msg_id, sop_class), [ident], len(ident))
        seconds = max(FIND_SECONDS, self.peer.timeout)
        until = time.monotonic() + seconds
        for count in range(MAX_ANSWERS + 1):  # a bound, whatever the peer sends
            if count == MAX_ANSWERS:
                self._lose(f"more than {MAX_ANSWERS} C-FIND answers")
            if time.monotonic() > until:
                self._lose(f"C-FIND answers for more than {seconds:g} s")
            command, data = self._guard(lambda: self._answer(cx, msg_id, C_FIND_RSP))
            status, found = status_of(command), Dataset()
            if data is not None:
                try:
                    found = decode(BytesIO(data), implicit, little, ts.is_deflated) or found
                except Exception as exc:
                    self._lose(f"an identifier pydicom cannot decode ({type(exc).__name__})")
            yield status, found
            if int(status.Status) not in (0xFF00, 0xFF01):
                return

    def echo(self, cx: int) -> Dataset:
        if not self.is_established:
            raise Lost("the association is closed")
        msg_id = self._next_id()
        self._request(cx, echo_command(msg_id), [], 0)
        command, _ = self._guard(lambda: self._answer(cx, msg_id, C_ECHO_RSP))
        return status_of(command)

    def _syntax(self, cx: int) -> str:
        for c in self.accepted_contexts:
            if c.context_id == cx:
                return str(c.transfer_syntax[0])
        raise ValueError(f"context {cx} was not accepted")

    # --- ending ---------------------------------------------------------------------
    def alive(self) -> bool:
        """Established, and nothing has arrived since the last answer."""
        if not self.is_established or self._buf or self._pdvs:
            return False
        if getattr(self.sock, "pending", int)():
            return False
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(0):
                return True
            self.sock.setblocking(False)  # readable: a PDU, the end, or TLS records only
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return True  # e.g. TLS 1.3 session tickets: no data for us
            finally:
                self.sock.settimeout(self.peer.timeout)
        except OSError:
            return False
        self._buf += data  # a release, an abort, or b"" (closed): not reusable
        return False

    def release(self) -> None:
        """A-RELEASE (the peer's A-RELEASE-RP awaited, within ``Timeout``); never raises."""
        if not self.alive():  # the peer released, aborted or closed already
            self._close()
            return
        try:
            self.sock.sendall(A_RELEASE_RQ().encode())
            self._read_pdu(time.monotonic() + min(self.peer.timeout, 5.0))
        except Exception:  # gone already: nothing more to say
            log.debug("releasing an association failed", exc_info=True)
        self._close()

    def abort(self) -> None:
        """A-ABORT and close; never raises."""
        if self.is_established:
            pdu = A_ABORT_RQ()
            primitive = A_ABORT()
            primitive.abort_source = 0
            pdu.from_primitive(primitive)
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(pdu.encode())
            except Exception:
                pass
        self._close()

    def _lose(self, reason: str, *, abort: bool = True) -> NoReturn:
        log.warning("%s: the association is lost: %s", self.peer.label, reason)
        if abort:
            self.abort()
        self._close()
        raise Lost(reason)

    def _close(self) -> None:
        self.is_established = False
        try:
            self.sock.close()
        except OSError:
            pass
